"""Median latency of one short conversation through gRPC Score, HTTP /v1/score and HTTP /get_reward, against a
running server (`rewardsvc serve --port 50071 --http-port 8071`). Figures: docs/INTEGRATIONS.md.

    python bench/http_latency.py --grpc 127.0.0.1:50071 --http http://127.0.0.1:8071 -n 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

from rewardsvc.client import RewardClient

CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
# The same conversation in ChatML, as OpenRLHF would send it for a ChatML policy.
QUERY = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>"


def median_ms(call, n: int) -> float:
    call()  # warm
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default="127.0.0.1:50071")
    parser.add_argument("--http", default="http://127.0.0.1:8071")
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(args.http + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())

    with RewardClient(args.grpc) as client:
        print(f"gRPC Score        {median_ms(lambda: client.score([CONVERSATION]), args.n):.1f} ms")
    print(f"HTTP /v1/score    {median_ms(lambda: post('/v1/score', {'conversations': [{'messages': CONVERSATION}]}), args.n):.1f} ms")
    print(f"HTTP /get_reward  {median_ms(lambda: post('/get_reward', {'query': [QUERY]}), args.n):.1f} ms")


if __name__ == "__main__":
    main()
