"""Anchored Preference Optimisation: APO-zero and APO-down (D'Oosterlinck et al. 2024,
arXiv 2408.06266).

Bounded plain-sigmoid losses (not log-sigmoid) on [B] summed log-probs; return :class:`LossOutput`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, pair_output
from train.losses.dpo import log_ratios


def apo_zero_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7:

    L = (1 − σ(βρ_w)) + σ(βρ_l).   Shapes: all [B].
    Use when the chosen outputs are better than the model's own: raises y_w, lowers y_l.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (1 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    return pair_output(losses, beta * rho_w, beta * rho_l)


def apo_down_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossOutput:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8:

    L = σ(βρ_w) + (1 − σ(β(ρ_w − ρ_l))).   Shapes: all [B].
    Use when the chosen outputs are worse than the model's own: lowers y_w, and y_l more. The
    gradient w.r.t. ℓθ(y_w) may be positive by design.
    """
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(beta * (rho_w - rho_l)))
    return pair_output(losses, beta * rho_w, beta * rho_l)
