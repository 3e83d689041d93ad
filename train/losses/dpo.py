"""The DPO family with a log-sigmoid link (DPO, cDPO/rDPO, BCO pair, EXO, DPOP,
RPO, ODPO; each function cites its paper).

All inputs are [B] completion log-probs **summed** over completion tokens (as in the DPO paper) unless the
docstring says otherwise; every function returns a :class:`LossOutput` whose ``losses`` is [B].
Reference log-probs are constants: they are detached here even if the caller forgot (the
papers treat them as constants).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, Reduce, as_float, pair_output
from train.losses.bco import RunningMean


def log_ratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """ρ_w = ℓθ(y_w) − sg[ℓref(y_w)], ρ_l likewise; [B] each, at least float32."""
    rho_w = as_float(policy_chosen_logps) - as_float(reference_chosen_logps).detach()
    rho_l = as_float(policy_rejected_logps) - as_float(reference_rejected_logps).detach()
    return rho_w, rho_l


def smoothed_sigmoid_loss(logits: Tensor, epsilon: Tensor | float) -> Tensor:
    """(1 − ε)·[−log σ(z)] + ε·[−log σ(−z)]; ε = 0 is plain DPO. logsigmoid, never log(sigmoid)."""
    return -(1 - epsilon) * F.logsigmoid(logits) - epsilon * F.logsigmoid(-logits)


def dpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    p_chosen: Tensor | None = None,
    beta: float = 0.1,
) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7:  L = −log σ(β h),  h = ρ_w − ρ_l.

    Shapes: all [B]. ``p_chosen`` [B] (optional soft labels P(y_w ≻ y_l), e.g. from an AI judge's
    token probabilities) gives the soft-label cross-entropy −p log σ(βh) − (1−p) log σ(−βh); it is
    data and is detached. Rewards β·ρ are detached.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)
    if p_chosen is None:
        losses = -F.logsigmoid(logits)
    else:
        losses = smoothed_sigmoid_loss(logits, 1 - as_float(p_chosen).detach())
    return pair_output(losses, beta * rho_w, beta * rho_l)


def cdpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> LossOutput:
    """Conservative DPO, Mitchell 2023 (ericmitchell.ai/cdpo.pdf): label smoothing with flip rate ε.

    L = (1−ε)[−log σ(βh)] + ε[−log σ(−βh)]   (Mitchell 2023, "A note on DPO with noisy preferences";
    TRL ≤ v0.28 "sigmoid" + label_smoothing;
    TRL ≥ v0.29 ignores label_smoothing in "sigmoid"). Shapes: all [B].
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"cdpo epsilon must lie in [0, 1], got {epsilon}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = smoothed_sigmoid_loss(beta * (rho_w - rho_l), epsilon)
    return pair_output(losses, beta * rho_w, beta * rho_l)


