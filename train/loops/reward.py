"""loop=reward: a scalar reward model (Bradley–Terry, optional margin; pointwise regression on scores;
listwise: InstructGPT all-pairs or Plackett–Luce over ranked lists) or, with loss=cost, a Safe-RLHF cost
model (ranking + sign terms from safety labels).

Reads top to bottom: set-up, data, model, optimiser, resume, the step loop, the end. The model is the
causal LM with a one-output score head (AutoModelForSequenceClassification, num_labels=1; the head reads
the last non-pad token), so the result loads like any HF reward model. Chosen and rejected rows go
through ONE forward (2B rows). Input: preference pairs (our preferences.jsonl, TRL columns, hh-rlhf) with
an optional `margin` column; ranked lists become best-vs-worst pairs. loss=cost needs `safe_chosen` /
`safe_rejected` booleans per pair (top-level or inside `meta`; names set by loop.safe_*_field), chosen
being the safer response. loss=bradley_terry_lm also trains the LM head (the tied input embeddings) on the
chosen completion from the same forward. loss=pointwise needs `score_chosen` / `score_rejected` on every pair. Listwise
losses (kind reward_ranked) read ranked rows {prompt, responses, scores} (pairs become lists of two): all
responses of a list go through the same forward and are regrouped to [B, K].
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from datasets import Dataset

from synth.errors import ConfigError
from train.data import DataError, detect_kind, make_collator, read_rows
from train.logprobs import sequence_logps
from train.loops.checkpoints import checkpoint_progress, resume_from
from train.loops.common import (
    Progress,
    accumulate_step,
    begin_run,
    build_optimizer,
    build_scheduler,
    call_loss,
    check_enough_rows,
    end_of_run,
    end_of_step,
    epoch_batches,
    epoch_order,
    load_data,
    load_trained_model,
    open_recorder,
    report_data,
    run_summary,
    steps_per_epoch,
    stopped_early,
    to_device,
    total_steps,
)
from train.loops.metrics import StepMetrics, finish_run, loss_metrics
from train.loops.preference import to_kind
from train.models import count_parameters, load_tokenizer, trainable_parameters


def run(cfg, resolved_yaml: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    # ---------------------------------------------------------------- 1. process, output folder, loss
    accelerator, out_dir, loss_fn, ckpt = begin_run(cfg, resolved_yaml)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    B, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    safety = cfg.loss.needs_safety_labels
    ranked = cfg.loss.kind == "reward_ranked"  # ranked lists: every response scored, [B, K] rewards

    # ---------------------------------------------------------------- 2. data
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.chat_template)
    if ranked:
        from train.loops.preference import to_kind

        convert = lambda rows, source: to_kind(rows, "ranked", source, cfg.loss.name)  # noqa: E731
    else:
        convert = lambda rows, source: to_pairs(rows, source, cfg, safety)  # noqa: E731
    data = load_data(cfg, tokenizer, "ranked" if ranked else "pairwise", convert)
    check_enough_rows(len(data.train), cfg, world, cfg.data.path)
    report_data(data, main)

    # ---------------------------------------------------------------- 3. model, optimiser, resume
    model = load_trained_model(cfg, ckpt, head="score", pad_token_id=tokenizer.pad_token_id)
    total = total_steps(cfg.optim, steps_per_epoch(len(data.train), B, world, accum))
    optimizer = build_optimizer(trainable_parameters(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    if cfg.loss.needs_nll and not getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(
            f"loss={cfg.loss.name} needs the LM head beside the score head; loop=reward rebuilds it from "
            f"the tied input embeddings, and {cfg.model.name_or_path} does not tie them; use "
            "loss=bradley_terry for this model"
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress(started=started)
    resume_from(ckpt, progress, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    n_train, n_total = count_parameters(accelerator.unwrap_model(model))
    if main:
        print(
            f"{'cost' if safety else 'reward'} model: {n_train:,} trainable of {n_total:,} parameters; "
            f"loss={cfg.loss.name}; {total} optimizer steps",
            flush=True,
        )

    # ---------------------------------------------------------------- 4. the step loop
    collate = (
        make_collator("ranked", tokenizer.pad_token_id)
        if ranked
        else PairsWithLabels(make_collator("pairwise", tokenizer.pad_token_id), safety)
    )
    rec = open_recorder(out_dir, cfg, main, total, progress, "reward")
    stopped = False
    save = functools.partial(
        checkpoint_progress,
        out_dir,
        progress,
        cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    held_out = (
        functools.partial(evaluate, model, data.eval, collate, loss_fn, cfg, accelerator)
        if data.eval is not None
        else None
    )
    model.train()
    while progress.step < total:
        batches = epoch_batches(epoch_order(len(data.train), cfg.seed, progress.epoch), B, world, rank)
        batches = batches[: len(batches) // accum * accum]
        for i in range(progress.micro, len(batches)):
            batch = to_device(collate(data.train.select(batches[i]).to_list()), accelerator.device)
            rec.speed.add(int(batch["attention_mask"].sum()), len(batches[i]))

            def loss(batch=batch):
                out = reward_loss(model, batch, loss_fn, cfg)
                return out.losses.mean(), loss_metrics(out)

            if not accumulate_step(
                accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm, rec.metrics, loss
            ):
                continue
            progress.update(step=progress.step + 1, micro=i + 1, samples=progress.samples + B * world * accum)
            stopped = end_of_step(
                rec, progress, cfg, total, accelerator=accelerator, scheduler=scheduler, save=save, evaluate=held_out
            )
            if stopped or progress.step >= total:
                break
        if stopped or progress.step >= total:
            break
        progress.update(epoch=progress.epoch + 1, micro=0)

    # ---------------------------------------------------------------- 5. the end
    if stopped:
        return stopped_early(rec, progress, out_dir)
    final = end_of_run(
        rec,
        progress,
        cfg,
        model=model,
        tokenizer=tokenizer,
        out_dir=out_dir,
        accelerator=accelerator,
        save=save,
        evaluate=held_out,
    )
    summary = run_summary("reward", cfg, progress, final, rec, data, out_dir)
    return finish_run(summary, out_dir, cfg, accelerator)


def scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B rows -> (chosen [B], rejected [B]) scalar outputs in float32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    r = out.logits[:, 0].float()
    b = r.shape[0] // 2
    return r[:b], r[b:]


def scores_and_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B], chosen NLL per token [B]): :func:`scores_and_lm_logps` without the sum."""
    chosen, rejected, nll, _ = scores_and_lm_logps(model, batch)
    return chosen, rejected, nll


