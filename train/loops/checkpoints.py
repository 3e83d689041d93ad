"""Checkpoints and exact resume: `step-N/` folders with weights, optimizer, scheduler, RNG states and the
loop's progress; pruning to `keep_last`; restoring all of it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from synth.io import fsync_dir, fsync_tree, write_text_atomic
from train.models import save_model

if TYPE_CHECKING:
    from train.loops.common import Progress


CHECKPOINT_PREFIX = "step-"


STATE_FILE = "trainer_state.json"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def find_last_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    accelerator,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict[str, Any],
    tensors: dict[str, Any] | None = None,
    keep_last: int,
    extra_models: dict[str, Any] | None = None,
) -> Path:
    """A checkpoint folder: the `save_pretrained` model (adapter or full) + tokenizer, then
    optimizer.pt / scheduler.pt / rng_<rank>.pt / tensors.pt (loss state, reference log-probs) and
    trainer_state.json written last, so a folder without it is an interrupted save and is ignored."""

    ckpt = checkpoint_dir(out_dir, step)
    save_model(model, tokenizer, ckpt, accelerator)
    for name, extra in (extra_models or {}).items():
        save_model(extra, None, ckpt / name, None if accelerator is None else accelerator)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        accelerator.save_state(str(ckpt / "accelerate_state"))  # sharded optimizer states need accelerate's savers
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    if accelerator.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
        if tensors:
            torch.save(tensors, ckpt / "tensors.pt")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), ckpt / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # every file of the checkpoint on disk before the mark that says it is complete: after a power loss a
        # checkpoint with trainer_state.json never holds weights or optimizer state still in the page cache
        fsync_tree(ckpt)
        # fsynced, renamed, and the folders fsynced: after a power loss the checkpoint that resume finds
        # keeps its trainer_state.json and its own name (POSIX: a name is durable once its folder is fsynced)
        write_text_atomic(ckpt / STATE_FILE, json.dumps({"step": step, **state}, indent=1))
        fsync_dir(ckpt.parent)  # checkpoints/: the new step-N folder
        fsync_dir(ckpt.parent.parent)  # the output folder: checkpoints/ itself after the first save
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return ckpt


def load_training_state(ckpt: Path, *, accelerator, optimizer, scheduler) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore optimizer, scheduler and this process's RNG; return (trainer_state, tensors)."""
    if (ckpt / "accelerate_state").is_dir():
        accelerator.load_state(str(ckpt / "accelerate_state"))
    else:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng_file = ckpt / f"rng_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt / STATE_FILE).read_text()), saved_tensors(ckpt)


def saved_tensors(ckpt: Path | None) -> dict[str, Any]:
    """A checkpoint's extra tensors (tensors.pt: precomputed references, running statistics); {} if none."""
    if ckpt is None or not (ckpt / "tensors.pt").exists():
        return {}
    return torch.load(ckpt / "tensors.pt", weights_only=False)


def resume_from(ckpt: Path | None, progress: Progress, *, accelerator, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG and `progress` from a checkpoint; return its tensors ({} if none)."""
    if ckpt is None:
        return {}
    state, tensors = load_training_state(ckpt, accelerator=accelerator, optimizer=optimizer, scheduler=scheduler)
    progress.restore(state)
    return tensors


def checkpoint_progress(
    out_dir: Path,
    progress: Progress,
    cfg,
    *,
    accelerator,
    model,
    tokenizer,
    optimizer,
    scheduler,
    tensors: dict[str, Any] | None = None,
    extra_models: dict[str, Any] | None = None,
) -> Path:
    """save_checkpoint with the progress as trainer state."""
    return save_checkpoint(
        out_dir,
        progress.step,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        state=progress.state(),
        tensors=tensors,
        keep_last=cfg.checkpoint.keep_last,
        extra_models=extra_models,
    )
