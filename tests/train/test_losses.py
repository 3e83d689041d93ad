"""Golden values for every objective (small worked examples, one per paper equation).

Each expected value is derived here from the paper's formula with plain ``math`` and first checked
against a hand-computed reference value (6 decimals), then compared with the function under test.
Properties (gradient signs, extremes, detached constants, padding) live in test_losses_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import RunningMean
from train.losses._core import log1mexp
from train.losses.apo import apo_down_loss, apo_zero_loss
from train.losses.bco import bco_loss
from train.losses.calibration import hinge_loss, ipo_loss, slic_hf_loss
from train.losses.dpo import (
    bco_pair_loss,
    cdpo_loss,
    dpo_loss,
    dpop_loss,
    exo_pair_loss,
    odpo_loss,
    robust_dpo_loss,
    rpo_loss,
)
from train.losses.kto import kl_pair_indices, kto_loss
from train.losses.listwise import lipo_lambda_loss, pro_loss, rrhf_loss
from train.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from train.losses.reward import bradley_terry_loss, cost_model_loss
from train.losses.sft import sft_loss
from train.losses.unlikelihood import cringe_loss, npo_loss

TOL = 1e-5  # function vs. independent derivation
SPEC = 1e-6  # independent derivation vs. the 6-decimal hand-computed reference value


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def row(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def nls(z: float) -> float:
    """−log σ(z) = log(1 + e^{−z})."""
    return math.log1p(math.exp(-z))


def check(got: torch.Tensor, expected: float, spec_value: float | None = None) -> None:
    if spec_value is not None:
        assert expected == pytest.approx(spec_value, abs=SPEC)
    assert got.item() == pytest.approx(expected, abs=TOL)


# T0: β = 0.1, ℓθ(y_w) = −10, ℓθ(y_l) = −12, ℓref = −11 for both: ρ_w = 1, ρ_l = −1, h = 2.
BETA, RHO_W, RHO_L, H = 0.1, 1.0, -1.0, 2.0


def t0() -> dict[str, torch.Tensor]:
    return dict(
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
    )


# ---------------------------------------------------------------- DPO, cDPO, rDPO


def test_dpo_t0_and_extreme() -> None:
    check(dpo_loss(**t0()).losses, nls(BETA * H), 0.598139)
    extreme = dpo_loss(
        policy_chosen_logps=t(-1511.0),
        policy_rejected_logps=t(-11.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
    )  # βh = −150
    check(extreme.losses, 150.0 + math.log1p(math.exp(-150.0)), 150.0)
    out = dpo_loss(**t0())
    assert out.chosen_rewards.item() == pytest.approx(BETA * RHO_W)
    assert out.rejected_rewards.item() == pytest.approx(BETA * RHO_L)


def test_dpo_soft_labels() -> None:
    p = 0.8
    expected = p * nls(BETA * H) + (1 - p) * nls(-BETA * H)
    check(dpo_loss(**t0(), p_chosen=t(p)).losses, expected)
    check(dpo_loss(**t0(), p_chosen=t(1.0)).losses, nls(BETA * H), 0.598139)


def test_cdpo_and_robust_t0() -> None:
    eps = 0.1
    cdpo = (1 - eps) * nls(BETA * H) + eps * nls(-BETA * H)
    rdpo = ((1 - eps) * nls(BETA * H) - eps * nls(-BETA * H)) / (1 - 2 * eps)
    check(cdpo_loss(**t0(), epsilon=eps).losses, cdpo, 0.618139)
    check(robust_dpo_loss(**t0(), epsilon=eps).losses, rdpo, 0.573139)


# ---------------------------------------------------------------- SLiC-HF / TRL hinge, IPO


def test_slic_hf_paper_form() -> None:
    delta, lam = 1.0, 0.5
    calibration = max(0.0, delta - (-10.0) + (-10.5))
    assert calibration == pytest.approx(0.5)
    out = slic_hf_loss(
        policy_chosen_logps=t(-10.0), policy_rejected_logps=t(-10.5), sft_target_logps=t(-8.0), delta=delta, lam=lam
    )
    check(out.losses, calibration - lam * (-8.0), 4.5)
    # On T0 the calibration term is max(0, 1 + 10 − 12) = 0; only the regulariser remains (y_ref = y_w).
    t0_out = slic_hf_loss(policy_chosen_logps=t(-10.0), policy_rejected_logps=t(-12.0), delta=delta, lam=lam)
    check(t0_out.metrics["calibration"], max(0.0, 1 + 10 - 12), 0.0)
    check(t0_out.losses, 0.0 + lam * 10.0)


def test_trl_hinge_t0() -> None:
    check(hinge_loss(**t0()).losses, max(0.0, 1 - BETA * H), 0.8)


def test_ipo_paper_and_trl_normalised() -> None:
    tau = 0.1
    check(ipo_loss(**t0(), tau=tau).losses, (H - 1 / (2 * tau)) ** 2, 9.0)
    h_norm = RHO_W / 5 - RHO_L / 6  # T0-len
    assert h_norm == pytest.approx(0.366667, abs=SPEC)
    got = ipo_loss(**t0(), tau=tau, length_normalise=True, chosen_lengths=t(5.0), rejected_lengths=t(6.0))
    check(got.losses, (h_norm - 1 / (2 * tau)) ** 2, 21.467778)


# ---------------------------------------------------------------- KTO


def test_kto_worked_example() -> None:
    z0 = max(0.0, ((-11.5 - -11.8) + (-12.2 - -12.0)) / 2)
    assert z0 == pytest.approx(0.05)
    desirable = 1 - sigmoid(BETA * (1.0 - z0))
    undesirable = 1 - sigmoid(BETA * (z0 - (-1.0)))
    out = kto_loss(
        policy_logps=t(-10.0, -12.0),
        reference_logps=t(-11.0, -11.0),
        labels=torch.tensor([True, False]),
        policy_kl_logps=t(-11.5, -12.2),
        reference_kl_logps=t(-11.8, -12.0),
    )
    check(out.losses[0], desirable, 0.476268)
    check(out.losses[1], undesirable, 0.473774)
    check(out.losses.mean(), (desirable + undesirable) / 2, 0.475021)
    check(out.metrics["kl"], z0)


def test_kto_negative_kl_clamps_to_zero() -> None:
    out = kto_loss(
        policy_logps=t(-10.0),
        reference_logps=t(-11.0),
        labels=torch.tensor([True]),
        policy_kl_logps=t(-12.0, -12.0),
        reference_kl_logps=t(-11.0, -11.0),
    )
    check(out.losses, 1 - sigmoid(BETA * 1.0), 0.475021)
    assert out.metrics["kl"].item() == 0.0


def test_kto_kl_pair_indices_are_trl_shift() -> None:
    assert kl_pair_indices(3).tolist() == [2, 0, 1]  # x1↔y3, x2↔y1, x3↔y2 (each x_i meets the next prompt's y)
    with pytest.raises(ValueError):
        kl_pair_indices(1)


# ---------------------------------------------------------------- BCO


def test_bco_fresh_running_mean_and_given_delta() -> None:
    common = dict(policy_logps=t(-10.0, -12.0), reference_logps=t(-11.0, -11.0), labels=torch.tensor([True, False]))
    fresh = bco_loss(**common, running_mean=RunningMean())  # rewards 0.1, −0.1 → δ = 0
    check(fresh.metrics["delta"], 0.0, 0.0)
    check(fresh.losses[0], nls(0.1), 0.644397)
    check(fresh.losses[1], nls(-(-0.1 - 0.0)), 0.644397)  # undesirable: −log σ(−(r − δ))
    given = bco_loss(**common, fixed_delta=0.02)
    check(given.losses[0], nls(0.1 - 0.02), 0.653947)
    check(given.losses[1], nls(-(-0.1 - 0.02)), 0.634946)
    check(given.losses.mean(), (nls(0.08) + nls(0.12)) / 2, 0.644447)


def test_bco_pair_trl_head_form_is_summed() -> None:
    check(bco_pair_loss(**t0()).losses, nls(BETA * RHO_W) + nls(-BETA * RHO_L), 1.288793)


# ---------------------------------------------------------------- CPO, ORPO, SimPO


def test_cpo_t0_paper_nll() -> None:
    preference = nls(BETA * ((-10.0) - (-12.0)))
    assert preference == pytest.approx(0.598139, abs=SPEC)
    check(cpo_loss(policy_chosen_logps=t(-10.0), policy_rejected_logps=t(-12.0)).losses, preference + 10.0, 10.598139)
    # per-sequence mean NLL (|y_w| = 5): coincides with TRL's token-mean for a single sequence
    mean_form = cpo_loss(
        policy_chosen_logps=t(-10.0), policy_rejected_logps=t(-12.0), chosen_nll=t(2.0), nll_form="sequence_mean"
    )
    check(mean_form.losses, preference + 2.0, 2.598139)


def test_orpo_t1() -> None:
    w, lo = -1.0, -1.5
    log_odds = (w - lo) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(lo)))
    assert log_odds == pytest.approx(0.706193, abs=SPEC)
    out = orpo_loss(policy_chosen_logps=t(w), policy_rejected_logps=t(lo), chosen_nll=t(1.0), lam=0.1)
    check(out.metrics["log_odds_ratio"], log_odds)
    check(out.metrics["odds_ratio_loss"], nls(log_odds), 0.401135)
    check(out.losses, 1.0 + 0.1 * nls(log_odds), 1.040114)


def test_log1mexp_float32_spec_values() -> None:
    x = torch.tensor([-1e-8, -30.0], dtype=torch.float32)
    got = log1mexp(x)
    assert got[0].item() == pytest.approx(-18.420681, abs=1e-5)
    assert got[1].item() == pytest.approx(-9.357623e-14, rel=1e-5)


def test_simpo_both_parametrisations() -> None:
    beta, gamma = 2.0, 0.5
    t1 = dict(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-1.5))  # T1 means
    expected = nls(beta * (-1.0) - beta * (-1.5) - gamma)
    check(simpo_loss(**t1, beta=beta, gamma_beta_ratio=0.25).losses, expected, 0.474077)
    check(simpo_loss(**t1, beta=beta, gamma=gamma, gamma_beta_ratio=None).losses, expected, 0.474077)
    t0_len = dict(policy_chosen_logps=t(-10.0 / 5), policy_rejected_logps=t(-12.0 / 6))
    check(simpo_loss(**t0_len, beta=beta).losses, nls(0.0 - gamma), 0.974077)
    with pytest.raises(ValueError):
        simpo_loss(**t1, gamma=0.5, gamma_beta_ratio=0.25)


# ---------------------------------------------------------------- EXO, DPOP, RPO, ODPO


def test_exo_pair_t0() -> None:
    eps, z = 1e-3, BETA * H
    expected = sigmoid(z) * (math.log(sigmoid(z)) - math.log(1 - eps)) + sigmoid(-z) * (
        math.log(sigmoid(-z)) - math.log(eps)
    )
    check(exo_pair_loss(**t0(), epsilon=eps).losses, expected, 2.422015)


def test_dpop_inside_penalty() -> None:
    check(dpop_loss(**t0(), lam=50.0).losses, nls(BETA * H), 0.598139)  # penalty inactive on T0
    case = dict(
        policy_chosen_logps=t(-11.5),
        policy_rejected_logps=t(-13.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
    )
    h, penalty = (-11.5 + 11.0) - (-13.0 + 11.0), max(0.0, -11.0 - -11.5)
    assert (h, penalty) == (1.5, 0.5)
    assert nls(BETA * h) == pytest.approx(0.620957, abs=SPEC)
    check(dpop_loss(**case, lam=50.0).losses, nls(BETA * (h - 50.0 * penalty)), 2.441091)
    wrong_outside = nls(BETA * h) + 50.0 * penalty
    assert wrong_outside == pytest.approx(25.620957, abs=SPEC)
    assert dpop_loss(**case, lam=50.0).losses.item() != pytest.approx(wrong_outside, abs=1.0)


def test_rpo_t0_len() -> None:
    check(rpo_loss(**t0(), chosen_nll=t(10.0 / 5), alpha=1.0).losses, nls(BETA * H) + 10.0 / 5, 2.598139)


def test_odpo_offsets() -> None:
    check(odpo_loss(**t0(), score_chosen=t(5.0), score_rejected=t(2.0)).losses, nls(BETA * H - math.log(3.0)), 1.240167)
    check(odpo_loss(**t0(), score_chosen=t(0.9), score_rejected=t(0.4)).losses, nls(BETA * H - math.log(0.5)), 0.343140)
    ratio = odpo_loss(**t0(), score_chosen=t(5.0), score_rejected=t(2.0), ratio=True)
    check(ratio.losses, nls(BETA * H - math.log(2.5)))
    with pytest.raises(ValueError):
        odpo_loss(**t0(), score_chosen=t(0.4), score_rejected=t(0.9))


# ---------------------------------------------------------------- NPO, APO


def test_npo() -> None:
    out = npo_loss(policy_logps=t(-10.0, -12.0), reference_logps=t(-11.0, -11.0), beta=0.1)
    check(out.losses[0], (2 / 0.1) * nls(-0.1 * 1.0), 14.887933)
    check(out.losses[1], (2 / 0.1) * nls(-0.1 * -1.0), 12.887933)
    retain = npo_loss(
        policy_logps=t(-10.0, -12.0),
        reference_logps=t(-11.0, -11.0),
        labels=torch.tensor([True, False]),
        retain_weight=0.5,
    )
    check(retain.losses[0], 0.5 * 10.0)
    check(retain.losses[1], 20 * nls(0.1))


def test_apo_t0() -> None:
    zero = (1 - sigmoid(BETA * RHO_W)) + sigmoid(BETA * RHO_L)
    down = sigmoid(BETA * RHO_W) + (1 - sigmoid(BETA * (RHO_W - RHO_L)))
    check(apo_zero_loss(**t0()).losses, zero, 0.950042)
    check(apo_down_loss(**t0()).losses, down, 0.975145)


# ---------------------------------------------------------------- LiPO-λ, PRO, RRHF


def lipo_expected(base: float) -> float:
    psi, s = (1.0, 0.5, 0.0), (0.1, -0.1, 0.0)
    tau = (1, 3, 2)  # ranks by s, descending
    gain = [2**p - 1 for p in psi]
    inv_d = [1 / (math.log(1 + r) / math.log(base)) for r in tau]
    total = 0.0
    for i in range(3):
        for j in range(3):
            if psi[i] > psi[j]:
                delta = abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])
                total += delta * math.log1p(math.exp(-(s[i] - s[j])))
    return total


def test_lipo_lambda() -> None:
    # Δ weights with a log2 discount (LiPO, arXiv 2402.01878)
    inv_d = [1 / math.log2(1 + r) for r in (1, 3, 2)]
    assert abs(1 - (2**0.5 - 1)) * abs(inv_d[0] - inv_d[1]) == pytest.approx(0.292893, abs=SPEC)
    assert abs(1 - 0) * abs(inv_d[0] - inv_d[2]) == pytest.approx(0.369070, abs=SPEC)
    assert abs((2**0.5 - 1) - 0) * abs(inv_d[1] - inv_d[2]) == pytest.approx(0.054233, abs=SPEC)
    common = dict(
        policy_logps=row(-10, -12, -11),
        reference_logps=row(-11, -11, -11),
        scores=row(1.0, 0.5, 0.0),
        mask=torch.ones(1, 3, dtype=torch.bool),
        beta=0.1,
    )
    check(lipo_lambda_loss(**common).losses, lipo_expected(2.0), 0.453389)
    check(lipo_lambda_loss(**common, discount_base=math.e).losses, lipo_expected(math.e), 0.654102)


def pro_expected(r: tuple[float, ...], big_r: tuple[float, ...]) -> float:
    total = 0.0
    for k in range(len(r) - 1):
        t_ki = {i: big_r[k] - big_r[i] for i in range(k + 1, len(r))}
        t_kk = max(t_ki.values())
        terms = [r[k] * t_kk] + [r[i] * t_ki[i] for i in t_ki]
        total += math.log(sum(math.exp(x) for x in terms)) - r[k] * t_kk
    return total


def test_pro() -> None:
    ranking = pro_expected((-1.0, -1.2, -1.5), (2.0, 1.0, 0.0))
    assert ranking == pytest.approx(1.279104 + 0.554355, abs=2e-6)
    # summed log-probs + lengths give RRHF's length-normalised scores; top summed = −10
    common = dict(
        policy_logps=row(-10, -6, -3),
        lengths=row(10, 5, 2),
        scores=row(2.0, 1.0, 0.0),
        mask=torch.ones(1, 3, dtype=torch.bool),
    )
    out = pro_loss(**common, sft_weight=0.05)
    check(out.metrics["ranking"], ranking, 1.833460)
    check(out.losses, ranking + 0.05 * 10.0, 2.333460)
    code_form = pro_loss(**common, sft_weight=0.05, reference_code_sft_scale=True)
    check(code_form.losses, ranking + 0.05 * (3 - 1) ** 2 * 10.0, 3.833460)
    shuffled = pro_loss(
        policy_logps=row(-3, -10, -6),
        lengths=row(2, 10, 5),
        scores=row(0.0, 2.0, 1.0),
        mask=torch.ones(1, 3, dtype=torch.bool),
        sft_weight=0.05,
    )
    check(shuffled.losses, ranking + 0.5)  # order of slots does not matter: the function sorts by score


def test_rrhf() -> None:
    p, rewards = (-1.2, -1.0, -1.5), (1.0, 0.5, 0.0)
    rank = sum(max(0.0, p[i] - p[j]) for i in range(3) for j in range(3) if rewards[i] < rewards[j])
    assert rank == pytest.approx(0.2)
    # lengths (10, 4, 2) with sums (−12, −4, −3) give p = (−1.2, −1.0, −1.5)
    out = rrhf_loss(
        policy_logps=row(-12, -4, -3),
        lengths=row(10, 4, 2),
        scores=row(*rewards),
        mask=torch.ones(1, 3, dtype=torch.bool),
    )
    check(out.metrics["rank"], rank, 0.2)
    check(out.losses, rank + 12.0, 12.2)


# ---------------------------------------------------------------- Cringe


def test_cringe_token_values() -> None:
    # One negative token: target logit s⁻ = 2; the only other candidate with non-negligible mass has s⁺ = 3.
    # One positive token whose CE is exactly 0.5: logits [a, 0] with −log σ(a) = 0.5.
    a = -math.log(math.exp(0.5) - 1)
    assert nls(a) == pytest.approx(0.5)
    logits = torch.full((2, 1, 8), -1e4, dtype=torch.float64)
    logits[0, 0, 0], logits[0, 0, 1] = a, 0.0
    logits[1, 0, 4], logits[1, 0, 5] = 2.0, 3.0
    common = dict(
        logits=logits,
        target_ids=torch.tensor([[0], [4]]),
        token_mask=torch.ones(2, 1, dtype=torch.bool),
        labels=torch.tensor([True, False]),
        k=5,
        alpha=1.0,
    )
    out = cringe_loss(**common, normalisation="sum")
    check(out.losses[0], 0.5)
    check(out.losses[1], math.log1p(math.exp(2.0 - 3.0)), 0.313262)
    check(out.losses.sum(), 0.5 + math.log1p(math.exp(-1.0)), 0.813262)
    token_mean = cringe_loss(**common)  # batch_token_mean (ParlAI): Σ token losses / 2 tokens
    check(token_mean.losses.mean(), (0.5 + math.log1p(math.exp(-1.0))) / 2)


@pytest.mark.parametrize("target, expected_plus", [(0, 4.0), (3, 5.0)])
def test_cringe_excludes_negative_token(target: int, expected_plus: float) -> None:
    # k = 1 over logits [5, 4, 3, 0]: top-2 = {0, 1}. If the negative token is among them it is masked
    # (target 0 → s⁺ = 4); otherwise the 2nd candidate is masked (target 3 → s⁺ = 5). Deterministic.
    logits = torch.tensor([[[5.0, 4.0, 3.0, 0.0]]], dtype=torch.float64)
    out = cringe_loss(
        logits=logits,
        target_ids=torch.tensor([[target]]),
        token_mask=torch.ones(1, 1, dtype=torch.bool),
        labels=torch.tensor([False]),
        k=1,
        normalisation="sum",
    )
    check(out.losses, math.log1p(math.exp(logits[0, 0, target].item() - expected_plus)))


# ---------------------------------------------------------------- cost model, Bradley–Terry, SFT


def test_bradley_terry() -> None:
    r_c, r_r = t(1.5), t(0.5)
    check(bradley_terry_loss(rewards_chosen=r_c, rewards_rejected=r_r).losses, nls(1.0), 0.313262)
    third = bradley_terry_loss(rewards_chosen=r_c, rewards_rejected=r_r, margin=t(1 / 3))
    check(third.losses, nls(1 - 1 / 3), 0.414370)
    check(bradley_terry_loss(rewards_chosen=r_c, rewards_rejected=r_r, margin=t(1.0)).losses, nls(0.0), 0.693147)
    check(
        bradley_terry_loss(rewards_chosen=r_c, rewards_rejected=r_r, center_coef=0.01).losses,
        nls(1.0) + 0.01 * 2.0**2,
        0.353262,
    )


def test_cost_model() -> None:
    c_harmful, c_safe = 1.0, -0.5  # harmful: s = +1; safe: s = −1
    parts = (nls(c_harmful - c_safe), nls(+1 * c_harmful), nls(-1 * c_safe))
    assert parts == pytest.approx((0.201413, 0.313262, 0.474077), abs=SPEC)
    out = cost_model_loss(
        costs_chosen=t(c_safe),
        costs_rejected=t(c_harmful),
        safe_chosen=torch.tensor([True]),
        safe_rejected=torch.tensor([False]),
    )
    check(out.losses, sum(parts), 0.988752)


@pytest.mark.parametrize(
    "normalisation, expected",
    [
        ("sequence_mean", [(0.5 + 1.5) / 2, 3.0 / 1]),
        ("sum", [2.0, 3.0]),
        ("batch_token_mean", [2.0 * 2 / 3, 3.0 * 2 / 3]),  # mean over the batch = 5 / 3 tokens
    ],
)
def test_sft_normalisations(normalisation: str, expected: list[float]) -> None:
    token_logps = torch.tensor([[-0.5, -1.5, -9.0], [-3.0, -7.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = sft_loss(token_logps=token_logps, token_mask=mask, normalisation=normalisation)
    assert out.losses.tolist() == pytest.approx(expected, abs=TOL)
