"""Policy-gradient objectives of the online loops: PPO-clip (token or sequence ratio; GRPO, Dr. GRPO,
RLOO, REINFORCE++ are PPO-clip with their own advantage and aggregation), REINFORCE (ReMax) and the
clipped value loss. Pure functions of tensors; every one returns a :class:`LossOutput`.

Keyword vocabulary (kind ``policy``): [B, T] per completion position, T right-padded
    logps        log π_θ of the sampled tokens (grad), float32, at the sampling temperature
    old_logps    log π_old (the rollout policy), constant
    advantages   [B, T] per token, or [B] per sequence (broadcast over its tokens)
    mask         bool, the real completion tokens
    ref_logps    log π_ref, constant; only for KL in the loss (kl_coef > 0)
    kl_coef, kl_estimator, kl_clamp   the loop's KL-in-loss settings (loop.kl; β may be adaptive)
    is_weights   [B, T] constant importance weights of a rollout sampled by vLLM (train/inference
                 mismatch, ``train.advantages.sampler_is_weights``); they multiply the per-token loss
                 before aggregation (not the KL term). None: the trainer sampled, no correction
    total_tokens, total_sequences   the counts of the whole optimizer step (all micro-batches; already
                 divided by the number of processes), so that Σ over micro-batches of
                 ``losses.sum() / total_sequences`` is the step loss and the token-mean is global
                 (GA normalisation done once: ms-swift#10117, trl#3021). None: this batch alone.

Aggregations (``aggregation``; the batch loss is ``losses.sum() / total_sequences``):
    token_mean            Σ_{i,t} l_it / Σ|o_i| over the step (DAPO; TRL ``dapo``, OpenRLHF, verl default)
    seq_mean_token_mean   (1/B) Σ_i (1/|o_i|) Σ_t l_it (GRPO paper, TRL ``grpo``; length-biased)
    seq_sum_norm          (1/B) Σ_i Σ_t l_it / L_max (Dr. GRPO; TRL ``dr_grpo``)
    seq_sum               (1/B) Σ_i Σ_t l_it (REINFORCE / ReMax)
    seq_mean              sequence-level ratio only: (1/B) Σ_i l_i (TRL RLOO)
"""

from __future__ import annotations

import torch
from torch import Tensor

from train.losses._core import LossOutput, as_float, batch_mean

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_norm", "seq_sum", "seq_mean")
RATIO_CLAMP = 20.0  # log-ratio clamp before exp (OpenRLHF, verl)
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_ratio")


