"""Listwise objectives over K responses per prompt: LiPO-λ, PRO, RRHF (LiPO: Liu et al. 2024, arXiv
2402.01878; PRO: Song et al. 2023, arXiv 2306.17492; RRHF: Yuan et al. 2023, arXiv 2304.05302).

Inputs are [B, K]; ``mask`` [B, K] bool marks real slots (False = padding, for ragged K). A padding
slot contributes nothing to the loss or the gradient whatever values it holds (they are replaced
before any arithmetic). ``scores`` are labels from the data, higher is better, and are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    """Replace padding slots by 0 so that NaN/inf there can reach neither values nor gradients."""
    return torch.where(mask, as_float(x), 0.0)


def _best_worst(values: Tensor, scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Detached values at the best- and worst-scored real slot of each list ([B] each)."""
    best = scores.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)
    worst = scores.masked_fill(~mask, float("inf")).argmin(dim=-1, keepdim=True)
    return values.detach().gather(-1, best).squeeze(-1), values.detach().gather(-1, worst).squeeze(-1)


def _pairs(scores: Tensor, mask: Tensor) -> Tensor:
    """[B, K, K] bool: (i, j) with both slots real and scores_i > scores_j (ties contribute nothing)."""
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return both & (scores.unsqueeze(-1) > scores.unsqueeze(-2))


def lipo_lambda_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    scores: Tensor,
    mask: Tensor,
    beta: float = 0.05,
    discount_base: float = 2.0,
) -> LossOutput:
    """LiPO-λ, Liu et al. 2024 (arXiv 2402.01878), with s_i = β(ℓθ(y_i) − ℓref(y_i)) (summed):

    L = Σ_{ψ_i > ψ_j} Δ_ij log(1 + e^{−(s_i − s_j)}),   Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|,
    G = 2^ψ − 1 (assumes ψ ≥ 0), D(τ) = log_base(1 + τ).

    Shapes: all [B, K]; ``scores`` = ψ. τ_i is the 1-based rank of slot i by the model's current
    scores s (descending, among real slots), so Δ is a detached constant. The paper
    writes "log": ``discount_base=2`` (LambdaLoss/NDCG, default) or ``math.e``; the base only rescales
    Δ. β = 0.05 [unverified]. The loss is a sum over pairs, per list.
    """
    mask = mask.bool()
    s = beta * (_clean(policy_logps, mask) - _clean(reference_logps, mask).detach())
    psi = _clean(scores, mask).detach()
    with torch.no_grad():
        order = s.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        positions = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype, device=s.device).expand_as(s)
        ranks = torch.empty_like(s).scatter_(-1, order, positions)
        inv_discount = math.log(discount_base) / torch.log1p(ranks)
        gains = torch.pow(2.0, psi) - 1
        weights = (gains.unsqueeze(-1) - gains.unsqueeze(-2)).abs() * (
            inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)
        ).abs()
    pair_losses = F.softplus(-(s.unsqueeze(-1) - s.unsqueeze(-2)))
    losses = torch.where(_pairs(psi, mask), weights * pair_losses, 0.0).sum(dim=(-2, -1))
    chosen, rejected = _best_worst(s, psi, mask)
    return LossOutput(losses, chosen, rejected, {})


