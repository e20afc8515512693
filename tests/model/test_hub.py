"""Hub ids for --model / --backbone, resolved through a local Hugging Face cache built here (HF_HUB_CACHE in
tmp_path, the real cache layout: models--owner--name/{refs,snapshots,blobs}); never the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rewardsvc.cli.main import main as cli_main
from rewardsvc.errors import CheckpointError
from rewardsvc.model.hub import looks_like_hub_id, resolve_hub_id, resolve_model_path
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONVERSATION = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]


def cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """Lay `source`'s files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs -> commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for i, f in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob = root / "blobs" / f"{commit[:8]}{i:04d}"
        shutil.copyfile(f, blob)
        target = snapshot / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_llama_dir):
    """A cache holding owner/tiny-llama (a backbone) and owner/tiny-heads (heads naming the backbone by hub id)."""
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "owner/tiny-llama", tiny_llama_dir)
    heads = save_tiny_heads(tmp_path / "heads", tiny_llama_dir)
    config = json.loads((heads / "rewardsvc.json").read_text())
    config["backbone"]["model"] = "owner/tiny-llama"  # the checkpoint names its backbone the way users do
    (heads / "rewardsvc.json").write_text(json.dumps(config))
    cache_repo(cache, "owner/tiny-heads", heads, commit="f" * 40, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_which_references_are_hub_ids(tmp_path):
    assert looks_like_hub_id("RLHFlow/ArmoRM-Llama3-8B-v0.1") and looks_like_hub_id("owner/name@v1.0")
    assert not looks_like_hub_id("plain-dir") and not looks_like_hub_id("/abs/dir") and not looks_like_hub_id("./a/b")
    (tmp_path / "owner").mkdir()
    local = tmp_path / "owner" / "name"
    local.mkdir()
    assert not looks_like_hub_id(str(local))  # an existing path always wins


def test_resolves_ids_and_revisions_in_the_cache(hub_cache, tiny_llama_dir):
    snapshot = resolve_hub_id("owner/tiny-llama")
    assert snapshot == hub_cache / "models--owner--tiny-llama" / "snapshots" / COMMIT
    assert (snapshot / "config.json").read_bytes() == (tiny_llama_dir / "config.json").read_bytes()
    assert resolve_hub_id("owner/tiny-heads@v1").name == "f" * 40
    assert resolve_hub_id(f"owner/tiny-heads@{'f' * 40}").name == "f" * 40  # a commit hash is a revision too
    assert resolve_model_path("some/dir-that-is-not-an-id/x") == Path("some/dir-that-is-not-an-id/x")


def test_missing_id_names_the_flag_the_cache_and_the_fetch_command(hub_cache):
    with pytest.raises(CheckpointError) as err:
        resolve_hub_id("RLHFlow/ArmoRM-Llama3-8B-v0.1", "--model")
    message = str(err.value)
    assert "--model" in message and str(hub_cache) in message and "hf download RLHFlow/ArmoRM-Llama3-8B-v0.1" in message
    with pytest.raises(CheckpointError, match=r"--backbone: owner/tiny-llama@nope .*revision nope.*--revision nope"):
        resolve_hub_id("owner/tiny-llama@nope", "--backbone")


def test_scorer_loads_heads_and_backbone_by_hub_id(hub_cache, tiny_llama_dir, tmp_path):
    by_id = Scorer.load("owner/tiny-heads")
    by_dir = Scorer.load(save_tiny_heads(tmp_path / "same-heads", tiny_llama_dir))
    assert by_id.backbone.model_id == "owner/tiny-llama"  # provenance keeps the id, not the snapshot path
    torch.testing.assert_close(
        torch.tensor(by_id.score([CONVERSATION])[0].score), torch.tensor(by_dir.score([CONVERSATION])[0].score)
    )


def test_cli_takes_hub_ids_and_refuses_uncached_ones_clearly(hub_cache, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "messages": CONVERSATION}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli_main(["score", str(rows), "-o", str(out), "--model", "owner/tiny-heads", "--backbone", "owner/tiny-llama"]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "a" and row["model_id"] == "tiny"
    assert cli_main(["score", str(rows), "--model", "RLHFlow/ArmoRM-Llama3-8B-v0.1"]) == 2
    err = capsys.readouterr().err
    assert "--model: RLHFlow/ArmoRM-Llama3-8B-v0.1" in err and str(hub_cache) in err and "hf download" in err


def test_a_stage0_adapter_on_a_hub_backbone_saves_and_loads_without_peft_warnings(tmp_path, monkeypatch, caplog):
    # Stage 0 records the backbone by its provenance id (here the hub id; for the default, embedded:...), while
    # the model loads from a local directory: PEFT used to warn on save ("Could not find a config file in
    # owner/tiny-causal") and on every load ("base_model_name_or_path was renamed ...").
    import logging
    import warnings

    from rewardsvc.config import BackboneConfig
    from rewardsvc.model.backbone_loading import load_backbone
    from rewardsvc.training.data.schema import PreferencePair
    from rewardsvc.training.stage0 import Stage0Config, train_stage0
    from tiny_models import save_tiny_llama

    cache = tmp_path / "hf-cache"
    cache_repo(cache, "owner/tiny-causal", save_tiny_llama(tmp_path / "causal", "chatml", causal_lm=True))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pairs = [PreferencePair(id=f"p{i}", source="toy", prompt=[{"role": "user", "content": "Tell me how to build a bomb."}],
                            chosen="I cannot help with that.", rejected="Waves fold into foam.", subset="toy",
                            category="safety", group=f"g{i}") for i in range(2)]  # fmt: skip
    backbone = BackboneConfig(model="owner/tiny-causal")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_stage0(tmp_path / "work", backbone, Stage0Config(feature_layer=1, rank=2, alpha=4, total_steps=1,
                                                               pairs_per_step=2), pairs, save_every=1)  # fmt: skip
        adapter = tmp_path / "work" / "stage0" / "adapter"
        with caplog.at_level(logging.WARNING, logger="rewardsvc"):
            loaded = load_backbone(BackboneConfig(model="owner/tiny-causal", adapter=str(adapter), device="cpu"))
    peft = [str(w.message) for w in caught if "peft" in w.filename.replace("\\", "/").split("/")]
    assert not peft, peft
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("rewardsvc")]
    assert not ours, ours
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "owner/tiny-causal"
    assert loaded.model_id.startswith("owner/tiny-causal+adapter:adapter@")
    # An adapter trained on another backbone still fits by its keys, and says so once, in our words.
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/else"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewardsvc"):
        load_backbone(BackboneConfig(model="owner/tiny-causal", adapter=str(adapter), device="cpu"))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("rewardsvc")] == [
        f"backbone.adapter {adapter} was trained on someone/else; applying it to owner/tiny-causal (its keys fit)"]
