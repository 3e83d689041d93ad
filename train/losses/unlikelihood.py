"""Objectives that push probability away from bad text: NPO (Zhang et al. 2024,
arXiv 2404.05868) and the CRINGE loss (Adolphs et al. 2022, arXiv 2211.05826; pairwise: Xu et al.
2023, arXiv 2312.16682)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, aggregate_tokens, as_float, batch_mean


def npo_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor | None = None,
    beta: float = 0.1,
    retain_weight: float = 0.0,
) -> LossOutput:
    """NPO, Zhang et al. 2024 (arXiv 2404.05868), on the forget set:

    L = (2/β) log(1 + (πθ/πref)^β) = −(2/β) log σ(−β ρ),   ρ = ℓθ(y) − ℓref(y) (summed).

    Shapes: policy_logps, reference_logps [B]; ``labels`` [B] bool optional (True = retain/desirable
    example, False = forget). Without labels every example is a forget example. Retain examples get
    ``retain_weight · (−ℓθ(y))`` (NPO+RT's retain NLL); the default 0 is plain NPO, where they
    contribute nothing. As β → 0 the forget term tends to gradient ascent on the NLL.
    """
    rho = as_float(policy_logps) - as_float(reference_logps).detach()
    forget = -(2.0 / beta) * F.logsigmoid(-beta * rho)
    if labels is None:
        labels = torch.zeros_like(rho, dtype=torch.bool)
    labels = labels.bool()
    losses = torch.where(labels, retain_weight * -as_float(policy_logps), forget)
    rewards = (beta * rho).detach()
    return LossOutput(losses, rewards[labels], rewards[~labels], {"forget_log_ratio": batch_mean(rho[~labels])})


def cringe_token_losses(logits: Tensor, targets: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """softplus(s⁻ − s⁺) per token (Adolphs et al. 2022), [B, T].

    s⁻ is the logit of the negative token; s⁺ the logit of one token sampled (softmax over their
    logits) from the top-k predictions excluding the negative token. As in ParlAI, take the top-(k+1)
    and mask the negative token, or the (k+1)-th candidate when the negative is not among them.
    s⁺ is not detached (ParlAI default); the sampling itself carries no gradient.
    """
    n_cand = min(k + 1, logits.shape[-1])
    values, indices = logits.topk(n_cand, dim=-1)
    is_target = indices == targets.unsqueeze(-1)
    last = torch.zeros_like(is_target)
    last[..., -1] = True
    drop = torch.where(is_target.any(dim=-1, keepdim=True), is_target, last)
    probs = torch.softmax(values.detach().masked_fill(drop, float("-inf")), dim=-1)
    picked = torch.multinomial(probs.reshape(-1, n_cand), 1, generator=generator).reshape(targets.shape)
    s_plus = values.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    s_minus = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return F.softplus(s_minus - s_plus)


def cringe_loss(
    *,
    logits: Tensor,
    target_ids: Tensor,
    token_mask: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    k: int = 5,
    normalisation: str = "batch_token_mean",
    generator: torch.Generator | None = None,
) -> LossOutput:
    """CRINGE, Adolphs et al. 2022 (arXiv 2211.05826):  L = L_CE(positive) + α L_Cr(negative).

    Shapes: logits [B, T, V] already shifted (position t predicts target_ids[:, t]); target_ids
    [B, T] long (any value at masked positions, e.g. −100); token_mask [B, T] bool (completion tokens);
    labels [B] bool (True = positive sequence: token CE; False = negative: Cringe on every token).
    ``normalisation`` (see ``aggregate_tokens``): default ``batch_token_mean`` = per-token losses
    summed and divided by the micro-batch's target-token count (ParlAI). ``generator`` (on the logits'
    device) makes the top-k sampling reproducible. k = 5 (paper; ParlAI's default is 1), α = 1.
    """
    mask = token_mask.bool()
    # Padding positions may hold anything (even NaN): zero them so neither the loss nor the gradient sees it.
    logits = torch.where(mask.unsqueeze(-1), as_float(logits), 0.0)
    targets = torch.where(mask, target_ids, torch.zeros_like(target_ids))
    ce = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    cr = cringe_token_losses(logits, targets, k, generator)
    positive = labels.bool().unsqueeze(-1)
    token_losses = torch.where(positive, ce, alpha * cr)
    losses = aggregate_tokens(token_losses, mask, normalisation)
    metrics = {"ce": batch_mean(ce[mask & positive]), "cringe": batch_mean(cr[mask & ~positive])}
    return LossOutput(losses, None, None, metrics)
