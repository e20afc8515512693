"""Content-addressed feature store: only new conversations cost a pass, a killed run resumes, no mixing."""

from __future__ import annotations

import zlib

import pytest
import torch

from rewardsvc.errors import CheckpointError, InvalidInputError
from rewardsvc.model.encoding import EncodedConversation
from rewardsvc.training.feature_store import FeatureStore, extract_features, feature_key

H, LAYERS = 5, (2, 4)


def _conv(i: int) -> EncodedConversation:
    ids = tuple(range(i, i + 3 + i % 4))
    return EncodedConversation(input_ids=ids, prompt_anchor=1, original_tokens=len(ids), truncated=False)


def _expected(e: EncodedConversation) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(e.input_ids).encode()))
    return torch.randn(2, len(LAYERS), H, generator=g)  # (2, L, H): response, prompt


class Counting:
    """features_fn that records what it computed and can die on its n-th call (a killed run)."""

    def __init__(self, die_on_call: int | None = None):
        self.seen: list[tuple[int, ...]] = []
        self.calls = 0
        self.die_on_call = die_on_call

    def __call__(self, encoded):
        self.calls += 1
        if self.calls == self.die_on_call:
            raise KeyboardInterrupt("killed")
        self.seen.extend(e.input_ids for e in encoded)
        both = torch.stack([_expected(e) for e in encoded])  # (n, 2, L, H)
        return both[:, 0], both[:, 1]


def _keyed(indices, backbone="tiny-a"):
    convs = [_conv(i) for i in indices]
    return {feature_key(backbone, c.input_ids, c.prompt_anchor): c for c in convs}


def test_round_trip_in_requested_order(tmp_path):
    store = FeatureStore(tmp_path, "tiny-a", LAYERS, H)
    convs = _keyed(range(10))
    assert extract_features(store, convs, Counting(), chunk_size=3, progress=False) == 10
    keys = list(convs)[::-1]
    got = FeatureStore(tmp_path, "tiny-a", LAYERS, H).get(keys)  # a fresh open rebuilds the index from the parts
    for n, key in enumerate(keys):
        want = _expected(convs[key])
        torch.testing.assert_close(got.response[n], want[0])
        torch.testing.assert_close(got.prompt[n], want[1])
        assert got.num_tokens[n] == convs[key].num_tokens
    response, prompt = got.layer(4)
    torch.testing.assert_close(response[0], _expected(convs[keys[0]])[0, 1])


def test_new_rows_cost_only_themselves_and_duplicates_once(tmp_path):
    store = FeatureStore(tmp_path, "tiny-a", LAYERS, H)
    extract_features(store, _keyed(range(6)), Counting(), progress=False)
    again = Counting()
    assert extract_features(store, _keyed([*range(8), 3]), again, progress=False) == 2
    assert sorted(again.seen) == sorted([_conv(6).input_ids, _conv(7).input_ids])


def test_killed_run_resumes_without_recomputing_saved_chunks(tmp_path):
    convs = _keyed(range(10))
    with pytest.raises(KeyboardInterrupt):
        extract_features(FeatureStore(tmp_path, "tiny-a", LAYERS, H), convs, Counting(die_on_call=3), chunk_size=3, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    resumed = Counting()
    store = FeatureStore(tmp_path, "tiny-a", LAYERS, H)
    assert len(store) == 6
    assert extract_features(store, convs, resumed, chunk_size=3, progress=False) == 4
    assert len(store.get(list(convs)).response) == 10


def test_key_depends_on_backbone_tokens_and_anchor():
    base = feature_key("a", (1, 2, 3), 1)
    assert base != feature_key("b", (1, 2, 3), 1)
    assert base != feature_key("a", (1, 2, 4), 1)
    assert base != feature_key("a", (1, 2, 3), 0)
    assert base == feature_key("a", [1, 2, 3], 1)


def test_refuses_another_backbone_or_layer_set(tmp_path):
    FeatureStore(tmp_path, "tiny-a", LAYERS, H)
    with pytest.raises(CheckpointError, match="tiny-b"):
        FeatureStore(tmp_path, "tiny-b", LAYERS, H)
    with pytest.raises(CheckpointError, match="layers"):
        FeatureStore(tmp_path, "tiny-a", (2, 3), H)


def test_bad_input_is_named(tmp_path):
    store = FeatureStore(tmp_path, "tiny-a", LAYERS, H)
    with pytest.raises(CheckpointError, match="not in"):
        store.get(["nope"])
    with pytest.raises(InvalidInputError, match="response"):
        store.add(["k"], torch.zeros(1, 3, H), torch.zeros(1, 2, H), torch.tensor([3]))
    with pytest.raises(InvalidInputError, match="non-finite"):
        store.add(["k"], torch.full((1, 2, H), float("nan")), torch.zeros(1, 2, H), torch.tensor([3]))
    with pytest.raises(InvalidInputError, match="layer 3"):
        store.get([]).layer(3)
    with pytest.raises(InvalidInputError, match="layers"):
        FeatureStore(tmp_path / "x", "tiny-a", (0,), H)
