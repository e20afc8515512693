from __future__ import annotations

import torch

from rewardsvc.config import HeadsConfig
from rewardsvc.model.heads import ArmoHeads


def test_heads_match_the_armorm_formulas():
    torch.manual_seed(0)
    K, H = 4, 16
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b", "c", "v"), hidden_size=H, gating_hidden_dim=8, gating_n_hidden=2))
    T = torch.eye(K)
    T[3] = torch.tensor([-0.5, -0.2, 0.1, 0.0])  # verbosity row: r'_j = r_j - lambda_j r_v, r'_v = 0
    heads.reward_transform_matrix.copy_(T)
    heads.gating.logit_scale.data.fill_(2.5)
    h_r, h_p = torch.randn(3, H), torch.randn(3, H)
    out = heads(h_r, h_p)

    r = h_r @ heads.regression_layer.weight.T
    x = h_p
    layers = heads.gating.layers
    for i, layer in enumerate(layers):
        x = x @ layer.weight.T + layer.bias
        if i < len(layers) - 1:
            x = torch.clamp(x, min=0)
    g = 2.5 * torch.exp(x / 10) / torch.exp(x / 10).sum(-1, keepdim=True)
    debiased = r.clone()
    for j, lam in enumerate([0.5, 0.2, -0.1]):
        debiased[:, j] = r[:, j] - lam * r[:, 3]
    debiased[:, 3] = 0
    torch.testing.assert_close(out.rewards, r)
    torch.testing.assert_close(out.gating, g)
    torch.testing.assert_close(out.gating.sum(-1), torch.full((3,), 2.5))
    torch.testing.assert_close(out.debiased, debiased)
    torch.testing.assert_close(out.score, (g * debiased).sum(-1))
    # The effective coefficients reproduce the score from the raw rewards.
    torch.testing.assert_close((out.coefficients * r).sum(-1), out.score)


def test_heads_run_in_float32_for_bf16_inputs():
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b"), hidden_size=8, gating_hidden_dim=4))
    out = heads(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.score.dtype == torch.float32


def test_regression_bias_enters_the_rewards_and_the_coefficients_still_hold():
    torch.manual_seed(1)
    K, H = 3, 8
    heads = ArmoHeads(HeadsConfig(attributes=("a", "b", "v"), hidden_size=H, gating_hidden_dim=4, regression_bias=True))
    assert torch.equal(heads.regression_layer.bias, torch.zeros(K))  # a fresh head adds nothing
    with torch.no_grad():
        heads.regression_layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        heads.reward_transform_matrix.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [-0.4, -0.2, 0]]))
    h_r, h_p = torch.randn(4, H), torch.randn(4, H)
    out = heads(h_r, h_p)
    r = h_r @ heads.regression_layer.weight.detach().T + torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(out.rewards, r)
    torch.testing.assert_close(out.score, (out.gating * (r @ heads.reward_transform_matrix)).sum(-1))
    torch.testing.assert_close((out.coefficients * out.rewards).sum(-1), out.score)
    assert "regression_layer.bias" not in ArmoHeads(HeadsConfig(attributes=("a",), hidden_size=H)).state_dict()
