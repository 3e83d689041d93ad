"""Shared pieces of the loops: setup (accelerator, seeds, output folder), data loading, batches,
optimizer and scheduler, loss calls, and the step/progress helpers. Metrics and plots are in
`train.loops.metrics`, checkpoints and resume in `train.loops.checkpoints`. No loop logic lives here: each
loop file reads top to bottom.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synth.app import ConfigError
from train.data import DataError, TokenizeConfig, load_records, tokenize_dataset
from train.distributed import check_launch
from train.loops.checkpoints import find_last_checkpoint
from train.loops.metrics import MetricsLogger, StepMetrics, Throughput, postfix
from train.losses import DATA_ARGS
from train.models import load_policy, save_model

# ------------------------------------------------------------------------------------ setup


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc only: serve every allocation of `threshold` bytes or more (activations, gradients, logits
    chunks) with its own mmap, so that freeing it gives the pages back to the system at once.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB), after which blocks
    of that size come from its heap, and what the heap frees stays resident: on SmolLM2 DPO (CPU,
    bench/dpo_memory.py) the resident memory after each step then grew 3.3 -> 4.8 -> 5.5 GB for 2.2 GB
    live, and the peak was 0.7 GB higher. A fixed threshold also stops the adjustment. The page faults cost
    ~25% wall time on that run, so it is opt-in (`optim.release_memory=true`). Skipped when the
    user set MALLOC_MMAP_THRESHOLD_ or on other C libraries; returns whether it was applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc
        return False


def make_accelerator(cfg):
    """An Accelerator whose settings come from the config; `accelerate launch` adds DDP/FSDP/DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.optim.grad_accum,
        mixed_precision=cfg.optim.mixed_precision,
        # we shard batches ourselves (epoch_batches) so that resume and DDP equivalence are exact
        dataloader_config=DataLoaderConfiguration(split_batches=False),
        step_scheduler_with_optimizer=False,
    )
    check_launch(accelerator)  # refuse launches that would silently train otherwise (FSDP/DeepSpeed on CPU)
    if accelerator.device.type == "cuda":
        # Every batch has a new shape (and packed rows a block-diagonal mask): torch's cuDNN attention
        # backend builds a new plan for each, ~2 ms of CPU per call. Measured on an H200 (107M model, DPO,
        # bench/dpo_vs_trl.py --device cuda --size 135m): training steps 43 -> 113 samples/s without it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return accelerator


def library_progress_bars(enabled: bool) -> None:
    """progress=false also silences the datasets / transformers bars (tokenising, loading, saving)."""
    import datasets
    import transformers

    if enabled:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def prepare_output_dir(output_dir: str | Path, resume: bool, is_main: bool) -> Path:
    """The output folder. A folder holding a previous run's checkpoints needs resume=true (continue) or
    another output_dir: silently mixing two runs' metrics and checkpoints helps nobody."""

    out = Path(output_dir).expanduser()
    if not resume and find_last_checkpoint(out) is not None:
        raise ConfigError(
            f"output_dir={out} already holds checkpoints of a run; pass resume=true to continue it, "
            "or choose another output_dir"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out_dir: Path, resolved_yaml: str | None, accelerator) -> None:
    """The resolved, redacted config beside the outputs."""
    if resolved_yaml is not None and accelerator.is_main_process:
        (out_dir / "config.yaml").write_text(resolved_yaml)


def begin_run(cfg, resolved_yaml: str | None):
    """The opening every loop shares: progress bars, the accelerator, seeds, the output folder and its
    config.yaml, the loss, and the checkpoint to resume from (None when starting afresh).
    Returns (accelerator, out_dir, loss_fn, ckpt)."""
    library_progress_bars(cfg.progress)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    out_dir = prepare_output_dir(cfg.output_dir, cfg.resume, accelerator.is_main_process)
    write_config(out_dir, resolved_yaml, accelerator)
    loss_fn = instantiate_loss(cfg.loss)
    ckpt = find_last_checkpoint(out_dir) if cfg.resume else None
    return accelerator, out_dir, loss_fn, ckpt


