"""What a run records: per-step metrics (averaged over micro-batches and processes), metrics.jsonl,
TensorBoard, curves.png, throughput and the final summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synth.io import write_text_atomic


@dataclass
class StepMetrics:
    """Per-micro-batch scalars summed until the optimizer step, then averaged (and across processes)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, values: dict[str, Any], weight: float = 1.0) -> None:
        for k, v in values.items():
            if v is None:
                continue
            v = float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
            if math.isnan(v):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
            self.counts[k] = self.counts.get(k, 0) + weight

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over micro-batches and processes (keys missing on a process count as absent there)."""
        keys = sorted(self.sums)
        if accelerator is not None and accelerator.num_processes > 1:
            keys = sorted(set().union(*_gather_objects(accelerator, keys)))
            t = torch.tensor(
                [[self.sums.get(k, 0.0), self.counts.get(k, 0)] for k in keys],
                dtype=torch.float64,
                device=accelerator.device,
            ).reshape(-1, 2)
            t = accelerator.reduce(t, "sum")
            out = {k: float(s / c) for k, (s, c) in zip(keys, t.tolist(), strict=True) if c > 0}
        else:
            out = {k: self.sums[k] / self.counts[k] for k in keys if self.counts[k] > 0}  # weight 0 only: absent
        self.sums.clear(), self.counts.clear()
        return out


def _gather_objects(accelerator, obj) -> list:
    from accelerate.utils import gather_object

    return gather_object([obj])


def loss_metrics(out, prefix: str = "", paired: bool = True) -> dict[str, Any]:
    """Scalars of a LossOutput: loss, rewards chosen/rejected, margin, accuracy and the loss's own.
    paired=False (unpaired data): chosen/rejected are different examples, so no margin or accuracy."""
    m: dict[str, Any] = {f"{prefix}loss": out.losses.detach().mean()}
    c, r = out.chosen_rewards, out.rejected_rewards
    if c is not None and c.numel():
        m[f"{prefix}rewards/chosen"] = c.mean()
    if r is not None and r.numel():
        m[f"{prefix}rewards/rejected"] = r.mean()
    if paired and c is not None and r is not None and c.numel() and c.shape == r.shape:
        m[f"{prefix}rewards/margin"] = (c - r).mean()
        m[f"{prefix}rewards/accuracy"] = (c > r).float().mean()
    for k, v in out.metrics.items():
        name = {"reward_margin": "rewards/margin", "reward_accuracy": "rewards/accuracy"}.get(k, k)
        m.setdefault(f"{prefix}{name}", v)
    return m


class MetricsLogger:
    """metrics.jsonl (append; a resumed run truncates lines past its step), TensorBoard when installed,
    and the tqdm postfix. Only the main process writes."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop records a crashed run wrote after its last checkpoint
            keep = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:
                self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


POSTFIX_KEYS = ("loss", "rewards/accuracy", "rewards/margin", "kl", "lr", "tokens_per_s")


def postfix(values: dict[str, float], keys: Sequence[str] | None = None) -> dict[str, str]:
    """The progress bar's short metrics: `keys` (default POSTFIX_KEYS) that `values` has."""
    return {k.split("/")[-1]: f"{values[k]:.4g}" for k in keys or POSTFIX_KEYS if k in values}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png: Path) -> Path | None:
    """curves.png: one panel per logged quantity (train solid, eval dots) against optimizer steps."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for r in rows:
        for k in r:
            base = k.removeprefix("eval/")
            if (
                k != "step"
                and base not in names
                and isinstance(r[k], (int, float))
                and base not in ("epoch", "stage", "time_s")
            ):
                names.append(base)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for key, style in ((name, "-"), (f"eval/{name}", "o--")):
            pts = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), style, label="eval" if key.startswith("eval/") else "train", markersize=3
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if any(f"eval/{name}" in r for r in rows):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


class Throughput:
    """Tokens and samples per second between optimizer steps (this process's tokens x processes)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0
        self.samples = 0

    def add(self, tokens: int, samples: int) -> None:
        self.tokens += tokens
        self.samples += samples

    def read(self, world_size: int) -> dict[str, float]:
        dt = max(time.perf_counter() - self.start, 1e-9)
        out = {"tokens_per_s": self.tokens * world_size / dt, "samples_per_s": self.samples * world_size / dt}
        self.__init__()
        return out


def write_json(path: Path, obj: Any) -> None:
    """Through a temporary file, fsynced, renamed, the folder fsynced (synth.io.write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def finish_run(summary: dict[str, Any], out_dir: Path, cfg: Any, accelerator: Any) -> dict[str, Any]:
    """The end every loop shares: summary.json, curves.png and the printed summary (main process
    only), then a barrier and accelerate's end_training. Returns `summary`."""
    if accelerator.is_main_process:
        write_json(out_dir / "summary.json", summary)
        if cfg.log.plot:
            plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
        print(format_summary(summary), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"done: {summary['steps']} steps, {summary['samples']} samples, {summary['time_s']:.1f}s "
        f"-> {summary['final_dir']}"
    ]
    for group in ("train", "eval"):
        vals = summary.get(f"final_{group}") or {}
        if vals:
            lines.append(
                f"  {group}: " + ", ".join(f"{k}={v:.4g}" for k, v in vals.items() if isinstance(v, (int, float)))
            )
    if summary.get("soft_labels"):
        lines.append(f"  soft labels: {summary['soft_labels']} pairs carry p_chosen (soft-label loss)")
    trunc = summary.get("truncation") or {}
    if trunc:
        lines.append("  truncation: " + ", ".join(f"{k}={v}" for k, v in trunc.items()))
    return "\n".join(lines)