def scores_and_lm_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(chosen [B], rejected [B], chosen NLL per token [B], chosen summed log-prob [B]) from ONE forward:
    the score head reads the last token as usual; the LM head (the tied input embeddings, trained with the
    backbone) scores the chosen completion from the same final hidden states (GRM's text-generation
    regulariser)."""

    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, output_hidden_states=True
    )
    r = out.logits[:, 0].float()
    b = r.shape[0] // 2
    weight = getattr(model, "module", model).get_input_embeddings().weight
    lm_logits = out.hidden_states[-1][:b].float() @ weight.float().T  # the final (normed) hidden states
    total, mean, _ = sequence_logps(lm_logits, batch["labels"][:b])
    return r[:b], r[b:], -mean, total


def list_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward over the sum(k) responses of a RankedCollator batch -> [B, Kmax] rewards (0 at padding)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    r = out.logits[:, 0].float()
    return torch.where(batch["list_mask"], r[batch["list_index"]], 0.0)


def _targets(batch, key: str, cfg):
    """Pointwise targets: required on every pair when the loss regresses on them."""
    value = batch.get(key)
    if not cfg.loss.needs_scores:
        return None
    if value is None or torch.isnan(value).any():
        raise DataError(
            f"loss={cfg.loss.name} regresses on score_chosen and score_rejected: every pair needs both "
            f"({key} is missing on some rows)"
        )
    return value


def reward_loss(model, batch, loss_fn, cfg):
    if cfg.loss.kind == "reward_ranked":
        rewards = list_scores(model, batch)
        return call_loss(loss_fn, {"rewards": rewards, "scores": batch["scores"], "mask": batch["list_mask"]})
    chosen_nll = chosen_logps = None
    if cfg.loss.needs_nll:
        chosen, rejected, chosen_nll, chosen_logps = scores_and_lm_logps(model, batch)
    else:
        chosen, rejected = scores(model, batch)
    margin = batch.get("margin") if cfg.loop.use_margin else None
    if margin is not None:
        margin = torch.nan_to_num(margin, nan=0.0)  # rows without a margin: plain Bradley–Terry
    avail = {
        "rewards_chosen": chosen,
        "rewards_rejected": rejected,
        "margin": margin,
        "costs_chosen": chosen,
        "costs_rejected": rejected,
        "safe_chosen": batch.get("safe_chosen"),
        "safe_rejected": batch.get("safe_rejected"),
        "score_chosen": _targets(batch, "score_chosen", cfg),
        "score_rejected": _targets(batch, "score_rejected", cfg),
        "chosen_nll": chosen_nll,
        "chosen_logps": chosen_logps,
    }
    return call_loss(loss_fn, avail)


@torch.no_grad()
def evaluate(model, eval_ds, collate, loss_fn, cfg, accelerator) -> dict[str, float]:
    """Held-out loss and pair accuracy (chosen scored above rejected), over rows and processes."""
    model.eval()
    B = cfg.eval.batch_size or cfg.optim.batch_size
    mine = list(range(len(eval_ds)))[accelerator.process_index :: accelerator.num_processes]
    metrics = StepMetrics()
    for start in range(0, len(mine), B):
        idx = mine[start : start + B]
        batch = to_device(collate(eval_ds.select(idx).to_list()), accelerator.device)
        metrics.add(loss_metrics(reward_loss(model, batch, loss_fn, cfg), "eval/"), weight=len(idx))
    model.train()
    return metrics.reduce(accelerator)


class PairsWithLabels:
    """data.PairCollator plus the pairs' safety labels (cost model)."""

    def __init__(self, pairs, safety: bool):
        self.pairs, self.safety = pairs, safety

    def __call__(self, rows):
        batch = self.pairs(rows)
        if self.safety:
            batch["safe_chosen"] = torch.tensor([bool(r["safe_chosen"]) for r in rows])
            batch["safe_rejected"] = torch.tensor([bool(r["safe_rejected"]) for r in rows])
        return batch


