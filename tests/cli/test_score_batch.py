"""`rewardsvc score` as a batch job on the tiny random model: resume after SIGKILL, torn lines, Parquet in
and out, dedupe, --group-by, and every file error before the model loads. Scores are checked against the
library's own Scorer.score on the same conversations (an independent path: no CLI code)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardsvc.cli import main as cli
from rewardsvc.cli.score_sources import LocalSource
from rewardsvc.cli.batch_io import conversation_of
from rewardsvc.cli.score_pipeline import score_rows
from rewardsvc.cli.batch_io import read_output, read_rows
from rewardsvc.config import ScorerConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.scorer import Scorer
from tiny_models import save_tiny_heads

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def heads_dir(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("cli-heads"), tiny_llama_dir)


@pytest.fixture(scope="module")
def scorer(heads_dir):
    return Scorer.load(heads_dir, config=ScorerConfig())  # the CLI's defaults


def rows_of(n: int, distinct: int | None = None) -> list[dict]:
    """n rows; with `distinct`, row i repeats conversation i % distinct (ids stay unique)."""
    distinct = distinct or n
    return [{"id": f"r{i}", "prompt": f"Question {i % distinct}?", "response": f"Answer {i % distinct}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_rows_match(got: list[dict], expected_rows: list[dict], scorer, tol: float = 1e-6) -> None:
    """Every input row exactly once, in order, with the scorer's own score for its conversation."""
    assert [g["id"] for g in got] == [r["id"] for r in expected_rows]
    want = scorer.score([conversation_of(r) for r in expected_rows])
    for g, w in zip(got, want):
        assert abs(g["score"] - w.score) <= tol and g["num_tokens"] == w.num_tokens
        assert all(abs(g["rewards"][k] - v) <= tol for k, v in w.rewards.items())
        assert all(abs(g["gating"][k] - v) <= tol for k, v in w.gating.items())


