"""Issue 18 objectives: golden values worked by hand (math / numpy here, never the function under test),
properties, and toy problems on which each objective learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.losses.constrained import c_dpo_loss, dual_ascent_step, lagrangian_preference
from train.losses.cross_prompt import dove_loss, relative_po_loss
from train.losses.d2o import d2o_loss
from train.losses.dpo import dpo_loss
from train.losses.reward import bradley_terry_lm_loss, bradley_terry_loss, pointwise_regression_loss
from train.losses.reward_rank import listwise_bradley_terry_loss, plackett_luce_loss


def nls(z: float) -> float:
    """−log σ(z) by hand."""
    return math.log1p(math.exp(-z))


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ------------------------------------------------------------------ reward-model family: golden values


def test_pointwise_golden():
    out = pointwise_regression_loss(
        rewards_chosen=t(1.0, -0.5), rewards_rejected=t(0.2, 0.3), score_chosen=t(2.0, 0.0), score_rejected=t(0.0, 1.0)
    )
    # ½[(1−2)² + 0.2²] = 0.52 ; ½[0.5² + 0.7²] = 0.37
    assert out.losses.tolist() == pytest.approx([0.52, 0.37])
    out = pointwise_regression_loss(
        rewards_chosen=t(1.0, -0.5),
        rewards_rejected=t(0.2, 0.3),
        score_chosen=t(2.0, 0.0),
        score_rejected=t(0.0, 1.0),
        target_shift=1.0,
        target_scale=2.0,
    )
    # targets (s−1)/2: c = 0.5, −0.5 ; r = −0.5, 0 -> ½[0.25 + 0.49] = 0.37 ; ½[0 + 0.09] = 0.045
    assert out.losses.tolist() == pytest.approx([0.37, 0.045])
    with pytest.raises(ValueError):
        pointwise_regression_loss(
            rewards_chosen=t(1.0), rewards_rejected=t(0.0), score_chosen=t(1.0), score_rejected=t(0.0), target_scale=0.0
        )


def test_bradley_terry_lm_golden_and_limits():
    out = bradley_terry_lm_loss(
        rewards_chosen=t(1.0), rewards_rejected=t(0.0), chosen_nll=t(2.0), lm_coef=0.1, regularizer="nll"
    )
    assert out.losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-1.0)) + 0.1 * 2.0)
    # GRM's default (sft_only, reference-free): R = −log σ(β Σ log π(y_c)); Σ log π = −30, β = 0.1 → log(1 + e³)
    sft = bradley_terry_lm_loss(
        rewards_chosen=t(1.0), rewards_rejected=t(0.0), chosen_nll=t(2.0), chosen_logps=t(-30.0), lm_coef=0.1
    )
    assert sft.losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(3.0)))
    with pytest.raises(ValueError, match="chosen_logps"):
        bradley_terry_lm_loss(rewards_chosen=t(1.0), rewards_rejected=t(0.0), chosen_nll=t(2.0))
    plain = bradley_terry_loss(rewards_chosen=t(1.0, -2.0), rewards_rejected=t(0.0, 0.5))
    zero = bradley_terry_lm_loss(
        rewards_chosen=t(1.0, -2.0),
        rewards_rejected=t(0.0, 0.5),
        chosen_nll=t(9.0, 9.0),
        lm_coef=0.0,
        regularizer="nll",
    )
    assert torch.allclose(plain.losses, zero.losses)


def test_listwise_bt_golden_ties_and_padding():
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    rewards = torch.tensor(
        [[2.0, 1.0, 0.0, float("nan")], [2.0, 1.0, 0.0, float("inf")]], dtype=torch.float64, requires_grad=True
    )
    scores = t(3.0, 2.0, 1.0, 0.0).expand(2, 4).clone()
    scores[1] = t(3.0, 3.0, 1.0, 9.0)  # a tie between slots 0 and 1; the padding score must not count
    out = listwise_bradley_terry_loss(rewards=rewards, scores=scores, mask=mask)
    # row 0: C(3,2)=3 pairs, gaps 1, 2, 1 ; row 1: the tie is skipped, pairs (0,2), (1,2): gaps 2, 1
    assert out.losses.tolist() == pytest.approx([(2 * nls(1) + nls(2)) / 3, (nls(2) + nls(1)) / 2])
    out.losses.sum().backward()
    assert torch.isfinite(rewards.grad).all() and (rewards.grad[:, 3] == 0).all()


def test_listwise_bt_with_two_responses_is_bradley_terry():
    rc, rr = t(0.3, -1.0, 2.0), t(0.5, -3.0, 2.5)
    bt = bradley_terry_loss(rewards_chosen=rc, rewards_rejected=rr)
    lw = listwise_bradley_terry_loss(
        rewards=torch.stack([rc, rr], -1), scores=t(1.0, 0.0).expand(3, 2), mask=torch.ones(3, 2, dtype=torch.bool)
    )
    assert torch.allclose(bt.losses, lw.losses)


def test_plackett_luce_golden():
    def lse(*xs):
        return math.log(sum(math.exp(x) for x in xs))

    rewards = t(2.0, 1.0, 0.0)
    good = plackett_luce_loss(
        rewards=rewards[None], scores=t(3.0, 2.0, 1.0)[None], mask=torch.ones(1, 3, dtype=torch.bool)
    )
    assert good.losses.item() == pytest.approx((lse(2, 1, 0) - 2) + (lse(1, 0) - 1))
    bad = plackett_luce_loss(
        rewards=rewards[None], scores=t(1.0, 2.0, 3.0)[None], mask=torch.ones(1, 3, dtype=torch.bool)
    )
    assert bad.losses.item() == pytest.approx((lse(0, 1, 2) - 0) + (lse(1, 2) - 1))
    # padding in the middle, holding NaN: the list is (slot 0, slot 2) -> Bradley–Terry on them
    r = torch.tensor([[0.5, float("nan"), 1.5]], dtype=torch.float64, requires_grad=True)
    out = plackett_luce_loss(rewards=r, scores=t(2.0, 5.0, 1.0)[None], mask=torch.tensor([[True, False, True]]))
    assert out.losses.item() == pytest.approx(nls(0.5 - 1.5))
    out.losses.sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 1] == 0


# ------------------------------------------------------------------ DOVE, Relative PO, D2O, C-DPO: golden values


def test_dove_golden_and_joint_prompt_terms_cancel_for_one_prompt():
    out = dove_loss(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-3.0),
        reference_chosen_logps=t(-2.0),
        reference_rejected_logps=t(-2.5),
        beta=0.1,
    )
    assert out.losses.item() == pytest.approx(nls(0.1 * ((-1 + 2) - (-3 + 2.5))))
    # joint log-probs: the same prompt's log π(x) (policy −4, reference −5) on both sides cancels
    joint = dove_loss(
        policy_chosen_logps=t(-5.0),
        policy_rejected_logps=t(-7.0),
        reference_chosen_logps=t(-7.0),
        reference_rejected_logps=t(-7.5),
        beta=0.1,
    )
    assert joint.losses.item() == pytest.approx(out.losses.item())
    # different prompts: the prompt terms do not cancel (−4 vs −1 on the policy side)
    cross = dove_loss(
        policy_chosen_logps=t(-5.0),
        policy_rejected_logps=t(-4.0),
        reference_chosen_logps=t(-7.0),
        reference_rejected_logps=t(-7.5),
        beta=0.1,
    )
    assert cross.losses.item() == pytest.approx(nls(0.1 * ((-5 + 7) - (-4 + 7.5))))


def test_relative_po_golden_two_rows():
    rho_w, rho_l = np.array([1.0, 0.5]), np.array([-1.0, 0.0])
    emb = np.array([[2.0, 0.0], [0.0, 0.5]])  # orthogonal: cosine distance 1 (scale must not matter)
    d = 1 - np.array([[1.0, 0.0], [0.0, 1.0]])
    w = np.exp(-d / 0.5)
    w = w / w.sum(1, keepdims=True)  # [[0.8808, 0.1192], ...]
    expected = [np.mean([np.log1p(np.exp(-0.1 * w[i, j] * (rho_w[i] - rho_l[j]))) for j in range(2)]) for i in range(2)]
    zeros = torch.zeros(2, dtype=torch.float64)
    out = relative_po_loss(
        policy_chosen_logps=torch.tensor(rho_w),
        policy_rejected_logps=torch.tensor(rho_l),
        reference_chosen_logps=zeros,
        reference_rejected_logps=zeros,
        prompt_embeddings=torch.tensor(emb),
        beta=0.1,
        distance_temperature=0.5,
    )
    assert out.losses.tolist() == pytest.approx(expected)
    assert w[0, 0] == pytest.approx(1 / (1 + math.exp(-2)))


def test_relative_po_diagonal_weight_shrinks_with_batch():
    """Spec trap: B = 8 unrelated prompts (cosine distance 0.85), τ = 0.5: ω_ii = 1/(1 + 7e^{−1.7}) ≈ 0.439."""
    basis = torch.eye(9, dtype=torch.float64)
    emb = math.sqrt(0.15) * basis[0] + math.sqrt(0.85) * basis[1:]  # pairwise cosine 0.15
    rho = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    out = relative_po_loss(
        policy_chosen_logps=rho + 1.0,
        policy_rejected_logps=torch.zeros(8, dtype=torch.float64),
        reference_chosen_logps=torch.zeros(8, dtype=torch.float64),
        reference_rejected_logps=torch.zeros(8, dtype=torch.float64),
        prompt_embeddings=emb,
    )
    assert out.metrics["omega_diagonal"].item() == pytest.approx(1 / (1 + 7 * math.exp(-1.7)), abs=1e-9)
    assert 1 / (1 + 7 * math.exp(-1.7)) == pytest.approx(0.4388, abs=1e-4)


def test_relative_po_unpaired_golden_and_no_contrast():
    from train.losses.cross_prompt import relative_po_unpaired_loss

    # rows: desirable d0 (ρ 1, prompt e1), undesirable u0 (ρ −1, e1), desirable d1 (ρ 0.5, e2), undesirable u1 (ρ 0, e2)
    rho = np.array([1.0, -1.0, 0.5, 0.0])
    labels = torch.tensor([True, False, True, False])
    emb = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.0, 0.5]])
    w = np.exp(-np.array([[0.0, 1.0], [1.0, 0.0]]) / 0.5)
    w = w / w.sum(1, keepdims=True)  # d_i against (u0, u1): same prompt direction 0 apart, orthogonal 1 apart
    d, u = rho[[0, 2]], rho[[1, 3]]
    expected = [np.mean([np.log1p(np.exp(-0.1 * w[i, j] * (d[i] - u[j]))) for j in range(2)]) for i in range(2)]
    pol = torch.tensor(rho, requires_grad=True)
    out = relative_po_unpaired_loss(
        policy_logps=pol + 3.0,
        reference_logps=torch.full((4,), 3.0, dtype=torch.float64),
        labels=labels,
        prompt_embeddings=torch.tensor(emb),
    )
    assert out.losses.tolist() == pytest.approx([2 * expected[0], 0.0, 2 * expected[1], 0.0])  # × B/|D| = 2
    assert out.losses.mean().item() == pytest.approx(np.mean(expected)) and out.metrics["no_contrast"].item() == 0
    # a micro-batch with one label only: no contrast, a zero loss that still reaches the policy's graph
    lone = relative_po_unpaired_loss(
        policy_logps=pol,
        reference_logps=torch.zeros(4, dtype=torch.float64),
        labels=torch.ones(4, dtype=torch.bool),
        prompt_embeddings=torch.tensor(emb),
    )
    lone.losses.mean().backward()
    assert lone.losses.tolist() == [0.0] * 4 and lone.metrics["no_contrast"].item() == 1 and pol.grad is not None


def test_relative_po_single_row_is_dpo():
    args = dict(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-3.0),
        reference_chosen_logps=t(-2.0),
        reference_rejected_logps=t(-2.5),
    )
    rel = relative_po_loss(**args, prompt_embeddings=t(0.3, 0.4)[None])
    assert rel.losses.item() == pytest.approx(dpo_loss(**args).losses.item())


def test_d2o_golden_ragged_and_dpo_limit():
    # row 0: samples ρ = 1, 3 (mean 2), negative ρ = −1 in slot 1 ; row 1: one sample ρ = 0.5, negative ρ = 2, one pad
    pol = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, float("nan")]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -3.0], [0.0, -2.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = d2o_loss(policy_logps=pol, reference_logps=ref, scores=scores, mask=mask, beta=0.1, alpha=0.2)
    assert out.losses.tolist() == pytest.approx([nls(0.1 * 2 - 0.2 * (-1)), nls(0.1 * 0.5 - 0.2 * 2)])
    out.losses.sum().backward()
    assert torch.isfinite(pol.grad).all() and pol.grad[1, 2] == 0
    # K = 1, α = β: DPO
    dpo = dpo_loss(
        policy_chosen_logps=t(0.5),
        policy_rejected_logps=t(0.0),
        reference_chosen_logps=t(0.0),
        reference_rejected_logps=t(-2.0),
        beta=0.1,
    )
    d2o = d2o_loss(
        policy_logps=t(0.5, 0.0)[None],
        reference_logps=t(0.0, -2.0)[None],
        scores=t(1.0, 0.0)[None],
        mask=torch.ones(1, 2, dtype=torch.bool),
        beta=0.1,
        alpha=0.1,
    )
    assert d2o.losses.item() == pytest.approx(dpo.losses.item())


def test_d2o_rejects_lists_without_one_negative():
    with pytest.raises(ValueError, match="one negative"):
        d2o_loss(
            policy_logps=torch.zeros(1, 3),
            reference_logps=torch.zeros(1, 3),
            scores=t(1.0, 0.0, 0.0)[None],
            mask=torch.ones(1, 3, dtype=torch.bool),
        )


def test_c_dpo_golden_relabel_soft_and_hard():
    pol_c, pol_r, ref_c, ref_r = t(-1.0), t(-2.0), t(-1.5), t(-1.5)  # h = 0.5 − (−0.5) = 1
    rc, rr, cc, cr = t(1.0), t(2.0), t(0.0), t(3.0)
    args = dict(
        policy_chosen_logps=pol_c,
        policy_rejected_logps=pol_r,
        reference_chosen_logps=ref_c,
        reference_rejected_logps=ref_r,
        reward_chosen=rc,
        reward_rejected=rr,
        cost_chosen=cc,
        cost_rejected=cr,
    )
    # λ = 1: r_λ = 1 vs −1, gap 2: soft p = σ(2); hard p = 1 (the data order stands)
    p = 1 / (1 + math.exp(-2))
    soft = c_dpo_loss(**args, beta=0.1, lam=1.0, soft=True)
    assert soft.losses.item() == pytest.approx(p * nls(0.1) + (1 - p) * nls(-0.1))
    hard = c_dpo_loss(**args, beta=0.1, lam=1.0, soft=False)
    assert hard.losses.item() == pytest.approx(nls(0.1))
    # λ = 0: the reward model prefers the data's rejected side (gap −1): hard relabels the pair
    flipped = c_dpo_loss(**args, beta=0.1, lam=0.0, soft=False)
    assert flipped.losses.item() == pytest.approx(nls(-0.1))
    assert flipped.metrics["relabelled"].item() == 1.0
    q = 1 / (1 + math.exp(1))
    assert c_dpo_loss(**args, beta=0.1, lam=0.0).losses.item() == pytest.approx(q * nls(0.1) + (1 - q) * nls(-0.1))
    # an exact tie under r_λ: p = ½ (λ = 1/3: r_λ = 1 vs 1)
    assert lagrangian_preference(rc, rr, cc, cr, 1 / 3, False).item() == pytest.approx(0.5)


def test_dual_ascent_step():
    assert dual_ascent_step(1.0, cost_estimate=0.5, cost_limit=0.2, lr=2.0) == pytest.approx(1.6)
    assert dual_ascent_step(0.1, cost_estimate=0.0, cost_limit=1.0, lr=1.0) == 0.0
    with pytest.raises(ValueError):
        dual_ascent_step(0.1, 0.0, 0.0, lr=0.0)


# ------------------------------------------------------------------ toy problems: each objective learns


def _features(n: int, k: int, gen: torch.Generator):
    """n lists of k responses, each a 6-dim feature vector; the true quality is a fixed linear score."""
    x = torch.randn(n, k, 6, generator=gen)
    true_w = torch.tensor([1.5, -1.0, 0.5, 0.0, 2.0, -0.5])
    return x, x @ true_w


def _ranking_accuracy(w: torch.Tensor, x: torch.Tensor, q: torch.Tensor) -> float:
    r = x @ w
    pairs = q.unsqueeze(-1) > q.unsqueeze(-2)
    return float(((r.unsqueeze(-1) > r.unsqueeze(-2)) & pairs).sum() / pairs.sum())


@pytest.mark.parametrize("name", ["pointwise", "listwise_bt", "plackett_luce", "bradley_terry_lm"])
def test_reward_family_learns_a_ranking(name):
    gen = torch.Generator().manual_seed(0)
    x, q = _features(64, 4, gen)
    x_test, q_test = _features(64, 4, gen)
    w = torch.zeros(6, requires_grad=True)
    lm = torch.zeros(6, 3, requires_grad=True)  # bradley_terry_lm: a toy "LM head" on the same features
    targets = q.argmax(-1) % 3  # the best answer's "token"
    opt = torch.optim.Adam([w, lm], lr=0.05)
    mask = torch.ones(64, 4, dtype=torch.bool)
    before = _ranking_accuracy(w.detach(), x_test, q_test)
    first_nll = None
    for _ in range(150):
        r = x @ w
        if name == "pointwise":
            out = pointwise_regression_loss(
                rewards_chosen=r[:, 0], rewards_rejected=r[:, 1], score_chosen=q[:, 0], score_rejected=q[:, 1]
            )
        elif name == "listwise_bt":
            out = listwise_bradley_terry_loss(rewards=r, scores=q, mask=mask)
        elif name == "plackett_luce":
            out = plackett_luce_loss(rewards=r, scores=q, mask=mask)
        else:
            best, worst = q.argmax(-1), q.argmin(-1)
            rows = torch.arange(64)
            feats = x[rows, best]
            nll = torch.nn.functional.cross_entropy(feats @ lm, targets, reduction="none")
            first_nll = nll.mean().item() if first_nll is None else first_nll
            out = bradley_terry_lm_loss(
                rewards_chosen=r[rows, best],
                rewards_rejected=r[rows, worst],
                chosen_nll=nll,
                chosen_logps=-nll,  # one "token" per answer: the sum is the token's log-prob
                lm_coef=0.2,
            )
            last_nll = nll.mean().item()
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    after = _ranking_accuracy(w.detach(), x_test, q_test)
    assert before == 0.0 and after > 0.9, (name, after)
    if name == "bradley_terry_lm":
        assert last_nll < first_nll


def _policy_logps(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)


def test_dove_learns_joint_preference_across_prompts():
    """Toy joint model: π(x, y) = π(x) π(y | x) over 3 prompts × 4 responses; pairs prefer (x0, y1) over (x2, y3)."""
    prompt_logits = torch.zeros(3, requires_grad=True)
    resp_logits = torch.zeros(3, 4, requires_grad=True)
    ref_p, ref_r = _policy_logps(prompt_logits.detach()), _policy_logps(resp_logits.detach())
    opt = torch.optim.Adam([prompt_logits, resp_logits], lr=0.1)
    for _ in range(100):
        lp, lr_ = _policy_logps(prompt_logits), _policy_logps(resp_logits)
        out = dove_loss(
            policy_chosen_logps=(lp[0] + lr_[0, 1])[None],
            policy_rejected_logps=(lp[2] + lr_[2, 3])[None],
            reference_chosen_logps=(ref_p[0] + ref_r[0, 1])[None],
            reference_rejected_logps=(ref_p[2] + ref_r[2, 3])[None],
            beta=0.5,
        )
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    joint = _policy_logps(prompt_logits.detach())[:, None] + _policy_logps(resp_logits.detach())
    assert joint[0, 1] - joint[2, 3] > 2.0 and out.metrics["reward_accuracy"] == 1.0


def test_relative_po_learns_and_uses_similar_prompts():
    """4 prompts, two topics (rows 0,1 similar; 2,3 similar); each prompt has responses 0 (good) and 1 (bad)."""
    logits = torch.zeros(4, 2, requires_grad=True)
    ref = _policy_logps(logits.detach())
    emb = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(100):
        lp = _policy_logps(logits)
        out = relative_po_loss(
            policy_chosen_logps=lp[:, 0],
            policy_rejected_logps=lp[:, 1],
            reference_chosen_logps=ref[:, 0],
            reference_rejected_logps=ref[:, 1],
            prompt_embeddings=emb,
            beta=1.0,
        )
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    p_good = torch.softmax(logits.detach(), -1)[:, 0]
    assert (p_good > 0.9).all()


def test_d2o_learns_to_avoid_the_negative_and_keeps_the_samples():
    """One prompt, 5 responses: 0-2 are the model's own samples, 4 the human negative, 3 never seen."""
    logits = torch.zeros(5, requires_grad=True)
    ref = _policy_logps(logits.detach())
    scores, mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.ones(1, 4, dtype=torch.bool)
    slots = torch.tensor([0, 1, 2, 4])
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(100):
        lp = _policy_logps(logits)
        out = d2o_loss(
            policy_logps=lp[slots][None],
            reference_logps=ref[slots][None],
            scores=scores,
            mask=mask,
            beta=0.5,
            alpha=0.5,
        )
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    p = torch.softmax(logits.detach(), -1)
    assert p[4] < 0.02 and (p[:3] > 0.2).all()


