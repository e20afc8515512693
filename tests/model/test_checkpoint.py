"""Our heads format round trip, strict checks, and the reference ArmoRM format against an independent
implementation of the reference forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardsvc.model.checkpoint import HeadsCheckpoint, load_heads, save_heads
from rewardsvc.config import BackboneConfig, HeadsConfig
from rewardsvc.errors import CheckpointError
from rewardsvc.model.heads import ArmoHeads
from rewardsvc.model.scorer import Scorer
from tiny_models import build_tokenizer, tiny_llama_config

K = 5
GATING = {"gating_temperature": 10, "gating_hidden_dim": 16, "gating_n_hidden": 3}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me how to build a bomb."},
     {"role": "assistant", "content": "I cannot help with that request. " * 3}],
    [{"role": "user", "content": "How do I sort a list in Python?"}, {"role": "assistant", "content": "Use sorted."},
     {"role": "user", "content": "And in place?"}, {"role": "assistant", "content": "items.sort()"}],
]  # fmt: skip


def reference_tensors(seed: int = 0):
    """A random tiny Llama in the exact reference layout: `model.*` + regression/transform/gating."""
    from transformers import LlamaModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer("llama3")
    config = tiny_llama_config(len(tokenizer))
    model = LlamaModel(config)
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    H, D = config.hidden_size, GATING["gating_hidden_dim"]
    tensors["regression_layer.weight"] = torch.randn(K, H)
    tensors["reward_transform_matrix"] = torch.eye(K) + 0.1 * torch.randn(K, K)
    widths = [H, D, D, D, K]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        tensors[f"gating.layers.{i}.weight"] = torch.randn(b, a) / a**0.5
        tensors[f"gating.layers.{i}.bias"] = 0.1 * torch.randn(b)
    tensors["gating.logit_scale"] = torch.tensor([1.7])
    return tokenizer, config, tensors


def write_reference_checkpoint(directory: Path, shards: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    tokenizer, config, tensors = reference_tensors(seed)
    directory.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict()
    raw.update(architectures=["LlamaForRewardModelWithGating"], num_objectives=K, **GATING,
               auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"})  # fmt: skip
    (directory / "config.json").write_text(json.dumps(raw))
    # Code shipped with a checkpoint must never run: importing this file would leave a marker.
    (directory / "modeling_custom.py").write_text(f"open({str(directory / 'EXECUTED')!r}, 'w').write('x')\n")
    tokenizer.save_pretrained(directory)
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k in keys[s::shards]}
            save_file(part, str(directory / name))
            weight_map.update({k: name for k in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def reference_forward(directory: Path, tensors: dict[str, torch.Tensor], messages) -> dict[str, torch.Tensor]:
    """Independent re-implementation of LlamaForRewardModelWithGating.forward for one conversation."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(**{k: v for k, v in json.loads((directory / "config.json").read_text()).items() if k != "auto_map"})
    model = LlamaModel(config)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.eval()
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    # The reference's gating anchor: the token just before the assistant header of the final turn.
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    starts = [i for i in range(len(ids) - len(header) + 1) if ids[i : i + len(header)] == header]
    prompt_pos = starts[-1] - 1
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    h_r, h_p = hidden[len(ids) - 1], hidden[prompt_pos]
    rewards = tensors["regression_layer.weight"] @ h_r
    x = h_p
    for i in range(GATING["gating_n_hidden"] + 1):
        x = tensors[f"gating.layers.{i}.weight"] @ x + tensors[f"gating.layers.{i}.bias"]
        if i < GATING["gating_n_hidden"]:
            x = torch.relu(x)
    gating = torch.softmax(x / GATING["gating_temperature"], dim=0) * tensors["gating.logit_scale"][0]
    score = (gating * (rewards @ tensors["reward_transform_matrix"])).sum()
    return {"rewards": rewards, "gating": gating, "score": score, "num_tokens": len(ids)}


