"""Advantage estimators, KL estimators, reward shaping and the two controllers of the online loops.

Pure functions of tensors and scalars, like train/losses: no config, model or device. Shapes: N rollout
samples, T completion positions (right-padded); ``mask`` [N, T] bool marks the real completion tokens
(up to and including the first EOS). Scores are [N], NaN = unscorable; a NaN never becomes a number:
it is left out of every baseline and statistic and its sample gets advantage 0 (TRL ``nan_to_num``).
Group estimators take the N samples as N/n contiguous groups of n (what the sampler produces).

    kl_estimate(logps, ref_logps, estimator)            [N, T]   k1 | k2 | k3 (Schulman, "Approximating KL")
    shape_rewards(scores, mask, kl, beta)               [N, T]   r_t = -β·kl_t + 1[t = last]·R
    overlong_penalty(lengths, max_length, buffer, f)    [N]      DAPO soft overlong punishment
    whiten(x, mask)                                     [N, T]   masked mean / population std
    gae(rewards, values, mask, gamma, lam)              (A, G)   Schulman et al. 2015, Eq. 16
    discounted_returns(rewards, mask, gamma)            [N, T]   REINFORCE++ (Hu 2025) before whitening
    rloo(scores, n)                                     [N]      Ahmadian et al. 2024, leave-one-out
    grpo(scores, n, scale, eps)                         [N]      Shao et al. 2024, §4.1.2
    dr_grpo(scores, n)                                  [N]      Liu et al. 2025 (arXiv 2503.20783): centred only
    remax(scores, greedy_scores)                        [N]      Li et al. 2023 (arXiv 2310.10505), Eq. 5
    adaptive_kl_beta(beta, kl, target, n, horizon)      float    Ziegler et al. 2019, §2.2
    lagrange_step(log_lambda, mean_cost, threshold, lr) float    Dai et al. 2023 (Safe RLHF) code semantics
    mix_lagrangian(adv_r, adv_c, lam)                   tensor   (A_R − λ A_C) / (1 + λ)
    running_moments(stats, scores)                      stats    running mean / variance (Chan et al. parallel update)
    normalize_scores(scores, stats, function, eps)      [N]      affine | scale | translate (safe-rlhf Normalizer)
    sampler_is_weights(old, sampler, mask, mode, cap)   [N, T]   train/inference mismatch: TIS | sequence MIS
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# KL estimators live beside the losses (train/losses imports only torch); re-exported here.
from train.losses.policy import KL_ESTIMATORS, kl_estimate  # noqa: E402,F401

# ------------------------------------------------------------------------------------------------ shaping


def last_token_index(mask: Tensor) -> Tensor:
    """[N] index of the last real token of each row (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def shape_rewards(scores: Tensor, mask: Tensor, kl: Tensor | None = None, beta: float = 0.0) -> Tensor:
    """Token rewards r_t = −β·kl_t + 1[t = T_i]·R_i (Ziegler et al. 2019, Eq. 2), [N, T], 0 on masked
    positions. The score sits on the **last real response token** (OpenRLHF compute_reward, safe-rlhf),
    never on a PAD slot. A NaN score contributes 0 here (its advantage is zeroed by the estimator)."""
    mask = mask.bool()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and beta:
        rewards = rewards - beta * kl.float()
    rows = torch.arange(mask.shape[0], device=mask.device)
    last = torch.nan_to_num(scores.float(), nan=0.0)
    rewards[rows, last_token_index(mask)] += torch.where(mask.any(1), last, torch.zeros_like(last))
    return rewards * mask


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, Eq. 13):
    −min(|y| − (L − B), B)/B · f when |y| > L − B, else 0. [N] float32."""
    over = (lengths.float() - (max_length - buffer)).clamp(min=0, max=buffer)
    return -over / buffer * factor


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce=None) -> Tensor:
    """(x − mean) / std over the masked entries (population variance, clamped at eps; OpenRLHF). 0 off
    mask. ``reduce`` sums a tensor over processes (the statistics are then those of the whole rollout)."""
    mask = mask.bool()
    reduce = reduce or (lambda t: t)
    xm = torch.where(mask, x, torch.zeros_like(x))
    n, total = reduce(torch.stack([mask.sum().to(x.dtype), xm.sum()]))
    mean = total / n.clamp(min=1)
    var = reduce(torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum()) / n.clamp(min=1)
    out = (x - mean) if shift_mean else x
    return torch.where(mask, out * torch.rsqrt(var.clamp(min=eps)), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------ token-level


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, Eq. 16), backwards with
    V_{T+1} = 0:  δ_t = r_t + γV_{t+1} − V_t,  A_t = δ_t + γλA_{t+1},  G_t = A_t + V_t.

    rewards, values [N, T] (values of masked slots are ignored); returns (advantages, returns) [N, T],
    0 off mask. Not whitened: the loop decides (safe-rlhf does not whiten, OpenRLHF/verl do)."""
    mask = mask.bool()
    r = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    v = torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32))
    adv = torch.zeros_like(r)
    next_adv = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    next_v = torch.zeros_like(next_adv)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_adv
        m = mask[:, t]
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        next_adv = torch.where(m, a, next_adv)  # padding after the last token passes the zeros through
        next_v = torch.where(m, v[:, t], next_v)
    return adv, (adv + v) * mask


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = Σ_{s≥t} γ^{s−t} r_s over the real tokens (REINFORCE++, Hu 2025, arXiv 2501.03262; γ = 1 is
    the reverse cumsum). Whiten the result over the batch to get REINFORCE++'s advantage. [N, T]."""
    mask = mask.bool()
    r = torch.where(mask, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * mask


# ------------------------------------------------------------------------------------------------ sequence-level


def _groups(scores: Tensor, n: int) -> Tensor:
    if n < 1 or scores.numel() % n:
        raise ValueError(f"{scores.numel()} scores do not split into whole groups of {n}")
    return scores.float().view(-1, n)


def rloo(scores: Tensor, n: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740, Eq. 7):
    A_i = r_i − mean_{j≠i, j scorable} r_j. NaN samples are left out of the baseline (divisor =
    scorable − 1, as TRL) and get A = 0; a group with one scorable sample gets A = 0. [N]."""
    g = _groups(scores, n)
    ok = ~torch.isnan(g)
    k = ok.sum(1, keepdim=True).float()
    total = torch.where(ok, g, torch.zeros_like(g)).sum(1, keepdim=True)
    baseline = (total - torch.where(ok, g, torch.zeros_like(g))) / (k - 1).clamp(min=1)
    adv = torch.where(ok & (k > 1), g - baseline, torch.zeros_like(g))
    return adv.reshape(-1)


def _nan_mean_std(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass, NaN-aware mean and unbiased std per row (a one-pass variance of a near-constant float32
    group is ~2e-7 instead of 0 and blows the advantage up, NeMo-RL PR#4158)."""
    ok = ~torch.isnan(g)
    k = ok.sum(1, keepdim=True).float()
    mean = torch.where(ok, g, torch.zeros_like(g)).sum(1, keepdim=True) / k.clamp(min=1)
    var = torch.where(ok, (g - mean) ** 2, torch.zeros_like(g)).sum(1, keepdim=True) / (k - 1).clamp(min=1)
    return mean, var.sqrt(), ok


def grpo(scores: Tensor, n: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2024, arXiv 2402.03300, §4.1.2): A_i = (r_i − mean)/(std + ε),
    unbiased std, ε = 1e-4 (TRL). scale: group (per-group std) | batch (one std over all scorable
    scores) | none (Dr. GRPO: centre only). A group whose std is ≈ 0 (isclose) gets A = 0, never a
    blown-up quotient; NaN samples get 0. [N]."""
    g = _groups(scores, n)
    mean, std, ok = _nan_mean_std(g)
    centred = g - mean
    if scale == "group":
        denom = std
    elif scale == "batch":
        flat = g[ok]
        denom = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        denom = denom.expand_as(std)
    elif scale == "none":
        return torch.where(ok, centred, torch.zeros_like(g)).reshape(-1)
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    flat_group = (
        torch.isclose(std, torch.zeros_like(std), atol=1e-6)
        if scale == "group"
        else torch.zeros_like(std, dtype=torch.bool)
    )
    adv = torch.where(ok & ~flat_group, centred / (denom + eps), torch.zeros_like(g))
    return adv.reshape(-1)


def dr_grpo(scores: Tensor, n: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783, §3.1): A_i = r_i − mean(group), no std. Pair it with a
    constant-denominator aggregation (``seq_sum_norm``). [N]."""
    return grpo(scores, n, scale="none")


def remax(scores: Tensor, greedy_scores: Tensor) -> Tensor:
    """ReMax (Li et al. 2023, arXiv 2310.10505, Alg. 1): A = R(y) − R(ȳ), ȳ the greedy decode of the same
    prompt under no grad. scores [N]; greedy_scores [N] (the prompt's greedy score repeated per sample).
    A NaN on either side gives A = 0."""
    adv = scores.float() - greedy_scores.float()
    return torch.nan_to_num(adv, nan=0.0)


def reinforce_baseline(scores: Tensor, n: int) -> Tensor:
    """REINFORCE++-baseline (OpenRLHF ``reinforce_baseline``): subtract the group mean; the loop then
    whitens the token advantages over the batch. NaN → 0. [N]."""
    return dr_grpo(scores, n)


# ------------------------------------------------------------------------------------------------ controllers


def adaptive_kl_beta(beta: float, kl: float, target: float, n_steps: int, horizon: int = 10_000) -> float:
    """Ziegler et al. 2019 (arXiv 1909.08593), §2.2, code AdaptiveKLController:
    e = clip(KL/KL_target − 1, ±0.2);  β ← β·(1 + e·n/H).

    Units: ``kl`` and ``target`` must be in the same unit. Our loops pass the batch mean of the
    **sequence-summed** k1 KL in nats (Ziegler's unit, target 6 nats); n = episodes in the update."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def lagrange_step(
    log_lambda: float, mean_cost: float, threshold: float, lr: float, lambda_max: float | None = None
) -> float:
    """One SGD step of the Safe-RLHF multiplier in log space (Dai et al. 2023, arXiv 2310.12773; the
    safe-rlhf code's ``log_lambda_optimizer``): loss −(J̄_C − d)·e^{log λ}, so
    log λ ← log λ + η·λ·(J̄_C − d), clamped at log λ_max when set. Returns the new log λ."""
    lam = math.exp(log_lambda)
    new = log_lambda + lr * lam * (mean_cost - threshold)
    if lambda_max is not None:
        new = min(new, math.log(lambda_max))
    return new


def mix_lagrangian(adv_reward: Tensor, adv_cost: Tensor, lam: float) -> Tensor:
    """Safe-RLHF mixed advantage (A_R − λ·A_C)/(1 + λ) (Dai et al. 2023, Eq. 11, code ppo_lag trainer)."""
    return (adv_reward - lam * adv_cost) / (1.0 + lam)


# ------------------------------------------------------------------------------------------------ score normaliser


def running_moments(stats: tuple[int, float, float], scores: Tensor) -> tuple[int, float, float]:
    """(count, mean, var) after folding in this batch's non-NaN scores, by Chan et al.'s parallel update
    as safe-rlhf's `RunningMeanStd.update`: the batch contributes its mean and its unbiased (n−1)
    variance, the merged variance is M2 / total count. Start from (0, 0.0, 1.0) (safe-rlhf's buffers).

        δ = μ_b − μ,  N' = N + n,  μ' = μ + δ·n/N',  σ'² = (σ²·N + σ_b²·n + δ²·N·n/N') / N'
    """
    x = scores[~torch.isnan(scores)].double()
    n = int(x.numel())
    if n == 0:
        return stats
    count, mean, var = stats
    b_mean = float(x.mean())
    b_var = float(x.var()) if n > 1 else 0.0
    total = count + n
    delta = b_mean - mean
    m2 = var * count + b_var * n + delta * delta * count * n / total
    return total, mean + delta * n / total, m2 / total


def normalize_scores(scores: Tensor, stats: tuple[int, float, float], function: str, eps: float = 1e-8) -> Tensor:
    """safe-rlhf `Normalizer.normalize`: affine (x − μ)/(σ + eps), scale x/(σ + eps), translate x − μ,
    none x; NaN stays NaN."""
    _, mean, var = stats
    std = math.sqrt(max(var, 0.0))
    if function == "affine":
        return (scores - mean) / (std + eps)
    if function == "scale":
        return scores / (std + eps)
    if function == "translate":
        return scores - mean
    if function == "none":
        return scores
    raise ValueError(f"normalize function {function!r}: affine | scale | translate | none")


# ------------------------------------------------------------------------------------------------ sampler mismatch

# token level (one ratio per token) and sequence level (one ratio per sequence, on all its tokens); each bound
# either truncates (clips the ratio into [is_min, is_cap]) or masks (ratios outside it become 0)
IS_CORRECTIONS = ("none", "tis", "token_mask", "seq_truncate", "seq_mask")
TOKEN_LEVEL_IS = ("tis", "token_mask")


def sampler_is_weights(
    old_logps: Tensor,
    sampler_logps: Tensor,
    mask: Tensor,
    mode: str = "seq_mask",
    cap: float | None = 3.0,
    floor: float | None = None,
) -> Tensor:
    """Importance weights that correct a rollout sampled by another engine (vLLM) than the trainer.

    The rollout's tokens were drawn from π_sampler (vLLM's kernels, dtype and sampler, incl. top-k/top-p),
    while the update treats them as drawn from π_old (the trainer's recomputed log-probs); the two differ (Yao
    et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training": truncated IS; TRL
    ``vllm_importance_sampling_mode``, whose four modes these are). With Δ_t = log π_old(y_t) − log π_sampler(y_t)
    on the real tokens (NaN sampler log-probs: Δ = 0), ρ_t = exp(Δ_t) and ρ_i = exp(Σ_t Δ_t):

        tis           w_t = clip(ρ_t, floor, cap)                 token-level truncated IS (TRL token_truncate)
        token_mask    w_t = ρ_t if floor ≤ ρ_t ≤ cap else 0       token-level masked IS (TRL token_mask)
        seq_truncate  w_i = clip(ρ_i, floor, cap)                 sequence-level truncated IS (TRL
                                                                  sequence_truncate), on every token of i
        seq_mask      w_i = ρ_i if floor ≤ ρ_i ≤ cap else 0       sequence-level masked IS (TRL sequence_mask,
                                                                  its default: cap 3, no floor)
        none          w = 1

    A bound of None is no bound. [N, T] in, [N, T] float32 out (detached, 0 off the mask); the policy loss
    multiplies its per-token loss by w before aggregation (the KL term is not weighted, as TRL)."""
    m = mask.bool()
    if mode == "none":
        return m.float()
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"is_correction must be one of {IS_CORRECTIONS}, got {mode!r}")
    delta = torch.where(m, old_logps.detach().float() - sampler_logps.detach().float(), torch.zeros(()))
    delta = torch.nan_to_num(delta, nan=0.0)
    log_ratio = delta if mode in TOKEN_LEVEL_IS else delta.sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if mode in ("tis", "seq_truncate"):
        w = ratio if cap is None and floor is None else ratio.clamp(min=floor, max=cap)
    else:
        outside = torch.zeros_like(ratio, dtype=torch.bool)
        if cap is not None:
            outside |= ratio > cap
        if floor is not None:
            outside |= ratio < floor
        w = ratio.masked_fill(outside, 0.0)
    w = w.expand_as(delta)
    return torch.where(m, w, torch.zeros_like(w))


def abs_logp_diff(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ |log π_sampler − log π_trainer| over the real tokens, their count): the monitor of the
    train/inference mismatch (TRL ``sampling/sampling_logp_difference/mean``); NaN entries left out."""
    d = (sampler_logps.detach().float() - old_logps.detach().float()).abs()
    ok = mask.bool() & ~torch.isnan(d)
    return torch.where(ok, d, torch.zeros_like(d)).sum(), ok.sum()
