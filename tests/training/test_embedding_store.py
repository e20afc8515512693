"""Resumable, never-mixing, atomic embedding shards."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from rewardsvc.training.embedding_store import extract_embeddings, fingerprint, load_embeddings, shard_path
from rewardsvc.errors import CheckpointError, InvalidInputError

H = 6


@dataclass(frozen=True)
class Row:
    id: str


def _embedding(row_id: str, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{row_id}/{salt}".encode()))
    return torch.randn(2, H, generator=g)


class CountingEmbedder:
    """embed_fn that records its calls and can fail on the n-th one (a killed run)."""

    def __init__(self, fail_on_call: int | None = None, salt: int = 0):
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call
        self.salt = salt

    def __call__(self, rows):
        self.calls.append([row.id for row in rows])
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        pairs = torch.stack([_embedding(row.id, self.salt) for row in rows])  # (n, 2, H)
        return {
            "response": pairs[:, 0],
            "prompt": pairs[:, 1].double(),  # any float dtype is accepted and stored as float32
            "num_tokens": torch.tensor([len(row.id) for row in rows]),
        }


ROWS = [Row(f"row-{i}") for i in range(10)]


def test_round_trip_shards_metadata_and_manifest(tmp_path):
    embed = CountingEmbedder()
    result = extract_embeddings(ROWS, embed, tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    assert [len(c) for c in embed.calls] == [4, 4, 2]
    loaded = load_embeddings(tmp_path)
    for got in (result, loaded):
        assert got.ids == [r.id for r in ROWS] and got.backbone_id == "tiny-a" and len(got) == 10
        expected = torch.stack([_embedding(r.id) for r in ROWS])
        assert torch.equal(got.response, expected[:, 0]) and got.response.dtype == torch.float32
        assert torch.equal(got.prompt, expected[:, 1].double().float())
        assert torch.equal(got.num_tokens, torch.tensor([len(r.id) for r in ROWS]))
        assert got.num_tokens.dtype == torch.int64
    with safe_open(str(shard_path(tmp_path, 1)), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["backbone_id"] == "tiny-a" and meta["shard_index"] == "1"
    assert json.loads(meta["row_ids"]) == [f"row-{i}" for i in range(4, 8)]
    assert meta["fingerprint"] == fingerprint([f"row-{i}" for i in range(4, 8)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone_id"] == "tiny-a" and manifest["num_rows"] == 10
    assert manifest["fingerprint"] == fingerprint([r.id for r in ROWS])


def test_resume_skips_finished_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(
            ROWS, CountingEmbedder(fail_on_call=2), tmp_path, backbone_id="tiny-a", shard_size=4, progress=False
        )
    assert shard_path(tmp_path, 0).exists() and not shard_path(tmp_path, 1).exists()
    with pytest.raises(CheckpointError, match="shard-00001.safetensors is missing"):
        load_embeddings(tmp_path)
    embed = CountingEmbedder()
    result = extract_embeddings(ROWS, embed, tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    assert embed.calls == [[f"row-{i}" for i in range(4, 8)], ["row-8", "row-9"]]
    assert torch.equal(result.response, torch.stack([_embedding(r.id)[0] for r in ROWS]))
    again = CountingEmbedder()
    extract_embeddings(ROWS, again, tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    assert again.calls == []


def test_refuses_another_backbone_or_row_list_unless_overwrite(tmp_path):
    extract_embeddings(ROWS, CountingEmbedder(), tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    with pytest.raises(CheckpointError, match=r"backbone 'tiny-a', not of the requested 'tiny-b'"):
        extract_embeddings(ROWS, CountingEmbedder(), tmp_path, backbone_id="tiny-b", shard_size=4, progress=False)
    with pytest.raises(CheckpointError, match="different row list"):
        extract_embeddings(ROWS[:9], CountingEmbedder(), tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    with pytest.raises(CheckpointError, match="shard_size 4, not 5"):
        extract_embeddings(ROWS, CountingEmbedder(), tmp_path, backbone_id="tiny-a", shard_size=5, progress=False)
    # A shard of another backbone without its manifest (copied in by hand) is refused too.
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"'tiny-a', not of the requested 'tiny-b'"):
        extract_embeddings(ROWS, CountingEmbedder(), tmp_path, backbone_id="tiny-b", shard_size=4, progress=False)
    (tmp_path / "unrelated.txt").write_text("keep me")
    embed = CountingEmbedder(salt=1)
    result = extract_embeddings(
        ROWS, embed, tmp_path, backbone_id="tiny-b", shard_size=4, progress=False, overwrite=True
    )
    assert len(embed.calls) == 3 and result.backbone_id == "tiny-b"
    assert torch.equal(result.response, torch.stack([_embedding(r.id, 1)[0] for r in ROWS]))
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"


def test_leftover_temporary_file_is_ignored(tmp_path):
    extract_embeddings(ROWS, CountingEmbedder(), tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    shard_path(tmp_path, 2).unlink()
    # What a run killed inside save_file leaves behind: a half-written temporary, never the shard itself.
    (tmp_path / "shard-00002.safetensors.tmp").write_bytes(b"\x00garbage")
    embed = CountingEmbedder()
    result = extract_embeddings(ROWS, embed, tmp_path, backbone_id="tiny-a", shard_size=4, progress=False)
    assert embed.calls == [["row-8", "row-9"]]
    assert result.ids[-2:] == ["row-8", "row-9"]
    assert not (tmp_path / "shard-00002.safetensors.tmp").exists()  # replaced by the completed shard


def test_bad_rows_and_embed_outputs_are_named(tmp_path):
    with pytest.raises(InvalidInputError, match="duplicates"):
        extract_embeddings([Row("x"), Row("x")], CountingEmbedder(), tmp_path, backbone_id="a", progress=False)
    with pytest.raises(InvalidInputError, match=r"rows\[1\] has no non-empty str `id`"):
        extract_embeddings([Row("x"), object()], CountingEmbedder(), tmp_path, backbone_id="a", progress=False)

    def wrong_shape(rows):
        return {"response": torch.zeros(len(rows) + 1, H), "prompt": torch.zeros(len(rows), H),
                "num_tokens": torch.zeros(len(rows))}

    with pytest.raises(InvalidInputError, match=r"shard 0: response must be \(3, H\)"):
        extract_embeddings(ROWS[:3], wrong_shape, tmp_path / "w", backbone_id="a", progress=False)
    assert list((tmp_path / "w").glob("shard-*")) == []
