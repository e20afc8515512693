"""Content-addressed store of backbone features: (prompt, response) hidden states at several layers.

Symbols: N conversations, L stored layers, H hidden size.

A conversation's key is the sha256 of (backbone id, its token ids, its prompt anchor): the features are a
function of exactly these, so rows added to a data set, another source, or another split reuse whatever is
already there, and only new conversations cost a backbone pass. An interrupted run resumes where it
stopped: every part file is complete (written to a temporary name, then renamed) and the index is rebuilt
from the parts on open.

Layout of a store directory:
- `store.json`: format, backbone_id, layers, hidden_size. Written once; a store never mixes backbones or
  layer sets (opening it with others raises CheckpointError naming both).
- `part-<ns>-<pid>.safetensors`: tensors `response` (n, L, H) float32, `prompt` (n, L, H) float32,
  `num_tokens` (n,) int64; metadata `keys` (JSON list of n keys).

Layer l's feature is the decoder's final norm applied to the residual stream after l blocks (for the last
layer that is `last_hidden_state` itself). Stopping the backbone after l blocks (early exit) gives exactly
this feature, so heads fit on layer l can be served by running l blocks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidInputError, RewardError
from ..model.encoding import ChatEncoder, EncodedConversation

FORMAT = "rewardsvc.features.v2"
MANIFEST = "store.json"
_PART_GLOB = "part-*.safetensors"


def feature_key(backbone_id: str, input_ids: Sequence[int], prompt_anchor: int) -> str:
    """Identity of one conversation's features: what the backbone sees, and where the prompt ends."""
    payload = json.dumps([backbone_id, list(input_ids), int(prompt_anchor)], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Features:
    """Features of N conversations, in the order they were asked for."""

    response: torch.Tensor  # (N, L, H) float32
    prompt: torch.Tensor  # (N, L, H) float32
    num_tokens: torch.Tensor  # (N,) int64
    layers: tuple[int, ...]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(response (N, H), prompt (N, H)) at one stored layer."""
        if layer not in self.layers:
            raise InvalidInputError(f"layer {layer} is not stored; stored layers: {self.layers}", field="layer")
        i = self.layers.index(layer)
        return self.response[:, i], self.prompt[:, i]


class FeatureStore:
    """Append-only, content-addressed features of one backbone at a fixed set of layers."""

    def __init__(self, directory: str | os.PathLike, backbone_id: str, layers: Sequence[int], hidden_size: int):
        if not backbone_id:
            raise InvalidInputError("backbone_id must be a non-empty string", field="backbone_id")
        if not layers or len(set(layers)) != len(layers) or any(int(x) < 1 for x in layers):
            raise InvalidInputError(f"layers must be distinct integers >= 1, got {list(layers)}", field="layers")
        self.directory = Path(directory)
        self.backbone_id = backbone_id
        self.layers = tuple(int(x) for x in layers)
        self.hidden_size = int(hidden_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        wanted = {"format": FORMAT, "backbone_id": backbone_id, "layers": list(self.layers), "hidden_size": self.hidden_size}
        check_or_write_manifest(self.directory, MANIFEST, wanted, "features", "backbone or layer set")
        self._where: dict[str, tuple[Path, int]] = {}
        for part in sorted(self.directory.glob(_PART_GLOB)):
            with safe_open(str(part), framework="pt") as f:
                for row, key in enumerate(json.loads(f.metadata()["keys"])):
                    self._where.setdefault(key, (part, row))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Keys not stored yet, each once, in first-seen order."""
        seen: set[str] = set()
        out = []
        for key in keys:
            if key not in self._where and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def add(self, keys: Sequence[str], response: torch.Tensor, prompt: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Store one part: response/prompt (n, L, H), num_tokens (n,)."""
        n, L, H = len(keys), len(self.layers), self.hidden_size
        for name, t in (("response", response), ("prompt", prompt)):
            if tuple(t.shape) != (n, L, H):
                raise InvalidInputError(f"{name} has shape {tuple(t.shape)}, expected {(n, L, H)}", field=name)
            if not torch.isfinite(t).all():
                raise InvalidInputError(f"{name} holds non-finite values; refusing to store them", field=name)
        path = self.directory / f"part-{time.time_ns()}-{os.getpid()}.safetensors"
        tensors = {"response": response.float().contiguous(), "prompt": prompt.float().contiguous(),
                   "num_tokens": num_tokens.to(torch.int64).contiguous()}  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(list(keys)), "backbone_id": self.backbone_id})
        os.replace(tmp, path)
        for row, key in enumerate(keys):
            self._where.setdefault(key, (path, row))

    def get(self, keys: Sequence[str]) -> Features:
        """Features of `keys` in order; CheckpointError naming the first key that is not stored."""
        absent = [k for k in keys if k not in self._where]
        if absent:
            raise CheckpointError(f"{len(absent)} of {len(keys)} keys are not in {self.directory} (first: {absent[0]})")
        by_part: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            part, row = self._where[key]
            by_part.setdefault(part, []).append((i, row))
        L, H = len(self.layers), self.hidden_size
        response = torch.empty((len(keys), L, H))
        prompt = torch.empty((len(keys), L, H))
        num_tokens = torch.empty((len(keys),), dtype=torch.int64)
        for part, places in by_part.items():
            dest = torch.tensor([i for i, _ in places])
            rows = torch.tensor([r for _, r in places])
            with safe_open(str(part), framework="pt") as f:
                response[dest] = f.get_tensor("response")[rows]
                prompt[dest] = f.get_tensor("prompt")[rows]
                num_tokens[dest] = f.get_tensor("num_tokens")[rows]
        return Features(response=response, prompt=prompt, num_tokens=num_tokens, layers=self.layers)


def stored_key(store: "FeatureStore", encoder: ChatEncoder, backbone_id: str, prompt: Sequence[dict], response: str) -> str | None:
    """The store's key of (prompt, response) when the store holds it; None when it does not, or when the
    conversation cannot be encoded (over the encoder's token limit: training leaves it out too)."""
    try:
        e = encoder.encode([*prompt, {"role": "assistant", "content": response}])
    except RewardError:
        return None
    k = feature_key(backbone_id, e.input_ids, e.prompt_anchor)
    return k if k in store else None


def stored_layers(directory: str | os.PathLike) -> tuple[int, ...] | None:
    """The layers a store directory holds, or None where there is no store yet."""
    manifest = Path(directory) / MANIFEST
    if not manifest.exists():
        return None
    return tuple(int(x) for x in json.loads(manifest.read_text()).get("layers", ()))


def check_or_write_manifest(directory: Path, name: str, wanted: Mapping, holds: str, differs_by: str) -> None:
    """A store directory's manifest `name` must say `wanted` (what the caller is about to read or add); where there
    is none yet it is written, atomically. A directory made for something else is refused, naming both."""
    manifest = directory / name
    if manifest.exists():
        existing = json.loads(manifest.read_text())
        if existing != wanted:
            raise CheckpointError(
                f"{directory} holds {holds} {existing}, not the requested {wanted}; "
                f"use another directory for another {differs_by}"
            )
    else:
        _write_atomic(manifest, json.dumps(wanted, indent=1).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


FeaturesFn = Callable[[Sequence[EncodedConversation]], tuple[torch.Tensor, torch.Tensor]]
"""encoded conversations (n) -> (response (n, L, H), prompt (n, L, H)) at the store's layers."""


def extract_features(
    store: FeatureStore,
    conversations: Mapping[str, EncodedConversation],
    features_fn: FeaturesFn,
    *,
    chunk_size: int = 96,
    progress: bool = True,
) -> int:
    """Compute and store the features of every conversation (key -> encoded) the store lacks; returns how many.

    Work is saved every `chunk_size` conversations, so a killed run loses at most one chunk. Keys are processed
    in the mapping's order: put the most wanted first and a partial run is still useful.
    """
    if chunk_size < 1:
        raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}", field="chunk_size")
    todo = store.missing(conversations)
    total_tokens = sum(conversations[k].num_tokens for k in todo)
    bar = tqdm(total=total_tokens, unit="tok", desc="features", disable=not progress)
    for start in range(0, len(todo), chunk_size):
        keys = todo[start : start + chunk_size]
        encoded = [conversations[k] for k in keys]
        response, prompt = features_fn(encoded)
        store.add(keys, response, prompt, torch.tensor([e.num_tokens for e in encoded]))
        bar.update(sum(e.num_tokens for e in encoded))
    bar.close()
    return len(todo)
