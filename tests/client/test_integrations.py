"""rewardsvc.integrations against a real server on loopback (tiny random scorer), each called exactly as its
trainer calls it: TRL `reward_func(prompts=..., completions=..., **kwargs)` (sync, and a coroutine awaited
concurrently as TRL does), verl's reward managers `compute_score(data_source=, solution_str=, ground_truth=,
extra_info=)` with numpy object arrays, blocking and awaited (verl's own code: tests/client/test_verl_reward_loop.py). Expected values: the scorer itself, offline."""

from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest

from rewardsvc.errors import InvalidInputError
from rewardsvc.integrations import trl as rtrl
from rewardsvc.integrations import trl_functions
from rewardsvc.integrations import verl as rverl
from service_fixtures import settled_requests
from tiny_service import ATTRS

TOL = 1e-5
PROMPT = [{"role": "user", "content": "Name a colour."}]
PROMPTS = [PROMPT, PROMPT, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
COMPLETIONS = [[{"role": "assistant", "content": "Red."}], [{"role": "assistant", "content": "Seven."}],
               [{"role": "assistant", "content": "Hello!"}]]  # fmt: skip
CONVERSATIONS = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]


def score_calls(server) -> float:
    """Score RPCs counted, once the ones already answered are all in the count (service_fixtures.settled_requests)."""
    return settled_requests(server.metrics_port, {"method": "Score"})


class Metrics:
    """TRL's `log_metric(name, value)` callback: scalars averaged per logging step."""

    def __init__(self):
        self.logged: dict[str, list[float]] = {}

    def __call__(self, name: str, value: float) -> None:
        self.logged.setdefault(name, []).append(value)


def expected_gating_logs(results) -> dict[str, list[float]]:
    n = len(results)
    out = {f"rewardsvc/gating/{a}": [sum(r.gating[a] for r in results) / n] for a in ATTRS}
    out.update({f"rewardsvc/coefficient/{a}": [sum(r.coefficients[a] for r in results) / n] for a in ATTRS})
    return out


def assert_logs(got: dict[str, list[float]], want: dict[str, list[float]]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=TOL), name


def test_trl_sync_functions_share_one_rpc_and_log_gating(server, tiny):
    funcs = rtrl.reward_funcs(f"127.0.0.1:{server.port}", [None, ATTRS[0]], log_gating=True)
    assert [f.__name__ for f in funcs] == ["rewardsvc_score", f"rewardsvc_{ATTRS[0]}"]
    before, metrics = score_calls(server), Metrics()
    # TRL's GRPOTrainer call: keyword arguments, plus the dataset's extra columns and its own callbacks.
    values = [f(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3, trainer_state=None,
                log_metric=metrics, log_extra=lambda column, values: None) for f in funcs]  # fmt: skip
    assert score_calls(server) == before + 1  # two functions, one RPC
    offline = tiny.score(CONVERSATIONS)
    assert values[0] == pytest.approx([r.score for r in offline], abs=TOL)
    assert values[1] == pytest.approx([r.rewards[ATTRS[0]] for r in offline], abs=TOL)
    assert_logs(metrics.logged, expected_gating_logs(offline))  # once per batch, not once per function


def test_trl_standard_format_and_bad_attribute(server, tiny):
    [func] = rtrl.reward_funcs(f"127.0.0.1:{server.port}", ["nope"])
    with pytest.raises(InvalidInputError, match="'nope' is not one of the model's"):
        func(prompts=["Name a colour."], completions=["Red."])
    [func] = rtrl.reward_funcs(f"127.0.0.1:{server.port}")
    want = tiny.score([[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]])
    assert func(prompts=["Name a colour."], completions=["Red."]) == pytest.approx([want[0].score], abs=TOL)


