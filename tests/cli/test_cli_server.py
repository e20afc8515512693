"""`score`, `compare` and `inspect` with `--server`: a real gRPC server on loopback (TLS and a bearer token),
the tiny random model behind it, and the same model loaded in this process as the reference."""

from __future__ import annotations

import json
import math

import pytest

from rewardsvc.cli import main as cli
from rewardsvc.cli.batch_io import conversation_of
from rewardsvc.cli.batch_io import read_output
from rewardsvc.config import ScorerConfig
from rewardsvc.model.scorer import Scorer
from service_fixtures import make_certs, start_server
from tiny_models import save_tiny_heads

TOKEN = "s3cret-token"
ROWS = [
    {"id": "a1", "qid": "q1", "prompt": "Name a colour.", "response": "Red."},
    {"id": "b1", "qid": "q2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
     "response": "Apple."},
    {"id": "a2", "qid": "q1", "prompt": "Name a colour.", "response": "Blue, like the sea on a clear day."},
    {"id": "a3", "qid": "q1", "prompt": "Name a colour.", "response": "Red."},
    {"id": "c1", "qid": "q3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"id": "bad", "qid": "q3", "messages": [{"role": "user", "content": "no response"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """(heads dir, reference scorer, remote flags); the server runs its own Scorer instance."""
    root = tmp_path_factory.mktemp("cli-server")
    heads = save_tiny_heads(root / "heads", tiny_llama_dir)
    certs = make_certs(root)
    (root / "token").write_text(TOKEN + "\n")
    running = start_server(Scorer.load(heads, config=ScorerConfig()), auth_token=TOKEN,
                           tls_cert=str(certs["server_cert"]), tls_key=str(certs["server_key"]))  # fmt: skip
    flags = ["--server", f"127.0.0.1:{running.port}", "--tls-ca", str(certs["ca"]), "--auth-token-file", str(root / "token")]
    yield heads, Scorer.load(heads, config=ScorerConfig()), flags
    running.stop(0)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_score_through_the_server_equals_local_scores(setup, tmp_path, capsys):
    heads, scorer, flags = setup
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    remote, local = tmp_path / "remote.parquet", tmp_path / "local.jsonl"
    assert cli.main(["score", src, "-o", str(remote), "--group-by", "qid", *flags]) == 1  # the bad row
    assert "-> " + str(remote) in capsys.readouterr().err
    assert cli.main(["score", src, "-o", str(local), "--group-by", "qid", "--model", str(heads)]) == 1
    got_remote, got_local = read_output(remote), read_output(local)
    want = scorer.score([conversation_of(r) for r in ROWS[:5]])
    for r, l, w in zip(got_remote, got_local, want):
        assert r["id"] == l["id"] and abs(r["score"] - w.score) <= 1e-5 and abs(l["score"] - w.score) <= 1e-5
        assert r["num_tokens"] == w.num_tokens and r["rewards"].keys() == w.rewards.keys()
        assert r["group"]["rank"] == l["group"]["rank"] and abs(r["group"]["std"] - l["group"]["std"]) <= 1e-5
    q1 = [w.score for w in (want[0], want[2], want[3])]
    mean = sum(q1) / 3
    assert abs(got_remote[0]["group"]["mean"] - mean) <= 1e-5
    assert abs(got_remote[0]["group"]["std"] - math.sqrt(sum((s - mean) ** 2 for s in q1) / 2)) <= 1e-5
    assert got_remote[5]["id"] == "bad" and "assistant" in got_remote[5]["error"]


def test_compare_and_inspect_through_the_server(setup, tmp_path, capsys):
    heads, scorer, flags = setup
    pairs = [
        {"id": "p1", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I do not know."},
        {"id": "p2", "prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert cli.main(["compare", src, *flags]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for g, p in zip(got, pairs):
        c, r = scorer.score([conversation_of({"prompt": p["prompt"], "response": p[k]}) for k in ("chosen", "rejected")])
        assert g["id"] == p["id"] and abs(g["score_chosen"] - c.score) <= 1e-5 and abs(g["score_rejected"] - r.score) <= 1e-5
        assert abs(g["p_chosen"] - 1 / (1 + math.exp(-(c.score - r.score)))) <= 1e-5

    assert cli.main(["inspect", "Name a colour.", "--json", *flags]) == 0
    shown = json.loads(capsys.readouterr().out)
    want = scorer.inspect([{"role": "user", "content": "Name a colour."}])
    assert all(abs(shown["gating"][k] - v) <= 1e-5 for k, v in want.gating.items())


def test_a_wrong_token_or_address_is_one_clear_line(setup, tmp_path, capsys):
    _, _, flags = setup
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    (tmp_path / "wrong").write_text("nope")
    bad_token = [*flags[:-1], str(tmp_path / "wrong")]
    assert cli.main(["score", src, *bad_token, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "--server" in err and "Traceback" not in err, err
    assert cli.main(["score", src, "--server", "127.0.0.1"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert cli.main(["score", src, *flags, "--model", "elsewhere"]) == 2
    assert "with --server the server's own model scores" in capsys.readouterr().err
