"""Golden values for the online estimators, KL estimators, controllers and policy/value losses.

Each expected number is derived by hand here (plain `math`) and checked against the worked examples of
the papers' formulas (PPO / GAE / Ziegler / GRPO / RLOO / ReMax / Safe-RLHF / DAPO), then compared with
the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from train import advantages as adv
from train.losses.policy import (
    aggregate,
    clipped_surrogate,
    reinforce_loss,
    remax_loss,
    rloo_loss,
    value_loss,
)
from train.losses.policy import (
    policy_gradient_loss as ppo_clip_loss,
)

TOL = 1e-5


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_values_and_gradients():
    # log π = −1, log π_ref = −1.2: ℓ = 0.2, r = e^{−0.2}
    ell, r = 0.2, math.exp(-0.2)
    expect = {"k1": (ell, 1.0), "k2": (0.5 * ell**2, ell), "k3": (r - 1 + ell, 1 - r), "k3_ratio": (r - 1 + ell, ell)}
    assert expect["k3"][0] == pytest.approx(0.018731, abs=1e-6)
    assert expect["k3"][1] == pytest.approx(0.181269, abs=1e-6)
    for name, (value, grad) in expect.items():
        lp = torch.tensor([-1.0], requires_grad=True)
        est = adv.kl_estimate(lp, torch.tensor([-1.2]), name, old_logps=torch.tensor([-1.0]))
        est.sum().backward()
        assert float(est.detach()) == pytest.approx(value, abs=TOL), name
        assert float(lp.grad) == pytest.approx(grad, abs=TOL), name  # coefficient on ∇log π


def test_kl_estimator_unknown_and_k3_ratio_needs_old():
    with pytest.raises(ValueError):
        adv.kl_estimate(t(0.0), t(0.0), "k4")
    with pytest.raises(ValueError):
        adv.kl_estimate(t(0.0), t(0.0), "k3_ratio")


# --------------------------------------------------------------------------- shaping


def test_shaped_last_token_reward():
    # score 1.0, β = 0.2, log-ratio 0.3 on the last token: 1 − 0.06 = 0.94
    mask = torch.tensor([[True, True, False]])
    kl = t(0.1, 0.3, 9.0)[None]
    r = adv.shape_rewards(t(1.0), mask, kl, beta=0.2)
    assert r[0, 1].item() == pytest.approx(0.94, abs=TOL)
    assert r[0, 0].item() == pytest.approx(-0.02, abs=TOL)
    assert r[0, 2].item() == 0.0  # never on padding


def test_score_on_last_real_token_and_nan_is_zero():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    r = adv.shape_rewards(t(2.0, float("nan")), mask)
    assert r.tolist() == [[0, 0, 2.0, 0], [0, 0, 0, 0]]


def test_overlong_penalty():
    # L = 512, B = 128, |y| = 480: −(480 − 384)/128 = −0.75
    p = adv.overlong_penalty(torch.tensor([480, 300, 600]), 512, 128)
    assert p.tolist() == pytest.approx([-0.75, 0.0, -1.0])


def test_whiten_masked_population_std():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = adv.whiten(x, torch.tensor([[True, True, False]]))
    assert w[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)


# --------------------------------------------------------------------------- GAE / returns


def test_gae_worked_example():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), γ = 1, λ = 0.95
    d3 = 1 - 0.7
    d2 = 0 + 0.7 - 0.6
    d1 = 0 + 0.6 - 0.5
    a3 = d3
    a2 = d2 + 0.95 * a3
    a1 = d1 + 0.95 * a2
    assert (a1, a2, a3) == pytest.approx((0.465750, 0.385000, 0.300000), abs=1e-6)
    mask = torch.tensor([[True, True, True, False]])
    a, g = adv.gae(t(0, 0, 1, 5)[None], t(0.5, 0.6, 0.7, 9)[None], mask, 1.0, 0.95)
    assert a[0].tolist() == pytest.approx([a1, a2, a3, 0.0], abs=TOL)
    assert g[0].tolist() == pytest.approx([0.965750, 0.985, 1.0, 0.0], abs=TOL)


def test_gae_gamma_discount_and_lambda_one_is_return_minus_value():
    mask = torch.ones(1, 3, dtype=torch.bool)
    r, v = t(0.5, 0.0, 1.0)[None], t(0.2, 0.4, 0.1)[None]
    a, g = adv.gae(r, v, mask, 1.0, 1.0)
    assert g[0].tolist() == pytest.approx([1.5, 1.0, 1.0], abs=TOL)
    assert a[0].tolist() == pytest.approx([1.3, 0.6, 0.9], abs=TOL)
    a, _ = adv.gae(t(0.0, 1.0)[None], t(0.0, 0.0)[None], torch.ones(1, 2, dtype=torch.bool), 0.5, 1.0)
    assert a[0].tolist() == pytest.approx([0.5, 1.0], abs=TOL)


def test_discounted_returns_reverse_cumsum():
    mask = torch.tensor([[True, True, True, False]])
    g = adv.discounted_returns(t(-0.1, -0.2, 1.0, 7.0)[None], mask)
    assert g[0].tolist() == pytest.approx([0.7, 0.8, 1.0, 0.0], abs=TOL)


# --------------------------------------------------------------------------- group estimators


def test_rloo_worked_example_and_nan():
    a = adv.rloo(t(1, 0, 0.5, 0.5), 4)
    assert a.tolist() == pytest.approx([0.666667, -0.666667, 0, 0], abs=1e-6)
    # NaN left out: baseline over scorable − 1; singleton scorable group gets 0
    a = adv.rloo(t(1, float("nan"), 0, 0.5, float("nan"), float("nan")), 3)
    assert a.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_grpo_worked_example_variants():
    r = t(1, 0, 0.5, 0.5)
    std = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0.5, 0.5)) / 3)
    assert 0.5 / (std + 1e-4) == pytest.approx(1.224445, abs=1e-6)
    assert adv.grpo(r, 4).tolist() == pytest.approx([1.224445, -1.224445, 0, 0], abs=1e-5)
    assert adv.dr_grpo(r, 4).tolist() == pytest.approx([0.5, -0.5, 0, 0], abs=1e-6)
    two = torch.cat([r, t(3, 3, 3, 3)])
    batch_std = torch.tensor([1, 0, 0.5, 0.5, 3, 3, 3, 3.0]).std().item()
    assert adv.grpo(two, 4, scale="batch")[:2].tolist() == pytest.approx(
        [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4)], abs=1e-5
    )


def test_grpo_flat_group_and_nan_give_zero():
    near = torch.full((4,), 0.1, dtype=torch.float32) + torch.tensor([0, 1e-8, 0, 0])
    assert adv.grpo(near, 4).abs().max().item() == 0.0  # never −2075
    a = adv.grpo(t(1, float("nan"), 0, 0.5), 4)
    std = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2 + 0) / 2)
    assert a.tolist() == pytest.approx([0.5 / (std + 1e-4), 0.0, -0.5 / (std + 1e-4), 0.0], abs=1e-5)
    with pytest.raises(ValueError):
        adv.grpo(t(1, 2, 3), 2)


def test_remax_worked_example():
    a = adv.remax(t(0.8, 0.2, float("nan")), t(0.5, 0.5, 0.5))
    assert a.tolist() == pytest.approx([0.3, -0.3, 0.0], abs=1e-6)
    # loss −A·Σ log π with Σ log π = −10: 3.0
    out = reinforce_loss(logps=torch.full((1, 5), -2.0), advantages=a[:1], mask=torch.ones(1, 5, dtype=torch.bool))
    assert out.losses.item() == pytest.approx(3.0, abs=1e-5)


# --------------------------------------------------------------------------- controllers


def test_adaptive_kl_worked_examples():
    # β = 0.2, target 6 nats, horizon 1e4, n = 512
    assert adv.adaptive_kl_beta(0.2, 8, 6, 512) == pytest.approx(0.2 * (1 + 0.2 * 512 / 1e4))
    assert adv.adaptive_kl_beta(0.2, 8, 6, 512) == pytest.approx(0.202048, abs=1e-6)
    assert adv.adaptive_kl_beta(0.2, 5, 6, 512) == pytest.approx(0.198293, abs=1e-6)


def test_lagrange_step_and_mix():
    # λ = 1, η = 0.1, J̄_C = 0.3, d = 0 -> λ = e^{0.03} = 1.030455
    new = adv.lagrange_step(0.0, 0.3, 0.0, 0.1)
    assert math.exp(new) == pytest.approx(1.030455, abs=1e-6)
    assert adv.lagrange_step(math.log(4.9), 10.0, 0.0, 0.1, lambda_max=5.0) == pytest.approx(math.log(5.0))
    assert adv.lagrange_step(0.0, -0.5, 0.0, 0.1) < 0.0  # under the threshold λ shrinks
    assert adv.mix_lagrangian(t(0.5), t(0.2), 1.0).item() == pytest.approx(0.15, abs=1e-6)
    # the ±β two-stream KL is λ-neutral: β = 0.01, ℓ = 0.5, λ = 2 -> −0.005
    beta, ell, lam = 0.01, 0.5, 2.0
    assert adv.mix_lagrangian(t(-beta * ell), t(beta * ell), lam).item() == pytest.approx(-0.005, abs=1e-7)


# --------------------------------------------------------------------------- losses


def test_ppo_clip_worked_examples():
    ratio = torch.tensor([math.exp(0.3)])
    assert ratio.item() == pytest.approx(1.349859, abs=1e-6)
    loss, _ = clipped_surrogate(ratio, t(1.0), 0.2)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    loss, _ = clipped_surrogate(ratio, t(-1.0), 0.2)
    assert loss.item() == pytest.approx(1.349859, abs=1e-6)
    # dual clip: A = −1, ρ = 4 -> 4.0 standard, 3.0 with c = 3
    assert clipped_surrogate(t(4.0), t(-1.0), 0.2)[0].item() == pytest.approx(4.0)
    assert clipped_surrogate(t(4.0), t(-1.0), 0.2, dual_clip=3.0)[0].item() == pytest.approx(3.0)
    # clip-higher: ρ = 1.25, A = 1 -> −1.2 at ε 0.2, −1.25 at ε_hi 0.28
    assert clipped_surrogate(t(1.25), t(1.0), 0.2, 0.28)[0].item() == pytest.approx(-1.25)


def test_ppo_clip_loss_through_log_probs():
    lp = torch.tensor([[0.3, 0.3]], requires_grad=True)
    out = ppo_clip_loss(lp, old_logps=torch.zeros(1, 2), advantages=t(-1.0), mask=torch.tensor([[True, False]]))
    assert out.losses.item() == pytest.approx(1.349859, abs=1e-6)
    out.losses.sum().backward()
    assert lp.grad.tolist()[0] == pytest.approx([1.349859, 0.0], abs=1e-6)  # unclipped branch, masked token silent


def test_aggregations_worked_example():
    # two sequences: 2 tokens of loss 1, 4 tokens of loss 2; L_max = 4
    tok = torch.tensor([[1.0, 1.0, 0, 0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    get = lambda agg: aggregate(tok, mask, agg).sum().item() / 2  # noqa: E731
    assert get("seq_mean_token_mean") == pytest.approx(1.5)
    assert get("token_mean") == pytest.approx(1.666667, abs=1e-6)
    assert get("seq_sum_norm") == pytest.approx(1.25)
    # split into two micro-batches of one sequence with the step's totals: same loss
    a = aggregate(tok[:1], mask[:1], "token_mean", total_tokens=6, total_sequences=2).sum() / 2
    b = aggregate(tok[1:], mask[1:], "token_mean", total_tokens=6, total_sequences=2).sum() / 2
    assert (a + b).item() == pytest.approx(1.666667, abs=1e-6)


def test_sequence_ratio_rloo_loss():
    # TRL RLOO: one ratio per sequence, exp(Σ log π − Σ log π_old) = e^{0.3}, clipped at 1.2 for A > 0
    lp = torch.tensor([[0.1, 0.2, 5.0]])
    out = ppo_clip_loss(
        lp,
        old_logps=torch.zeros(1, 3),
        advantages=t(1.0),
        mask=torch.tensor([[True, True, False]]),
        ratio_level="sequence",
        aggregation="seq_mean",
    )
    assert out.losses.item() == pytest.approx(-1.2, abs=1e-6)
    with pytest.raises(ValueError):
        ppo_clip_loss(lp, old_logps=lp, advantages=t(1.0), mask=lp > 0, ratio_level="sequence")


def test_kl_in_loss_grpo_value():
    # on-policy (ratio 1), A = 0, β = 0.04, k3 with ℓ = 0.2: loss = 0.04 · 0.018731
    lp = torch.tensor([[-1.0]], requires_grad=True)
    out = ppo_clip_loss(
        lp,
        old_logps=torch.tensor([[-1.0]]),
        advantages=t(0.0),
        mask=torch.ones(1, 1, dtype=torch.bool),
        ref_logps=torch.tensor([[-1.2]]),
        kl_coef=0.04,
        kl_estimator="k3",
    )
    assert out.losses.item() == pytest.approx(0.04 * 0.018731, abs=1e-7)
    out.losses.sum().backward()
    assert lp.grad.item() == pytest.approx(0.04 * 0.181269, abs=1e-6)


def test_value_loss_worked_example():
    # V = 0.9, V_old = 0.5, G = 1, ε_v = 0.2: max(0.01, 0.09)/2 = 0.045
    out = value_loss(
        values=t(0.9)[None], old_values=t(0.5)[None], returns=t(1.0)[None], mask=torch.ones(1, 1, dtype=torch.bool)
    )
    assert out.losses.item() == pytest.approx(0.045, abs=1e-6)
    out = value_loss(
        values=t(0.9)[None],
        old_values=t(0.5)[None],
        returns=t(1.0)[None],
        mask=torch.ones(1, 1, dtype=torch.bool),
        value_clip=None,
    )
    assert out.losses.item() == pytest.approx(0.005, abs=1e-6)


def test_remax_surrogate_gradient_is_reinforce():
    lp = torch.tensor([[-2.0, -1.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    remax_loss(logps=lp, old_logps=lp.detach(), advantages=t(0.3), mask=mask).losses.sum().backward()
    g1 = lp.grad.clone()
    lp.grad = None
    reinforce_loss(logps=lp, advantages=t(0.3), mask=mask).losses.sum().backward()
    assert g1[0].tolist() == pytest.approx(lp.grad[0].tolist()) and g1[0, 0].item() == pytest.approx(-0.3)


def test_rloo_loss_matches_sequence_formula():
    lp = torch.tensor([[0.1, 0.2], [-0.5, 0.0]])
    out = rloo_loss(
        logps=lp, old_logps=torch.zeros(2, 2), advantages=t(1.0, -2.0), mask=torch.ones(2, 2, dtype=torch.bool)
    )
    r = [math.exp(0.3), math.exp(-0.5)]
    expect = [max(-1 * r[0], -1 * min(r[0], 1.2)), max(2 * r[1], 2 * max(r[1], 0.8))]
    assert out.losses.tolist() == pytest.approx(expect, abs=1e-6)


# ------------------------------------------------------------------------------------------------ score normaliser


def test_running_moments_golden_safe_rlhf_update():
    # safe-rlhf RunningMeanStd from (count 0, mean 0, var 1): batch [1, 2, 3] -> (3, 2, 1);
    # then [4, 5] (mean 4.5, unbiased var 0.5): mean 2 + 2.5*2/5 = 3, var (1*3 + 0.5*2 + 2.5²*3*2/5)/5 = 2.3
    s = adv.running_moments((0, 0.0, 1.0), torch.tensor([1.0, float("nan"), 2.0, 3.0]))  # NaN left out
    assert s == (3, pytest.approx(2.0), pytest.approx(1.0))
    s = adv.running_moments(s, torch.tensor([4.0, 5.0]))
    assert s == (5, pytest.approx(3.0), pytest.approx(2.3))
    assert adv.running_moments(s, torch.tensor([float("nan")])) == s  # nothing scorable: unchanged
    x = torch.tensor([4.0, float("nan")])
    assert adv.normalize_scores(x, s, "affine")[0].item() == pytest.approx(0.659380, abs=1e-6)
    assert adv.normalize_scores(x, s, "scale")[0].item() == pytest.approx(2.637522, abs=1e-6)
    assert adv.normalize_scores(x, s, "translate")[0].item() == pytest.approx(1.0)
    assert adv.normalize_scores(x, s, "none")[0].item() == 4.0
    assert all(torch.isnan(adv.normalize_scores(x, s, f)[1]) for f in ("affine", "scale", "translate"))
    with pytest.raises(ValueError, match="affine"):
        adv.normalize_scores(x, s, "whiten")
