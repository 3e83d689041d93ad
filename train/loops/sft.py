"""loop=sft: supervised fine-tuning on chat conversations, loss only on the labelled assistant turns.

Reads top to bottom: set-up, data, model, optimiser, resume, the step loop, the end. Input: `messages`
rows (our sft.jsonl, TRL "messages" datasets); preference rows train on prompt + chosen. The loss is
conf/loss/sft.yaml (token NLL; `loss.fn.normalisation` sequence_mean | sum | batch_token_mean).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from datasets import Dataset

from train.data import DataError, detect_kind, make_collator
from train.logprobs import model_token_logps
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
from train.loops.metrics import StepMetrics, finish_run
from train.loops.packing import packed_token_logps, packing_ok
from train.models import count_parameters, load_tokenizer, trainable_parameters


def run(cfg, resolved_yaml: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    # ---------------------------------------------------------------- 1. process, output folder, loss
    accelerator, out_dir, loss_fn, ckpt = begin_run(cfg, resolved_yaml)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    B, accum = cfg.optim.batch_size, cfg.optim.grad_accum

    # ---------------------------------------------------------------- 2. data
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.chat_template)
    data = load_data(cfg, tokenizer, "sft", to_sft)
    check_enough_rows(len(data.train), cfg, world, cfg.data.path)
    report_data(data, main)

    # ---------------------------------------------------------------- 3. model, optimiser, resume
    policy = load_trained_model(cfg, ckpt)
    total = total_steps(cfg.optim, steps_per_epoch(len(data.train), B, world, accum))
    optimizer = build_optimizer(trainable_parameters(policy), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    model, optimizer = accelerator.prepare(policy, optimizer)
    progress = Progress(started=started)
    resume_from(ckpt, progress, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    n_train, n_total = count_parameters(accelerator.unwrap_model(model))
    if main:
        print(
            f"model: {n_train:,} trainable of {n_total:,} parameters; loss={cfg.loss.name}; {total} optimizer steps",
            flush=True,
        )

    # ---------------------------------------------------------------- 4. the step loop
    collate = make_collator("sft", tokenizer.pad_token_id)
    packed = cfg.optim.packing and packing_ok(model, data.train, collate, cfg, accelerator)
    rec = open_recorder(out_dir, cfg, main, total, progress, "sft", ("loss", "tokens_per_s", "lr"))
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
        functools.partial(evaluate, model, data.eval, collate, loss_fn, cfg, accelerator, packed)
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
                out = sft_loss(model, batch, loss_fn, packed)
                return out.losses.mean(), {"loss": out.losses.detach().mean(), **out.metrics}

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
    summary = run_summary("sft", cfg, progress, final, rec, data, out_dir)
    return finish_run(summary, out_dir, cfg, accelerator)


def sft_loss(model, batch: dict[str, torch.Tensor], loss_fn, packed: bool = False):
    """Token log-probs of the labelled tokens (float32, train.logprobs; packed rows when `packed`) -> the loss."""

    if packed:
        logps, mask = packed_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    else:
        logps, mask = model_token_logps(
            model, batch["labels"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    return call_loss(loss_fn, {"token_logps": logps, "token_mask": mask})


@torch.no_grad()
def evaluate(model, eval_ds, collate, loss_fn, cfg, accelerator, packed: bool = False) -> dict[str, float]:
    """Held-out loss (and token perplexity) averaged over rows and processes."""
    model.eval()
    B = cfg.eval.batch_size or cfg.optim.batch_size
    mine = list(range(len(eval_ds)))[accelerator.process_index :: accelerator.num_processes]
    metrics = StepMetrics()
    for start in range(0, len(mine), B):
        idx = mine[start : start + B]
        batch = to_device(collate(eval_ds.select(idx).to_list()), accelerator.device)
        out = sft_loss(model, batch, loss_fn, packed)
        metrics.add({"eval/loss": out.losses.mean()}, weight=len(idx))
    model.train()
    values = metrics.reduce(accelerator)
    if "eval/loss" in values and cfg.loss.fn.get("normalisation", "sequence_mean") != "sum":
        values["eval/perplexity"] = math.exp(min(values["eval/loss"], 50.0))
    return values


def to_sft(rows: Dataset, source: str) -> Dataset:
    """SFT rows; preference rows become prompt + chosen conversations, ranked rows prompt + best response."""
    kind = detect_kind(rows)
    if kind == "sft":
        return rows
    if kind == "pairwise":
        return Dataset.from_list([{"id": r["id"], "messages": r["prompt"] + r["chosen"]} for r in rows])
    if kind == "ranked":
        best = lambda s: max(range(len(s)), key=s.__getitem__)  # noqa: E731
        return Dataset.from_list(
            [{"id": r["id"], "messages": r["prompt"] + r["responses"][best(r["scores"])]} for r in rows]
        )
    raise DataError(f"{source}: {kind} rows (prompt, completion, label) cannot train loop=sft; give `messages` rows")
