"""Policy-gradient objectives of the online loops: PPO-clip (token or sequence ratio; GRPO, Dr. GRPO,
RLOO, REINFORCE++ are PPO-clip with their own advantage and aggregation), REINFORCE (ReMax) and the
clipped value loss. Pure functions of tensors; every one returns a :class:`LossOutput`.

Keyword vocabulary (kind ``policy``): [B, T] per completion position, T right-padded
    logps        log π_θ of the sampled tokens (grad), float32, at the sampling temperature
    old_logps    log π_old (the rollout policy), constant
    advantages   [B, T] per token, or [B] per sequence (broadcast over its tokens)
    mask         bool, the real completion tokens
    ref_logps    log π_ref, constant; only for KL in the loss (kl_coef > 0)
    total_tokens, total_sequences   the counts of the whole optimizer step (all micro-batches; already
                 divided by the number of processes), so that Σ over micro-batches of
                 ``losses.sum() / total_sequences`` is the step loss and the token-mean is global
                 (GA normalisation done once: ms-swift#10117, trl#3021). None: this batch alone.

Aggregations (``aggregation``; the batch loss is ``losses.sum() / total_sequences``):
    token_mean            Σ_{i,t} l_it / Σ|o_i| over the step (DAPO; TRL ``dapo``, OpenRLHF, verl default)
    seq_mean_token_mean   (1/B) Σ_i (1/|o_i|) Σ_t l_it (GRPO paper, TRL ``grpo``; length-biased)
    seq_sum_norm          (1/B) Σ_i Σ_t l_it / L_max (Dr. GRPO; TRL ``dr_grpo``)
    seq_mean              sequence-level ratio only: (1/B) Σ_i l_i (TRL RLOO)
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, as_float, batch_mean

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm", "seq_mean")
RATIO_CLAMP = 20.0  # log-ratio clamp before exp (OpenRLHF, verl)


def _per_token(adv: Tensor, like: Tensor) -> Tensor:
    return adv[:, None].expand_as(like) if adv.dim() == 1 else adv


def clipped_surrogate(ratio: Tensor, adv: Tensor, clip_eps: float, clip_eps_high: float | None = None,
                      dual_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO-clip (Schulman et al. 2017, arXiv 1707.06347, Eq. 7) as a loss:
    −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A); with dual_clip c (Ye et al. 2020, arXiv 1912.09729) the loss of
    A < 0 is at most c·|A|. Returns (loss, clipped-indicator) elementwise."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + hi)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, (clipped > unclipped).to(loss.dtype)


def aggregate(token_losses: Tensor, mask: Tensor, aggregation: str, total_tokens: float | None = None,
              total_sequences: float | None = None) -> Tensor:
    """[B, T] token losses -> [B] such that losses.sum()/total_sequences is the aggregated loss."""
    mask = mask.bool()
    summed = torch.where(mask, token_losses, torch.zeros_like(token_losses)).sum(-1)
    s = float(total_sequences) if total_sequences is not None else float(token_losses.shape[0])
    if aggregation == "token_mean":
        n = float(total_tokens) if total_tokens is not None else float(mask.sum().clamp(min=1))
        return summed * s / n
    if aggregation == "seq_mean_token_mean":
        return summed / mask.sum(-1).clamp(min=1)
    if aggregation == "seq_sum_norm":
        return summed / token_losses.shape[-1]
    raise ValueError(f"aggregation must be one of {AGGREGATIONS[:3]} for a token ratio, got {aggregation!r}")


def ppo_clip_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    entropy_coef: float = 0.0,
    entropy: Tensor | None = None,
) -> LossOutput:
    """PPO-clip policy loss; GRPO/Dr. GRPO/RLOO/REINFORCE++ differ only in advantages and aggregation.

    ratio_level token: ρ_t = exp(clamp(log π_θ − log π_old, ±20)); sequence (TRL RLOO): one ratio per
    sequence, exp(Σ_t log π_θ − Σ_t log π_old), with aggregation ``seq_mean``. KL in the loss adds
    kl_coef·est_t per token (GRPO Eq. 3; estimator per ``train.advantages.kl_estimate``); the entropy
    bonus subtracts entropy_coef·H_t (``entropy`` [B, T] with grad). Shapes: module docstring.
    """
    from train.advantages import kl_estimate

    logps, old = as_float(logps), as_float(old_logps).detach()
    adv = as_float(advantages).detach()
    mask = mask.bool()
    log_ratio = torch.where(mask, logps - old, torch.zeros_like(logps))
    metrics: dict[str, Tensor] = {}
    if ratio_level == "sequence":
        if aggregation != "seq_mean":
            raise ValueError("ratio_level=sequence aggregates per sequence: aggregation must be seq_mean")
        if kl_coef or entropy_coef:
            raise ValueError("ratio_level=sequence has no per-token terms: put the KL in the reward")
        seq_adv = adv if adv.dim() == 1 else adv[:, 0]
        ratio = torch.exp(log_ratio.sum(-1).clamp(-RATIO_CLAMP, RATIO_CLAMP))
        losses, clipped = clipped_surrogate(ratio, seq_adv, clip_eps, clip_eps_high, dual_clip)
        metrics["clip_frac"] = batch_mean(clipped)
        metrics["ratio"] = batch_mean(ratio)
        return LossOutput(losses, metrics=metrics)
    if ratio_level != "token":
        raise ValueError(f"ratio_level must be token or sequence, got {ratio_level!r}")
    ratio = torch.exp(log_ratio.clamp(-RATIO_CLAMP, RATIO_CLAMP))
    token_loss, clipped = clipped_surrogate(ratio, _per_token(adv, logps), clip_eps, clip_eps_high, dual_clip)
    if kl_coef:
        if ref_logps is None:
            raise ValueError("kl_coef > 0 needs ref_logps")
        kl = kl_estimate(logps, as_float(ref_logps), kl_estimator, old_logps=old)
        token_loss = token_loss + kl_coef * kl
        metrics["kl_loss"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    if entropy_coef and entropy is not None:
        token_loss = token_loss - entropy_coef * entropy
    losses = aggregate(token_loss, mask, aggregation, total_tokens, total_sequences)
    n = mask.sum().clamp(min=1)
    metrics["clip_frac"] = (clipped * mask).sum() / n
    metrics["ratio"] = (ratio.detach() * mask).sum() / n
    metrics["approx_kl_old"] = ((-log_ratio.detach()) * mask).sum() / n  # k1 of π_old vs π_θ
    return LossOutput(losses, metrics=metrics)


def reinforce_loss(
    *,
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    total_sequences: float | None = None,
    old_logps: Tensor | None = None,
) -> LossOutput:
    """REINFORCE with a baseline, as ReMax writes it (Li et al. 2023, arXiv 2310.10505, Alg. 1):
    L_i = −A_i · Σ_t log π_θ(y_t), A per sequence ([B] or [B, T] read at t = 0). Strictly on-policy
    (one update per rollout); ``old_logps`` is accepted and ignored. losses [B]."""
    adv = as_float(advantages).detach()
    seq_adv = adv if adv.dim() == 1 else adv[:, 0]
    summed = torch.where(mask.bool(), as_float(logps), torch.zeros_like(as_float(logps))).sum(-1)
    return LossOutput(-seq_adv * summed)


def value_loss(
    *,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None = 0.2,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> LossOutput:
    """Clipped value loss (PPO; Ziegler et al. 2019 code; OpenRLHF ValueLoss):
    ½·max((V − G)², (clip(V, V_old ± ε_v) − G)²), token-mean over the step. [B, T] in, losses [B]."""
    v, g, old = as_float(values), as_float(returns).detach(), as_float(old_values).detach()
    err = (v - g) ** 2
    if value_clip is not None:
        v_clipped = old + (v - old).clamp(-value_clip, value_clip)
        token = 0.5 * torch.maximum(err, (v_clipped - g) ** 2)
    else:
        token = 0.5 * err
    losses = aggregate(token, mask, "token_mean", total_tokens, total_sequences)
    m = mask.bool()
    return LossOutput(losses, metrics={"value_error": (err.detach() * m).sum() / m.sum().clamp(min=1)})
