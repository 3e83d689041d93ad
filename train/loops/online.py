"""loop=ppo | rloo | remax | grpo | ppo_lag | online_dpo: online RL on one rollout cycle.

Every step is the same cycle; only the estimator, the scorer and the extra models change:

    1. sample    P prompts (whole groups per process) × n completions, token ids, from the live policy
    2. score     one batched call per scorer (function / reward model / AI judge); NaN = unscorable
    3. passes    no-grad: π_old log-probs (float32, logits / T), π_ref log-probs (β > 0), values (PPO)
    4. shape     missing-EOS penalty, score clip, KL in the reward (per token) when configured
    5. estimate  gae | reinforce_pp(_baseline) | rloo | grpo | dr_grpo | remax (train/advantages.py)
    6. update    epochs_per_rollout × mini_batches optimizer steps, micro-batches accumulated, the loss
                 from conf/loss (kind policy; KL in the loss when configured) + the clipped value loss
    7. control   adaptive β (Ziegler), Lagrange λ (Safe-RLHF, per optimizer step), log, checkpoint

online_dpo (OAIF) replaces 4-6 by: label each prompt's two samples (judge both orders / reward), drop
ties, and apply the conf/loss DPO-family loss against the fixed initial policy.

Resume: a checkpoint is written between rollouts (policy, critics, optimizers, β, log λ, the cost
window, the step). An interrupted rollout is not persisted: the resumed run restarts that rollout, and
because sampling seeds derive from (seed, step, process) it draws the same completions.
Dropout is off for the whole run (the model stays in eval mode), so π_old equals π_θ on the first
mini-batch (TRL disable_dropout); when that mini-batch is the only update and no KL sits in the reward,
the π_old pass is skipped; when the KL sits in the reward and the rollout is one micro-batch, the
update's own forward (run first, graph kept) supplies π_old. With optim.packing the trainer's forwards
run on rows packed end to end, with the LM head on completion positions only.
Opt-in score options: mask_truncated_completions (DAPO: no policy loss on a completion without EOS) and
a running mean/std normaliser of raw reward / cost scores (safe-rlhf Normalizer, restored on resume).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synth.errors import ConfigError
from train import advantages as A
from train.data.prompts import encode_prompts, load_prompts
from train.loops.checkpoints import checkpoint_progress, resume_from
from train.loops.common import (
    Progress,
    begin_run,
    build_optimizer,
    build_scheduler,
    epoch_order,
    load_trained_model,
    total_steps,
)
from train.loops.critics import build_critics, check_critic_processes, critic_kind, save_adapter_heads
from train.loops.metrics import MetricsLogger, finish_run, postfix
from train.loops.online_update import (
    decode,
    dpo_update,
    estimate,
    fused_old_pass,
    gather_all,
    greedy_scores,
    label_pairs,
    loss_aggregation,
    no_grad_passes,
    normalize,
    policy_update,
    update_cost_window,
)
from train.loops.packing import packing_agreed, packing_matches
from train.models import (
    count_parameters,
    is_peft,
    load_frozen,
    load_tokenizer,
    save_model,
    trainable_parameters,
)
from train.rollout import (
    AdapterValues,
    Packed,
    Rollout,
    head_only_matches,
    hf_generate,
    left_pad,
    token_logps,
)
from train.scorers import PairwiseJudge, build_scorer


@dataclass
class OnlineState(Progress):
    """The offline loops' Progress (step = finished rollouts) plus the controllers' state: everything a
    checkpoint restores besides weights, optimizers and RNG (trainer_state.json)."""

    optimizer_steps: int = 0
    beta: float = 0.0
    log_lambda: float = 0.0
    cost_window: list[float] = field(default_factory=list)
    reward_moments: list[float] = field(
        default_factory=lambda: [0, 0.0, 1.0]
    )  # running (count, mean, var) of raw scores
    cost_moments: list[float] = field(default_factory=lambda: [0, 0.0, 1.0])

    SAVED = Progress.SAVED + ("optimizer_steps", "beta", "log_lambda", "cost_window", "reward_moments", "cost_moments")


def run(cfg, resolved_yaml: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    L = cfg.loop
    # ---------------------------------------------------------------- 1. process, output folder, loss
    accelerator, out_dir, loss_fn, ckpt = begin_run(cfg, resolved_yaml)
    world, rank, main, device = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.is_main_process,
        accelerator.device,
    )
    check_run_start(cfg, loss_fn, world)

    # ---------------------------------------------------------------- 2. prompts
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.chat_template)
    prompts, prompt_ids, n_truncated = online_prompts(cfg, tokenizer)
    total = total_steps(
        cfg.optim, len(prompts) // L.prompts_per_step
    )  # rollouts: max_steps, else epochs over the prompts
    per_process = L.prompts_per_step // world

    # ---------------------------------------------------------------- 3. models and scorers
    policy = load_trained_model(cfg, ckpt)
    reference = build_reference(cfg, policy, device) if L.name == "online_dpo" or L.kl.coef > 0 else None
    policy_params = trainable_parameters(policy)  # before any critic adapter joins the PeftModel
    critics = build_critics(cfg, ckpt, device, policy)
    reward_scorer = (
        PairwiseJudge(L.reward.judge)
        if L.name == "online_dpo" and L.reward.kind == "judge"
        else build_scorer(L.reward, device, "loop.reward")
    )
    cost_scorer = build_scorer(L.cost, device, "loop.cost") if L.name == "ppo_lag" else None
    generator, probe = build_generator(cfg, accelerator, prompt_ids)  # (None, None): the live policy samples
    sample = generator.generate if generator is not None else hf_generate

    # ---------------------------------------------------------------- 4. optimisers, resume
    updates_per_rollout = L.epochs_per_rollout * L.mini_batches
    optimizer = build_optimizer(policy_params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total * updates_per_rollout)
    model, optimizer = accelerator.prepare(policy, optimizer)
    critic_opts = prepare_critics(critics, cfg, accelerator)
    state = OnlineState(beta=L.kl.coef, log_lambda=math.log(L.lagrangian.lambda_init), started=started)
    tensors = resume_from(ckpt, state, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    restore_critics(tensors, critics, critic_opts, accelerator)
    packed = forward_mode(model, prompt_ids, cfg, accelerator)
    # the policy's own count: critic adapters (kind=adapter) live in its PeftModel but are the critics'
    n_train, n_total = count_parameters(
        accelerator.unwrap_model(model), [p for c in critics.values() for p in c.parameters()]
    )
    critic_counts = ", ".join(f"{k} {count_parameters(c)[0]:,} trainable" for k, c in critics.items())
    if main:
        print(
            f"loop={L.name}: policy {n_train:,} trainable of {n_total:,} parameters; loss={cfg.loss.name}; "
            f"{len(prompts)} prompts "
            f"({n_truncated} truncated); {total} rollouts of {L.prompts_per_step}x{L.samples_per_prompt}; forwards: "
            f"{'packed' if packed else 'padded'}"
            f"{f'; critic: {critic_kind(cfg)} ({critic_counts})' if critics else ''}"
            f"{', LM head on completions only' if getattr(packed, 'head_only', False) else ''}",
            flush=True,
        )

    # ---------------------------------------------------------------- 5. the rollout cycle
    logger = MetricsLogger(out_dir, main, cfg.log.tensorboard, resume_step=state.step)
    pairs_log = PairsLog(out_dir / "pairs.jsonl", main, state.step) if L.name == "online_dpo" else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.step, disable=not (cfg.progress and main), desc=L.name, dynamic_ncols=True)
    last: dict[str, float] = {}
    stopped = False
    for m in (model, *critics.values()):
        m.eval()  # no dropout: π_old == π_θ on the first mini-batch
    while state.step < total:
        t0 = time.perf_counter()
        # 1. sample: this process's whole groups of this step's prompts
        mine = step_prompts(state.step, len(prompts), L.prompts_per_step, cfg.seed)[
            rank * per_process : (rank + 1) * per_process
        ]
        sync = {} if generator is None else generator.sync(model, probe, device)  # weights in, probe checked
        rollout = sample(
            model,
            tokenizer,
            [prompt_ids[i] for i in mine],
            L.samples_per_prompt,
            L.generation,
            seed=sample_seed(cfg.seed, state.step, rank),
            device=device,
        )
        texts, ids_list = decode(tokenizer, rollout)
        row_prompts = [prompts[mine[g]] for g in rollout.group.tolist()]
        t_gen = time.perf_counter()
        # 2. score (one batched call each); NaN = unscorable
        if L.name == "online_dpo":
            labels, scores = label_pairs(reward_scorer, L, row_prompts, texts, ids_list, rollout)
        else:
            scores = reward_scorer(row_prompts, texts, ids_list)
        costs = cost_scorer(row_prompts, texts, ids_list) if cost_scorer is not None else None
        baseline = (
            greedy_scores(sample, model, tokenizer, reward_scorer, prompt_ids, mine, prompts, L, device)
            if L.estimator == "remax"
            else None
        )
        if generator is not None:
            generator.sleep()  # the step's generations are done: the memory goes to the update
        raw_scores, raw_costs = scores, costs  # logged, and the cost window keeps the threshold's unit
        scores, costs, baseline = normalize_step(state, scores, costs, baseline, L, accelerator)
        t_score = time.perf_counter()
        # 3-6
        if L.name == "online_dpo":
            pairs_log.write(state.step, [prompts[i] for i in mine], texts, labels, accelerator)
            metrics = dpo_update(
                model, reference, rollout, labels, loss_fn, optimizer, scheduler, cfg, accelerator, packed
            )
            state.optimizer_steps += updates_per_rollout
        else:
            # π_old == π_θ for a single on-policy update: when the whole local rollout is one micro-batch, the
            # update's own forward (kept with its graph) supplies π_old for the KL in the reward: one forward less
            live = (
                token_logps(model, rollout, L.generation.temperature, device, with_entropy=True, packed=packed)
                if fused_old_pass(L, reference, critics, len(rollout), cfg.optim.batch_size)
                and (reference != "adapter" or world == 1)
                and not L.entropy_coef  # (the bonus needs the entropy's graph)
                else None
            )  # (no DDP forward between forward and backward)
            batch = no_grad_passes(
                model, reference, critics, rollout, L, cfg.optim.batch_size, device, packed, skip_old=live is not None
            )
            if live is not None:
                batch["old_logps"], batch["entropy"] = live[0].detach().cpu(), live[1].cpu()
            if costs is not None:  # Safe-RLHF: episode costs (scorer end scores, no KL) feed J̄_C
                update_cost_window(state, gather_all(accelerator, raw_costs), L.lagrangian.window)
            metrics = estimate(batch, rollout, scores, costs, baseline, state, L, accelerator)
            metrics |= policy_update(
                model,
                critics,
                critic_opts,
                optimizer,
                scheduler,
                batch,
                rollout,
                loss_fn,
                state,
                L,
                cfg,
                accelerator,
                packed,
                live_logps=live[0] if live is not None else None,
            )
            del live
        t_update = time.perf_counter()
        # 7. controllers, log, checkpoint
        metrics |= (
            rollout_metrics(
                rollout,
                None if L.name == "online_dpo" and L.reward.kind == "judge" else raw_scores,
                raw_costs,
                L,
                accelerator,
            )
            | sync
        )
        if L.kl.adaptive and "kl" in metrics:
            n = L.prompts_per_step * L.samples_per_prompt
            state.beta = A.adaptive_kl_beta(state.beta, metrics["kl"], L.kl.target_per_sequence_nats, n, L.kl.horizon)
        state.step += 1
        state.samples += L.prompts_per_step * L.samples_per_prompt
        last = step_record(metrics, state, L, scheduler, (t0, t_gen, t_score, t_update))
        if state.log_due(cfg.log.every_steps, total):
            logger.log(state.step, last)
            bar.set_postfix(postfix(last, ("reward/mean", "kl", "loss", "lambda")))
        bar.update(1)
        due, stopped = state.checkpoint_due(cfg.checkpoint)
        if due:
            checkpoint(out_dir, state, accelerator, model, tokenizer, optimizer, scheduler, critics, critic_opts, cfg)
        if stopped:
            break
    bar.close()

    # ---------------------------------------------------------------- 6. the end
    logger.close()
    if stopped:
        return {"stopped": True, "steps": state.step, "output_dir": str(out_dir)}
    final = save_model(model, tokenizer, out_dir / "final", accelerator)
    save_adapter_heads(critics, final, accelerator)
    if state.final_checkpoint_due(cfg.checkpoint):
        checkpoint(out_dir, state, accelerator, model, tokenizer, optimizer, scheduler, critics, critic_opts, cfg)
    summary = {
        "loop": L.name,
        "loss": cfg.loss.name,
        "steps": state.step,
        "optimizer_steps": state.optimizer_steps,
        "samples": state.samples,
        "time_s": state.time_s(),
        "final_dir": str(final),
        "final_train": last,
        "truncation": {"prompts_truncated": n_truncated},
        "output_dir": str(out_dir),
    }
    return finish_run(summary, out_dir, cfg, accelerator)


# ==================================================================================== set-up helpers


def check_run_start(cfg, loss_fn, world: int) -> None:
    """What can only be checked once the process count and the loss are known, before any model loads."""
    check_shapes(cfg.loop, world, cfg.optim.batch_size)
    check_critic_processes(cfg, world)
    if cfg.loop.entropy_coef:
        loss_aggregation(loss_fn)  # refuses a loss whose aggregation is unknown


def online_prompts(cfg, tokenizer):
    """The run's prompts (data.path), chat-encoded (data.max_prompt_length, drop_overlong) ->
    (prompts kept, their token ids, how many were truncated); fewer than one rollout's is refused."""
    prompts = load_prompts(cfg.data.path, cfg.data.split, cfg.data.limit)
    prompt_ids, kept, n_truncated = encode_prompts(
        prompts, tokenizer, cfg.model.chat_template, cfg.data.max_prompt_length, cfg.data.drop_overlong
    )
    prompts = [prompts[i] for i in kept]
    if len(prompts) < cfg.loop.prompts_per_step:
        raise ConfigError(
            f"data.path={cfg.data.path}: {len(prompts)} prompt(s), fewer than "
            f"loop.prompts_per_step={cfg.loop.prompts_per_step}"
        )
    return prompts, prompt_ids, n_truncated


