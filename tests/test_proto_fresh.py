"""The checked-in generated code in rewardsvc/_proto matches what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "rewardsvc" / "_proto"


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalise(text: str) -> str:
    """Drop the generator's version stamps: another grpcio-tools release writes other numbers into
    otherwise identical code, which is not staleness of the contract."""
    text = re.sub(r"# Protobuf Python Version: .*", "", text)
    text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "", text)
    return re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", "", text)


def test_generated_code_is_fresh(tmp_path):
    fresh = {p.relative_to(tmp_path): p for p in _gen_proto().generate(tmp_path)}
    checked_in = {p.relative_to(CHECKED_IN): p for p in CHECKED_IN.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(map(str, fresh)) == sorted(map(str, checked_in)), "run: python scripts/gen_proto.py"
    stale = [str(rel) for rel, path in fresh.items()
             if _normalise(path.read_text()) != _normalise(checked_in[rel].read_text())]  # fmt: skip
    assert not stale, f"rewardsvc/_proto is stale ({stale}); run: python scripts/gen_proto.py"


def test_generated_modules_import_as_a_package():
    from rewardsvc._proto.rewardsvc.v1 import reward_pb2, reward_pb2_grpc

    assert reward_pb2.DESCRIPTOR.package == "rewardsvc.v1"
    assert reward_pb2.DESCRIPTOR.name == "rewardsvc/v1/reward.proto"
    assert hasattr(reward_pb2_grpc, "RewardServiceStub")
    methods = {m.name for m in reward_pb2.DESCRIPTOR.services_by_name["RewardService"].methods}
    assert methods == {"Score", "ScoreGroup", "Compare", "ScoreStream", "InspectWeights", "GetModelInfo"}