def test_trl_async_functions_run_concurrently_on_one_rpc(server, tiny):
    funcs = rtrl.async_reward_funcs(f"127.0.0.1:{server.port}", [None, ATTRS[1]], log_gating=True)
    assert all(asyncio.iscoroutinefunction(f) for f in funcs)  # what TRL checks to await them
    before, metrics = score_calls(server), Metrics()

    async def trl_step():  # TRL gathers the coroutine reward functions of one batch
        return await asyncio.gather(*(f(prompts=PROMPTS, completions=COMPLETIONS, trainer_state=None, log_metric=metrics)
                                      for f in funcs))  # fmt: skip

    values = asyncio.run(trl_step())
    assert score_calls(server) == before + 1
    offline = tiny.score(CONVERSATIONS)
    assert values[0] == pytest.approx([r.score for r in offline], abs=TOL)
    assert values[1] == pytest.approx([r.rewards[ATTRS[1]] for r in offline], abs=TOL)
    assert_logs(metrics.logged, expected_gating_logs(offline))
    # A second step on a new event loop (as asyncio.run makes) gets its own channel and works.
    assert asyncio.run(trl_step())[0] == pytest.approx(values[0], abs=TOL)


def test_log_gating_warns_once_without_log_metric(server):
    [func] = rtrl.reward_funcs(f"127.0.0.1:{server.port}", log_gating=True)
    trl_functions._warned.clear()
    with pytest.warns(UserWarning, match="no `log_metric`"):
        func(prompts=PROMPTS, completions=COMPLETIONS)


def test_client_alias_still_works(server, tiny):
    from rewardsvc.client import RewardClient

    with RewardClient(f"127.0.0.1:{server.port}") as client:
        [func] = client.trl_reward_funcs([None])
        assert func(PROMPTS, COMPLETIONS) == pytest.approx([r.score for r in tiny.score(CONVERSATIONS)], abs=TOL)


def test_verl_compute_score_as_the_naive_manager_calls_it(server, tiny):
    compute_score = functools.partial(rverl.compute_score, target=f"127.0.0.1:{server.port}")  # reward_kwargs
    offline = tiny.score(CONVERSATIONS)
    for conversation, want in zip(CONVERSATIONS, offline):
        extra_info = {"index": 0, "split": "train", "prompt": np.array(conversation[:-1], dtype=object)}  # from parquet
        got = compute_score(data_source="chat", solution_str=conversation[-1]["content"], ground_truth=None, extra_info=extra_info)
        assert got == pytest.approx(want.score, abs=TOL)
    detailed = rverl.compute_score("chat", "Red.", None, {"prompt": "Name a colour."}, target=f"127.0.0.1:{server.port}", return_dict=True)
    assert detailed["score"] == pytest.approx(offline[0].score, abs=TOL)
    assert set(detailed) == {"score", *(f"{kind}/{a}" for kind in ("reward", "gating", "coefficient") for a in ATTRS)}
    for a in ATTRS:
        assert detailed[f"coefficient/{a}"] == pytest.approx(offline[0].coefficients[a], abs=TOL)
    with pytest.raises(InvalidInputError, match=r'extra_info\["prompt"\]: missing'):
        compute_score(data_source="chat", solution_str="Red.", ground_truth=None, extra_info={"index": 3})


def test_verl_async_compute_score_as_the_reward_loop_awaits_it(server, tiny):
    """verl 0.9.1's naive manager awaits an `async def` compute_score, the samples of a chunk together
    (RewardLoopWorker.compute_score_batch gathers run_single)."""
    compute_score = functools.partial(rverl.compute_score_async, target=f"127.0.0.1:{server.port}", attribute=ATTRS[2])
    assert asyncio.iscoroutinefunction(rverl.compute_score_async)

    async def chunk():
        return await asyncio.gather(*(compute_score(data_source="chat", solution_str=c[-1]["content"], ground_truth=None,
                                                    extra_info={"prompt": np.array(c[:-1], dtype=object)})
                                      for c in CONVERSATIONS))  # fmt: skip

    assert asyncio.run(chunk()) == pytest.approx([r.rewards[ATTRS[2]] for r in tiny.score(CONVERSATIONS)], abs=TOL)
