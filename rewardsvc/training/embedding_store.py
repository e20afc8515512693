"""Resumable extraction of (response, prompt) embeddings into safetensors shards.

Symbols: N rows, H hidden size, n rows of one shard.

Layout of `out_dir`:
- `manifest.json`: format, backbone_id, num_rows, shard_size, num_shards and the fingerprint (sha256) of the
  whole ordered row-id list. Written (atomically) before the first shard, so a killed run can be resumed and a
  foreign run recognised.
- `shard-00000.safetensors`, ...: tensors `response` (n, H) float32, `prompt` (n, H) float32, `num_tokens` (n,)
  int64; metadata backbone_id, row_ids (JSON), shard_index, fingerprint (of that shard's ids).

Every file is written to a temporary name in the same directory and then `os.replace`d, so a killed run leaves
complete shards and at most a stray temporary file, which nothing reads. Embeddings of two backbones (or of two
row lists) are never mixed: a mismatch raises CheckpointError naming both, unless `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

FORMAT = "rewardsvc.embeddings.v1"
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")
_TMP_SUFFIX = ".tmp"
_TENSORS = ("response", "prompt", "num_tokens")


@dataclass(frozen=True)
class EmbeddingSet:
    """Embeddings of N rows from one backbone, in row order."""

    ids: list[str]
    response: torch.Tensor  # (N, H) float32, h_r
    prompt: torch.Tensor  # (N, H) float32, h_p
    num_tokens: torch.Tensor  # (N,) int64
    backbone_id: str

    def __len__(self) -> int:
        return len(self.ids)


EmbedFn = Callable[[Sequence[Any]], dict[str, torch.Tensor]]
"""rows_chunk -> {"response": (n, H) float32, "prompt": (n, H) float32, "num_tokens": (n,) int64}."""


def fingerprint(ids: Sequence[str]) -> str:
    """sha256 of the ordered id list: equal fingerprints mean the same rows in the same order."""
    return hashlib.sha256(json.dumps(list(ids), ensure_ascii=False).encode("utf-8")).hexdigest()


def shard_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / f"shard-{index:05d}.safetensors"


def extract_embeddings(
    rows: Sequence[Any],
    embed_fn: EmbedFn,
    out_dir: str | os.PathLike,
    *,
    backbone_id: str,
    shard_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> EmbeddingSet:
    """Embed `rows` (each with a str `id`) shard by shard into `out_dir`, skipping shards already complete.

    `embed_fn` is called once per missing shard with that shard's rows. Raises CheckpointError if `out_dir`
    holds embeddings of another backbone_id, another row list or another shard_size (unless `overwrite`,
    which deletes this store's files in `out_dir`, and only those).
    """
    if not backbone_id:
        raise InvalidInputError("backbone_id must be a non-empty string", field="backbone_id")
    if shard_size < 1:
        raise InvalidInputError(f"shard_size must be >= 1, got {shard_size}", field="shard_size")
    rows = list(rows)
    ids = [_row_id(row, i) for i, row in enumerate(rows)]
    if not ids:
        raise InvalidInputError("rows is empty: nothing to embed", field="rows")
    if len(set(ids)) != len(ids):
        raise InvalidInputError(f"row ids must be unique; {len(ids) - len(set(ids))} duplicates", field="rows.id")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(ids) // shard_size)
    manifest = {
        "format": FORMAT,
        "backbone_id": backbone_id,
        "num_rows": len(ids),
        "shard_size": shard_size,
        "num_shards": num_shards,
        "fingerprint": fingerprint(ids),
    }
    if overwrite:
        _remove_store_files(out)
    else:
        _check_compatible(out, manifest)
    _write_json_atomic(out / MANIFEST, manifest)

    chunks = [ids[i * shard_size : (i + 1) * shard_size] for i in range(num_shards)]
    done = {i for i in range(num_shards) if _shard_is_complete(out, i, chunks[i], backbone_id)}
    hidden = _hidden_size(shard_path(out, min(done))) if done else None
    bar = tqdm(total=len(ids), unit="row", desc="embeddings", disable=not progress)
    bar.update(sum(len(chunks[i]) for i in done))
    for index in range(num_shards):
        if index in done:
            continue
        chunk = rows[index * shard_size : (index + 1) * shard_size]
        chunk_ids = chunks[index]
        tensors = _validated_output(embed_fn(chunk), len(chunk), hidden, index)
        hidden = tensors["response"].shape[1]
        metadata = {
            "format": FORMAT,
            "backbone_id": backbone_id,
            "row_ids": json.dumps(chunk_ids, ensure_ascii=False),
            "shard_index": str(index),
            "fingerprint": fingerprint(chunk_ids),
        }
        _save_atomic(tensors, shard_path(out, index), metadata)
        bar.update(len(chunk))
    bar.close()
    return load_embeddings(out)


def load_embeddings(out_dir: str | os.PathLike) -> EmbeddingSet:
    """Read back a complete store; raises CheckpointError naming the missing or inconsistent shard."""
    out = Path(out_dir)
    manifest = _read_manifest(out)
    if manifest is None:
        raise CheckpointError(f"{out} has no {MANIFEST}: not an embedding store (or never started)")
    backbone_id = manifest["backbone_id"]
    ids: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in _TENSORS}
    for index in range(manifest["num_shards"]):
        path = shard_path(out, index)
        if not path.exists():
            raise CheckpointError(
                f"{path} is missing ({index} of {manifest['num_shards']} shards present in order); "
                "re-run extract_embeddings with the same rows to resume"
            )
        metadata, tensors = _read_shard(path)
        if metadata.get("backbone_id") != backbone_id:
            raise CheckpointError(
                f"{path} holds embeddings of backbone {metadata.get('backbone_id')!r} but the store's manifest "
                f"says {backbone_id!r}; refusing to mix models"
            )
        ids.extend(json.loads(metadata["row_ids"]))
        for name in _TENSORS:
            parts[name].append(tensors[name])
    if len(ids) != manifest["num_rows"] or fingerprint(ids) != manifest["fingerprint"]:
        raise CheckpointError(f"shards in {out} hold {len(ids)} rows that do not match its manifest's row list")
    return EmbeddingSet(
        ids=ids,
        response=torch.cat(parts["response"]),  # (N, H)
        prompt=torch.cat(parts["prompt"]),  # (N, H)
        num_tokens=torch.cat(parts["num_tokens"]),  # (N,)
        backbone_id=backbone_id,
    )


def _row_id(row: Any, index: int) -> str:
    value = row.get("id") if isinstance(row, dict) else getattr(row, "id", None)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"rows[{index}] has no non-empty str `id` (got {value!r})", field=f"rows[{index}].id")
    return value


def _check_compatible(out: Path, wanted: dict) -> None:
    """Refuse a directory holding another backbone's, another row list's or another layout's shards."""
    existing = _read_manifest(out)
    if existing is not None:
        if existing.get("backbone_id") != wanted["backbone_id"]:
            raise CheckpointError(
                f"{out} holds embeddings of backbone {existing.get('backbone_id')!r}, not of the requested "
                f"{wanted['backbone_id']!r}; use another directory or overwrite=True"
            )
        if existing.get("fingerprint") != wanted["fingerprint"]:
            raise CheckpointError(
                f"{out} holds embeddings (backbone {existing.get('backbone_id')!r}) of a different row list "
                f"({existing.get('num_rows')} rows, fingerprint {str(existing.get('fingerprint'))[:12]}) than the "
                f"requested one ({wanted['num_rows']} rows, fingerprint {wanted['fingerprint'][:12]}); "
                "use another directory or overwrite=True"
            )
        if existing.get("shard_size") != wanted["shard_size"]:
            raise CheckpointError(
                f"{out} was written with shard_size {existing.get('shard_size')}, not {wanted['shard_size']}; "
                "resume with the same shard_size or overwrite=True"
            )
    # Shards without a manifest (copied in by hand, or a manifest deleted): each must still be ours.
    for path in sorted(p for p in out.iterdir() if _SHARD_RE.match(p.name)):
        found = _shard_backbone(path)
        if found is not None and found != wanted["backbone_id"]:
            raise CheckpointError(
                f"{path} holds embeddings of backbone {found!r}, not of the requested {wanted['backbone_id']!r}; "
                "use another directory or overwrite=True"
            )


def _shard_is_complete(out: Path, index: int, chunk_ids: list[str], backbone_id: str) -> bool:
    """Whether shard `index` already holds exactly these rows of this backbone (header only, no tensor read)."""
    path = shard_path(out, index)
    if not path.exists():
        return False
    try:
        metadata, shapes = _read_header(path)
    except CheckpointError as error:
        logger.warning("embedding store: recomputing unreadable shard %s (%s)", path, error)
        return False
    if metadata.get("backbone_id") != backbone_id:
        raise CheckpointError(
            f"{path} holds embeddings of backbone {metadata.get('backbone_id')!r}, not of the requested "
            f"{backbone_id!r}; refusing to mix models"
        )
    if json.loads(metadata["row_ids"]) != chunk_ids or metadata.get("fingerprint") != fingerprint(chunk_ids):
        raise CheckpointError(
            f"{path} holds other rows than shard {index} of the requested row list; use overwrite=True"
        )
    n = len(chunk_ids)
    ok = len(shapes["response"]) == 2 and shapes["response"][0] == n and shapes["prompt"] == shapes["response"]
    ok = ok and shapes["num_tokens"] == (n,)
    if not ok:
        logger.warning("embedding store: recomputing shard %s whose tensors do not match its %d rows", path, n)
    return ok


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Metadata and tensor shapes of a shard; CheckpointError if it is not one of ours."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            missing = [name for name in _TENSORS if name not in handle.keys()]
            if missing:
                raise CheckpointError(f"{path} lacks tensors {missing}")
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in _TENSORS}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors shard: {error}") from error
    if "row_ids" not in metadata or "backbone_id" not in metadata:
        raise CheckpointError(f"{path} lacks the backbone_id/row_ids metadata of an embedding shard")
    return metadata, shapes