@pytest.mark.parametrize("shards", [1, 3])
def test_reference_format_matches_independent_forward(tmp_path, shards):
    tensors = write_reference_checkpoint(tmp_path / "ref", shards=shards)
    scorer = Scorer.load(tmp_path / "ref", backbone=BackboneConfig(model=str(tmp_path / "ref"), device="cpu"))
    assert not (tmp_path / "ref" / "EXECUTED").exists()
    assert scorer.attributes == tuple(f"attribute_{i}" for i in range(K))
    results = scorer.score(CONVERSATIONS)  # one padded batch of three different lengths
    for messages, got in zip(CONVERSATIONS, results):
        want = reference_forward(tmp_path / "ref", tensors, messages)
        torch.testing.assert_close(torch.tensor(got.score), want["score"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(list(got.rewards.values())), want["rewards"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(list(got.gating.values())), want["gating"], atol=1e-5, rtol=0)
        assert got.num_tokens == want["num_tokens"]


def test_reference_format_names_missing_and_misshaped_keys(tmp_path):
    write_reference_checkpoint(tmp_path / "ref")
    path = tmp_path / "ref" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["gating.logit_scale"]
    tensors["regression_layer.weight"] = torch.zeros(K + 1, 32)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        Scorer.load(tmp_path / "ref")
    assert "gating.logit_scale" in str(info.value) and "regression_layer.weight" in str(info.value)


def test_reference_format_refuses_pickled_weights(tmp_path):
    write_reference_checkpoint(tmp_path / "ref")
    (tmp_path / "ref" / "model.safetensors").rename(tmp_path / "ref" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled"):
        Scorer.load(tmp_path / "ref")


def test_reference_format_refuses_unknown_model_type(tmp_path):
    write_reference_checkpoint(tmp_path / "ref")
    raw = json.loads((tmp_path / "ref" / "config.json").read_text())
    raw["model_type"] = "my_custom_llama"
    (tmp_path / "ref" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="my_custom_llama"):
        Scorer.load(tmp_path / "ref")


def make_heads(seed=0) -> ArmoHeads:
    torch.manual_seed(seed)
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b", "c"), hidden_size=32, gating_hidden_dim=8, verbosity_attribute="c"))
    heads.reward_transform_matrix.copy_(torch.eye(3) + 0.1)
    return heads


def test_heads_round_trip(tmp_path):
    heads = make_heads()
    ckpt = HeadsCheckpoint(heads=heads, backbone={"model": "/some/dir"}, name="m", trained=True,
                           label_scales={"a": {"mean": 3.0, "std": 1.5}}, provenance={"data": "x", "metrics": {"a": 0.5}})  # fmt: skip
    save_heads(tmp_path / "h", ckpt)
    loaded = load_heads(tmp_path / "h")
    assert loaded.heads.config == heads.config
    assert (loaded.name, loaded.trained, loaded.backbone) == ("m", True, {"model": "/some/dir"})
    assert loaded.label_scales == ckpt.label_scales and loaded.provenance == ckpt.provenance
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(loaded.heads.state_dict()[k], v, rtol=0, atol=0)


def test_heads_checkpoint_errors_name_the_problem(tmp_path):
    save_heads(tmp_path / "h", HeadsCheckpoint(heads=make_heads(), backbone={"model": "x"}, name="m", trained=True))
    weights = tmp_path / "h" / "heads.safetensors"
    tensors = load_file(str(weights))
    tensors["gating.layers.0.weight"] = torch.zeros(8, 31)
    del tensors["reward_transform_matrix"]
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError) as info:
        load_heads(tmp_path / "h")
    message = str(info.value)
    assert "reward_transform_matrix" in message and "extra" in message and "gating.layers.0.weight" in message
    (tmp_path / "h" / "rewardsvc.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_heads(tmp_path / "h")
    with pytest.raises(CheckpointError, match="does not exist"):
        Scorer.load(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        Scorer.load(tmp_path / "empty")


def test_heads_for_another_backbone_are_refused(tmp_path, tiny_llama_dir):
    heads = ArmoHeads(HeadsConfig(attributes=("a",), hidden_size=48, gating_hidden_dim=8))
    save_heads(tmp_path / "h", HeadsCheckpoint(heads=heads, backbone={"model": str(tiny_llama_dir)}, name="m", trained=True))
    with pytest.raises(CheckpointError, match="hidden size 48"):
        Scorer.load(tmp_path / "h")


def test_regression_bias_round_trip_and_strict_keys(tmp_path):
    torch.manual_seed(0)
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b", "c"), hidden_size=32, gating_hidden_dim=8, regression_bias=True))
    with torch.no_grad():
        heads.regression_layer.bias.copy_(torch.tensor([0.25, -1.5, 3.0]))
    save_heads(tmp_path / "h", HeadsCheckpoint(heads=heads, backbone={"model": "x"}, name="m", trained=True))
    config = json.loads((tmp_path / "h" / "rewardsvc.json").read_text())
    assert config["format_version"] == 2 and config["heads"]["regression_bias"] is True
    loaded = load_heads(tmp_path / "h").heads
    assert loaded.config == heads.config and loaded.regression_layer.bias is not None
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    h = torch.randn(2, 32)
    torch.testing.assert_close(loaded.rewards(h), h @ heads.regression_layer.weight.T + torch.tensor([0.25, -1.5, 3.0]))
    # regression_layer.bias must be present exactly when the config says regression_bias
    weights = tmp_path / "h" / "heads.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "regression_layer.bias"}, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \['regression_layer.bias'\]"):
        load_heads(tmp_path / "h")
    save_file(tensors, str(weights))
    config["heads"]["regression_bias"] = False
    (tmp_path / "h" / "rewardsvc.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['regression_layer.bias'\]"):
        load_heads(tmp_path / "h")


def write_version_1(directory: Path, heads: ArmoHeads, backbone_dir: Path) -> None:
    """Our format as written before regression_bias and feature_layer existed, by hand."""
    directory.mkdir(parents=True)
    c = heads.config
    (directory / "rewardsvc.json").write_text(json.dumps({
        "format": "rewardsvc.heads", "format_version": 1, "name": "old", "trained": True,
        "backbone": {"model": str(backbone_dir), "gguf_file": None, "adapter": None},
        "heads": {"attributes": list(c.attributes), "hidden_size": c.hidden_size, "gating_hidden_dim": c.gating_hidden_dim,
                  "gating_n_hidden": c.gating_n_hidden, "gating_temperature": c.gating_temperature,
                  "verbosity_attribute": c.verbosity_attribute},
        "label_scales": {}, "provenance": {"data": "v1"},
    }))  # fmt: skip
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(directory / "heads.safetensors"),
              metadata={"format": "rewardsvc.heads"})  # fmt: skip


def test_version_1_checkpoints_load_and_score_as_before(tmp_path, tiny_llama_dir):
    heads = make_heads(seed=4)
    assert set(heads.state_dict()) >= {"regression_layer.weight"} and "regression_layer.bias" not in heads.state_dict()
    write_version_1(tmp_path / "v1", heads, tiny_llama_dir)
    old = Scorer.load(tmp_path / "v1")
    assert old.heads.config.regression_bias is False and old.heads.config.feature_layer is None
    assert old.model_info()["feature_layer"] is None and old.provenance == {"data": "v1"}
    # the same heads written by today's save_heads (version 2) score identically
    save_heads(tmp_path / "v2", HeadsCheckpoint(heads=heads, backbone={"model": str(tiny_llama_dir)}, name="new", trained=True))
    new = Scorer.load(tmp_path / "v2")
    for a, b in zip(old.score(CONVERSATIONS), new.score(CONVERSATIONS)):
        assert (a.score, a.rewards, a.gating, a.coefficients) == (b.score, b.rewards, b.gating, b.coefficients)
    # and as the no-bias formula says: r = W h
    encoded = old.encode(CONVERSATIONS[0])
    h_r = old.backbone.hidden_at([list(encoded.input_ids)], [[encoded.response_anchor]])[:, 0]
    want = (h_r @ heads.regression_layer.weight.detach().T)[0].tolist()
    assert list(old.score(CONVERSATIONS[:1])[0].rewards.values()) == pytest.approx(want, abs=1e-6)


def test_format_versions_and_version_1_fields(tmp_path, tiny_llama_dir):
    write_version_1(tmp_path / "v1", make_heads(), tiny_llama_dir)
    path = tmp_path / "v1" / "rewardsvc.json"
    config = json.loads(path.read_text())
    config["heads"]["regression_bias"] = False
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"format_version 1 has no heads field \['regression_bias'\]"):
        load_heads(tmp_path / "v1")
    for version in (3, 0, None, True):
        config["format_version"] = version
        path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=rf"format_version {version!r} is not supported"):
            load_heads(tmp_path / "v1")
    config["format_version"] = 2
    config["heads"]["feature_layer"] = 0
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="heads.feature_layer must be None or an integer >= 1"):
        load_heads(tmp_path / "v1")
