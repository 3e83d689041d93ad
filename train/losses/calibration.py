"""Margin/regression objectives on pairs: SLiC-HF, TRL's "hinge" (RSO hinge-norm), IPO (SLiC-HF:
Zhao et al. 2023, arXiv 2305.10425, Eq. 1; IPO: Azar et al. 2023, arXiv 2310.12036, Eq. 17; RSO hinge-norm:
Liu et al. 2023, arXiv 2309.06657).

Inputs are [B] summed completion log-probs; every function returns a :class:`LossOutput`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, as_float, pair_output
from train.losses.dpo import log_ratios


def slic_hf_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    sft_target_logps: Tensor | None = None,
    delta: float = 1.0,
    lam: float = 0.5,
) -> LossOutput:
    """SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), Eq. 1 (paper form, no reference model):

    L = max(0, δ − ℓθ(y_w) + ℓθ(y_l)) − λ ℓθ(y_ref)

    Shapes: all [B]. ``sft_target_logps`` is ℓθ(y_ref) of the SFT target for the prompt; when the
    data has none, y_ref = y_w (a common choice, not the paper's). δ = 1, λ = 0.5 are illustrative,
    the paper tunes both (these defaults are not checked against it). Not TRL's "hinge": see :func:`hinge_loss`.
    """
    l_w, l_l = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    l_ref = l_w if sft_target_logps is None else as_float(sft_target_logps)
    calibration = torch.relu(delta - l_w + l_l)
    regulariser = -lam * l_ref
    return pair_output(calibration + regulariser, l_w, l_l, calibration=calibration, regulariser=regulariser)


def hinge_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """TRL's ``loss_type="hinge"`` = RSO's hinge-norm, Liu et al. 2023 (arXiv 2309.06657):

    L = max(0, 1 − β h),  h = ρ_w − ρ_l  (reference-normalised).

    Shapes: all [B]. Equals β·max(0, 1/β − h): margin 1/β (10 nats at β = 0.1) and no SFT
    regulariser, so it is *not* SLiC-HF; RSO uses β = γ = 0.05.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1 - beta * (rho_w - rho_l))
    return pair_output(losses, beta * rho_w, beta * rho_l)


def ipo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    tau: float = 0.1,
    length_normalise: bool = False,
) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17:  L = (h − 1/(2τ))².

        Shapes: all [B]. ``tau`` is TRL's ``beta``. Paper form (default): h = ρ_w − ρ_l on summed
        log-probs. ``length_normalise=True`` is TRL's form (all versions): h = ρ_w/|y_w| − ρ_l/|y_l|
        with the token counts ``chosen_lengths`` / ``rejected_lengths`` (clamped at 1, as TRL does).
        The two differ by about the sequence length in the meaning of τ (TRL's IPO averages log-probs over
    tokens; neither arXiv 2310.12036 nor the DPO authors' code does). Feeding
        per-token-mean log-probs (YAML ``length_normalised: true``) to the paper form is the same thing;
        do not do both.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    if length_normalise:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_loss(length_normalise=True) needs chosen_lengths and rejected_lengths")
        len_w = as_float(chosen_lengths).detach().clamp(min=1)
        len_l = as_float(rejected_lengths).detach().clamp(min=1)
        h = rho_w / len_w - rho_l / len_l
    else:
        h = rho_w - rho_l
    losses = (h - 1 / (2 * tau)) ** 2
    return pair_output(losses, tau * rho_w, tau * rho_l)