def _read_shard(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    metadata, _ = _read_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return metadata, {name: handle.get_tensor(name) for name in _TENSORS}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors shard: {error}") from error


def _shard_backbone(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("backbone_id")
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable: recomputed later if it is part of this row list


def _hidden_size(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("response").get_shape()[1])


def _validated_output(output: Any, n: int, hidden: int | None, index: int) -> dict[str, torch.Tensor]:
    if not isinstance(output, dict) or any(name not in output for name in _TENSORS):
        keys = sorted(output) if isinstance(output, dict) else type(output).__name__
        raise InvalidInputError(f"embed_fn must return a dict with {list(_TENSORS)}, got {keys}", field="embed_fn")
    response = torch.as_tensor(output["response"]).detach().to("cpu", torch.float32).contiguous()
    prompt = torch.as_tensor(output["prompt"]).detach().to("cpu", torch.float32).contiguous()
    num_tokens = torch.as_tensor(output["num_tokens"]).detach().to("cpu", torch.int64).contiguous()
    where = f"embed_fn output for shard {index}"
    if response.ndim != 2 or response.shape[0] != n:
        raise InvalidInputError(f"{where}: response must be ({n}, H), got {tuple(response.shape)}", field="response")
    if hidden is not None and response.shape[1] != hidden:
        raise InvalidInputError(
            f"{where}: response has H={response.shape[1]}, earlier shards {hidden}", field="response"
        )
    if prompt.shape != response.shape:
        raise InvalidInputError(
            f"{where}: prompt {tuple(prompt.shape)} differs from response {tuple(response.shape)}", field="prompt"
        )
    if tuple(num_tokens.shape) != (n,):
        raise InvalidInputError(
            f"{where}: num_tokens must be ({n},), got {tuple(num_tokens.shape)}", field="num_tokens"
        )
    if not (torch.isfinite(response).all() and torch.isfinite(prompt).all()):
        raise InvalidInputError(f"{where}: non-finite embeddings", field="response")
    return {"response": response, "prompt": prompt, "num_tokens": num_tokens}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync(tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old state or the whole shard


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    # Without it a power cut after os.replace could leave a renamed but empty file.
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    return manifest


def _remove_store_files(out: Path) -> None:
    """overwrite=True: delete this store's files only (manifest, shards, temporaries), never anything else."""
    for path in out.iterdir():
        name = path.name.removesuffix(_TMP_SUFFIX)
        if path.is_file() and (name == MANIFEST or _SHARD_RE.match(name)):
            path.unlink()
