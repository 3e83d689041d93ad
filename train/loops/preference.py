"""loop=preference: offline preference optimisation, one objective from conf/loss.

Reads top to bottom: set-up, data, policy, reference, optimiser, resume, the step loop, the end. The loss
YAML's `kind` picks the data flow:

    pairwise  chosen + rejected in ONE concatenated forward (train.logprobs.concatenated_forward)
    ranked    k responses per prompt in one forward, regrouped to [B, K] (LiPO-λ, PRO, RRHF)
    unpaired  prompt + completion + desirable label (KTO with its mismatched-pair KL estimate, BCO, NPO,
              Cringe on logits)

Reference log-probs (losses with `needs_reference`; the rest skip all of this), `loop.reference.mode`:
    precomputed       one no-grad pass over the data before training, cached on disk by a hash of the
                      model, the tokens and the settings; training holds one model (the default)
    adapter_disabled  LoRA: the base model under `model.disable_adapter()` every step (no second copy)
    model             a frozen copy in memory; what TR-DPO (`reference.update`) mixes the policy into
sDPO (`sdpo_stages`) and Curry-DPO (`curriculum: curry`) train stage after stage; before each stage the
reference log-probs are recomputed with the current policy (the previous stage's model).

Any `accelerate launch` (DDP/FSDP/DeepSpeed) works unchanged: every process takes its share of each
global batch (`epoch_batches`), gradients accumulate under `accelerator.accumulate`, metrics are
averaged over processes, KTO's KL estimate and BCO's reward mean are all-reduced.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from synth.app import ConfigError
from train.data import DataError, add_kl_completions, detect_kind, has_distinct_prompts, make_collator
from train.distributed import check_sharded_reference, load_whole, set_deepspeed_batch
from train.embeddings import with_prompt_embeddings
from train.loops.checkpoints import checkpoint_progress, resume_from, saved_tensors
from train.loops.common import (
    Progress,
    accumulate_step,
    begin_run,
    build_optimizer,
    build_scheduler,
    check_enough_rows,
    end_of_run,
    end_of_step,
    epoch_batches,
    epoch_order,
    load_data,
    load_rows,
    load_trained_model,
    open_recorder,
    report_data,
    run_summary,
    stopped_early,
    to_device,
    tokenize_checked,
)
from train.loops.metrics import finish_run, loss_metrics
from train.loops.packing import PackedLogits, packing_ok
from train.loops.preference_step import LossContext, evaluate, forward_loss
from train.losses import RunningMean
from train.models import (
    count_parameters,
    is_peft,
    load_frozen,
    load_tokenizer,
    trainable_parameters,
)
from train.reference import (
    ReferenceLogps,
    TRDPOSchedule,
    curry_iterations,
    model_identity,
    precompute_reference_logps,
    sdpo_stages,
)


def run(cfg, resolved_yaml: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    # ---------------------------------------------------------------- 1. process, output folder, loss
    accelerator, out_dir, loss_fn, ckpt = begin_run(cfg, resolved_yaml)
    spec, loop = cfg.loss, cfg.loop
    kind = spec.kind  # pairwise | ranked | unpaired: the rows the loss trains on
    ref_mode = reference_mode(cfg)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    B = cfg.optim.batch_size

    # ---------------------------------------------------------------- 2. data (+ stages)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.chat_template)
    convert = lambda rows, source: with_embeddings(to_kind(rows, kind, source, spec.name), spec)  # noqa: E731
    data = load_data(cfg, tokenizer, kind, convert)
    stages = make_stages(cfg, data.train, tokenizer)
    check_sharded_reference(accelerator, loop.reference.update != "none", len(stages) > 1 and ref_mode == "precomputed")
    fixed_kl = spec.needs_kl_pairs and ref_mode == "precomputed"
    if fixed_kl:  # precomputed reference KL log-probs need the mismatched pairs fixed in the data
        stages, data.eval = fix_kl_pairs(stages, data.eval, B, cfg)
    for i, rows in enumerate(stages):
        check_enough_rows(len(rows), cfg, world, f"{cfg.data.path}" + (f" (stage {i + 1})" if len(stages) > 1 else ""))
    report_data(data, main)
    soft_rows = soft_label_rows(data.train, loss_fn, spec.name, main)

    # ---------------------------------------------------------------- 3. policy
    # ZeRO-3: models load whole until prepare() (the packing check and the reference run them before it)
    stop_loading_whole = load_whole(accelerator)
    policy = load_trained_model(cfg, ckpt)
    policy.to(accelerator.device)
    collate = make_collator(kind, tokenizer.pad_token_id, **({"kl": spec.needs_kl_pairs} if kind == "unpaired" else {}))
    packed = cfg.optim.packing and not spec.needs_logits and packing_ok(policy, stages[0], collate, cfg, accelerator)

    # ---------------------------------------------------------------- 4. reference
    saved = saved_tensors(ckpt)  # a resumed run keeps its precomputed references
    refs = References(
        mode=ref_mode,
        cache_dir=loop.reference.cache_dir or out_dir / "reference_cache",
        settings={"tokenize": data.report.settings, "dtype": cfg.optim.dtype, "fixed_kl": B if fixed_kl else None},
        train=saved.get("reference_train"),
        eval=saved.get("reference_eval"),
    )
    prepare_references(refs, policy, stages[0], data.eval, kind, tokenizer, cfg, ckpt, accelerator, packed)
    ref_model = refs.model
    schedule = tr_dpo_schedule(loop.reference)

    # ---------------------------------------------------------------- 5. optimiser, schedule, state
    total = staged_total_steps([len(s) for s in stages], cfg.optim, world)
    optimizer = build_optimizer(trainable_parameters(policy), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    set_deepspeed_batch(accelerator, B, cfg.optim.grad_accum)  # DeepSpeed: no DataLoader to read them from
    stop_loading_whole()
    model, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    reduce = (lambda t: accelerator.reduce(t, "mean")) if world > 1 else None  # noqa: E731
    progress = Progress(started=started)
    tensors = resume_from(ckpt, progress, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    running_mean = _running_mean(spec, tensors)
    stage_ds = attach(stages[progress.stage], refs.train)
    eval_ds = attach(data.eval, refs.eval)
    n_train, n_total = count_parameters(unwrapped)
    if main:
        print(
            f"policy: {n_train:,} trainable of {n_total:,} parameters; loss={spec.name} ({spec.kind}); "
            f"reference={ref_mode}; {len(stages)} stage(s); {total} optimizer steps",
            flush=True,
        )

    # ---------------------------------------------------------------- 6. the step loop
    rec = open_recorder(out_dir, cfg, main, total, progress, "train")
    ctx = LossContext(spec, loss_fn, ref_mode, ref_model, running_mean, reduce, cfg.seed, packed)
    # evaluation always compares with the initial reference (precomputed columns) when there are any; its
    # KL estimate stays per process (processes may hold different numbers of eval batches: no collectives)
    eval_mode = "precomputed" if refs.eval is not None else ref_mode
    eval_ctx = LossContext(spec, loss_fn, eval_mode, ref_model, running_mean, None, cfg.seed, packed)
    held_out = (
        functools.partial(evaluate, model, unwrapped, eval_ds, collate, eval_ctx, kind, cfg, accelerator, fixed_kl)
        if eval_ds is not None
        else None
    )
    stopped = False

    def save() -> None:  # reads the loop's current state (the stage's references, the running mean)
        _checkpoint(out_dir, progress, accelerator, model, tokenizer, optimizer, scheduler, cfg, running_mean, refs)

    model.train()
    while progress.step < total and progress.stage < len(stages):
        batches = epoch_batches(_order(stage_ds, fixed_kl, B, cfg.seed, progress), B, world, rank)
        batches = batches[: len(batches) // cfg.optim.grad_accum * cfg.optim.grad_accum]
        for i in range(progress.micro, len(batches)):
            batch = to_device(collate(stage_ds.select(batches[i]).to_list()), accelerator.device)
            rec.speed.add(int(batch["attention_mask"].sum()), len(batches[i]))

            def loss(batch=batch):
                out, extra = forward_loss(model, unwrapped, batch, ctx, kind, step=progress.step)
                return out.losses.mean(), {**loss_metrics(out, paired=kind != "unpaired"), **extra}

            if not accumulate_step(
                accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm, rec.metrics, loss
            ):
                continue
            progress.update(
                step=progress.step + 1, micro=i + 1, samples=progress.samples + B * world * cfg.optim.grad_accum
            )
            if schedule is not None:
                schedule.apply(progress.step, ref_model, unwrapped)
            stopped = end_of_step(
                rec,
                progress,
                cfg,
                total,
                accelerator=accelerator,
                scheduler=scheduler,
                save=save,
                evaluate=held_out,
                extra={"stage": progress.stage},
            )
            if stopped or progress.step >= total:
                break
        if stopped or progress.step >= total:
            break
        progress.update(epoch=progress.epoch + 1, micro=0)
        if progress.epoch >= cfg.optim.epochs and len(stages) > 1:  # next sDPO / Curry stage
            progress.update(stage=progress.stage + 1, epoch=0)
            stage_ds = next_stage(refs, unwrapped, stages, progress.stage, kind, tokenizer, cfg, accelerator, packed)
        elif cfg.optim.max_steps is None and progress.epoch >= cfg.optim.epochs:
            break

    # ---------------------------------------------------------------- 7. the end
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
    summary = run_summary(
        "preference",
        cfg,
        progress,
        final,
        rec,
        data,
        out_dir,
        reference=ref_mode,
        stages=len(stages),
        **({"soft_labels": soft_rows} if soft_rows else {}),
    )
    return finish_run(summary, out_dir, cfg, accelerator)


# ==================================================================== data shapes, stages, reference


def with_embeddings(rows: Dataset, spec) -> Dataset:
    """Relative PO: each row's frozen prompt embedding, computed once before training (train.embeddings)."""
    if not spec.needs_prompt_embeddings:
        return rows

    return with_prompt_embeddings(rows, spec.embedding_model)


