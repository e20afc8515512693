"""ScoreGroup over a real gRPC server on loopback: the prompt runs once (shared key/value cache) and the
results equal the flat path (every conversation run whole) within 1e-5."""

from __future__ import annotations

from dataclasses import replace

import grpc

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc._proto.rewardsvc.v1 import reward_pb2_grpc as pb_grpc
from service_fixtures import start_server
from group_fixtures import PROMPT, RESPONSES, PromptCounter


def test_score_group_runs_the_prompt_once_and_equals_flat(tiny_scorer):
    flat = tiny_scorer.with_config(replace(tiny_scorer.config, share_prompts=False)).score_group(PROMPT, RESPONSES)
    first = tiny_scorer.encode(PROMPT + [{"role": "assistant", "content": RESPONSES[0]}])
    counter = PromptCounter(tiny_scorer, first.input_ids[: first.prompt_anchor + 1])
    running = start_server(tiny_scorer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            prompt = [pb.Message(role=m["role"], content=m["content"]) for m in PROMPT]
            reply = stub.ScoreGroup(pb.ScoreGroupRequest(prompt=prompt, responses=RESPONSES), timeout=60)
    finally:
        running.stop(0)
        counter.close()
    assert counter.rows == 1
    assert len(reply.results) == len(RESPONSES)
    for got, want in zip(reply.results, flat):
        assert abs(got.score - want.score) <= 1e-5