def pro_loss(
    *,
    policy_logps: Tensor,
    lengths: Tensor,
    scores: Tensor,
    mask: Tensor,
    sft_weight: float = 0.05,
    reference_code_sft_scale: bool = False,
) -> LossOutput:
    """PRO, Song et al. 2023 (arXiv 2306.17492), responses sorted best-first by R:

    L = Σ_{k=1}^{n−1} [ log Σ_{i=k}^{n} exp(r^i t^k_i) − r^k t^k_k ] + β_sft · (−ℓθ(y^1)),
    r = ℓθ/|y| (length-normalised), t^k_i = R^k − R^i (i > k), t^k_k = max_{i>k} t^k_i.

    Shapes: policy_logps (**summed**, [B, K]), lengths, scores = R, mask: [B, K]. The function
    normalises by ``lengths`` itself because the SFT term needs the summed log-prob of the top
    response. logsumexp, not the reference code's log(eps + Σ exp). ``reference_code_sft_scale=True``
    multiplies the SFT term by (n − 1)² like the reference code; the paper does not.
    """
    mask = mask.bool()
    key = scores.masked_fill(~mask, float("-inf")).detach()
    order = key.argsort(dim=-1, descending=True, stable=True)
    valid = mask.gather(-1, order)
    summed = _clean(policy_logps, mask).gather(-1, order)
    r = summed / _clean(lengths, mask).detach().gather(-1, order).clamp(min=1)
    big_r = _clean(scores, mask).detach().gather(-1, order)
    ranking = torch.zeros_like(r[:, 0])
    for k in range(r.shape[-1] - 1):
        later = valid[:, k + 1 :]
        t = torch.where(later, big_r[:, k : k + 1] - big_r[:, k + 1 :], 0.0)
        t_kk = t.masked_fill(~later, float("-inf")).amax(dim=-1).clamp(min=0)  # t ≥ 0 after sorting
        active = valid[:, k] & later.any(dim=-1)
        anchor = r[:, k] * t_kk
        # inactive rows get finite dummy terms so logsumexp's backward stays NaN-free
        others = torch.where(later | ~active.unsqueeze(-1), r[:, k + 1 :] * t, float("-inf"))
        term = torch.logsumexp(torch.cat([anchor.unsqueeze(-1), others], dim=-1), dim=-1) - anchor
        ranking = ranking + torch.where(active, term, 0.0)
    n = valid.sum(dim=-1).to(r.dtype)
    sft = -summed[:, 0]
    scale = (n - 1) ** 2 if reference_code_sft_scale else 1.0
    losses = ranking + sft_weight * scale * sft
    normalised = _clean(policy_logps, mask) / _clean(lengths, mask).detach().clamp(min=1)
    chosen, rejected = _best_worst(normalised, scores, mask)
    return LossOutput(losses, chosen, rejected, {"ranking": ranking.detach().mean(), "sft": sft.detach().mean()})


def rrhf_loss(
    *,
    policy_logps: Tensor,
    lengths: Tensor,
    scores: Tensor,
    mask: Tensor,
    rank_weight: float = 1.0,
    length_penalty: float = 1.0,
) -> LossOutput:
    """RRHF, Yuan et al. 2023 (arXiv 2304.05302):

    p_i = ℓθ(y_i) / |y_i|^lp,   L = w · Σ_{r_i < r_j} max(0, p_i − p_j) + (−ℓθ(y_{i'})),  i' = argmax r.

    Shapes: policy_logps (**summed**, [B, K]), lengths, scores = r, mask: [B, K]. The rank term is a
    sum over pairs with zero margin; the fine-tuning term is the summed NLL of the best response
    (paper form; the reference code's padded mean over the first example is not
    reproduced). w = 1 (paper, train.sh; train.py's default 100).
    """
    mask = mask.bool()
    summed = _clean(policy_logps, mask)
    p = summed / _clean(lengths, mask).detach().clamp(min=1) ** length_penalty
    r = _clean(scores, mask).detach()
    # pairs (j, i) with r_j > r_i: penalise p_i above p_j
    hinge = torch.relu(p.unsqueeze(-2) - p.unsqueeze(-1))  # [b, j, i] = p_i − p_j
    rank = torch.where(_pairs(r, mask), hinge, 0.0).sum(dim=(-2, -1))
    best = r.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)
    ft = -summed.gather(-1, best).squeeze(-1)
    chosen, rejected = _best_worst(p, r, mask)
    metrics = {"rank": rank.detach().mean(), "ft": ft.detach().mean()}
    return LossOutput(rank_weight * rank + ft, chosen, rejected, metrics)
