"""KTO: prospect-theoretic loss on unpaired feedback with the z0 KL reference point (Ethayarajh et al. 2024,
arXiv 2402.01306)."""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, Reduce, as_float


def kl_pair_indices(batch_size: int) -> Tensor:
    """Completion index paired with each prompt for KTO's mismatched KL pairs: [m−1, 0, 1, …, m−2].

    TRL's convention (``KL_completion_ids``): prompt j gets completion j−1, so no example is paired
    with its own completion when m > 1. For the data collator; the loss only sees the log-probs.
    """
    if batch_size < 2:
        raise ValueError("KTO's KL estimate needs at least 2 examples per micro-batch")
    return torch.roll(torch.arange(batch_size), shifts=1)


def kto_reference_point(
    *,
    policy_kl_logps: Tensor | None = None,
    reference_kl_logps: Tensor | None = None,
    kl: Tensor | float | None = None,
    reduce: Reduce | None = None,
) -> Tensor:
    """z0 = sg[max(0, mean_j(ℓθ(y'_j|x_j) − ℓref(y'_j|x_j)))] over mismatched pairs (the paper's reference point).

    Either the [m] KL-pair log-probs (current policy, no-grad forward, as in TRL), mean-all-reduced
    across processes by ``reduce`` before clamping, or a precomputed, already reduced ``kl``.
    """
    if kl is not None:
        return torch.as_tensor(kl).detach().float().clamp(min=0.0)
    if policy_kl_logps is None or reference_kl_logps is None:
        raise ValueError("KTO needs policy_kl_logps and reference_kl_logps (YAML needs_kl_pairs) or a precomputed kl")
    if policy_kl_logps.numel() < 2:
        raise ValueError("KTO's KL estimate needs at least 2 mismatched pairs per micro-batch (TRL raises too)")
    z0 = (as_float(policy_kl_logps) - as_float(reference_kl_logps)).mean().detach()
    if reduce is not None:
        z0 = reduce(z0).detach()
    return z0.clamp(min=0.0)


def kto_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    policy_kl_logps: Tensor | None = None,
    reference_kl_logps: Tensor | None = None,
    kl: Tensor | float | None = None,
    reduce: Reduce | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO, Ethayarajh et al. 2024 (arXiv 2402.01306), Eq. 7 (per TRL), with r = ℓθ(y) − ℓref(y):

    desirable:   λ_D (1 − σ(β(r − z0)))       undesirable:   λ_U (1 − σ(β(z0 − r)))

    Shapes: policy_logps, reference_logps, labels (bool, True = desirable) [B], summed log-probs;
    policy_kl_logps / reference_kl_logps [m] log-probs of mismatched pairs (see
    :func:`kl_pair_indices`). z0 is detached and clamped at 0 (:func:`kto_reference_point`); pass
    ``reduce`` to all-reduce it, or a precomputed ``kl``. Plain sigmoid, not logsigmoid (arXiv 2402.01306).
    Paper guidance: λ_D n_D / (λ_U n_U) ∈ [1, 4/3].
    """
    labels = labels.bool()
    z0 = kto_reference_point(
        policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps, kl=kl, reduce=reduce
    )
    rho = as_float(policy_logps) - as_float(reference_logps).detach()
    z0 = z0.to(dtype=rho.dtype, device=rho.device)
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho))),
    )
    rewards = (beta * rho).detach()
    return LossOutput(losses, rewards[labels], rewards[~labels], {"kl": z0})
