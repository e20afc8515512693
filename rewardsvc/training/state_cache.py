"""Content-addressed cache of every token's hidden state at one block: what stage 0 from a cache trains on.

Symbols: T tokens of one conversation, H hidden size, b a block count (the residual stream after b blocks,
before any norm; b = 0 is the token embeddings).

Stage 0 adapts the top k blocks below the feature layer L only. The L-k blocks under them never change, so
their output for a training conversation is computed once, stored here, and every epoch runs only the k
trained blocks from it (about k/L of a full forward and backward).

A state's key is the sha256 of (backbone id, token ids, block count): the states are a function of exactly
these, so another data set, split or k reuses what is stored and only new conversations cost a pass.
Nothing else is needed to run the blocks above: a cached conversation is one causal sequence with positions
0..T-1 (no padding, no packing), so its attention mask is the plain causal mask and its rotary positions are
`arange(T)`; both are rebuilt from T by the backbone's own modules (top_blocks.py).

Layout of a cache directory (parts are complete or absent: written to a temporary name, then renamed, and
the index is rebuilt from the parts on open, so a killed pass resumes where it stopped):
- `cache.json`: format, backbone_id, hidden_size, dtype. Written once; a cache never mixes backbones.
- `part-<ns>-<pid>.safetensors`: tensor `states` (sum of T, H) in the cache dtype (float16 by default),
  `offsets` (n + 1,) int64 (row i is states[offsets[i]:offsets[i+1]]); metadata `keys` (JSON list of n keys)
  and `blocks` (JSON list of n block counts).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidInputError
from .feature_store import check_or_write_manifest

FORMAT = "rewardsvc.state-cache.v1"
MANIFEST = "cache.json"
_PART_GLOB = "part-*.safetensors"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def state_key(backbone_id: str, input_ids: Sequence[int], block: int) -> str:
    """Identity of one conversation's states after `block` blocks of one backbone."""
    payload = json.dumps([backbone_id, [int(t) for t in input_ids], int(block)], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class StateCache:
    """Append-only, content-addressed per-token hidden states of one backbone (at any block counts)."""

    def __init__(self, directory: str | os.PathLike, backbone_id: str, hidden_size: int, dtype: str | None = None):
        """dtype: float16 (the default for a new cache) or float32; None opens an existing cache in its own."""
        if not backbone_id:
            raise InvalidInputError("backbone_id must be a non-empty string", field="backbone_id")
        manifest = Path(directory) / MANIFEST
        if dtype is None:
            dtype = json.loads(manifest.read_text()).get("dtype", "float16") if manifest.exists() else "float16"
        if dtype not in DTYPES:
            raise InvalidInputError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")
        self.directory = Path(directory)
        self.backbone_id = backbone_id
        self.hidden_size = int(hidden_size)
        self.dtype = dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        wanted = {"format": FORMAT, "backbone_id": backbone_id, "hidden_size": self.hidden_size, "dtype": dtype}
        check_or_write_manifest(self.directory, MANIFEST, wanted, "states", "backbone or dtype")
        self._where: dict[str, tuple[Path, int, int]] = {}  # key -> (part, start row, end row)
        self._open: dict[Path, object] = {}  # safe_open handles, kept for the cache's life (memory-mapped reads)
        for part in sorted(self.directory.glob(_PART_GLOB)):
            self._index(part)

    def _index(self, part: Path) -> None:
        with safe_open(str(part), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
            offsets = f.get_tensor("offsets").tolist()
        for i, key in enumerate(keys):
            self._where.setdefault(key, (part, offsets[i], offsets[i + 1]))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def num_tokens(self, key: str) -> int:
        _, start, end = self._where[key]
        return end - start

    def add(self, keys: Sequence[str], blocks: Sequence[int], states: Sequence[torch.Tensor]) -> Path:
        """Store one part: states[i] is (T_i, H) for keys[i]; returns the part's path."""
        if not (len(keys) == len(blocks) == len(states)) or not keys:
            raise InvalidInputError(f"add needs as many keys, blocks and states (>= 1), got {len(keys)}, {len(blocks)}, {len(states)}", field="keys")
        dtype = DTYPES[self.dtype]
        rows = []
        for key, s in zip(keys, states):
            if s.dim() != 2 or s.shape[1] != self.hidden_size or s.shape[0] < 1:
                raise InvalidInputError(f"states of {key[:12]} have shape {tuple(s.shape)}, expected (T >= 1, {self.hidden_size})", field="states")
            stored = s.detach().to(dtype)
            # float16 overflows to inf above 65504: refuse it rather than store a state that is not the model's.
            if not torch.isfinite(stored).all():
                raise InvalidInputError(
                    f"states of {key[:12]} are not finite in {self.dtype} (max |x| {float(s.abs().max()):.4g}); "
                    "use dtype float32", field="states",
                )  # fmt: skip
            rows.append(stored)
        offsets = [0]
        for s in rows:
            offsets.append(offsets[-1] + s.shape[0])
        path = self.directory / f"part-{time.time_ns()}-{os.getpid()}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        metadata = {"keys": json.dumps(list(keys)), "blocks": json.dumps([int(b) for b in blocks]), "backbone_id": self.backbone_id}
        save_file({"states": torch.cat(rows).contiguous(), "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        self._index(path)
        return path

    def get(self, key: str) -> torch.Tensor:
        """(T, H) float32 states of one stored key; CheckpointError if it is not stored."""
        where = self._where.get(key)
        if where is None:
            raise CheckpointError(f"state {key} is not in {self.directory}; run the caching pass first")
        part, start, end = where
        handle = self._open.get(part)
        if handle is None:
            handle = self._open[part] = safe_open(str(part), framework="pt")
        return handle.get_slice("states")[start:end].float()


def block_output_module(decoder, block: int):
    """The decoder module whose output is the residual stream after `block` blocks (0: the token embeddings)."""
    return decoder.embed_tokens if block == 0 else decoder.layers[block - 1]


def cache_states(
    cache: StateCache,
    backbone,
    conversations: Mapping[str, Sequence[int]],
    blocks: Sequence[int],
    *,
    chunk_tokens: int = 32_768,
    max_seconds: float | None = None,
    progress=None,
    bar: bool = False,
) -> dict:
    """Run the backbone over every conversation (name -> token ids) whose states at some block in `blocks`
    the cache lacks, and store all of them; one pass serves every block count (it stops after the largest).

    Work is saved every `chunk_tokens` tokens, so a killed pass loses at most one chunk; `max_seconds` stops
    between conversations (the finished ones are saved). Returns {"embedded", "tokens", "seconds", "done"}.
    `progress` is called with each conversation's token count; `bar` draws a tokens bar on stderr (the pass
    runs for an hour or more on a CPU, and a log line comes only at its end).
    `backbone` is a rewardsvc Backbone (the plain, frozen model; its model_id is the cache's backbone id).
    """
    from ..model.backbone import decoder_of, truncate_backbone

    blocks = sorted({int(b) for b in blocks})
    decoder = decoder_of(backbone.model)
    depth = len(decoder.layers)
    if not blocks or blocks[0] < 0 or blocks[-1] >= depth:
        raise InvalidInputError(f"cache blocks must lie in 0..{depth - 1} (the backbone has {depth} blocks), got {blocks}", field="blocks")
    if backbone.model_id != cache.backbone_id:
        raise InvalidInputError(f"the cache holds {cache.backbone_id}, the backbone is {backbone.model_id}", field="backbone")
    truncate_backbone(backbone, max(1, blocks[-1]))  # the pass stops after the largest block count
    captured: dict[int, torch.Tensor] = {}

    def hook_for(block: int):
        def hook(_module, _inputs, output):
            captured[block] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    # The model's own forward, observed: block b's output is the residual stream after b blocks (b = 0: the
    # embedding layer's output), exactly what the blocks above receive.
    handles = [block_output_module(decoder, b).register_forward_hook(hook_for(b)) for b in blocks]
    todo = [name for name, ids in conversations.items() if any(state_key(cache.backbone_id, ids, b) not in cache for b in blocks)]
    meter = tqdm(total=sum(len(conversations[name]) for name in todo), unit="tok", desc="state cache", disable=not bar)
    started = time.perf_counter()
    keys: list[str] = []
    block_of: list[int] = []
    states: list[torch.Tensor] = []
    pending = embedded = tokens = 0
    try:
        with torch.inference_mode():
            for name in todo:
                if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                    break
                ids = list(conversations[name])
                captured.clear()
                backbone.model(input_ids=torch.tensor([ids], device=backbone.device), use_cache=False)
                for b in blocks:
                    key = state_key(cache.backbone_id, ids, b)
                    if key not in cache and key not in keys:
                        keys.append(key)
                        block_of.append(b)
                        states.append(captured[b][0].float().cpu())
                pending += len(ids)
                embedded += 1
                tokens += len(ids)
                meter.update(len(ids))
                if progress is not None:
                    progress(len(ids))
                if pending >= chunk_tokens:
                    cache.add(keys, block_of, states)
                    keys, block_of, states, pending = [], [], [], 0
            if keys:
                cache.add(keys, block_of, states)
    finally:
        meter.close()
        for handle in handles:
            handle.remove()
    return {"embedded": embedded, "tokens": tokens, "seconds": round(time.perf_counter() - started, 3), "done": embedded == len(todo)}