def check_shapes(L, world: int, micro: int) -> None:
    """Group integrity under data parallelism (a group split across processes would get a wrong
    baseline): each process holds whole groups, and its rollout share splits into equal mini-batches of
    whole micro-batches."""
    if L.prompts_per_step % world:
        raise ConfigError(
            f"loop.prompts_per_step={L.prompts_per_step} does not split over {world} processes; a group "
            "must stay on one process: use a multiple of the process count"
        )
    local = L.prompts_per_step // world * L.samples_per_prompt
    unit = L.prompts_per_step // world if L.name == "online_dpo" else local
    if unit % L.mini_batches or (unit // L.mini_batches) % micro:
        what = "pairs" if L.name == "online_dpo" else "samples"
        raise ConfigError(
            f"{unit} {what} per process do not split into loop.mini_batches={L.mini_batches} mini-batches "
            f"of whole micro-batches of optim.batch_size={micro}"
        )


def build_reference(cfg, policy, device):
    """The KL / DPO reference: the base with the adapter disabled under LoRA (auto), else a frozen copy
    of the initial weights (never a resumed checkpoint) on `device`."""
    mode = cfg.loop.reference
    if mode == "auto":
        mode = "adapter_disabled" if cfg.lora.enabled else "model"
    if mode == "adapter_disabled":
        if not is_peft(policy):
            raise ConfigError("loop.reference=adapter_disabled needs LoRA (lora.enabled=true)")
        return "adapter"
    return load_frozen(cfg.model.name_or_path, revision=cfg.model.revision, dtype=cfg.optim.dtype).to(device)


def build_generator(cfg, accelerator, prompt_ids: list[list[int]]):
    """generation.backend=vllm: the colocated engine (GPU, opt-in), synced and probed every step, and its
    probe sequence; hf: (None, None), the live policy samples (train.rollout.hf_generate)."""
    if cfg.loop.generation.backend != "vllm":
        return None, None
    from train.models import model_path  # lazy: with train.vllm_colocate, only for the vllm backend
    from train.vllm_colocate import VLLMColocate, probe_sequence  # lazy: imports vllm

    engine = VLLMColocate(
        model_path(cfg.model.name_or_path),
        cfg.loop.generation,
        accelerator=accelerator,
        dtype=cfg.optim.dtype,
        seed=cfg.seed,
        max_model_len=max(map(len, prompt_ids)) + cfg.loop.generation.max_new_tokens,
        lora_rank=cfg.lora.r if cfg.lora.enabled else None,
    )
    return engine, probe_sequence(prompt_ids)


def prepare_critics(critics: dict[str, Any], cfg, accelerator) -> dict[str, Any]:
    """Each critic's own optimizer (lr loop.critic.lr), both prepared by accelerate (critics replaced in
    place by their prepared modules). Returns the optimizers by critic name."""
    opts = {}
    for k, critic in critics.items():
        opt = build_optimizer(trainable_parameters(critic), cfg.optim.model_copy(update={"lr": cfg.loop.critic.lr}))
        critics[k], opts[k] = accelerator.prepare(critic, opt)
    return opts


def restore_critics(tensors: dict[str, Any], critics, critic_opts, accelerator) -> None:
    """A resumed run's critic optimizers, and an adapter critic's head (its adapter came back with the policy)."""
    for k, opt in critic_opts.items():
        if f"critic_{k}_optimizer" in tensors:
            opt.load_state_dict(tensors[f"critic_{k}_optimizer"])
        if f"critic_{k}_head" in tensors:
            accelerator.unwrap_model(critics[k]).head.load_state_dict(tensors[f"critic_{k}_head"])


def forward_mode(model, prompt_ids: list[list[int]], cfg, accelerator):
    """The trainer's forwards: padded (False), or packed rows (optim.packing, checked on this model) with the
    LM head on completion positions only when this model's forward allows it (Packed.head_only)."""
    if not (cfg.optim.packing and packing_check(model, prompt_ids, cfg, accelerator)):
        return False
    return Packed(head_only=head_check(model, prompt_ids, accelerator))


def normalize_step(state: OnlineState, scores, costs, baseline, L, accelerator):
    """loop.normalize_reward / normalize_cost: the running statistics take this step's raw scores (all
    processes), then the scores (and ReMax's greedy baseline, with the same statistics) are normalised."""
    if L.normalize_reward != "none":
        scores, baseline = normalize(
            state, "reward_moments", scores, baseline, L.normalize_reward, L.normalize_eps, accelerator
        )
    if costs is not None and L.normalize_cost != "none":
        costs, _ = normalize(state, "cost_moments", costs, None, L.normalize_cost, L.normalize_eps, accelerator)
    return scores, costs, baseline


def step_record(metrics: dict[str, float], state: OnlineState, L, scheduler, times) -> dict[str, float]:
    """One rollout's metrics.jsonl line: the update's metrics, β (and λ for ppo_lag), the running reward
    statistics, lr, the phases' seconds (sample, score, update) and throughput; NaN values left out."""
    t0, t_gen, t_score, t_update = times
    last = {
        **metrics,
        "beta": state.beta,
        "lr": scheduler.get_last_lr()[0],
        "time/generate_s": t_gen - t0,
        "time/score_s": t_score - t_gen,
        "time/update_s": t_update - t_score,
        "samples_per_s": L.prompts_per_step * L.samples_per_prompt / max(t_update - t0, 1e-9),
        "time_s": state.time_s(),
    }
    if L.normalize_reward != "none":
        last["reward/running_mean"] = state.reward_moments[1]
        last["reward/running_std"] = math.sqrt(state.reward_moments[2])
    if L.name == "ppo_lag":
        last["lambda"] = math.exp(state.log_lambda)
    return {k: v for k, v in last.items() if not (isinstance(v, float) and math.isnan(v))}


def packing_check(model, prompt_ids: list[list[int]], cfg, accelerator) -> bool:
    """optim.packing: the trainer's forwards run on rows laid end to end (no compute on the prompts'
    left padding or the completions' right padding) when this model keeps packed rows apart (checked
    once on two prompts, agreed by every process; train/loops/packing.py)."""

    rows = prompt_ids[:2]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
    batch = {
        "input_ids": ids.to(accelerator.device),
        "attention_mask": attn.to(accelerator.device),
        "labels": torch.where(attn.bool(), ids, torch.full_like(ids, -100)).to(accelerator.device),
    }
    ok = packing_matches(getattr(model, "module", model), batch, cfg.optim.dtype)
    return packing_agreed(ok, accelerator)


def head_check(model, prompt_ids: list[list[int]], accelerator) -> bool:
    """Packed forwards may run the LM head on completion positions only (train/rollout.py `_head_on`):
    checked once against the padded forward on two prompts whose last tokens act as completions, agreed
    by every process."""
    rows = [list(r) for r in prompt_ids[:2] if len(r) >= 2]
    if not rows:
        return False
    k = min(4, min(len(r) for r in rows) - 1)
    p_ids, p_mask = left_pad([r[:-k] for r in rows], 0)
    c_ids = torch.tensor([r[-k:] for r in rows])
    probe = Rollout(
        p_ids,
        p_mask,
        c_ids,
        torch.ones_like(c_ids, dtype=torch.bool),
        torch.zeros(len(rows), dtype=torch.bool),
        torch.arange(len(rows)),
    )
    ok = head_only_matches(model, probe, accelerator.device)
    if accelerator.num_processes > 1:
        ok = bool(accelerator.reduce(torch.tensor([float(ok)], device=accelerator.device), "min").item())
    return ok


def step_prompts(step: int, n_prompts: int, per_step: int, seed: int) -> list[int]:
    """The prompts of rollout `step`: consecutive slices of a per-epoch permutation (same on every process)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(k, n_prompts)
        out.append(epoch_order(n_prompts, seed, epoch)[j])
    return out


def sample_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


# ==================================================================================== scoring helpers


# ==================================================================================== passes, shaping, advantages


# ==================================================================================== update


# ==================================================================================== metrics, checkpoints


def rollout_metrics(rollout: Rollout, scores, costs, L, accelerator) -> dict[str, float]:
    """Rollout-level metrics over all processes (scores None: a pairwise judge gave labels, not scores)."""
    lengths = gather_all(accelerator, rollout.lengths.float())
    out = {
        "completions/mean_length": float(lengths.mean()),
        "completions/truncated_frac": float(gather_all(accelerator, rollout.truncated.float()).mean()),
    }
    if scores is not None:
        s = gather_all(accelerator, scores.float())
        ok = s[~torch.isnan(s)]
        out |= {
            "reward/mean": float(ok.mean()) if ok.numel() else math.nan,
            "reward/std": float(ok.std()) if ok.numel() > 1 else 0.0,
            "reward/frac_unscorable": float(torch.isnan(s).float().mean()),
        }
    if costs is not None:
        c = gather_all(accelerator, costs.float())
        out["cost/mean"] = float(c[~torch.isnan(c)].mean()) if (~torch.isnan(c)).any() else math.nan
    return out


def checkpoint(
    out_dir, state: OnlineState, accelerator, model, tokenizer, optimizer, scheduler, critics, critic_opts, cfg
):
    tensors = {f"critic_{k}_optimizer": opt.state_dict() for k, opt in critic_opts.items()}
    extra = {}  # separate critics; an adapter critic is saved with the policy (PEFT writes critic_<k>/)
    for k, c in critics.items():
        c = accelerator.unwrap_model(c)
        if isinstance(c, AdapterValues):
            tensors[f"critic_{k}_head"] = c.head.state_dict()
        else:
            extra[f"critic_{k}"] = c.model
    checkpoint_progress(
        out_dir,
        state,
        cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        tensors=tensors,
        extra_models=extra,
    )


class PairsLog:
    """pairs.jsonl: every labelled online_dpo pair (prompt, both samples, label; null = dropped) for
    offline replay. A resumed run drops the records past its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, step: int, prompts, texts, labels, accelerator) -> None:
        rows = [
            {"step": step, "prompt": p, "a": texts[2 * k], "b": texts[2 * k + 1], "label": labels[k]}
            for k, p in enumerate(prompts)
        ]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        if self.enabled:
            with self.path.open("a") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
