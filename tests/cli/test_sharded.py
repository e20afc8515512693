"""Sharded scoring under torchrun (2 CPU processes, gloo): the merged output equals the single-process output
(ids, order, error rows, scores within 1e-5); shards cover every row once and keep groups whole; a re-run
resumes each rank's part after its last complete row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardsvc.cli.batch_io import RawRow, read_jsonl
from rewardsvc.cli.batch_io import complete_jsonl_rows, input_sha256
from rewardsvc.cli.sharded import _finished, merge_parts, part_path, plan_shards
from rewardsvc.errors import InvalidInputError
from tiny_models import save_tiny_heads

BIN = Path(sys.executable).parent
SCORE_FIELDS = ("score", "rewards", "gating", "coefficients")


def conversation(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {i}: what is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital of France. " * (i % 4 + 1)}]  # fmt: skip


def write_input(path: Path, group_field: bool = False) -> Path:
    lines = [json.dumps({"id": f"r{i}", "messages": conversation(i), **({"g": i % 3} if group_field else {})})
             for i in range(11)]  # fmt: skip
    lines.insert(3, "not json")  # an error row in rank 0's shard
    lines.insert(6, json.dumps({"id": "no-response", "messages": [{"role": "user", "content": "x"}]}))
    lines.append(lines[1])  # a duplicate of a row of the other shard
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def heads(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("heads"), tiny_llama_dir)


def score(*argv: str, torchrun: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # --standalone: a free local rendezvous port, so concurrent runs on one machine do not collide
    launcher = ["torchrun", "--standalone", "--nproc-per-node", "2"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "rewardsvc", "score", *argv], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r.get("id") for r in got] == [r.get("id") for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w)
        if "error" in w:
            assert g == w
            continue
        for key in set(w) - set(SCORE_FIELDS):
            assert g[key] == w[key], key
        for key in SCORE_FIELDS:
            a = torch.tensor(list(g[key].values()) if isinstance(g[key], dict) else [g[key]])
            b = torch.tensor(list(w[key].values()) if isinstance(w[key], dict) else [w[key]])
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_two_processes_equal_one(heads, tmp_path):
    source = write_input(tmp_path / "in.jsonl")
    common = ["--model", str(heads), "--device", "cpu", "--chunk-size", "4"]
    one = score(str(source), "-o", str(tmp_path / "one.jsonl"), *common, torchrun=False)
    two = score(str(source), "-o", str(tmp_path / "two.jsonl"), *common, torchrun=True)
    assert one.returncode == 1 and two.returncode == 1, two.stderr[-3000:]  # 1: the input has error rows
    assert "rank 0/2" in two.stderr and "rank 1/2" in two.stderr and "merged 2 parts" in two.stderr
    want = read(tmp_path / "one.jsonl")
    assert len(want) == 14 and sum("error" in r for r in want) == 2
    assert_same_rows(read(tmp_path / "two.jsonl"), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "one.jsonl", "two.jsonl"]  # parts removed


def test_torchrun_resumes_each_part_and_keeps_groups_whole(heads, tmp_path):
    from rewardsvc.cli.score_sources import LocalSource
    from rewardsvc.cli.score_pipeline import score_rows
    from rewardsvc.model.scorer import Scorer

    source = write_input(tmp_path / "in.jsonl", group_field=True)
    inputs = list(read_jsonl(source))
    reference = tmp_path / "reference.jsonl"
    score_rows(inputs, reference, LocalSource(Scorer.load(heads), None), group_by="g")  # one process
    want = read(reference)
    # A killed earlier run: rank 1 had written its first row (marked, to see it is kept, not recomputed) and
    # half of its second.
    out = tmp_path / "out.jsonl"
    shards = plan_shards(inputs, 2, "g")
    first = dict(want[shards[1][0]], score=123.0)
    part_path(out, 1, 2).write_text(json.dumps(first) + "\n" + json.dumps(want[shards[1][1]])[:30])
    run = score(str(source), "-o", str(out), "--model", str(heads), "--device", "cpu", "--group-by", "g", torchrun=True)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "resumed after row 1" in run.stderr
    got = read(out)
    assert got[shards[1][0]]["score"] == 123.0
    got[shards[1][0]]["score"] = want[shards[1][0]]["score"]
    assert_same_rows(got, want)


def rows(n: int, groups: list[int] | None = None) -> list[RawRow]:
    return [RawRow(i + 1, {"id": i, **({"g": groups[i]} if groups else {})}) for i in range(n)]


@pytest.mark.parametrize("n, size", [(0, 2), (1, 2), (7, 2), (7, 3), (10, 4)])
def test_contiguous_shards_cover_every_row_once(n, size):
    shards = plan_shards(rows(n), size)
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in rank order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_group_shards_keep_groups_whole():
    groups = [0, 1, 0, 2, 2, 2, 1, 3, 0, 4]
    data = rows(10, groups) + [RawRow(11, None, error="not JSON")]
    shards = plan_shards(data, 2, "g")
    assert sorted(i for s in shards for i in s) == list(range(11))
    for g in set(groups):
        owners = {r for r, s in enumerate(shards) for i in s if i < 10 and groups[i] == g}
        assert len(owners) == 1, (g, shards)
    assert all(s == sorted(s) for s in shards)


def test_merge_puts_rows_back_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    shards = [[0, 2, 3], [1, 4]]
    for rank, indices in enumerate(shards):
        part_path(out, rank, 2).write_text("".join(json.dumps({"id": i}) + "\n" for i in indices))
    merge_parts(out, shards, 5)
    assert [r["id"] for r in complete_jsonl_rows(out)[0]] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_merge_refuses_a_short_part(tmp_path):
    out = tmp_path / "out.jsonl"
    part_path(out, 0, 2).write_text(json.dumps({"id": 0}) + "\n")
    part_path(out, 1, 2).write_text("")
    with pytest.raises(Exception, match="has 0 rows, its shard 1"):
        merge_parts(out, [[0], [1]], 2)
    assert not out.exists()


def test_an_unfinished_unsharded_output_is_not_taken_for_done(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0}) + "\n")
    with pytest.raises(InvalidInputError, match="--overwrite"):
        _finished(out, rows(3), overwrite=False)
    assert _finished(out, rows(1), overwrite=False)  # complete: a re-run leaves it alone
    assert not _finished(out, rows(3), overwrite=True)


def test_a_finished_output_of_an_edited_input_is_not_complete(tmp_path):
    inputs = rows(3)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": r.id, "input_sha256": input_sha256(r)}) + "\n" for r in inputs))
    assert _finished(out, inputs, overwrite=False)
    edited = [inputs[0], RawRow(2, {"id": 1, "prompt": "edited"}), inputs[2]]
    with pytest.raises(InvalidInputError, match=r"row 2 was written for other content than input row 2 \(line 2, id 1\)"):
        _finished(out, edited, overwrite=False)