def assert_same_rows(got: list[dict], want: list[dict], tol: float = 1e-6) -> None:
    """Row for row: the same keys, ids and strings; numbers equal to float precision (a different chunking
    puts conversations in other padded batches, which moves the last bits)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["id"] == w["id"]
        for key, value in w.items():
            if isinstance(value, float):
                assert abs(g[key] - value) <= tol, key
            elif isinstance(value, dict) and key != "group":
                assert g[key].keys() == value.keys() and all(abs(g[key][k] - v) <= tol for k, v in value.items()), key
            else:
                assert g[key] == value, key


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_file(tmp_path, heads_dir, scorer, capsys):
    rows = rows_of(120, distinct=90)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["score", str(src), "-o", str(out), "--model", str(heads_dir), "--chunk-size", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "rewardsvc.cli", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n") >= 4):  # one chunk is durable: kill now
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no output row within 240 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < len(rows), f"the kill came too late ({written} rows written)"

    # The same command again (in this process: it saves a second interpreter start and torch import).
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"120 rows, resumed after row {written}; {120 - written} written" in err, err

    fresh = tmp_path / "fresh.jsonl"
    summary = score_rows(read_rows(src), fresh, LocalSource(scorer, None), chunk_size=4)
    assert summary.written == 120 and summary.unique == 90  # each distinct conversation scored once
    got = read_output(out)
    assert_same_rows(got, read_output(fresh))
    assert_rows_match(got, rows, scorer)


def test_a_torn_last_line_is_rewritten_and_a_foreign_output_is_refused(tmp_path, scorer):
    rows = rows_of(7)
    src = read_rows(write_jsonl(tmp_path / "in.jsonl", rows))
    out = tmp_path / "out.jsonl"
    backend = LocalSource(scorer, None)
    score_rows(src[:4], out, backend, chunk_size=2)  # a run over the first 4 rows...
    with open(out, "ab") as f:
        f.write(b'{"id": "r4", "score": 0.1')  # ...and a torn write of the 5th
    summary = score_rows(src, out, backend, chunk_size=2)
    assert summary.resumed == 4 and summary.written == 3 and summary.unique == 3
    assert_rows_match(read_output(out), rows, scorer)
    assert out.read_bytes().endswith(b"}\n")

    other = read_rows(write_jsonl(tmp_path / "other.jsonl", [{**r, "id": f"x{i}"} for i, r in enumerate(rows)]))
    with pytest.raises(Exception, match="row 1 has id 'r0' but input row 1 .* has id 'x0'.*--overwrite"):
        score_rows(other, out, backend)
    summary = score_rows(other, out, backend, overwrite=True)
    assert summary.resumed == 0 and [r["id"] for r in read_output(out)] == [f"x{i}" for i in range(7)]


def test_a_resume_over_an_edited_input_row_stops_and_names_it(tmp_path, heads_dir, scorer, capsys):
    rows = rows_of(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    source = LocalSource(scorer, None)
    score_rows(read_rows(src)[:4], out, source, chunk_size=2)  # a run that stopped after 4 rows
    kept = out.read_bytes()
    assert [len(r["input_sha256"]) for r in read_output(out)] == [64] * 4
    write_jsonl(src, [*rows[:2], {**rows[2], "response": "Another answer."}, *rows[3:]])  # same ids, row 3 edited
    with pytest.raises(InvalidInputError, match=r"row 3 was written for other content than input row 3 \(line 3, id 'r2'\).*--overwrite"):
        score_rows(read_rows(src), out, source)
    assert cli.main(["score", str(src), "-o", str(out), "--model", str(heads_dir)]) == 2
    assert "row 3 was written for other content" in capsys.readouterr().err
    assert out.read_bytes() == kept  # nothing written, nothing lost
    # Key order and spacing are not content: the original rows, written differently, resume.
    src.write_text("".join(json.dumps(dict(reversed(r.items())), separators=(" , ", " : ")) + "\n" for r in rows))
    summary = score_rows(read_rows(src), out, source, chunk_size=2)
    assert summary.resumed == 4 and summary.written == 2
    assert_rows_match(read_output(out), rows, scorer)


def test_parquet_round_trip_and_resume(tmp_path, scorer):
    rows = rows_of(6) + [{"id": "bad", "messages": [{"role": "user", "content": "no response"}]}]
    messages = [conversation_of(r) for r in rows[:6]] + [rows[6]["messages"]]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "messages": messages}), src)
    out = tmp_path / "out.parquet"
    backend = LocalSource(scorer, None)
    score_rows(read_rows(src)[:3], out, backend, chunk_size=2)  # a finished partial run, then the full input
    summary = score_rows(read_rows(src), out, backend, chunk_size=2)
    assert summary.resumed == 3 and summary.errors == 1
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    table = pq.read_table(out)  # a real Parquet file, nested attributes as struct columns
    assert pa.types.is_struct(table.schema.field("rewards").type) and table.num_rows == 7
    got = read_output(out)
    assert_rows_match(got[:6], rows[:6], scorer)
    assert got[6]["id"] == "bad" and "last message must be the assistant" in got[6]["error"]
    # JSONL of the same input gives the same rows (Parquet's nulls aside).
    jsonl = tmp_path / "out.jsonl"
    score_rows(read_rows(src), jsonl, backend)
    assert_same_rows(read_output(jsonl), got)


def test_group_by_scores_groups_and_names_a_row_with_another_prompt(tmp_path, scorer):
    rows = [
        {"id": "a1", "qid": 1, "prompt": "Name a colour.", "response": "Red."},
        {"id": "b1", "qid": 2, "prompt": "Name a fruit.", "response": "Apple."},
        {"id": "a2", "qid": 1, "prompt": "Name a colour.", "response": "Blue, the colour of the sea."},
        {"id": "a3", "qid": 1, "prompt": "Name a colour.", "response": "Red."},  # a duplicate: scored once
        {"id": "odd", "qid": 1, "prompt": "Name a city.", "response": "Paris."},
        {"id": "b2", "qid": 2, "prompt": "Name a fruit.", "response": "A pear."},
        {"id": "none", "prompt": "Name a fruit.", "response": "A pear."},
        {"id": "long", "qid": 3, "prompt": "Say a lot.", "response": "word " * 300},  # over --max-tokens below
    ]
    out = tmp_path / "out.jsonl"
    short = scorer.with_config(ScorerConfig(max_tokens=200))
    summary = score_rows(read_rows(write_jsonl(tmp_path / "in.jsonl", rows)), out, LocalSource(short, None),
                         chunk_size=2, group_by="qid")  # fmt: skip
    got = {r["id"]: r for r in read_output(out)}
    assert summary.unique == 5 and summary.errors == 3
    assert "line 8" in got["long"]["error"] and "max_tokens=200" in got["long"]["error"]
    assert "line 5" in got["odd"]["error"] and "line 1" in got["odd"]["error"] and "qid" in got["odd"]["error"]
    assert "--group-by field 'qid' is missing" in got["none"]["error"]
    for members in (["a1", "a2", "a3"], ["b1", "b2"]):
        scores = [s.score for s in scorer.score([conversation_of(next(r for r in rows if r["id"] == m)) for m in members])]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        for i, m in enumerate(members):
            g = got[m]["group"]
            assert abs(got[m]["score"] - scores[i]) <= 1e-6 and g["size"] == len(members)
            assert abs(g["mean"] - mean) <= 1e-6 and abs(g["std"] - std) <= 1e-6 and g["rank"] == order.index(i) + 1


def test_file_errors_come_before_the_model_loads(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows_of(2))
    no_model = str(tmp_path / "no-model")  # loading it would fail: these errors must come first
    assert cli.main(["score", str(src), "-o", str(tmp_path / "out.csv"), "--model", no_model]) == 2
    assert "--output" in (err := capsys.readouterr().err) and "'.csv'" in err and ".parquet" in err
    assert not (tmp_path / "out.csv").exists()
    parquet_named_jsonl = tmp_path / "data.jsonl"
    pq.write_table(pa.table({"id": [1]}), parquet_named_jsonl)
    assert cli.main(["score", str(parquet_named_jsonl), "--model", no_model]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "Traceback" not in err
    assert cli.main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--format", "table", "--model", no_model]) == 2
    assert "--format table" in capsys.readouterr().err
    assert cli.main(["score", str(src), "-o", str(tmp_path / "no-dir" / "o.jsonl"), "--model", no_model]) == 2
    assert "no-dir does not exist" in capsys.readouterr().err


def test_table_format_and_summary_line(tmp_path, heads_dir, scorer, capsys):
    rows = rows_of(3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert cli.main(["score", str(src), "--format", "table", "--progress", "--model", str(heads_dir)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["id", "score", "tokens"] and len(lines) == 2 + len(rows)
    want = scorer.score([conversation_of(r) for r in rows])
    for line, r, w in zip(lines[2:], rows, want):
        assert line.split()[0] == r["id"] and abs(float(line.split()[1]) - w.score) <= 1e-4
    assert "score: 3 rows; 3 written (3 unique conversations scored" in captured.err and "tokens/s" in captured.err
    assert "3/3 [" in captured.err and "row/s" in captured.err  # the --progress bar (tqdm) on stderr
