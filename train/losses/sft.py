"""Supervised fine-tuning: token negative log-likelihood on completion tokens (the NLL term of
CPO, arXiv 2401.08417, and RPO, arXiv 2404.19733; RAFT's fine-tuning step, arXiv 2304.06767)."""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, aggregate_tokens, as_float


def sft_loss(
    *,
    token_logps: Tensor,
    token_mask: Tensor,
    normalisation: str = "sequence_mean",
) -> LossOutput:
    """Maximum likelihood on the completion:  L = −Σ_{t ∈ y} log πθ(y_t | x, y_<t) / N.

    Shapes: token_logps [B, T] (float32 log-prob of each target token, already gathered), token_mask
    [B, T] bool (True = completion token that is scored; prompt and padding False, whatever their
    values). ``normalisation``: ``sequence_mean`` (default; N = |y|, each sequence weighs the same),
    ``sum`` (N = 1, the sequence NLL), or ``batch_token_mean`` (N = tokens in the micro-batch, so
    ``losses.mean()`` equals TRL's / HF's token-mean cross-entropy).
    """
    mask = token_mask.bool()
    nll = torch.where(mask, -as_float(token_logps), 0.0)
    losses = aggregate_tokens(nll, mask, normalisation)
    return LossOutput(losses, None, None, {"tokens": mask.sum().to(nll.dtype) / mask.shape[0]})
