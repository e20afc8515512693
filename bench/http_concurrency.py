"""One-sample HTTP throughput at OpenRLHF's concurrency against batched gRPC, in the same run (issue 25 item 1).

A `rewardsvc serve --http-port` process (the packaged default model, or `--tiny`) is started; this process is
the client. Each round scores the same N distinct short conversations twice, in turn:
  grpc  one Score call holding all N conversations (what a batched trainer sends);
  http  N POST /get_reward, one sample each, all at once, each as OpenRLHF 0.11.2 sends it
        (openrlhf/utils/agent.py: a new aiohttp.ClientSession per request, ClientTimeout(total=180),
        {"query": [q], "prompts": [p], "labels": [""]}, q = p + response + EOS in the policy template, here the
        reward model's own).
It prints conversations/s of each and the ratio http/grpc (median over rounds; target >= 0.80), checks that
every HTTP reward equals its gRPC score within 1e-3, then sends `--large` posts at once (a large rollout
batch) and reports the wall time and the slowest request (OpenRLHF gives up on a request after 180 s).
One JSON line goes to --out with the machine, date and commit.

    python bench/http_concurrency.py --rounds 3 --large 1024 --out bench/results/http_concurrency.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, machine, stamp  # noqa: E402

OPENRLHF_TIMEOUT_S = 180.0


def conversations(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """Distinct short conversations (identical ones would be computed once and flatter the batch)."""
    return [[{"role": "system", "content": ""},
             {"role": "user", "content": f"Question {i + offset}: what is {i + offset} plus {i + offset}?"},
             {"role": "assistant", "content": f"It is {2 * (i + offset)}."}] for i in range(n)]  # fmt: skip


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, int, int]:
    command = [sys.executable, "-m", "rewardsvc.cli.serve", "--port", "0", "--http-port", "0", "--grace", "30"]
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_tiny_heads, save_tiny_llama

        root = Path(tempfile.mkdtemp(prefix="rewardsvc-bench-"))
        command += ["--model", str(save_tiny_heads(root / "heads", save_tiny_llama(root / "llama", "chatml"))), "--max-tokens", "256"]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_file = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "event=serve.ready" in text:
            port = int(re.search(r"event=serve.listening address=\S+:(\d+)", text).group(1))
            return process, port, int(re.search(r"http_port=(\d+)", text).group(1))
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{text}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready in 600 s")


async def post_like_openrlhf(url: str, query: str, prompt: str, timeout_s: float) -> tuple[float, float | None]:
    """(seconds, reward or None): one sample, as openrlhf/utils/agent.py _fetch_rewards_via_http posts it."""
    import aiohttp

    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.post(url, json={"query": [query], "prompts": [prompt], "labels": [""]}) as response:
                response.raise_for_status()
                body = await response.json()
        return time.perf_counter() - started, body["rewards"][0]
    except Exception as exc:  # OpenRLHF would log it at INFO and lose the sample's reward
        print(f"  request failed: {exc!r}", file=sys.stderr)
        return time.perf_counter() - started, None


async def http_round(url: str, samples: list[tuple[str, str]], timeout_s: float) -> tuple[float, list[float], list[float | None]]:
    started = time.perf_counter()
    out = await asyncio.gather(*(post_like_openrlhf(url, q, p, timeout_s) for q, p in samples))
    return time.perf_counter() - started, [s for s, _ in out], [r for _, r in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=256, help="conversations per round = concurrent one-sample posts (default 256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=1024, help="concurrent posts of the last check (0 = skip)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; for trying the script)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--client-timeout", type=float, default=OPENRLHF_TIMEOUT_S,
                        help="each POST's total timeout in the throughput rounds (default OpenRLHF's 180 s; raise it on a "
                             "machine too slow to score N conversations in 180 s, or the ratio counts lost requests)")  # fmt: skip
    parser.add_argument("--out", default=None, help="append the JSON line here")
    args = parser.parse_args()

    from rewardsvc.client import RewardClient

    log_path = Path(tempfile.mkdtemp(prefix="rewardsvc-bench-")) / "serve.log"
    process, port, http_port = start_server(args, log_path)
    url = f"http://127.0.0.1:{http_port}/get_reward"
    try:
        with RewardClient(f"127.0.0.1:{port}") as client:
            info = client.model_info()
            tokenizer = _tokenizer(args)

            def render(batch):
                out = []
                for conversation in batch:
                    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
                    out.append((prompt + conversation[-1]["content"] + tokenizer.eos_token, prompt))
                return out

            convs = conversations(args.n)
            samples = render(convs)
            tokens = sum(r.num_tokens for r in client.score(conversations(8, 10**6)))  # warm both paths
            asyncio.run(http_round(url, render(conversations(8, 2 * 10**6)), args.client_timeout))
            rows, worst = [], 0.0
            for r in range(args.rounds):
                started = time.perf_counter()
                expected = client.score(convs, timeout=600)
                grpc_s = time.perf_counter() - started
                http_s, latencies, rewards = asyncio.run(http_round(url, samples, args.client_timeout))
                failed = sum(x is None for x in rewards)
                worst = max([worst] + [abs(x - e.score) for x, e in zip(rewards, expected) if x is not None])
                rows.append({"grpc_s": round(grpc_s, 3), "http_s": round(http_s, 3), "ratio": round(grpc_s / http_s, 3),
                             "http_failed": failed, "http_p50_s": round(statistics.median(latencies), 3)})  # fmt: skip
                print(f"round {r}: grpc {args.n / grpc_s:.1f} conv/s  http {args.n / http_s:.1f} conv/s  "
                      f"ratio {grpc_s / http_s:.2f}  failed {failed}", flush=True)  # fmt: skip
            tokens = sum(e.num_tokens for e in expected)
            large = None
            if args.large:
                big = render(conversations(args.large, 10**5))
                large_s, latencies, rewards = asyncio.run(http_round(url, big, OPENRLHF_TIMEOUT_S))
                large = {"n": args.large, "seconds": round(large_s, 2), "slowest_s": round(max(latencies), 2),
                         "failed": sum(x is None for x in rewards), "within_openrlhf_timeout": max(latencies) < OPENRLHF_TIMEOUT_S}  # fmt: skip
                print(f"{args.large} concurrent posts: {large_s:.1f} s, slowest {max(latencies):.1f} s, failed {large['failed']}")
    finally:
        process.terminate()
        process.wait(120)
    if any(r["http_failed"] for r in rows):
        raise SystemExit("some HTTP requests failed: no throughput is recorded (see --client-timeout)")
    grpc_rate = statistics.median(args.n / (r["grpc_s"]) for r in rows)
    http_rate = statistics.median(args.n / (r["http_s"]) for r in rows)
    row = {
        "bench": "http_concurrency", **stamp(), "machine_details": machine(), "model": info["model_id"], "n": args.n, "conversation_tokens": tokens,
        "grpc_conversations_per_s": round(grpc_rate, 2), "http_conversations_per_s": round(http_rate, 2),
        "ratio": round(http_rate / grpc_rate, 3), "max_abs_reward_diff": worst, "client_timeout_s": args.client_timeout, "rounds": rows, "large": large,
        "load_average": os.getloadavg()[0], "note": "server in its own process (rewardsvc serve), the client here; same machine",
    }  # fmt: skip
    print(f"ratio http/grpc = {row['ratio']:.2f} (target >= 0.80); max |http - grpc| = {worst:.2e}")
    emit(row, args.out)


def _tokenizer(args):
    """The reward model's own tokenizer (the policy here shares its template)."""
    if args.tiny:
        from tiny_models import build_tokenizer

        return build_tokenizer("chatml")
    from rewardsvc.model.backbone_loading import converted_gguf_dir, embedded_gguf_path, load_tokenizer

    # The packaged default's tokenizer, from the converted copy the server has just made (no weights loaded).
    return load_tokenizer(str(converted_gguf_dir(embedded_gguf_path())))


if __name__ == "__main__":
    main()