def soft_label_rows(rows, loss_fn, loss_name: str, main: bool) -> int:
    """Pairs with a p_chosen that the loss reads (its signature takes p_chosen), said once; 0 otherwise."""
    import inspect

    if "p_chosen" not in inspect.signature(loss_fn).parameters or "p_chosen" not in (rows.column_names or []):
        return 0
    n = sum(p is not None and p == p for p in rows["p_chosen"])
    if main and n:
        print(
            f"loss={loss_name}: {n} of {len(rows)} pairs carry p_chosen, so they train on the "
            "soft-label loss (the rest as hard labels, p=1)",
            flush=True,
        )
    return n


def to_kind(rows: Dataset, want: str, source: str, loss_name: str) -> Dataset:
    """Canonical rows converted to the kind the loss trains on, where that is well defined:
    pairs -> unpaired (chosen desirable, rejected undesirable; as TRL's unpair_preference_dataset),
    pairs -> lists of two (scores from the data, else 1 and 0), lists -> pairs (best vs worst; ties dropped)."""
    have = detect_kind(rows)
    if have == want:
        return rows
    if has_distinct_prompts(rows):
        raise DataError(
            f"{source}: the pairs carry prompt_rejected (joint DOVE pairs with two instructions); "
            f"loss={loss_name} trains {want} rows; use loss=dove"
        )
    out: list[dict[str, Any]] = []
    if (have, want) == ("pairwise", "unpaired"):
        for r in rows:
            out.append({"id": f"{r['id']}:chosen", "prompt": r["prompt"], "completion": r["chosen"], "label": True})
            out.append(
                {"id": f"{r['id']}:rejected", "prompt": r["prompt"], "completion": r["rejected"], "label": False}
            )
    elif (have, want) == ("pairwise", "ranked"):
        for r in rows:
            sc, sr = r.get("score_chosen"), r.get("score_rejected")
            scores = [sc, sr] if sc is not None and sr is not None and sc > sr else [1.0, 0.0]
            out.append(
                {"id": r["id"], "prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "scores": scores}
            )
    elif (have, want) == ("ranked", "pairwise"):
        for r in rows:
            s = r["scores"]
            best, worst = max(range(len(s)), key=s.__getitem__), min(range(len(s)), key=s.__getitem__)
            if s[best] > s[worst]:
                out.append(
                    {
                        "id": r["id"],
                        "prompt": r["prompt"],
                        "chosen": r["responses"][best],
                        "rejected": r["responses"][worst],
                        "score_chosen": s[best],
                        "score_rejected": s[worst],
                    }
                )
    else:
        raise DataError(f"{source}: {have} rows cannot train loss={loss_name}, a {want} objective")
    if not out:
        raise DataError(f"{source}: no usable rows for loss={loss_name} (every list has tied scores)")
    return Dataset.from_list(out)


def make_stages(cfg, train: Dataset, tokenizer) -> list[Dataset]:
    """sDPO chunks (in the data's order, or easiest first by score gap when the data has scores) or
    Curry-DPO difficulty levels; one stage otherwise."""

    loop = cfg.loop
    if loop.curriculum == "curry":
        if loop.sdpo_stages > 1:
            raise ConfigError("choose one staging: loop.curriculum=curry or loop.sdpo_stages>1, not both")
        raw = load_rows(cfg.data.path, cfg, None, cfg.data.limit)
        if detect_kind(raw) == "ranked":  # one level per pair rank: (R1, RK) first ... (R1, R2) last
            levels = curry_iterations(raw)
            return [
                tokenize_checked(lv, tokenizer, cfg, "pairwise", f"{cfg.data.path} (curry level {i + 1})")[0]
                for i, lv in enumerate(levels)
            ]
        gaps = _gaps(train, "loop.curriculum=curry")
        return sdpo_stages(train, min(loop.curriculum_stages, len(train)), [-g for g in gaps])
    if loop.sdpo_stages > 1:
        has_scores = "score_chosen" in train.column_names and "score_rejected" in train.column_names
        difficulty = [-g for g in _gaps(train, "")] if has_scores and None not in train["score_chosen"] else None
        return sdpo_stages(train, loop.sdpo_stages, difficulty)
    return [train]


def _gaps(ds: Dataset, setting: str) -> list[float]:
    if "score_chosen" not in ds.column_names or "score_rejected" not in ds.column_names:
        raise DataError(
            f"{setting} orders pairs by score gap: the data needs score_chosen and score_rejected "
            "(or ranked rows with scores)"
        )
    return [float(a) - float(b) for a, b in zip(ds["score_chosen"], ds["score_rejected"], strict=True)]


def with_kl_pairs(ds: Dataset, batch_size: int, seed: int) -> Dataset:
    """KTO with precomputed reference: shuffle once, then fix each chunk's mismatched pairs (data.py)."""

    return add_kl_completions(ds.shuffle(seed=seed).flatten_indices(), batch_size)


def _order(ds: Dataset, fixed_kl: bool, B: int, seed: int, progress) -> list[int]:
    """Row order of one epoch: a seeded permutation, or (fixed KL pairs) a permutation of whole chunks."""
    key = seed + 7919 * progress.stage
    if not fixed_kl:
        return epoch_order(len(ds), key, progress.epoch)
    n_chunks = len(ds) // B
    return [c * B + j for c in epoch_order(n_chunks, key, progress.epoch) for j in range(B)]


def reference_mode(cfg) -> str:
    """none | precomputed | adapter_disabled | model, from the loss and loop.reference."""
    ref = cfg.loop.reference
    if not cfg.loss.needs_reference:
        return "none"
    if ref.update != "none":
        return "model"
    if ref.mode == "auto":
        staged = cfg.loop.sdpo_stages > 1 or cfg.loop.curriculum != "none"
        return "adapter_disabled" if cfg.lora.enabled and not staged and ref.name_or_path is None else "precomputed"
    if ref.mode == "adapter_disabled" and ref.name_or_path is not None:
        raise ConfigError(
            "loop.reference.mode=adapter_disabled uses the policy's own base model; "
            "loop.reference.name_or_path needs mode=precomputed or model"
        )
    return ref.mode


@dataclass
class References:
    """The run's reference: its mode, the precomputed log-prob columns of the current stage's rows and of
    the eval rows, and the frozen model (mode=model). The one place the loop, the stage change and the
    checkpoint read them from."""

    mode: str  # none | precomputed | adapter_disabled | model (reference_mode)
    cache_dir: Path
    settings: dict[str, Any]  # what the precomputed cache is keyed on besides the model and the tokens
    train: dict[str, torch.Tensor] | None = None
    eval: dict[str, torch.Tensor] | None = None
    model: Any = None


def prepare_references(refs: References, policy, train, eval_rows, kind, tokenizer, cfg, ckpt, accelerator, packed):
    """Fill `refs` before training (what a resumed checkpoint already holds is kept):
    precomputed: one no-grad pass over the first stage's rows and the eval rows with the initial policy
    (adapter off), or with `reference.name_or_path` (also after a resume, when the policy has moved);
    model: the frozen copy (a resumed TR-DPO reference from the checkpoint), and the eval rows' log-probs
    under the initial reference so eval curves stay comparable while TR-DPO moves it."""
    ref = cfg.loop.reference
    if refs.mode == "precomputed" and (refs.train is None or (eval_rows is not None and refs.eval is None)):
        source = policy
        if ref.name_or_path is not None or ckpt is not None:
            source = load_frozen(ref.name_or_path or cfg.model.name_or_path, dtype=cfg.optim.dtype)
            source = source.to(accelerator.device)
        with _adapter_off(source):
            if refs.train is None:
                refs.train = precompute(
                    source, train, kind, tokenizer, cfg, refs.cache_dir, refs.settings, accelerator, packed
                )
            if eval_rows is not None and refs.eval is None:
                refs.eval = precompute(
                    source, eval_rows, kind, tokenizer, cfg, refs.cache_dir, refs.settings, accelerator, packed
                )
        del source
    if refs.mode == "model":
        saved = ckpt / "reference" if ckpt is not None and (ckpt / "reference").exists() else None
        path = saved or (ref.name_or_path or cfg.model.name_or_path)
        refs.model = load_frozen(str(path), dtype=cfg.optim.dtype).to(accelerator.device)
        if eval_rows is not None and refs.eval is None and not cfg.loss.needs_kl_pairs:
            refs.eval = precompute(
                refs.model, eval_rows, kind, tokenizer, cfg, refs.cache_dir, refs.settings, accelerator, packed
            )


def next_stage(refs: References, policy, stages, stage: int, kind, tokenizer, cfg, accelerator, packed):
    """sDPO / Curry-DPO: stage `stage`'s rows (None after the last stage); with precomputed references
    the reference becomes the current policy (its log-probs on these rows)."""
    if stage >= len(stages):
        return None
    rows = stages[stage]
    refs.train = None
    if refs.mode == "precomputed":
        refs.train = precompute(policy, rows, kind, tokenizer, cfg, refs.cache_dir, refs.settings, accelerator, packed)
    return attach(rows, refs.train)


def fix_kl_pairs(stages: list[Dataset], eval_rows: Dataset | None, B: int, cfg):
    """KTO-style KL estimates from mismatched pairs, with a precomputed reference: the pairs are fixed in
    the data (the reference pass must see the same pairs the step will), for every stage and the eval rows."""
    if eval_rows is not None and len(eval_rows) < 2:
        raise DataError(
            f"{cfg.data.path}: the eval split has {len(eval_rows)} row; loss={cfg.loss.name} estimates its KL "
            "term from pairs of rows: raise data.eval_split or give data.eval_path"
        )
    stages = [with_kl_pairs(s, B, cfg.seed) for s in stages]
    return stages, with_kl_pairs(eval_rows, B, cfg.seed) if eval_rows is not None else None


def tr_dpo_schedule(ref):
    if ref.update == "none":
        return None
    if ref.update == "tr_dpo_hard":
        return TRDPOSchedule(mode="hard", tau=ref.sync_steps)
    return TRDPOSchedule(mode="soft", alpha=ref.mixup_alpha, soft_every=ref.sync_steps)


def precompute(model, ds: Dataset, kind: str, tokenizer, cfg, cache_dir, settings, accelerator, packed: bool = False):
    """Reference log-probs of every row (main process first: the others read its cache file). With
    packing the pass runs on packed rows too; the cache key is the model's own identity either way."""

    bs = cfg.loop.reference.batch_size or 2 * cfg.optim.batch_size
    identity = model_identity(
        model, name_or_path=cfg.loop.reference.name_or_path or cfg.model.name_or_path, revision=cfg.model.revision
    )
    runner = PackedLogits(model) if packed else model
    with accelerator.main_process_first(), accelerator.autocast():  # the same numerics as the training forward
        ref = precompute_reference_logps(
            runner,
            ds,
            kind=kind,
            pad_token_id=tokenizer.pad_token_id,
            cache_dir=cache_dir,
            batch_size=bs,
            settings=settings,
            identity=identity,
            show_progress=cfg.progress and accelerator.is_main_process,
        )
    return ref.tensors


def attach(ds: Dataset | None, tensors: dict[str, torch.Tensor] | None) -> Dataset | None:
    if ds is None or tensors is None:
        return ds
    return ReferenceLogps(tensors, "", None, True).attach(ds)  # type: ignore[arg-type]


@contextlib.contextmanager
def _adapter_off(model):
    """Precomputing from a fresh LoRA policy: the adapter is zero-initialised, but disable it anyway."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def _running_mean(spec, saved: dict[str, Any]):
    """The loss's running reward mean (BCO), restored from a checkpoint's tensors when resuming."""
    if spec.stateful != "running_mean":
        return None
    mean = RunningMean()
    if "running_mean" in saved:
        mean.load_state_dict(saved["running_mean"])
    return mean


def staged_total_steps(stage_rows: list[int], optim, world: int) -> int:
    """Optimizer steps of the run: every stage runs its epochs; max_steps overrides that for one stage
    and only caps the total with sDPO / Curry stages."""
    total = sum(n // (optim.batch_size * world) // optim.grad_accum * optim.epochs for n in stage_rows)
    if optim.max_steps is not None:
        total = optim.max_steps if len(stage_rows) == 1 else min(total, optim.max_steps)
    return total


def _checkpoint(out_dir, progress, accelerator, model, tokenizer, optimizer, scheduler, cfg, running_mean, refs):
    tensors: dict[str, Any] = {}
    if running_mean is not None:
        tensors["running_mean"] = running_mean.state_dict()
    if refs.mode == "precomputed":
        tensors["reference_train"] = refs.train
    if refs.eval is not None:
        tensors["reference_eval"] = refs.eval
    moving = refs.model is not None and cfg.loop.reference.update != "none"  # TR-DPO's reference is trained state
    checkpoint_progress(
        out_dir,
        progress,
        cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        tensors=tensors,
        extra_models={"reference": refs.model} if moving else None,
    )