def to_pairs(rows: Dataset, source: str, cfg, safety: bool) -> Dataset:
    """Pairs for the reward model (ranked lists: best vs worst), with safety labels for the cost model."""

    pairs = to_kind(rows, "pairwise", source, "bradley_terry")
    if not safety:
        return pairs
    if detect_kind(rows) != "pairwise":
        raise DataError(f"{source}: loss=cost needs preference pairs with safety labels, not {detect_kind(rows)} rows")
    labels = safety_labels(source, cfg.data.split, len(rows), cfg.loop.safe_chosen_field, cfg.loop.safe_rejected_field)
    return pairs.add_column("safe_chosen", labels[0]).add_column("safe_rejected", labels[1])


def safety_labels(
    source: str, split: str, n: int, chosen_field: str, rejected_field: str
) -> tuple[list[bool], list[bool]]:
    """The per-pair safety booleans, read from the raw rows (top level or `meta`), in row order.
    train.data keeps only the canonical columns, so the labels are read beside it."""
    safe_c, safe_r = [], []
    for i, row in zip(range(n), read_rows(source, split), strict=False):
        values = []
        for name in (chosen_field, rejected_field):
            v = row.get(name, (row.get("meta") or {}).get(name))
            if not isinstance(v, bool) and v not in (0, 1):
                raise DataError(
                    f"{source}: row {i}: loss=cost needs a boolean {name!r} (True = the response is safe), "
                    f"got {v!r}; set loop.safe_chosen_field / loop.safe_rejected_field to your column names"
                )
            values.append(bool(v))
        safe_c.append(values[0])
        safe_r.append(values[1])
    return safe_c, safe_r