def kl_estimate(
    logps: Tensor, ref_logps: Tensor, estimator: str = "k1", old_logps: Tensor | None = None, clamp: float | None = 10.0
) -> Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled tokens. ℓ = log π − log π_ref, r = e^{−ℓ}:

        k1 = ℓ            unbiased value; as a loss its gradient is zero in expectation (use it in the reward)
        k2 = ½ℓ²          as a loss: the reverse-KL gradient
        k3 = r − 1 + ℓ    ≥ 0, low variance; as a loss: the *forward*-KL gradient (GRPO paper, verl low_var_kl)
        k3_ratio = k3 · π/π_old   as a loss: the reverse-KL gradient (TRL 1.16 use_bias_correction_kl)

    ``ref_logps`` is a constant (detached). ``clamp`` bounds each estimate to ±clamp (OpenRLHF: 10).
    """
    ell = logps - ref_logps.detach()
    if estimator == "k1":
        est = ell
    elif estimator == "k2":
        est = 0.5 * ell.pow(2)
    elif estimator in ("k3", "k3_ratio"):
        est = torch.exp(-ell) - 1 + ell
        if estimator == "k3_ratio":
            if old_logps is None:
                raise ValueError("k3_ratio needs old_logps (the importance ratio π/π_old)")
            est = est * torch.exp(logps - old_logps.detach())
    else:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return est.clamp(-clamp, clamp) if clamp is not None else est


def _per_token(adv: Tensor, like: Tensor) -> Tensor:
    return adv[:, None].expand_as(like) if adv.dim() == 1 else adv


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, clip_eps: float, clip_eps_high: float | None = None, dual_clip: float | None = None
) -> tuple[Tensor, Tensor]:
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


def aggregate(
    token_losses: Tensor,
    mask: Tensor,
    aggregation: str,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
) -> Tensor:
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
    if aggregation == "seq_sum":
        return summed
    raise ValueError(f"aggregation must be one of {AGGREGATIONS[:4]} for a token ratio, got {aggregation!r}")


def policy_gradient_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    kl_clamp: float | None = 10.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "token_mean",
    is_weights: Tensor | None = None,
) -> LossOutput:
    """PPO-clip policy loss; GRPO/Dr. GRPO/RLOO/ReMax/REINFORCE++ differ in advantages and aggregation.

    ratio_level token: ρ_t = exp(clamp(log π_θ − log π_old, ±20)); sequence (TRL RLOO): one ratio per
    sequence, exp(Σ_t log π_θ − Σ_t log π_old), with aggregation ``seq_mean``. KL in the loss adds
    kl_coef·est_t per token (GRPO Eq. 3; estimator per ``train.advantages.kl_estimate``). Shapes: module
    docstring. Returns losses [B] (batch loss ``losses.sum() / total_sequences``).
    """
    logps, old = as_float(logps), as_float(old_logps).detach()
    adv = as_float(advantages).detach()
    mask = mask.bool()
    log_ratio = torch.where(mask, logps - old, torch.zeros_like(logps))
    metrics: dict[str, Tensor] = {}
    if ratio_level == "sequence":
        if aggregation != "seq_mean":
            raise ValueError("ratio_level=sequence aggregates per sequence: aggregation must be seq_mean")
        if kl_coef:
            raise ValueError("ratio_level=sequence has no per-token terms: put the KL in the reward")
        seq_adv = adv if adv.dim() == 1 else adv[:, 0]
        ratio = torch.exp(log_ratio.sum(-1).clamp(-RATIO_CLAMP, RATIO_CLAMP))
        losses, clipped = clipped_surrogate(ratio, seq_adv, clip_eps, clip_eps_high, dual_clip)
        if is_weights is not None:
            losses = losses * _sequence_weights(as_float(is_weights).detach(), mask)
        metrics["clip_frac"] = batch_mean(clipped)
        metrics["ratio"] = batch_mean(ratio)
        return LossOutput(losses, metrics=metrics)
    if ratio_level != "token":
        raise ValueError(f"ratio_level must be token or sequence, got {ratio_level!r}")
    ratio = torch.exp(log_ratio.clamp(-RATIO_CLAMP, RATIO_CLAMP))
    token_loss, clipped = clipped_surrogate(ratio, _per_token(adv, logps), clip_eps, clip_eps_high, dual_clip)
    if is_weights is not None:
        token_loss = token_loss * as_float(is_weights).detach()
    if kl_coef:
        if ref_logps is None:
            raise ValueError("kl_coef > 0 needs ref_logps")
        kl = kl_estimate(logps, as_float(ref_logps), kl_estimator, old_logps=old, clamp=kl_clamp)
        token_loss = token_loss + kl_coef * kl
        metrics["kl_loss"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    losses = aggregate(token_loss, mask, aggregation, total_tokens, total_sequences)
    n = mask.sum().clamp(min=1)
    metrics["clip_frac"] = (clipped * mask).sum() / n
    metrics["ratio"] = (ratio.detach() * mask).sum() / n
    return LossOutput(losses, metrics=metrics)


def _sequence_weights(w: Tensor, mask: Tensor) -> Tensor:
    """[B, T] weights that are constant over each sequence's real tokens -> [B] (a sequence-level ratio
    has no per-token terms, so a per-token correction has nothing to multiply)."""
    m = mask.bool()
    hi = torch.where(m, w, torch.full_like(w, -torch.inf)).amax(-1)
    lo = torch.where(m, w, torch.full_like(w, torch.inf)).amin(-1)
    has = m.any(-1)
    if bool((has & (hi != lo)).any()):
        raise ValueError("a sequence-level ratio takes one importance weight per sequence (is_correction=seq_mask)")
    return torch.where(has, hi, torch.zeros_like(hi))


def ppo_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    kl_clamp: float | None = 10.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    is_weights: Tensor | None = None,
) -> LossOutput:
    """PPO-clip (Schulman et al. 2017, Eq. 7) with token ratios, token-mean over the optimizer step
    (OpenRLHF / verl); dual_clip c = 3 is verl's choice, None is OpenRLHF's default."""
    return policy_gradient_loss(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        dual_clip=dual_clip,
        aggregation=aggregation,
        is_weights=is_weights,
    )


def grpo_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    kl_clamp: float | None = 10.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "seq_mean_token_mean",
    is_weights: Tensor | None = None,
) -> LossOutput:
    """GRPO (Shao et al. 2024, arXiv 2402.03300, Eq. 3): PPO-clip, per-sequence token mean, mean over
    the group's sequences; KL in the loss. ``aggregation=token_mean`` is TRL's default ``dapo``."""
    return policy_gradient_loss(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        aggregation=aggregation,
        is_weights=is_weights,
    )


def dr_grpo_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    kl_clamp: float | None = 10.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, Eq. 2): the token sum of each sequence over a
    constant L_max (the padded completion length), mean over sequences: no length bias."""
    return policy_gradient_loss(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        aggregation="seq_sum_norm",
        is_weights=is_weights,
    )


def rloo_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    total_sequences: float | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """RLOO as TRL 1.16 trains it (Ahmadian et al. 2024 + PPO clipping): one **sequence-level** ratio
    exp(Σ_t log π_θ − Σ_t log π_old), clipped, mean over sequences; the KL is in the reward (k1)."""
    return policy_gradient_loss(
        logps,
        old_logps,
        advantages,
        mask,
        total_sequences=total_sequences,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        ratio_level="sequence",
        aggregation="seq_mean",
        is_weights=is_weights,
    )


def remax_loss(
    *,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    total_tokens: float | None = None,
    total_sequences: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3_ratio",
    kl_clamp: float | None = 10.0,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Alg. 1) as a surrogate: Σ_t −ρ_t A_t per sequence, mean
    over sequences. On-policy (ρ = 1) its gradient is REINFORCE's −A ∇Σ_t log π (see
    :func:`reinforce_loss`, the paper's form, whose value differs by the constant A·Σ log π)."""
    return policy_gradient_loss(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        total_tokens=total_tokens,
        total_sequences=total_sequences,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        kl_clamp=kl_clamp,
        clip_eps=1e9,
        aggregation="seq_sum",
        is_weights=is_weights,
    )


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