def instantiate_loss(spec):
    """conf/loss/<name>.yaml `fn` -> the partial loss function. An unknown hyperparameter is one line
    naming it and the valid ones (not a TypeError from deep inside the first step)."""
    from hydra.utils import get_object, instantiate

    from synth.app import ConfigError

    fn_cfg = dict(spec.fn)
    target = fn_cfg.get("_target_")
    try:
        func = get_object(target)
    except Exception as e:  # noqa: BLE001 - hydra raises several types for a bad path
        raise ConfigError(f"loss={spec.name}: fn._target_={target} does not resolve ({e})") from None
    params = inspect.signature(func).parameters
    hyper = sorted(k for k in params if k not in DATA_ARGS.get(spec.kind, ()) and k not in _RUNTIME_ARGS)
    unknown = [k for k in fn_cfg if not k.startswith("_") and k not in params]
    if unknown:
        raise ConfigError(f"loss.fn.{unknown[0]}: not a hyperparameter of {target} (valid: {', '.join(hyper)})")
    return instantiate(fn_cfg)


_RUNTIME_ARGS = ("reduce", "running_mean", "generator")


@dataclass
class TrainData:
    train: Any  # tokenised datasets.Dataset
    eval: Any | None
    report: Any  # train.data.TokenisationReport of the training rows
    eval_report: Any | None


def load_rows(path: str, cfg, convert: Callable | None = None, limit: int | None = None):
    """Canonical rows of a data file (train/data.py), optionally converted to the kind a loss needs."""

    rows = load_records(path, split=cfg.data.split, limit=limit)
    return convert(rows, path) if convert is not None else rows


def tokenize_config(cfg):
    d = cfg.data
    return TokenizeConfig(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        truncation_mode=d.truncation_mode,
        assistant_turns=d.assistant_turns,
        chat_template=cfg.model.chat_template,
        distinct_prompts=cfg.loss.distinct_prompts,
        joint_prompts=cfg.loss.joint_distribution,
    )


def tokenize_checked(rows, tokenizer, cfg, kind: str, source: str):
    """Tokenise with the configured truncation policy. Rows whose prompt alone leaves no room are an
    error naming the file, the rows and the settings (unless data.drop_overlong); no rows left is too."""

    tok, report = tokenize_dataset(rows, tokenizer, tokenize_config(cfg), kind=kind)
    if report.dropped_prompt_too_long and not cfg.data.drop_overlong:
        ids = ", ".join(report.dropped_ids[:5]) + (" ..." if len(report.dropped_ids) > 5 else "")
        raise DataError(
            f"{source}: {report.dropped_prompt_too_long} row(s) have a prompt that alone fills "
            f"data.max_length={cfg.data.max_length} tokens (row ids: {ids}); set data.max_prompt_length=<n> to "
            f"truncate prompts, raise data.max_length, or set data.drop_overlong=true to skip them"
        )
    if len(tok) == 0:
        raise DataError(
            f"{source}: no rows left after tokenisation ({report.rows_in} in; "
            f"{report.dropped_prompt_too_long} over-long, {report.dropped_empty_completion} empty)"
        )
    return tok, report


def load_data(cfg, tokenizer, kind: str, convert: Callable | None = None) -> TrainData:
    """Training rows from data.path, evaluation rows from data.eval_path or a data.eval_split share."""
    rows = load_rows(cfg.data.path, cfg, convert, cfg.data.limit)
    eval_rows = None
    if cfg.data.eval_path:
        eval_rows = load_rows(cfg.data.eval_path, cfg, convert)
    elif cfg.data.eval_split > 0 and len(rows) > 1:
        split = rows.train_test_split(test_size=cfg.data.eval_split, seed=cfg.seed, shuffle=True)
        rows, eval_rows = split["train"], split["test"]
    train, report = tokenize_checked(rows, tokenizer, cfg, kind, cfg.data.path)
    ev, ev_report = (None, None)
    if eval_rows is not None and len(eval_rows):
        ev, ev_report = tokenize_checked(
            eval_rows, tokenizer, cfg, kind, cfg.data.eval_path or f"{cfg.data.path} (eval split)"
        )
    return TrainData(train, ev, report, ev_report)


