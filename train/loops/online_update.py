"""Steps 2-7 of the online cycle (see train/loops/online.py): score shaping and normalisation, the
no-grad passes (pi_old, reference, values), advantage estimation, the policy/value update over mini- and
micro-batches, the OAIF DPO update, and the Lagrange multiplier step."""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

import torch

from synth.errors import ConfigError
from train import advantages as A
from train.loops.common import (
    call_loss,
    epoch_order,
)
from train.loops.metrics import StepMetrics
from train.losses.policy import aggregate, value_loss
from train.rollout import (
    AdapterValues,
    Rollout,
    token_logps,
    token_values,
)
from train.scorers import PairwiseJudge

if TYPE_CHECKING:
    from train.loops.online import OnlineState


def decode(tokenizer, rollout: Rollout) -> tuple[list[str], list[list[int]]]:
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True), ids


def adjust_scores(
    scores: torch.Tensor, truncated: torch.Tensor, L, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Missing-EOS penalty (TRL online DPO / legacy PPO), DAPO's soft overlong penalty (when
    loop.overlong_buffer is set), then the score clip (OpenRLHF ±clip)."""
    if L.missing_eos_penalty is not None:
        scores = scores - L.missing_eos_penalty * truncated.float()
    if L.overlong_buffer is not None and lengths is not None:
        scores = scores + A.overlong_penalty(lengths, L.generation.max_new_tokens, L.overlong_buffer, L.overlong_factor)
    if L.score_clip is not None:
        scores = scores.clamp(-L.score_clip, L.score_clip)
    return scores


def normalize(state: OnlineState, key: str, scores: torch.Tensor, baseline, function: str, eps: float, accelerator):
    """Opt-in running normaliser of raw scorer outputs (safe-rlhf `Normalizer`, RunningMeanStd): fold this
    step's scores of all processes into the running (count, mean, var), then normalise this process's
    scores (and a ReMax greedy baseline, which does not update the statistics) with them. NaN stays NaN."""
    moments = A.running_moments(tuple(getattr(state, key)), gather_all(accelerator, scores))
    setattr(state, key, list(moments))
    norm = A.normalize_scores(scores, moments, function, eps)
    return norm, (A.normalize_scores(baseline, moments, function, eps) if baseline is not None else None)


def label_pairs(scorer, L, prompts, texts, ids_list, rollout) -> tuple[list[int | None], torch.Tensor]:
    """online_dpo: per prompt 1 (first sample preferred), 0 (second) or None (tie / unscorable: dropped).
    A judge is asked in both orders; a reward function/model prefers the strictly higher score."""
    a, b = texts[0::2], texts[1::2]
    if isinstance(scorer, PairwiseJudge):
        return scorer(prompts[0::2], a, b), torch.full((len(texts),), math.nan)
    scores = adjust_scores(scorer(prompts, texts, ids_list), rollout.truncated, L, rollout.lengths)
    labels = []
    for sa, sb in zip(scores[0::2].tolist(), scores[1::2].tolist(), strict=True):
        labels.append(None if math.isnan(sa) or math.isnan(sb) or sa == sb else int(sa > sb))
    return labels, scores


@torch.no_grad()
def greedy_scores(sample, model, tokenizer, scorer, prompt_ids, mine, prompts, L, device) -> torch.Tensor:
    """ReMax baseline: the scorer's reward of one greedy decode per prompt (no KL, as verl), repeated per sample."""
    greedy = sample(
        model, tokenizer, [prompt_ids[i] for i in mine], 1, L.generation, seed=0, greedy=True, device=device
    )
    texts, ids_list = decode(tokenizer, greedy)
    s = adjust_scores(scorer([prompts[i] for i in mine], texts, ids_list), greedy.truncated, L, greedy.lengths)
    return s.repeat_interleave(L.samples_per_prompt)


def micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def on_policy_single_update(L, reference) -> bool:
    """π_old == π_θ exactly for the only mini-batch of the only epoch, and nothing before the update
    needs π_old (no KL in the reward): then the π_old pass is skipped and the update uses its own
    log-probs, detached, as π_old (TRL does the same when num_iterations == 1)."""
    kl_in_reward = reference is not None and L.kl.placement == "reward"
    return L.epochs_per_rollout == 1 and L.mini_batches == 1 and not kl_in_reward