def robust_dpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    epsilon: float = 0.1,
) -> LossOutput:
    """Robust DPO, Chowdhury et al. 2024 (arXiv 2403.00409), unbiased under flip rate ε:

    L = {(1−ε)[−log σ(βh)] − ε[−log σ(−βh)]} / (1 − 2ε).   Shapes: all [B].
    The flipped term is *subtracted*, so the loss can go negative; it is not clamped (Chowdhury et al.
    2024, arXiv 2403.00409).
    """
    if not 0.0 <= epsilon < 0.5:
        raise ValueError(f"robust DPO needs 0 <= epsilon < 0.5, got {epsilon}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (rho_w - rho_l)
    losses = ((1 - epsilon) * -F.logsigmoid(logits) + epsilon * F.logsigmoid(-logits)) / (1 - 2 * epsilon)
    return pair_output(losses, beta * rho_w, beta * rho_l)


def rpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> LossOutput:
    """RPO, Pang et al. 2024 (arXiv 2404.19733):  L = L_DPO + α · NLL(y_w) / |y_w|.

    Shapes: all [B]. ``chosen_nll`` is the per-sequence **length-normalised** NLL of the chosen
    completion (the paper's form; TRL uses one token-mean over the whole batch).
    """
    dpo = dpo_loss(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=beta,
    )
    nll = as_float(chosen_nll)
    metrics = {**dpo.metrics, "nll": nll.detach().mean()}
    return LossOutput(dpo.losses + alpha * nll, dpo.chosen_rewards, dpo.rejected_rewards, metrics)


def dpop_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    lam: float = 50.0,
) -> LossOutput:
    """DPO-Positive (Smaug), Pal et al. 2024 (arXiv 2402.13228), Eq. 3:

    L = −log σ(β [h − λ · max(0, ℓref(y_w) − ℓθ(y_w))]).   Shapes: all [B].
    The penalty sits *inside* β(...) (arXiv 2402.13228 Eq. 3; public ports that add it outside
    are wrong) and is
    active only when the policy's chosen log-prob falls below the reference's.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    penalty = torch.clamp(-rho_w, min=0.0)  # max(0, ℓref(y_w) − ℓθ(y_w)) = max(0, −ρ_w)
    losses = -F.logsigmoid(beta * (rho_w - rho_l - lam * penalty))
    return pair_output(losses, beta * rho_w, beta * rho_l, dpop_penalty=penalty)


def odpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    score_chosen: Tensor,
    score_rejected: Tensor,
    beta: float = 0.1,
    alpha: float = 1.0,
    ratio: bool = False,
) -> LossOutput:
    """ODPO, Amini et al. 2024 (arXiv 2402.10571):  L = −log σ(β h − Δ),  Δ = α log(s_w − s_l).

    Shapes: all [B]. ``ratio=True`` uses Δ = α log(s_w / s_l) (reference repo option). Δ is data
    (detached) and **not** multiplied by β (arXiv 2402.10571). Requires s_w > s_l (and s_l > 0 for
    ``ratio``); with scores in [0, 1], Δ < 0 loosens rather than tightens the margin.
    """
    s_w, s_l = as_float(score_chosen).detach(), as_float(score_rejected).detach()
    gap = s_w / s_l if ratio else s_w - s_l
    bad = (s_l <= 0) | (gap <= 1) if ratio else gap <= 0
    if bool(bad.any()):
        raise ValueError("ODPO needs score_chosen > score_rejected (and > 0 with ratio=True) for every pair")
    offset = alpha * torch.log(gap)
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -F.logsigmoid(beta * (rho_w - rho_l) - offset)
    return pair_output(losses, beta * rho_w, beta * rho_l, offset=offset)


def exo_pair_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    epsilon: float = 1e-3,
) -> LossOutput:
    """EXO (pair form), Ji et al. 2024 (arXiv 2402.00856), Eq. 16 with K = 2:

    L = KL(q ‖ p) = σ(βh)[log σ(βh) − log(1−ε)] + σ(−βh)[log σ(−βh) − log ε],
    q = softmax(βρ_w, βρ_l), p = (1−ε, ε). Shapes: all [B]. ε = 0 is log 0: rejected (TRL HEAD
    raises too; TRL ≤ v0.28 silently used 1e-3).
    """
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"EXO needs 0 < epsilon < 1 (log epsilon), got {epsilon}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    z = beta * (rho_w - rho_l)
    log_p_w, log_p_l = math.log1p(-epsilon), math.log(epsilon)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - log_p_w) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_p_l)
    return pair_output(losses, beta * rho_w, beta * rho_l)


def bco_pair_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    running_mean: RunningMean | None = None,
    reduce: Reduce | None = None,
) -> LossOutput:
    """Paired BCO (Jung et al. 2024, arXiv 2404.04656) on preference pairs:

    L = −log σ(βρ_w − δ) − log σ(−(βρ_l − δ))   (summed over the pair, not averaged; Jung et al.
    2024, arXiv 2404.04656).
    Without ``running_mean``: δ = 0, TRL ≥ v0.29 ``bco_pair``. With it: δ = running mean of the
    batch-mean reward, updated with this batch *before* use (TRL ≤ v0.28); ``reduce``
    mean-all-reduces the batch mean first. Shapes: all [B].
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    r_w, r_l = beta * rho_w, beta * rho_l
    delta = torch.zeros((), dtype=r_w.dtype, device=r_w.device)
    if running_mean is not None:
        delta = running_mean.update_and_read(torch.cat([r_w, r_l]).detach().mean(), reduce)
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    return pair_output(losses, r_w, r_l, delta=delta)
