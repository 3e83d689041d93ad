"""Shared types and numerics for the loss catalogue (torch only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]
_LN2 = 0.6931471805599453


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns.

    losses:           [B] per-example losses, differentiable; the batch loss is ``losses.mean()``.
    chosen_rewards:   detached implicit rewards of the preferred responses (pairwise: [B];
                      unpaired: the desirable subset; listwise: the best slot of each list), or None.
    rejected_rewards: likewise for the dispreferred responses, or None.
    metrics:          detached 0-dim tensors (batch means) for logging, e.g. ``kl`` for KTO.
    """

    losses: Tensor
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


def as_float(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32; keep float64 as is.

    Log-ratios are differences of large log-probs: in half precision they lose their digits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, branched at -ln 2 (Mächler 2012, "Accurately computing log(1 - exp(-|a|))").

    ``log1p(-exp(x))`` is exact for very negative x but gives -inf near 0; ``log(-expm1(x))`` is exact
    near 0 but rounds to 0 for very negative x. x = 0 (probability 1) is clamped to the largest
    representable negative value so the result stays finite (TRL HEAD would return -inf there).
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    below = x < -_LN2
    # Feed each branch only inputs from its own domain: torch.where's backward multiplies the
    # unselected branch's inf/NaN derivative by 0, which is NaN.
    far = torch.log1p(-torch.exp(torch.where(below, x, torch.full_like(x, -_LN2))))
    near = torch.log(-torch.expm1(torch.where(below, torch.full_like(x, -_LN2), x)))
    return torch.where(below, far, near)


def batch_mean(x: Tensor) -> Tensor:
    """Detached mean for metrics; NaN-free (0) for an empty subset."""
    x = x.detach()
    return x.mean() if x.numel() else x.new_zeros(())


def pair_output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, **metrics: Tensor) -> LossOutput:
    """Bundle a pairwise loss with its detached rewards and margin/accuracy metrics."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    base = {"reward_margin": batch_mean(margins), "reward_accuracy": batch_mean((margins > 0).to(margins.dtype))}
    base.update({k: batch_mean(v) for k, v in metrics.items()})
    return LossOutput(losses, chosen_rewards, rejected_rewards, base)


TOKEN_NORMALISATIONS = ("sequence_mean", "sum", "batch_token_mean")


def aggregate_tokens(token_losses: Tensor, token_mask: Tensor, normalisation: str) -> Tensor:
    """[B, T] per-token losses -> [B] per-sequence losses; masked tokens contribute exactly 0.

    sequence_mean:    Σ_t l_t / |y|            (per-sequence mean; empty sequences give 0)
    sum:              Σ_t l_t
    batch_token_mean: B · Σ_t l_t / Σ_batch |y|, so ``losses.mean()`` is the token-mean over the
                      micro-batch (TRL's CE / ParlAI's Cringe normalisation)
    """
    if normalisation not in TOKEN_NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {TOKEN_NORMALISATIONS}, got {normalisation!r}")
    mask = token_mask.bool()
    summed = torch.where(mask, token_losses, torch.zeros_like(token_losses)).sum(dim=-1)
    if normalisation == "sum":
        return summed
    if normalisation == "sequence_mean":
        return summed / mask.sum(dim=-1).clamp(min=1)
    return summed * summed.shape[0] / mask.sum().clamp(min=1)
