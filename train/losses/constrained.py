"""C-DPO: constrained DPO for safety (Liu, Sun & Zheng 2024, arXiv 2403.02475).

Not to be confused with ``cdpo`` (conservative DPO, Mitchell 2023: label smoothing). Here each pair is
relabelled by the Lagrangian reward r_λ = r − λ·c from a reward model r and a cost model c (Safe-RLHF
convention: cost > 0 is unsafe), DPO is trained on the relabelled pairs, and λ follows dual ascent on
the constraint E[c] ≤ C_limit between rounds (:func:`dual_ascent_step`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, as_float, pair_output
from train.losses.dpo import log_ratios, smoothed_sigmoid_loss


def lagrangian_preference(
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    cost_chosen: Tensor,
    cost_rejected: Tensor,
    lam: float,
    soft: bool,
) -> Tensor:
    """P(chosen ≻ rejected) under r_λ = r − λc, [B], detached: σ(Δr_λ) (the Bradley–Terry model p*_λ),
    or the hard label 1[Δr_λ > 0] (½ on an exact tie: neither order is preferred)."""
    gap = (as_float(reward_chosen) - lam * as_float(cost_chosen)) - (
        as_float(reward_rejected) - lam * as_float(cost_rejected)
    )
    gap = gap.detach()
    if soft:
        return torch.sigmoid(gap)
    return (gap > 0).to(gap.dtype) + 0.5 * (gap == 0).to(gap.dtype)


def c_dpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reward_chosen: Tensor,
    reward_rejected: Tensor,
    cost_chosen: Tensor,
    cost_rejected: Tensor,
    beta: float = 0.1,
    lam: float = 1.0,
    soft: bool = True,
) -> LossOutput:
    """C-DPO primal step for a fixed λ: DPO on pairs labelled by r_λ = r − λc,

    p = σ(r_λ(x, y_1) − r_λ(x, y_2))  (soft, the BT model p*_λ)  or  1[r_λ(y_1) > r_λ(y_2)]  (hard),
    L = −p log σ(βh) − (1 − p) log σ(−βh),   h = ρ(y_1) − ρ(y_2),

    with y_1 / y_2 the data's chosen / rejected columns (their order only fixes the sign of h: a
    relabelled pair is the same two responses, so cached reference log-probs stay valid). Shapes: all
    [B]; r and c are precomputed scores of each response (data, detached). Sampling labels from p*_λ
    has this same expected loss. λ = 0 is DPO on the reward model's preferences; ``lam`` is the
    current dual variable (set it per round, e.g. ``loss.fn.lam=...``).
    """
    if lam < 0:
        raise ValueError(f"C-DPO's dual variable lam must be >= 0, got {lam}")
    p = lagrangian_preference(reward_chosen, reward_rejected, cost_chosen, cost_rejected, lam, soft)
    rho_1, rho_2 = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = smoothed_sigmoid_loss(beta * (rho_1 - rho_2), 1 - p)
    return pair_output(losses, beta * rho_1, beta * rho_2, p_first=p, relabelled=(p < 0.5).to(p.dtype))


def dual_ascent_step(lam: float, cost_estimate: float, cost_limit: float, lr: float) -> float:
    """C-DPO dual step: λ ← max(0, λ + η (Ĵ_c − C_limit)). Ĵ_c must be the mean cost of responses
    **sampled from the current policy** (on held-out prompts), not of the dataset's responses."""
    if lr <= 0:
        raise ValueError(f"the dual step size must be > 0, got {lr}")
    return max(0.0, lam + lr * (cost_estimate - cost_limit))
