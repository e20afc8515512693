"""Stage 2 gating on synthetic pairs whose preferred attribute depends on the prompt's cluster."""

from __future__ import annotations

import copy

import pytest
import torch

from rewardsvc.config import HeadsConfig
from rewardsvc.errors import InvalidInputError
from rewardsvc.model.heads import ArmoHeads
from rewardsvc.training.stage2 import (
    PreferencePairs, Stage2Config, balanced_weights, standardize_gating_input, train_gating,
)

H, K = 32, 3
ATTRS = ("accuracy", "style", "verbosity")
LAMBDA_0 = 1.0  # attribute 0 is debiased by verbosity: r'_0 = r_0 - r_2


@pytest.fixture(autouse=True)
def one_thread():
    """These MLPs are tiny: on the shared 2-core box, 2 intra-op threads spin against other processes (measured
    3-6x slower). Restored afterwards so other tests keep the process default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _heads(seed: int = 0) -> ArmoHeads:
    torch.manual_seed(seed)
    heads = ArmoHeads(HeadsConfig(attributes=ATTRS, hidden_size=H, gating_hidden_dim=64, gating_n_hidden=2,
                                  verbosity_attribute="verbosity"))
    with torch.no_grad():
        heads.regression_layer.weight.zero_()
        heads.regression_layer.weight[:, :K] = torch.eye(K)  # r_k = h_r[k]
        heads.reward_transform_matrix.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-LAMBDA_0, 0.0, 0.0]]))
    return heads


def _pairs(n: int, seed: int) -> tuple[PreferencePairs, torch.Tensor]:
    """Cluster A prompts (h_p[0] = +3) prefer the higher debiased accuracy r_0 - r_2; cluster B (-3) the higher
    style r_1. Raw r_0 alone ranks A's pairs at chance level plus a little, so only the debiased rewards work."""
    g = torch.Generator().manual_seed(seed)
    cluster_a = torch.rand(n, generator=g) < 0.5  # (N,)
    prompt = torch.randn(n, H, generator=g)
    prompt[:, 0] = torch.where(cluster_a, 3.0, -3.0)
    a, b = torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)
    a[:, 2] *= 2.0  # verbosity varies more than accuracy: raw r_0 is dominated by it
    b[:, 2] *= 2.0
    target = torch.where(cluster_a, (a[:, 0] - LAMBDA_0 * a[:, 2]) - (b[:, 0] - LAMBDA_0 * b[:, 2]), a[:, 1] - b[:, 1])
    a_wins = (target > 0)[:, None]
    pairs = PreferencePairs(prompt=prompt, chosen=torch.where(a_wins, a, b), rejected=torch.where(a_wins, b, a))
    return pairs, cluster_a