def fused_old_pass(L, reference, critics, n_local: int, micro: int) -> bool:
    """The π_old pass is needed before the update only for the KL in the reward; with one on-policy update
    of one micro-batch (no critic), the update's forward gives the same log-probs (dropout off), so the
    loop runs that forward first, with its graph, and uses its detached values as π_old."""
    return (
        L.epochs_per_rollout == 1
        and L.mini_batches == 1
        and reference is not None
        and L.kl.placement == "reward"
        and not critics
        and n_local <= micro
    )


@torch.no_grad()
def no_grad_passes(
    model, reference, critics, rollout: Rollout, L, micro: int, device, packed: bool = False, skip_old: bool = False
) -> dict[str, torch.Tensor]:
    """π_old (and entropy), π_ref and critic values over the rollout, micro-batch by micro-batch, float32,
    without autograd (a recorded graph here would keep the pass's activations alive through the update)."""
    T = L.generation.temperature
    skip_old = skip_old or on_policy_single_update(L, reference)
    out: dict[str, list[torch.Tensor]] = {
        "old_logps": [],
        "entropy": [],
        "ref_logps": [],
        **{f"values_{k}": [] for k in critics},
    }
    for idx in micro_batches(len(rollout), micro):
        mb = rollout.select(idx)
        if not skip_old:
            lp, ent = token_logps(model, mb, T, device, with_entropy=True, packed=packed)
            out["old_logps"].append(lp.cpu())
            out["entropy"].append(ent.cpu())
        if reference == "adapter":
            with accelerator_unwrap(model).disable_adapter():
                out["ref_logps"].append(token_logps(model, mb, T, device, packed=packed)[0].cpu())
        elif reference is not None:
            out["ref_logps"].append(token_logps(reference, mb, T, device, packed=packed)[0].cpu())
        for k, c in critics.items():
            out[f"values_{k}"].append(token_values(c, mb, device).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def accelerator_unwrap(model):
    return getattr(model, "module", model)


def estimate(
    batch: dict[str, torch.Tensor], rollout: Rollout, scores, costs, baseline, state: OnlineState, L, accelerator
) -> dict[str, float]:
    """Shape the scores and compute batch["advantages"] (and returns for the critics) on this process's
    rows; sequence-level statistics are over the whole rollout (all processes), group statistics per group."""
    mask = rollout.completion_mask
    n = L.samples_per_prompt
    scores = adjust_scores(scores, rollout.truncated, L, rollout.lengths)
    beta = state.beta if L.kl.coef else 0.0
    kl_tok = None
    metrics: dict[str, float] = {}
    if "ref_logps" in batch and "old_logps" in batch:
        kl_tok = (
            A.kl_estimate(
                batch["old_logps"],
                batch["ref_logps"],
                L.kl.estimator if L.kl.placement == "reward" else "k1",
                clamp=L.kl.clamp,
            )
            * mask
        )
    in_reward = kl_tok is not None and L.kl.placement == "reward"
    reduce = _sum_reducer(accelerator)
    if L.missing_eos_penalty is not None or L.overlong_buffer is not None or L.score_clip is not None:
        adjusted = gather_all(accelerator, scores)
        metrics["reward/adjusted_mean"] = float(adjusted[~torch.isnan(adjusted)].mean())
    if L.estimator == "gae":
        gae_advantages(batch, scores, costs, kl_tok if in_reward else None, beta, mask, L, reduce)
    elif L.estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        base = (
            scores
            if L.estimator == "reinforce_pp"
            else A.reinforce_baseline(gather_all(accelerator, scores), n)[_local(accelerator, len(scores))]
        )
        rewards = A.shape_rewards(base, mask, kl_tok if in_reward else None, beta)
        batch["advantages"] = A.whiten(A.discounted_returns(rewards, mask), mask, reduce=reduce)
    else:
        seq = scores
        if in_reward:  # TRL RLOO: −β Σ_t k1 in the score, before the baseline
            seq = scores - beta * kl_tok.sum(1)
        if L.estimator == "remax":
            rewards = A.shape_rewards(scores, mask, kl_tok if in_reward else None, beta)
            adv = (A.discounted_returns(rewards, mask) - torch.nan_to_num(baseline, nan=0.0)[:, None]) * mask
            adv = torch.where(torch.isnan(scores + baseline)[:, None], torch.zeros_like(adv), adv)
        else:
            everyone = gather_all(accelerator, seq)
            if L.estimator == "rloo":
                adv = A.rloo(everyone, n)
            elif L.estimator == "dr_grpo":
                adv = A.dr_grpo(everyone, n)
            else:
                adv = A.grpo(everyone, n, scale=L.scale_rewards)
            groups = torch.nan_to_num(everyone, nan=0.0).view(-1, n)
            metrics["frac_reward_zero_std"] = (
                float(torch.isclose(groups.std(1), torch.zeros(())).float().mean()) if n > 1 else 0.0
            )
            adv = adv[_local(accelerator, len(seq))]
        batch["advantages"] = adv
    zero_unscorable(batch, torch.isnan(scores) | (torch.isnan(costs) if costs is not None else False))
    if "entropy" in batch:  # else measured in the update (π_old pass skipped)
        ent = gather_all(accelerator, torch.stack([(batch["entropy"] * mask).sum(), mask.sum().float()])[None])
        metrics["entropy"] = float(ent[:, 0].sum() / ent[:, 1].sum().clamp(min=1))
    if kl_tok is not None and "old_logps" in batch:
        k1 = (batch["old_logps"] - batch["ref_logps"]).detach() * mask
        metrics["kl"] = float(gather_all(accelerator, k1.sum(1)).mean())  # sequence-summed k1, nats
    return metrics


def gae_advantages(batch, scores, costs, kl_tok, beta: float, mask, L, reduce) -> None:
    """PPO (GAE over the critic's values; `kl_tok` the per-token KL when it sits in the reward, else None):
    batch["advantages"] (whitened with loop.whiten_advantages) and the critic's returns. ppo_lag: the
    reward and the cost streams each get ±β·KL (λ-neutral), a per-token clip and their own GAE
    (adv_reward / adv_cost, mixed with the current λ at each optimizer step, so "advantages" is None)."""
    rewards = A.shape_rewards(scores, mask, kl_tok, beta)
    gamma, lam = L.critic.gamma, L.critic.lam
    if L.name != "ppo_lag":
        adv, batch["returns_reward"] = A.gae(rewards, batch["values_reward"], mask, gamma, lam)
        batch["advantages"] = A.whiten(adv, mask, reduce=reduce) if L.whiten_advantages else adv
        return
    c = costs.clamp(-L.score_clip, L.score_clip) if L.score_clip is not None else costs  # no EOS penalty on a cost
    costs_t = A.shape_rewards(c, mask, -kl_tok if kl_tok is not None else None, beta)
    clip = L.lagrangian.token_clip
    if clip is not None:
        rewards, costs_t = rewards.clamp(-clip, clip) * mask, costs_t.clamp(-clip, clip) * mask
    batch["adv_reward"], batch["returns_reward"] = A.gae(rewards, batch["values_reward"], mask, gamma, lam)
    batch["adv_cost"], batch["returns_cost"] = A.gae(costs_t, batch["values_cost"], mask, gamma, lam)
    batch["advantages"] = None


def zero_unscorable(batch, unscorable: torch.Tensor) -> None:
    """An unscorable sample (NaN score or cost) gets zero advantage under every estimator, never the value
    baseline's guess, and its value target is the critic's own value (no learning signal)."""
    if not unscorable.any():
        return
    for key in ("advantages", "adv_reward", "adv_cost"):
        if batch.get(key) is not None:
            batch[key] = torch.where(
                unscorable.view(-1, *[1] * (batch[key].dim() - 1)), torch.zeros_like(batch[key]), batch[key]
            )
    for k in ("reward", "cost"):
        if f"returns_{k}" in batch:
            batch[f"returns_{k}"] = torch.where(unscorable[:, None], batch[f"values_{k}"], batch[f"returns_{k}"])


def gather_all(accelerator, t: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return t
    return accelerator.gather(t.to(accelerator.device)).cpu()


def _local(accelerator, n: int) -> slice:
    return slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)


def _sum_reducer(accelerator):
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()


def policy_update(
    model,
    critics,
    critic_opts,
    optimizer,
    scheduler,
    batch,
    rollout: Rollout,
    loss_fn,
    state: OnlineState,
    L,
    cfg,
    accelerator,
    packed: bool = False,
    live_logps: torch.Tensor | None = None,
) -> dict[str, float]:
    """live_logps: this rollout's log-probs already computed with their graph (`fused_old_pass`; one
    micro-batch). epochs_per_rollout × mini_batches optimizer steps over this process's rows. Each mini-batch's
    token and sequence counts are summed over processes first, so the token-mean is global and the
    gradient-accumulation normalisation is applied once."""

    device, world = accelerator.device, accelerator.num_processes
    n_rows = len(rollout)
    size = n_rows // L.mini_batches
    metrics = StepMetrics()
    critic_only = L.name in ("ppo", "ppo_lag") and state.step < L.critic.warmup_steps
    for epoch in range(L.epochs_per_rollout):
        order = epoch_order(
            n_rows, cfg.seed + state.step, epoch, shuffle=L.epochs_per_rollout > 1 or L.mini_batches > 1
        )
        for m in range(L.mini_batches):
            rows = order[m * size : (m + 1) * size]
            if L.name == "ppo_lag":
                lag_step(state, L)
                lam = math.exp(state.log_lambda)
                batch["advantages"] = A.mix_lagrangian(batch["adv_reward"], batch["adv_cost"], lam)
            counts = torch.stack([loss_mask(rollout, L)[rows].sum(), rollout.completion_mask[rows].sum()]).float()
            if world > 1:
                counts = accelerator.reduce(counts.to(device), "sum").cpu()
            # policy tokens (no truncated rows under mask_truncated_completions) and critic tokens; >= 1 so an
            # all-truncated mini-batch gives a zero loss, not 0/0
            total_tokens, value_tokens = (max(float(c) / world, 1.0 / world) for c in counts)
            total_sequences = float(len(rows))
            chunks = [rows[i : i + cfg.optim.batch_size] for i in range(0, len(rows), cfg.optim.batch_size)]
            for j, idx in enumerate(chunks):
                mb = rollout.select(idx)
                with _maybe_no_sync(accelerator, [model, *critics.values()], j == len(chunks) - 1):
                    if not critic_only:
                        live = (
                            live_logps if live_logps is not None and len(chunks) == 1 and len(idx) == n_rows else None
                        )
                        data = micro_batch_data(batch, mb, idx, L, state, device, total_tokens, total_sequences)
                        policy_backward(
                            model, data, batch, mb, idx, loss_fn, L, live, len(chunks), packed, metrics, accelerator
                        )
                    for k, critic in critics.items():
                        critic_backward(
                            k,
                            critic,
                            batch,
                            mb,
                            idx,
                            value_tokens,
                            total_sequences,
                            L,
                            len(chunks),
                            metrics,
                            accelerator,
                        )
            optimizer_steps(model, optimizer, scheduler, critics, critic_opts, critic_only, cfg, metrics, accelerator)
            state.optimizer_steps += 1
    return metrics.reduce(accelerator)


def micro_batch_data(batch, mb: Rollout, idx, L, state: OnlineState, device, total_tokens, total_sequences) -> dict:
    """The loss inputs of one micro-batch: advantages (zero for rows the loss mask drops), the token mask,
    the global token and sequence counts, and π_ref with the KL settings when the KL sits in the loss."""
    keep = loss_mask(mb, L)
    adv = batch["advantages"][idx]
    data = {
        "advantages": (adv * keep.any(1).view(-1, *[1] * (adv.dim() - 1))).to(device),
        "mask": keep.to(device),
        "total_tokens": total_tokens,
        "total_sequences": total_sequences,
    }
    if "ref_logps" in batch and L.kl.placement == "loss":
        data.update(
            ref_logps=batch["ref_logps"][idx].to(device),
            kl_coef=state.beta,
            kl_estimator=L.kl.estimator,
            kl_clamp=L.kl.clamp,
        )
    return data


def policy_backward(model, data, batch, mb: Rollout, idx, loss_fn, L, live, n_chunks, packed, metrics, accelerator):
    """The policy loss of one micro-batch, backpropagated: log-probs with
    their graph (or `live`, the fused pass's), π_old (this forward's, detached, when the π_old pass was
    skipped), the vLLM sampler correction, the entropy bonus, and the step's entropy / KL / loss metrics."""
    device = data["mask"].device
    on_policy = "old_logps" not in batch
    if live is not None:
        data["logps"], entropy = live[torch.as_tensor(idx, device=live.device)], None
    else:
        data["logps"], entropy = token_logps(
            model,
            mb,
            L.generation.temperature,
            device,
            with_entropy=on_policy or bool(L.entropy_coef),
            packed=packed,
            entropy_grad=bool(L.entropy_coef),
        )
    data["old_logps"] = data["logps"].detach() if on_policy else batch["old_logps"][idx].to(device)
    if mb.sampler_logps is not None:  # vLLM sampled: mismatch monitor and correction
        sampler_correction(data, mb, L.generation, metrics, device)
    if on_policy:
        mask = data["mask"]
        if mask.any():  # (none under mask_truncated_completions when every row is truncated)
            metrics.add(
                {"entropy": (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)}, weight=float(mask.sum())
            )
        if "ref_logps" in batch:  # the KL metric: sequence-summed k1, nats
            k1 = ((data["logps"].detach() - batch["ref_logps"][idx].to(device)) * mask).sum(1)
            metrics.add({"kl": k1.mean()}, weight=len(idx))
    out = call_loss(loss_fn, data)
    loss = out.losses.sum() / data["total_sequences"]
    if L.entropy_coef:  # − coef · entropy, aggregated as the policy loss (verl, OpenRLHF)
        bonus = entropy_bonus(
            entropy, data["mask"], loss_aggregation(loss_fn), data["total_tokens"], data["total_sequences"]
        )
        loss = loss - L.entropy_coef * bonus
        metrics.add({"entropy_bonus": bonus.detach() * n_chunks})
    accelerator.backward(loss)
    metrics.add({"loss": loss.detach() * n_chunks, **out.metrics})


def critic_backward(
    k: str, critic, batch, mb: Rollout, idx, value_tokens, total_sequences, L, n_chunks, metrics, accelerator
):
    """Critic `k`'s clipped value loss on one micro-batch, backpropagated (its own optimizer steps it)."""
    device = accelerator.device
    vout = value_loss(
        values=token_values(critic, mb, device),
        old_values=batch[f"values_{k}"][idx].to(device),
        returns=batch[f"returns_{k}"][idx].to(device),
        mask=mb.completion_mask.to(device),
        value_clip=L.critic.value_clip,
        total_tokens=value_tokens,
        total_sequences=total_sequences,
    )
    vloss = vout.losses.sum() / total_sequences
    accelerator.backward(vloss)
    metrics.add({f"value_loss/{k}": vloss.detach() * n_chunks, f"value_error/{k}": vout.metrics["value_error"]})


def optimizer_steps(model, optimizer, scheduler, critics, critic_opts, critic_only: bool, cfg, metrics, accelerator):
    """One optimizer step of the policy (after gradient clipping; not during the critic warm-up) and of
    each critic, and one scheduler step."""
    if not critic_only:
        if cfg.optim.max_grad_norm is not None:
            params = policy_parameters(model, optimizer, critics)
            metrics.add({"grad_norm": accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    for k, critic in critics.items():
        if cfg.optim.max_grad_norm is not None:
            accelerator.clip_grad_norm_(critic.parameters(), cfg.optim.max_grad_norm)
        critic_opts[k].step()
        critic_opts[k].zero_grad(set_to_none=True)


def sampler_correction(data: dict, mb: Rollout, gen, metrics: StepMetrics, device) -> None:
    """A rollout sampled by vLLM: log the mean |log p_vllm − log p_trainer| over its completion tokens
    (`rollout/abs_logp_diff`, π_old as the trainer's) and, unless loop.generation.is_correction=none, pass the
    importance weights π_old / π_vllm (train.advantages.sampler_is_weights) to the policy loss."""
    sampler, cmask = mb.sampler_logps.to(device), mb.completion_mask.to(device)
    total, count = A.abs_logp_diff(data["old_logps"], sampler, cmask)
    if count > 0:
        metrics.add({"rollout/abs_logp_diff": total / count}, weight=float(count))
    if gen.is_correction == "none":
        return
    w = A.sampler_is_weights(data["old_logps"], sampler, cmask, gen.is_correction, gen.is_cap, gen.is_min)
    data["is_weights"] = w
    if count > 0:
        metrics.add({"rollout/is_weight_mean": (w * cmask).sum() / count}, weight=float(count))
    rows = cmask.any(1)
    if gen.is_correction == "seq_mask" and rows.any():
        dropped = (w.amax(1) == 0) & rows
        metrics.add({"rollout/is_masked_frac": dropped.sum() / rows.sum()}, weight=float(rows.sum()))
    if gen.is_correction == "token_mask" and count > 0:  # the share of real tokens whose weight is 0
        metrics.add({"rollout/is_masked_token_frac": ((w == 0) & cmask.bool()).sum() / count}, weight=float(count))


def policy_parameters(model, optimizer, critics):
    """The parameters the policy's grad norm is taken over: the model's, except when a critic adapter
    (critic.kind=adapter) lives in the same PeftModel; then the policy optimizer's own set."""
    if any(isinstance(getattr(c, "module", c), AdapterValues) for c in critics.values()):
        return [p for group in optimizer.param_groups for p in group["params"]]
    return model.parameters()


AGGREGATION_OF = {"dr_grpo_loss": "seq_sum_norm", "rloo_loss": "seq_mean", "remax_loss": "seq_sum"}


def loss_aggregation(loss_fn) -> str:
    """The aggregation of a conf/loss policy loss: its `aggregation` setting, or the one its function fixes."""
    param = inspect.signature(loss_fn).parameters.get("aggregation")
    if param is not None:
        return param.default
    name = getattr(getattr(loss_fn, "func", loss_fn), "__name__", "")
    if name not in AGGREGATION_OF:
        raise ConfigError(f"loop.entropy_coef: the loss function {name} declares no aggregation; set entropy_coef=0")
    return AGGREGATION_OF[name]


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, aggregation: str, total_tokens=None, total_sequences=None
) -> torch.Tensor:
    """The entropy term of the policy loss, loss − coef · bonus: the per-token entropy [B, T] aggregated like
    the policy loss (`train.losses.policy.aggregate`, step-level token and sequence counts), so the bonus
    scales with the loss it regularises. A sequence-ratio loss (seq_mean, RLOO) takes each sequence's
    token-mean. Returns this micro-batch's share (a scalar; the shares sum to the step's value)."""
    agg = "seq_mean_token_mean" if aggregation == "seq_mean" else aggregation
    s = float(total_sequences) if total_sequences is not None else float(entropy.shape[0])
    return aggregate(entropy, mask, agg, total_tokens, total_sequences).sum() / s


def loss_mask(rollout: Rollout, L) -> torch.Tensor:
    """[N, Lc] bool: the completion tokens that carry policy loss. loop.mask_truncated_completions (DAPO,
    Yu et al. 2025 §3.4; TRL `mask_truncated_completions`): a completion that hit max_new_tokens without
    EOS gets none (it is still scored and still counts in its group's baseline); the critic still fits it."""
    if not L.mask_truncated_completions:
        return rollout.completion_mask
    return rollout.completion_mask & ~rollout.truncated[:, None]


def _maybe_no_sync(accelerator, models, sync: bool):
    import contextlib

    if sync or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for m in models:
        stack.enter_context(accelerator.no_sync(m))
    return stack


def lag_step(state: OnlineState, L) -> None:
    """Safe-RLHF: λ is updated before every policy optimizer step (safe-rlhf `rl_step`), from the mean of
    the last `window` episode costs, after `delay_steps` rollouts. Every process computes the same value
    from the same gathered window, so no broadcast is needed."""
    lg = L.lagrangian
    if state.step < lg.delay_steps or not state.cost_window:
        return
    mean_cost = sum(state.cost_window) / len(state.cost_window)
    state.log_lambda = A.lagrange_step(state.log_lambda, mean_cost, lg.cost_threshold, lg.lambda_lr, lg.lambda_max)


def dpo_update(
    model, reference, rollout: Rollout, labels, loss_fn, optimizer, scheduler, cfg, accelerator, packed: bool = False
) -> dict[str, float]:
    """OAIF update: the DPO-family loss (conf/loss, pairwise) on each kept pair against the fixed
    reference; dropped pairs weigh 0 and the mean is over the kept pairs of all processes."""
    from train.loops.metrics import StepMetrics

    L, device, world = cfg.loop, accelerator.device, accelerator.num_processes
    n_pairs = len(labels)
    keep = torch.tensor([lab is not None for lab in labels], dtype=torch.float32)
    first_wins = torch.tensor([lab == 1 for lab in labels])
    chosen = torch.where(first_wins, torch.arange(n_pairs) * 2, torch.arange(n_pairs) * 2 + 1)
    rejected = torch.where(first_wins, torch.arange(n_pairs) * 2 + 1, torch.arange(n_pairs) * 2)
    metrics = StepMetrics()
    size = n_pairs // L.mini_batches
    for _epoch in range(L.epochs_per_rollout):
        for m in range(L.mini_batches):
            pairs = list(range(m * size, (m + 1) * size))
            kept = keep[pairs].sum()
            if world > 1:
                kept = accelerator.reduce(kept.to(device), "sum").cpu()
            if float(kept) == 0:
                scheduler.step()
                continue
            for j in range(0, len(pairs), cfg.optim.batch_size):
                p = pairs[j : j + cfg.optim.batch_size]
                rows = torch.cat([chosen[p], rejected[p]])
                mb = rollout.select(rows)
                sync = j + cfg.optim.batch_size >= len(pairs)
                with _maybe_no_sync(accelerator, [model], sync):
                    lp = (token_logps(model, mb, L.generation.temperature, device, packed=packed)[0]).sum(1)
                    with torch.no_grad():
                        if reference == "adapter":
                            with accelerator_unwrap(model).disable_adapter():
                                ref = token_logps(model, mb, L.generation.temperature, device, packed=packed)[0].sum(1)
                        else:
                            ref = token_logps(reference, mb, L.generation.temperature, device, packed=packed)[0].sum(1)
                    b = len(p)
                    out = call_loss(
                        loss_fn,
                        {
                            "policy_chosen_logps": lp[:b],
                            "policy_rejected_logps": lp[b:],
                            "reference_chosen_logps": ref[:b],
                            "reference_rejected_logps": ref[b:],
                        },
                    )
                    w = keep[p].to(device)
                    loss = (out.losses * w).sum() * world / float(kept)
                    accelerator.backward(loss)
                    if w.sum() > 0:
                        metrics.add(
                            {
                                "loss": (out.losses.detach() * w).sum() / w.sum(),
                                "rewards/accuracy": ((out.chosen_rewards > out.rejected_rewards).float() * w).sum()
                                / w.sum(),
                                "rewards/margin": ((out.chosen_rewards - out.rejected_rewards) * w).sum() / w.sum(),
                            }
                        )
            if cfg.optim.max_grad_norm is not None:
                metrics.add({"grad_norm": accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)})
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    values = metrics.reduce(accelerator)
    values["pairs/kept_frac"] = float(gather_all(accelerator, keep).mean())
    return values


def update_cost_window(state: OnlineState, costs: torch.Tensor, window: int) -> None:
    state.cost_window = (state.cost_window + [c for c in costs.tolist() if not math.isnan(c)])[-window:]