def check_enough_rows(n_rows: int, cfg, world_size: int, source: str) -> None:
    need = cfg.optim.batch_size * cfg.optim.grad_accum * world_size
    if n_rows < need:
        raise DataError(
            f"{source}: {n_rows} usable row(s), but one optimizer step needs optim.batch_size x "
            f"optim.grad_accum x processes = {need}; lower optim.batch_size or add data"
        )


def truncation_counts(report) -> dict[str, int]:
    keys = (
        "rows_in",
        "rows_out",
        "prompt_truncated",
        "rejected_prompt_truncated",
        "completion_truncated",
        "dropped_prompt_too_long",
        "dropped_empty_completion",
    )
    return {k: getattr(report, k) for k in keys if report is not None}


# ------------------------------------------------------------------------------------ batches


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A deterministic permutation of range(n) for one epoch (same on every process)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(order: Sequence[int], batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: global batch g = micro-batches g·W … g·W+W−1 of the
    order, micro-batch g·W+r on process r (what accelerate's batch sharding does). A tail that cannot
    give every process a full micro-batch is dropped, so all processes step together and every
    micro-batch has the same size (KTO's KL pairs need ≥ 2 rows)."""
    per_round = batch_size * world_size
    usable = len(order) // per_round * per_round
    batches = [list(order[i : i + batch_size]) for i in range(0, usable, batch_size)]
    return batches[rank::world_size]


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def steps_per_epoch(n_rows: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    micro = n_rows // (batch_size * world_size)
    return micro // grad_accum


def total_steps(optim, steps_in_epoch: int) -> int:
    return optim.max_steps if optim.max_steps is not None else steps_in_epoch * optim.epochs


# ------------------------------------------------------------------------------------ optimisation


def build_optimizer(params: Iterable[torch.nn.Parameter], optim) -> torch.optim.Optimizer:
    """AdamW; weight decay spares biases and norm weights (1-d tensors), as usual for transformers.

    The fused kernel (`fused=True`, CPU and CUDA) where every parameter allows it: the same update
    element by element, without the default multi-tensor path's temporary of one full parameter copy
    (sqrt of the second moment; +0.54 GB on a 135M model in float32) and, measured on one CPU thread,
    about 5x faster per step (bench/dpo_memory.py, the module docstring)."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if _fused_adamw_ok(params) else {}
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kwargs
    )


def _fused_adamw_ok(params: list[torch.nn.Parameter]) -> bool:
    """Plain float tensors, all on CPU or all on one kind of CUDA device (what the fused kernel takes)."""
    kinds = {p.device.type for p in params}
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return (
        len(kinds) == 1
        and kinds <= {"cpu", "cuda"}
        and all(type(p) is torch.nn.Parameter and p.dtype in floats for p in params)
    )


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps: linear warm-up, then
    constant / linear decay to 0 / half-cosine to 0 at `total`."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, optim, total: int):
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(round(optim.warmup_ratio * total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.scheduler, warmup, total))


def call_loss(fn: Callable, available: dict[str, Any]):
    """Call a loss with the keyword vocabulary it declares (train/losses/__init__.py): everything its
    signature names and `available` holds; its hyperparameters are already bound by the partial."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in available.items() if k in params and v is not None}
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"{getattr(fn, 'func', fn).__name__} needs {missing}, which this batch does not provide")
    return fn(**kwargs)


# ------------------------------------------------------------------------------------ progress, step, checkpoint


@dataclass
class Progress:
    """Where a run stands: the one object the loops advance, log from, checkpoint and resume (the fields
    are trainer_state.json's). `started` is this process's clock at the start of the run; `elapsed_s`
    adds the time of the runs this one resumed."""

    step: int = 0  # optimizer steps
    epoch: int = 0
    micro: int = 0  # micro-batches of the current epoch already consumed
    samples: int = 0
    stage: int = 0  # sDPO / Curry-DPO stage (preference loop)
    elapsed_s: float = 0.0
    started: float = field(default_factory=time.perf_counter, compare=False)

    SAVED = ("step", "epoch", "micro", "samples", "stage", "elapsed_s")

    def time_s(self) -> float:
        return self.elapsed_s + time.perf_counter() - self.started

    def state(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.SAVED}, "elapsed_s": self.time_s()}

    def restore(self, state: dict[str, Any]) -> None:
        for k in self.SAVED:
            if k in state:
                setattr(self, k, state[k])

    def update(self, **values: Any) -> None:
        for k, v in values.items():
            setattr(self, k, v)

    def log_due(self, every: int, total: int) -> bool:
        return self.step % every == 0 or self.step == total

    def checkpoint_due(self, ckpt_cfg) -> tuple[bool, bool]:
        """(save now, stop after saving): every `every_steps`, and at `stop_after_steps` (a planned stop)."""
        stop = ckpt_cfg.stop_after_steps is not None and self.step >= ckpt_cfg.stop_after_steps
        return stop or bool(ckpt_cfg.every_steps and self.step % ckpt_cfg.every_steps == 0), stop

    def final_checkpoint_due(self, ckpt_cfg) -> bool:
        """At the end (checkpoint.final): unless the last step already wrote one."""
        if not ckpt_cfg.final or not self.step:
            return False
        return ckpt_cfg.every_steps == 0 or self.step % ckpt_cfg.every_steps != 0


def accumulate_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    max_grad_norm: float | None,
    metrics: StepMetrics,
    loss: Callable[[], tuple[torch.Tensor, dict[str, Any]]],
) -> bool:
    """One micro-batch under accelerate's gradient accumulation: `loss()` -> (scalar, metrics) is
    backpropagated; on the micro-batch that completes an optimizer step, the gradient is clipped (its
    pre-clip norm logged) and the optimizer and scheduler step. Returns whether an optimizer step happened."""
    with accelerator.accumulate(model):
        value, values = loss()
        accelerator.backward(value)
        metrics.add(values)
        if accelerator.sync_gradients:
            if max_grad_norm is not None:
                metrics.add({"grad_norm": accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)})
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return accelerator.sync_gradients


