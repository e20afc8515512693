"""Packed (padding-free) forward passes: rows concatenated with per-sequence position ids give each row the
hidden states it gets alone, and scores equal the padded path's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rewardsvc.config import ScorerConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.batch_plan import plan_packed_batches
from test_scorer import conversation


def test_plan_packed_batches_bounds_the_sum_of_lengths():
    lengths = [5, 30, 12, 7, 40, 3]
    batches = plan_packed_batches(lengths, token_budget=45, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and (sum(lengths[i] for i in b) <= 45 or len(b) == 1)
    assert plan_packed_batches([100], 10, 4) == [[0]]  # over the budget: alone


def test_packed_rows_see_only_themselves(tiny_scorer):
    backbone = tiny_scorer.backbone
    rows = [list(tiny_scorer.encode(conversation(i)).input_ids) for i in (1, 2, 5, 7)]
    positions = [[0, len(r) // 2, len(r) - 1] for r in rows]
    packed = backbone.hidden_packed(rows, positions)
    for i, (row, pos) in enumerate(zip(rows, positions)):
        alone = backbone.hidden_at([row], [pos])[0]
        torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=1e-5)
    # a different neighbour leaves row 0 as it was
    other = backbone.hidden_packed([rows[0], rows[3][::-1]], [positions[0], [0, 1, 2]])
    torch.testing.assert_close(other[0], packed[0], atol=1e-5, rtol=1e-5)


def test_packed_scores_equal_padded(tiny_scorer):
    conversations = [conversation(i) for i in range(11)]
    padded = tiny_scorer.with_config(replace(tiny_scorer.config, batch_plan="padded")).score(conversations)
    packed = tiny_scorer.with_config(replace(tiny_scorer.config, batch_plan="packed")).score(conversations)
    for a, b in zip(padded, packed):
        assert abs(a.score - b.score) <= 1e-5 and a.num_tokens == b.num_tokens


def test_batch_plan_is_validated():
    with pytest.raises(InvalidInputError, match="scorer.batch_plan"):
        ScorerConfig(batch_plan="ragged")


def test_row_boundary_attention_equals_rows_alone(tiny_scorer):
    # The interface the CUDA varlen kernel plugs into, run here with its per-row SDPA kernel: boundaries from
    # the position ids, no mask at all.
    from rewardsvc.model.packed_attention import cu_seqlens

    backbone = tiny_scorer.backbone
    rows = [list(tiny_scorer.encode(conversation(i)).input_ids) for i in (3, 4, 8)]
    positions = [[len(r) - 1] for r in rows]
    packed = backbone.hidden_packed(rows, positions, attention="boundaries")
    for i, (row, pos) in enumerate(zip(rows, positions)):
        torch.testing.assert_close(packed[i], backbone.hidden_at([row], [pos])[0], atol=1e-5, rtol=1e-5)
    assert backbone.model.config._attn_implementation != "rewardsvc_packed"  # switched back after the forward
    cu, longest = cu_seqlens(torch.tensor([0, 1, 2, 0, 0, 1]))
    assert cu.tolist() == [0, 3, 4, 6] and longest == 3
