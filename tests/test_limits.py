"""One Limits definition (rewardsvc.config.Limits): the proto's ServerLimits has exactly its fields, the server,
the batcher and the scorer take their defaults from it, and docs/SERVING.md states them."""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

from rewardsvc._proto.rewardsvc.v1 import reward_pb2 as pb
from rewardsvc.config import Limits, ScorerConfig
from rewardsvc.serving.batching import BatcherConfig
from rewardsvc.serving.config import ServerConfig
from rewardsvc.serving.service import RewardService

SERVING_DOC = Path(__file__).resolve().parents[1] / "docs" / "SERVING.md"


def test_limits_are_the_proto_server_limits_field_for_field():
    proto_fields = [f.name for f in pb.ServerLimits.DESCRIPTOR.fields]
    assert [f.name for f in fields(Limits)] == proto_fields


def test_server_batcher_scorer_and_service_default_to_limits():
    limits, server = Limits(), ServerConfig()
    assert server.limits() == limits
    assert ScorerConfig().max_tokens == limits.max_tokens_per_conversation
    assert BatcherConfig().max_tokens_in_flight == limits.max_tokens_in_flight
    assert server.batcher_config().max_tokens_in_flight == limits.max_tokens_in_flight
    assert RewardService().limits == limits
    custom = ServerConfig(max_message_bytes=10, max_conversations_per_request=2, max_group_size=3, max_tokens_in_flight=99)
    assert asdict(custom.limits()) == {**asdict(limits), "max_message_bytes": 10, "max_conversations_per_request": 2,
                                       "max_group_size": 3, "max_tokens_in_flight": 99}  # fmt: skip


def _as_documented(value: int) -> str:
    mib = 1024 * 1024
    return f"{value // mib} MiB" if value % mib == 0 else f"{value:,}"


def test_serving_doc_states_every_limit_and_its_default():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\|.*\(`(\w+)`.*$", SERVING_DOC.read_text(), flags=re.M)}
    for f in fields(Limits):
        assert f.name in rows, f"docs/SERVING.md has no row for Limits.{f.name}"
        default = rows[f.name].split("|")[2].strip()
        assert default == _as_documented(f.default), f"{f.name}: the doc says {default}, Limits says {f.default}"