def report_data(data, main: bool) -> None:
    """The data report (rows kept, dropped by reason, truncation) of the train and eval splits."""
    if main:
        print(data.report.summary(), flush=True)
        if data.eval_report is not None:
            print("eval split, " + data.eval_report.summary(), flush=True)


def load_trained_model(cfg, ckpt: Path | None, **kwargs):
    """The model a run trains: the configured one, or on resume the checkpoint's (its full weights, or the
    configured base plus the checkpoint's LoRA adapter). `kwargs` go to train.models.load_policy."""
    full = ckpt is not None and not cfg.lora.enabled
    return load_policy(
        str(ckpt) if full else cfg.model.name_or_path,
        revision=None if full else cfg.model.revision,
        dtype=cfg.optim.dtype,
        lora=cfg.lora,
        gradient_checkpointing=cfg.optim.gradient_checkpointing,
        adapter_path=ckpt if ckpt is not None and cfg.lora.enabled else None,
        **kwargs,
    )


@dataclass
class Recorder:
    """What an offline loop records as it goes, held in one place the loop owns: metrics.jsonl and
    TensorBoard (`logger`), the progress bar, the running step metrics and throughput, and the last train
    and eval metrics (they go into summary.json)."""

    logger: MetricsLogger
    bar: Any
    postfix_keys: Sequence[str] | None = None  # the bar's short metrics (None: train.loops.metrics.postfix's)
    metrics: StepMetrics = field(default_factory=StepMetrics)
    speed: Throughput = field(default_factory=Throughput)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)


