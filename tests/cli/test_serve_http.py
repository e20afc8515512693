"""`rewardsvc serve --http-port` as a process (tiny random model): the HTTP port comes up with gRPC, answers
OpenRLHF's /get_reward, and closes with it on SIGTERM (exit 0)."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest

from service_fixtures import serve_process
from tiny_service import load_tiny_scorer, save_tiny_heads

# A whole `serve` process (imports torch and transformers, loads, warms up): tens of seconds on a shared CPU.
pytestmark = pytest.mark.slow
CONVERSATION = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_http_port_starts_answers_and_stops_on_sigterm(tiny_llama_dir, chatml_tokenizer, tmp_path):
    heads = save_tiny_heads(tmp_path / "heads", tiny_llama_dir)
    args = ["--model", str(heads), "--port", "0", "--http-port", "0", "--max-tokens", "256", "--grace", "10"]
    with serve_process(args, tmp_path / "serve.log") as served:
        http_port = served.logged_port("http_port")
        # serve.ready names the scoring plan (the suite's REWARDSVC_AUTO_PLAN=device reaches the subprocess).
        assert 'plan="float32/padded(device default)"' in served.log(), served.log()
        base = f"http://127.0.0.1:{http_port}"
        assert _get(f"{base}/health") == (200, {"status": "SERVING"})
        prompt = chatml_tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
        status, body = _get(f"{base}/get_reward", {"query": [prompt + "Red." + chatml_tokenizer.eos_token], "prompts": [prompt]})
        want = load_tiny_scorer(heads).score([CONVERSATION])[0].score
        assert status == 200 and body["rewards"] == pytest.approx([want], abs=1e-5)
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(60) == 0, served.log()
        with pytest.raises(urllib.error.URLError):  # closed with the gRPC server
            urllib.request.urlopen(f"{base}/health", timeout=5)
        assert "event=serve.stopped" in served.log()