def test_gating_learns_the_right_attribute_per_cluster_on_debiased_rewards():
    heads = _heads()
    before = copy.deepcopy(heads.state_dict())
    train, _ = _pairs(1200, seed=1)
    val, val_cluster_a = _pairs(400, seed=2)
    result = train_gating(heads, train, val, Stage2Config(lr=3e-3, batch_size=128, max_epochs=30, patience=5))

    # Independent accuracy: the full forward pass of the heads on each response, not the training shortcut.
    with torch.no_grad():
        s_c = heads(val.chosen, val.prompt).score
        s_r = heads(val.rejected, val.prompt).score
        gating = heads.gate(val.prompt)  # (M, K)
    accuracy = (s_c > s_r).sum().item() / len(val)
    assert accuracy == pytest.approx(result.best_val_accuracy, abs=1e-9)
    assert accuracy > 0.9
    assert gating[val_cluster_a, 0].mean() > 2 * gating[val_cluster_a, 1].mean()
    assert gating[~val_cluster_a, 1].mean() > 2 * gating[~val_cluster_a, 0].mean()

    after = heads.state_dict()
    torch.testing.assert_close(after["regression_layer.weight"], before["regression_layer.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["reward_transform_matrix"], before["reward_transform_matrix"], rtol=0, atol=0)
    changed = [k for k in after if k.startswith("gating.") and not torch.equal(after[k], before[k])]
    assert "gating.logit_scale" in changed and len(changed) >= 3

    history = result.history
    assert history[0]["epoch"] == 0 and history[0]["steps"] == 0
    assert result.best_val_accuracy == max(row["val_accuracy"] for row in history)
    assert history[result.best_epoch]["val_accuracy"] == result.best_val_accuracy
    assert result.steps == history[-1]["steps"] == (len(history) - 1) * 10  # 1200 / 128 -> 10 steps an epoch


def test_restores_best_state_and_is_seedable():
    train, _ = _pairs(300, seed=3)
    val, _ = _pairs(100, seed=4)
    config = Stage2Config(lr=1e-2, batch_size=64, max_epochs=4, patience=2, seed=7)
    heads_1, heads_2 = _heads(), _heads()
    result_1 = train_gating(heads_1, train, val, config)
    result_2 = train_gating(heads_2, train, val, config)
    assert result_1.history == result_2.history
    for key, value in heads_1.state_dict().items():
        torch.testing.assert_close(value, heads_2.state_dict()[key], rtol=0, atol=0)
    # What is left in the heads is the best epoch's state, not the last one's.
    with torch.no_grad():
        margin = heads_1(val.chosen, val.prompt).score - heads_1(val.rejected, val.prompt).score
    assert (margin > 0).sum().item() / len(val) == pytest.approx(result_1.best_val_accuracy, abs=1e-9)
    best = result_1.history[result_1.best_epoch]
    assert torch.nn.functional.softplus(-margin).mean().item() == pytest.approx(best["val_loss"], rel=1e-5)


def test_max_steps_and_validation():
    train, _ = _pairs(300, seed=5)
    val, _ = _pairs(50, seed=6)
    result = train_gating(_heads(), train, val, Stage2Config(batch_size=64, max_steps=3))
    assert result.steps == 3 and len(result.history) == 2
    with pytest.raises(InvalidInputError, match="H=16, the heads H=32"):
        small = PreferencePairs(torch.zeros(4, 16), torch.zeros(4, 16), torch.zeros(4, 16))
        train_gating(_heads(), small, val)
    with pytest.raises(InvalidInputError, match="must all be"):
        PreferencePairs(torch.zeros(4, H), torch.zeros(3, H), torch.zeros(4, H))
    with pytest.raises(InvalidInputError, match="stage2.batch_size"):
        Stage2Config(batch_size=0)


def test_balanced_weights_give_each_category_and_each_source_within_it_an_equal_share():
    groups = [("safety", "hh")] * 6 + [("safety", "xstest")] * 2 + [("chat", "uf")] * 4
    w = balanced_weights(groups)
    total = lambda pred: float(sum(x for x, g in zip(w, groups) if pred(g)))  # noqa: E731
    assert total(lambda g: g[0] == "safety") == pytest.approx(0.5)
    assert total(lambda g: g == ("safety", "hh")) == pytest.approx(0.25)
    assert total(lambda g: g == ("safety", "xstest")) == pytest.approx(0.25)
    assert total(lambda g: g[0] == "chat") == pytest.approx(0.5)


def test_standardized_gating_equals_the_original_network_on_standardized_inputs():
    heads = _heads()
    original = copy.deepcopy(heads)
    prompts = torch.randn(50, H) * torch.linspace(0.1, 100, H) + 40.0  # a few huge dimensions, far from 0
    standardize_gating_input(heads, prompts)
    mu, sd = prompts.double().mean(0), prompts.double().std(0)
    with torch.no_grad():
        torch.testing.assert_close(heads.gate(prompts), original.gate(((prompts - mu) / sd).float()), rtol=1e-4, atol=1e-5)


def test_sample_weights_zero_pairs_are_never_trained_on():
    """Pairs with weight 0 carry flipped labels: if they were drawn, the gating could not learn the clusters."""
    heads = _heads()
    train, _ = _pairs(600, seed=1)
    val, _ = _pairs(300, seed=2)
    flipped = PreferencePairs(prompt=train.prompt, chosen=train.rejected, rejected=train.chosen)
    both = PreferencePairs(prompt=torch.cat([train.prompt, flipped.prompt]), chosen=torch.cat([train.chosen, flipped.chosen]),
                           rejected=torch.cat([train.rejected, flipped.rejected]))  # fmt: skip
    weights = torch.cat([torch.ones(600), torch.zeros(600)])
    result = train_gating(heads, both, val, Stage2Config(max_epochs=30, patience=30), sample_weights=weights)
    assert result.best_val_accuracy > 0.8
    with pytest.raises(InvalidInputError, match="sample_weights"):
        train_gating(heads, both, val, Stage2Config(max_epochs=1), sample_weights=torch.zeros(1200))
