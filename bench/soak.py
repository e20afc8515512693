"""Bounded soak: a `serve` subprocess (embedded default model) on loopback, many client threads sending mixed
RPCs (Score, ScoreGroup, Compare, InspectWeights, ScoreStream, GetModelInfo, malformed requests) with random
deadlines and random cancels, for --duration seconds; then SIGTERM and a check that the server drained.

Prints requests served, status codes, p50/p99 latency of OK calls, the server's RSS when ready, after the
first quarter of the load (warm-up: the allocator reaches the largest batch shapes) and at the end, and whether growth stayed within --rss-margin-mib. Exits 1 if an accepted call was
lost at shutdown, a client saw INTERNAL/UNKNOWN, or RSS grew past the margin.

    HF_HUB_OFFLINE=1 python bench/soak.py [--duration 120] [--clients 16] [--rss-margin-mib 150]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb  # noqa: E402
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc  # noqa: E402

WORDS = "the river model score answer colour seven light quick brown fox jumps over lazy dog".split()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def messages(rng, with_response: bool):
    out = [pb.Message(role="system", content=""), pb.Message(role="user", content=sentence(rng, 3, 20))]
    if with_response:
        out.append(pb.Message(role="assistant", content=sentence(rng, 3, 30)))
    return out


def one_call(stub, rng: random.Random):
    """(method, a callable making the call with a timeout); a few requests are malformed on purpose."""
    kind = rng.choices(["Score", "ScoreGroup", "Compare", "InspectWeights", "ScoreStream", "GetModelInfo", "bad"],
                       weights=[30, 15, 10, 10, 10, 5, 5])[0]  # fmt: skip
    if kind == "Score":
        req = pb.ScoreRequest(conversations=[pb.Conversation(messages=messages(rng, True)) for _ in range(rng.randint(1, 4))])
        return kind, stub.Score.future, req
    if kind == "ScoreGroup":
        req = pb.ScoreGroupRequest(prompt=messages(rng, False), responses=[sentence(rng, 2, 20) for _ in range(rng.randint(2, 6))])
        return kind, stub.ScoreGroup.future, req
    if kind == "Compare":
        pair = pb.ComparePair(prompt=messages(rng, False), chosen=sentence(rng, 2, 15), rejected=sentence(rng, 2, 15))
        return kind, stub.Compare.future, pb.CompareRequest(pairs=[pair])
    if kind == "InspectWeights":
        return kind, stub.InspectWeights.future, pb.InspectWeightsRequest(prompt=messages(rng, False), top_k=rng.randint(0, 5))
    if kind == "GetModelInfo":
        return kind, stub.GetModelInfo.future, pb.GetModelInfoRequest()
    if kind == "bad":
        weights = pb.AttributeWeights(mode=pb.AttributeWeights.OVERRIDE, values={"helpfulness": rng.choice([1e308, -1.0, 1e39])})
        return "Score(bad)", stub.Score.future, pb.ScoreRequest(conversations=[pb.Conversation(messages=messages(rng, True))], weights=weights)
    reqs = [pb.ScoreRequest(conversations=[pb.Conversation(messages=messages(rng, True))], request_id=str(i)) for i in range(rng.randint(1, 4))]
    return kind, None, reqs


def client(port: int, seed: int, stop_at: float, codes: Counter, latencies: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        while time.monotonic() < stop_at:
            method, call, request = one_call(stub, rng)
            timeout = rng.choice([0.05, 0.5, 5.0, 30.0, 30.0, 30.0])
            cancel_after = rng.random() * 0.3 if rng.random() < 0.1 else None
            started = time.monotonic()
            try:
                if call is None:
                    stream = stub.ScoreStream(iter(request), timeout=timeout)
                    if cancel_after is not None:
                        threading.Timer(cancel_after, stream.cancel).start()
                    replies = list(stream)
                    errors = [r.error.code for r in replies if r.HasField("error")]
                    code = errors[0] if errors else "OK"
                else:
                    future = call(request, timeout=timeout)
                    if cancel_after is not None:
                        threading.Timer(cancel_after, future.cancel).start()
                    future.result()
                    code = "OK"
            except grpc.FutureCancelledError:
                code = "CANCELLED"
            except grpc.RpcError as exc:
                code = exc.code().name
            seconds = time.monotonic() - started
            with lock:
                codes[method, code] += 1
                if code == "OK":
                    latencies.append(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default %(default)s)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rss-margin-mib", type=float, default=150.0, help="allowed RSS growth over the load")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "rewardsvc.cli.serve", "--port", "0", "--metrics-port", "0", "--grace", "60"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    text = lambda: Path(log.name).read_text(errors="replace")  # noqa: E731
    try:
        deadline = time.monotonic() + 300
        while "event=serve.ready" not in text():
            if server.poll() is not None or time.monotonic() > deadline:
                print(text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        port = int(re.search(r"event=serve.listening address=127\.0\.0\.1:(\d+)", text()).group(1))
        rss_ready = rss_mib(server.pid)
        codes: Counter = Counter()
        latencies: list[float] = []
        lock = threading.Lock()
        started = time.monotonic()
        stop_at = started + args.duration
        threads = [threading.Thread(target=client, args=(port, i, stop_at, codes, latencies, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        # The first quarter warms up (the allocator grows to the largest batch shapes once); growth is
        # measured from there to the end of the load.
        time.sleep(args.duration / 4)
        rss_start = rss_mib(server.pid)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        rss_end = rss_mib(server.pid)
        server.send_signal(signal.SIGTERM)
        rc = server.wait(120)
    finally:
        if server.poll() is None:
            server.kill()
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")  # noqa: E731
    by_code: Counter = Counter()
    for (_method, code), n in codes.items():
        by_code[code] += n
    internal = by_code["INTERNAL"] + by_code["UNKNOWN"]
    growth = rss_end - rss_start
    figures = {
        "duration_s": round(elapsed, 1), "clients": args.clients, "requests": sum(codes.values()),
        "ok": by_code["OK"], "codes": dict(by_code), "by_method": {f"{m} {c}": n for (m, c), n in sorted(codes.items())},
        "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
        "rss_ready_mib": round(rss_ready, 1), "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1), "rss_growth_mib": round(growth, 1),
        "rss_margin_mib": args.rss_margin_mib, "exit_code": rc, "drained": "drained=True" in text(),
    }  # fmt: skip
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = internal == 0 and growth <= args.rss_margin_mib and rc == 0 and figures["drained"]
    print("PASS" if ok else "FAIL", f"(INTERNAL/UNKNOWN={internal}, RSS growth {growth:.1f} MiB <= {args.rss_margin_mib} MiB, "
          f"exit {rc}, drained={figures['drained']})")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