def open_recorder(out_dir: Path, cfg, main: bool, total: int, progress: Progress, desc: str, postfix_keys=None):
    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for notebooks at import

    return Recorder(
        logger=MetricsLogger(out_dir, main, cfg.log.tensorboard, resume_step=progress.step),
        bar=tqdm(
            total=total, initial=progress.step, disable=not (cfg.progress and main), desc=desc, dynamic_ncols=True
        ),
        postfix_keys=postfix_keys,
    )


def end_of_step(
    rec: Recorder,
    progress: Progress,
    cfg,
    total: int,
    *,
    accelerator,
    scheduler,
    save: Callable[[], None],
    evaluate: Callable[[], dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> bool:
    """What every offline loop does after an optimizer step, in this order: log the step's metrics
    (averaged over micro-batches and processes), throughput, lr, time, epoch and `extra` every
    `log.every_steps` and at the last step; advance the bar; evaluate every `eval.every_steps` when
    `evaluate` is given; checkpoint every `checkpoint.every_steps` and at `stop_after_steps`.
    Returns whether the run stops here (a planned stop after its checkpoint)."""
    if progress.log_due(cfg.log.every_steps, total):
        rec.last_train = {
            **rec.metrics.reduce(accelerator),
            **rec.speed.read(accelerator.num_processes),
            "lr": scheduler.get_last_lr()[0],
            "time_s": progress.time_s(),
            "epoch": progress.epoch,
            **(extra or {}),
        }
        rec.logger.log(progress.step, rec.last_train)
        rec.bar.set_postfix(postfix(rec.last_train, rec.postfix_keys))
    rec.bar.update(1)
    if evaluate is not None and cfg.eval.every_steps and progress.step % cfg.eval.every_steps == 0:
        rec.last_eval = evaluate()
        rec.logger.log(progress.step, rec.last_eval)
    due, stopped = progress.checkpoint_due(cfg.checkpoint)
    if due:
        save()
    return stopped


def end_of_run(
    rec: Recorder,
    progress: Progress,
    cfg,
    *,
    model,
    tokenizer,
    out_dir: Path,
    accelerator,
    save: Callable[[], None],
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> Path:
    """The end of a finished run: a last evaluation (when `evaluate` is given), the final model in
    `final/`, and a last checkpoint unless the last step wrote one. Returns the final folder."""
    rec.bar.close()
    if evaluate is not None:
        rec.last_eval = evaluate()
        rec.logger.log(progress.step, rec.last_eval)
    rec.logger.close()
    final = save_model(model, tokenizer, out_dir / "final", accelerator)
    if progress.final_checkpoint_due(cfg.checkpoint):
        save()
    return final


def stopped_early(rec: Recorder, progress: Progress, out_dir: Path) -> dict[str, Any]:
    """The result of a planned stop (`checkpoint.stop_after_steps`): its checkpoint is already written."""
    rec.bar.close()
    rec.logger.close()
    return {"stopped": True, "steps": progress.step, "output_dir": str(out_dir)}


def run_summary(name: str, cfg, progress: Progress, final: Path, rec: Recorder, data, out_dir: Path, **extra):
    """summary.json's fields every offline loop shares, then the loop's own (`extra`)."""
    return {
        "loop": name,
        "loss": cfg.loss.name,
        "steps": progress.step,
        "samples": progress.samples,
        "time_s": progress.time_s(),
        "final_dir": str(final),
        "final_train": rec.last_train,
        "final_eval": rec.last_eval,
        "truncation": truncation_counts(data.report),
        "eval_truncation": truncation_counts(data.eval_report),  # the held-out rows' cuts, beside the training ones
        "output_dir": str(out_dir),
        **extra,
    }


# ------------------------------------------------------------------------------------ run record