@pytest.mark.parametrize("lam, winner", [(0.0, 1), (2.0, 0)])
def test_c_dpo_learns_the_lagrangian_preference(lam, winner):
    """Response 1 is more helpful (r 2 vs 1) but costly (c 1 vs 0): λ = 0 prefers it, λ = 2 the safe 0."""
    logits = torch.zeros(2, requires_grad=True)
    ref = _policy_logps(logits.detach())
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(100):
        lp = _policy_logps(logits)
        out = c_dpo_loss(
            policy_chosen_logps=lp[0:1],
            policy_rejected_logps=lp[1:2],
            reference_chosen_logps=ref[0:1],
            reference_rejected_logps=ref[1:2],
            reward_chosen=t(1.0),
            reward_rejected=t(2.0),
            cost_chosen=t(0.0),
            cost_rejected=t(1.0),
            beta=1.0,
            lam=lam,
            soft=False,
        )
        opt.zero_grad()
        out.losses.mean().backward()
        opt.step()
    assert torch.softmax(logits.detach(), -1)[winner] > 0.9


def test_dove_soft_label_golden():
    z = 0.1 * ((-1 + 2) - (-3 + 2.5))
    out = dove_loss(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-3.0),
        reference_chosen_logps=t(-2.0),
        reference_rejected_logps=t(-2.5),
        p_chosen=t(0.8),
        beta=0.1,
    )
    assert out.losses.item() == pytest.approx(0.8 * nls(z) + 0.2 * nls(-z))
