#!/usr/bin/env python
"""Load generator for the gRPC reward service: a concurrency sweep against a real server, compared with
the scorer's offline throughput on the same conversations, measured in the same run.

    HF_HUB_OFFLINE=1 python bench/serve_load.py                       # default sweep 1..64
    HF_HUB_OFFLINE=1 python bench/serve_load.py --levels 1,8,64 --json out.json

The server runs in a subprocess (`python -m rewardsvc.cli.serve`, the embedded default model); the load
comes from one asyncio thread here (grpc.aio), so client overhead stays small. Every request is one
distinct conversation (no duplicates: the batcher computes identical conversations once, which would
flatter the figures). Offline = `scorer.score(the level's conversations)` in this process, right after the
level, while the server is idle; ratio = served tokens/s / offline tokens/s. The columns `batch` (mean
conversations per scorer call), `busy` (model compute time / wall time) and `steal` (CPU time the host
took from this VM during the level) explain the figures; compare only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "the model answers a question about rivers mountains code tests data cats weather history music numbers "
    "python server reward policy training careful helpful honest short long detailed example because which "
    "therefore however explain describe compare list summarize translate improve error result value"
).split()


def make_pool(n: int, seed: int) -> list[list[dict[str, str]]]:
    """n distinct conversations: a prompt of 8-40 words and a response of 10-80 words (~50-200 tokens)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        [{"role": "user", "content": f"[{i}] " + text(8, 40) + "?"}, {"role": "assistant", "content": text(10, 80) + "."}]
        for i in range(n)
    ]


def machine() -> dict[str, str]:
    model = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"Model name:\s*(.+)", out)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def start_server(log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, int, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "rewardsvc.cli.serve", "--port", "0", "--metrics-port", "0", "--grace", "60", *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "event=serve.ready" in text:
            port = int(re.search(r"event=serve.listening address=\S+:(\d+)", text).group(1))
            metrics_port = int(re.search(r"metrics_port=(\d+)", text).group(1))
            return process, port, metrics_port
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}:\n{text}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not become ready in 600 s")


async def run_level(port: int, requests: list, concurrency: int) -> dict[str, float]:
    import grpc

    from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc

    latencies: list[float] = []
    tokens = 0
    queue = list(reversed(requests))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        await channel.channel_ready()

        async def worker() -> None:
            nonlocal tokens
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                reply = await stub.Score(request, timeout=600)
                latencies.append(time.perf_counter() - started)
                tokens += sum(r.num_tokens for r in reply.results)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(requests),
        "seconds": wall,
        "conversations_per_s": len(requests) / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
    }


def batch_counters(metrics_port: int) -> dict[str, float]:
    """Server-side totals: scorer calls, conversations and tokens in them, and compute seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    wanted = {"rewardsvc_batch_conversations_count": "calls", "rewardsvc_batch_conversations_sum": "conversations",
              "rewardsvc_batch_tokens_sum": "tokens", "rewardsvc_batch_seconds_sum": "compute_s"}  # fmt: skip
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[wanted[name]] = float(value)
    return out


def format_row(row: dict) -> str:
    return (f"{row['concurrency']:>5} {row['requests']:>5} {row['conversations_per_s']:>8.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['p50_ms']:>9.0f} {row['p99_ms']:>9.0f} {row['offline_tokens_per_s']:>9.0f} {row['ratio']:>6.2f} "
            f"{row['mean_batch_conversations']:>6.1f} {row['model_busy']:>5.2f} {row['steal']:>6.0%}")  # fmt: skip


HEADER = (f"{'conc':>5} {'reqs':>5} {'conv/s':>8} {'tokens/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'offline':>9} {'ratio':>6} "
          f"{'batch':>6} {'busy':>5} {'steal':>6}")  # fmt: skip


def cpu_times() -> tuple[float, float]:
    """(steal, total) jiffies of all CPUs: steal = time the hypervisor gave our vCPUs to someone else."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    return (fields[7] if len(fields) > 7 else 0.0), sum(fields[:8])


def offline_throughput(scorer, conversations) -> float:
    started = time.perf_counter()
    results = scorer.score(conversations)
    return sum(r.num_tokens for r in results) / (time.perf_counter() - started)


def measure_level(c: int, conversations, port: int, metrics_port: int, scorer) -> dict:
    """Served throughput at concurrency c, then offline `scorer.score` on the same conversations right after
    (the server idle), so that drift in the machine's speed hits both sides of the ratio alike."""
    from rewardsvc.wire import score_request

    requests = [score_request([conversation], request_id=str(i)) for i, conversation in enumerate(conversations)]
    before, cpu_before = batch_counters(metrics_port), cpu_times()
    row = asyncio.run(run_level(port, requests, c))
    after = batch_counters(metrics_port)
    row["offline_tokens_per_s"] = offline_throughput(scorer, conversations)
    cpu_after = cpu_times()
    row["ratio"] = row["tokens_per_s"] / row["offline_tokens_per_s"]
    # Diagnostics: how the batcher grouped the load, how busy the model was, how much CPU the host stole.
    calls = after["calls"] - before["calls"]
    compute_s = after["compute_s"] - before["compute_s"]
    row["mean_batch_conversations"] = (after["conversations"] - before["conversations"]) / max(calls, 1)
    row["model_busy"] = compute_s / row["seconds"]
    row["model_tokens_per_s"] = (after["tokens"] - before["tokens"]) / max(compute_s, 1e-9)
    row["steal"] = (cpu_after[0] - cpu_before[0]) / max(cpu_after[1] - cpu_before[1], 1e-9)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrency levels (default %(default)s)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: max(32, 2 x concurrency))")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("server_args", nargs="*", help="extra `serve` flags after --, e.g. -- --batch-token-budget 4096")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    per_level = {c: args.requests or max(32, 2 * c) for c in levels}
    pool = make_pool(max(per_level.values()), args.seed)

    from rewardsvc.model.scorer import Scorer

    info = machine()
    print("machine:", json.dumps(info), flush=True)
    log_path = Path(tempfile.mkdtemp(prefix="serve_load.")) / "serve.log"
    process, port, metrics_port = start_server(log_path, args.server_args)
    try:
        scorer = Scorer.load()
        scorer.score(pool[:2])  # warm-up, as the server's
        print(HEADER, flush=True)
        rows = []
        for c in levels:
            rows.append(measure_level(c, pool[: per_level[c]], port, metrics_port, scorer))
            print(format_row(rows[-1]), flush=True)
        saturated = [r for r in rows if r["model_busy"] >= 0.95]
        if saturated:
            ratios = [r["ratio"] for r in saturated]
            print(f"saturation (model busy >= 95 %: concurrency {', '.join(str(r['concurrency']) for r in saturated)}): "
                  f"served/offline mean {statistics.mean(ratios):.2f}, min {min(ratios):.2f}")  # fmt: skip
        info["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "levels": rows}, indent=2))
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
        print(f"server exited with {code} (log: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
