"""Ray Data batch scoring (rewardsvc.cli.ray_data) on a local Ray (ray.init(num_cpus=2), once for the module),
checked against the single-process `rewardsvc score` on the same rows: a 2-actor job over a few hundred rows,
the library route a user writes (read_parquet -> map_batches -> write_parquet, pyarrow and pandas batches), and
an actor killed mid-job (Ray restarts it and reruns its batch; every row comes back exactly once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rewardsvc[ray]'); CI installs it")

from rewardsvc.cli import main as cli  # noqa: E402
from rewardsvc.cli.ray_data import ScoreBatches, read_inputs, score_on_ray  # noqa: E402
from rewardsvc.cli.batch_io import read_output  # noqa: E402
from local_ray import start_local_ray  # noqa: E402
from tiny_models import save_tiny_heads  # noqa: E402

pytestmark = pytest.mark.ray

ROWS = 300
TOL = 1e-5  # batch composition differs between the runs (float32 on CPU): a stated tolerance, not bitwise


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray(configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def heads_dir(tiny_llama_dir, tmp_path_factory):
    return save_tiny_heads(tmp_path_factory.mktemp("ray-heads"), tiny_llama_dir)


def input_rows() -> list[dict]:
    """ROWS rows in both row formats, some repeated conversations, and rows the CLI turns into error rows."""
    rows = []
    for i in range(ROWS):
        if i % 3 == 0:
            rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i % 40}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]})  # fmt: skip
        else:
            rows.append({"id": f"r{i}", "prompt": f"Question {i % 40}?", "response": f"Answer {i % 25}."})
    rows[17] = {"id": "r17", "prompt": "no response"}  # missing field
    rows[101] = {"id": "r101", "messages": [{"role": "user", "content": "the last message is not the assistant's"}]}
    return rows


@pytest.fixture(scope="module")
def input_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-in") / "in.jsonl"
    lines = [json.dumps(r) for r in input_rows()]
    lines.insert(50, "{not json")  # a line that does not parse: an error row, as in the local CLI
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def local_output(input_jsonl, heads_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ray-local") / "local.parquet"
    assert cli.main(["score", str(input_jsonl), "-o", str(out), "--model", str(heads_dir), "--no-progress"]) == 1
    return read_output(out)


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same rows in the same order; error rows identical; scores within TOL."""
    assert [g.get("id") for g in got] == [w.get("id") for w in want]
    for g, w in zip(got, want):
        if "error" in w:
            assert g == w
            continue
        assert set(g) == set(w) and g["num_tokens"] == w["num_tokens"] and g["model_id"] == w["model_id"]
        assert abs(g["score"] - w["score"]) <= TOL, (g["id"], g["score"], w["score"])
        for field in ("rewards", "gating", "coefficients"):
            assert g[field].keys() == w[field].keys()
            assert all(abs(g[field][k] - w[field][k]) <= TOL for k in w[field]), (g["id"], field)


def test_two_actor_cli_job_equals_the_local_cli(input_jsonl, heads_dir, local_output, tmp_path):
    out = tmp_path / "ray.parquet"
    code = cli.main(["score", str(input_jsonl), "-o", str(out), "--model", str(heads_dir), "--no-progress",
                     "--ray", "--ray-actors", "2", "--chunk-size", "32"])  # fmt: skip
    assert code == 1  # error rows, as locally
    got = read_output(out)
    assert len(got) == ROWS + 1
    errors = [r for r in got if "error" in r]
    assert [e["line"] for e in errors] == [18, 51, 103]  # r17, the bad JSON line, r101 (after it: +1)
    assert_same_rows(got, local_output)


def test_user_pipeline_read_parquet_map_batches_write_parquet(input_jsonl, heads_dir, local_output, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [r for r in input_rows() if r["id"] not in ("r17", "r101")]
    messages = [r for r in good if "messages" in r]
    pairs = [r for r in good if "messages" not in r]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(messages), src / "a.parquet")  # one row format per file (one schema)
    pq.write_table(pa.Table.from_pylist(pairs), src / "b.parquet")
    # A dataset, not a resumable file: no input hash column (the CLI's --ray output file has it, as locally).
    want = {r.get("id"): {k: v for k, v in r.items() if k != "input_sha256"} for r in local_output}
    # Reading runs as Ray tasks beside the actors: half a CPU per actor leaves the 2-CPU test cluster room for them.
    ds = ray.data.read_parquet(str(src))
    scored = ds.map_batches(ScoreBatches, fn_constructor_kwargs={"model": str(heads_dir)}, batch_size=40,
                            batch_format="pyarrow", concurrency=2, num_cpus=0.5)  # fmt: skip
    scored.write_parquet(str(tmp_path / "out"))
    got = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda r: int(r["id"][1:]))
    assert [r["id"] for r in got] == [r["id"] for r in good]  # every row once
    for row in got:
        assert row["error"] is None and row["line"] is None
        row = {k: v for k, v in row.items() if k not in ("error", "line")}
        assert_same_rows([row], [want[row["id"]]])


def test_pandas_batches_and_error_rows_that_name_the_row(heads_dir):
    rows = [{"id": "ok", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"id": "bad", "messages": [{"role": "user", "content": "Hi"}]}]  # fmt: skip
    got = ray.data.from_items(rows).map_batches(ScoreBatches, fn_constructor_kwargs={"model": str(heads_dir)},
                                                batch_format="pandas", concurrency=1, num_cpus=0.5).take_all()  # fmt: skip
    by_id = {r["id"]: r for r in got}
    want = ScoreBatches(str(heads_dir)).backend.scorer.score([rows[0]["messages"]])[0]
    assert abs(by_id["ok"]["score"] - want.score) <= TOL
    assert by_id["ok"]["error"] is None and by_id["ok"]["score"] is not None
    assert by_id["bad"]["score"] is None and by_id["bad"]["error"].startswith("row id 'bad': ")
    assert "assistant" in by_id["bad"]["error"]


def test_a_killed_actor_is_retried_and_every_row_comes_back_once(input_jsonl, heads_dir, local_output, tmp_path):
    marker = tmp_path / "killed-once"

    class DiesOnce(ScoreBatches):
        """Kills its own process (as an OOM kill or a lost node would) the first time it is given row 150."""

        def __call__(self, batch):
            if 150 in batch["_rewardsvc_order"].to_pylist() and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    inputs = read_inputs(input_jsonl)
    got = score_on_ray(inputs, actors=2, batch_size=32, scorer_kwargs={"model": str(heads_dir)}, scorer_class=DiesOnce)
    assert marker.exists()  # the actor did die mid-job
    # (the Parquet file the local run wrote reads back without null fields: the bad JSON line has no id)
    assert_same_rows([{k: v for k, v in r.items() if v is not None} for r in got], local_output)


def test_cli_refusals_name_the_flag_before_any_actor_starts(input_jsonl, heads_dir, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    base = ["score", str(input_jsonl), "-o", str(out), "--model", str(heads_dir), "--no-progress", "--ray"]
    assert cli.main([*base, "--group-by", "id"]) == 2
    assert "--group-by is not supported with --ray" in capsys.readouterr().err
    assert cli.main([*base, "--weights", "{not json"]) == 2
    assert "--weights is not valid JSON" in capsys.readouterr().err
    assert cli.main([*base, "--ray-actors", "0"]) == 2
    assert "--ray-actors must be >= 1" in capsys.readouterr().err
    out.write_bytes(b"")
    assert cli.main(base) == 2
    assert "pass --overwrite" in capsys.readouterr().err
