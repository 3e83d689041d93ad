"""Where a bench side's peak resident memory comes from (`bench/grpo_vs_trl.py --phases`).

`probe(label)` reads the current RSS (psutil) and the process high-water mark (getrusage ru_maxrss) after a
phase; the phases that raise the high-water mark are where the peak comes from. torch's allocations are
invisible to tracemalloc, so RSS is what we read. `wrap(obj, name)` probes after a function or method
returns; `probe_optimizer_steps()` after every optimizer step (torch's global step post-hook) and
`probe_backward()` after every `Accelerator.backward`, the same hooks on both sides of a bench.
"""

from __future__ import annotations

import functools
import resource

import psutil

_proc = psutil.Process()
RECORDS: list[tuple[str, float, float, float]] = []  # (label, rss MB now, high-water MB so far, process CPU s)


def probe(label: str) -> None:
    r = resource.getrusage(resource.RUSAGE_SELF)
    RECORDS.append((label, _proc.memory_info().rss / 2**20, r.ru_maxrss / 1024, r.ru_utime + r.ru_stime))


def wrap(obj, name: str, label: str | None = None, before: bool = False) -> None:
    """Probe after `obj.name` returns (and before it is called, with before=True)."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        if before:
            probe(f"before {label or name}")
        out = fn(*a, **k)
        probe(label or name)
        return out

    setattr(obj, name, inner)


def probe_optimizer_steps() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: probe("optimizer.step"))


def probe_backward() -> None:
    import accelerate

    wrap(accelerate.Accelerator, "backward", "backward")


def summary() -> dict:
    """rises: the probes at which the high-water mark rose (and by how much), in order, plus the last one.
    cpu_s: process CPU seconds from the clock's start (probe "start") to the first generation (start-up),
    from there to the last optimizer step (steps; of which in generation), and after it (end: final save)."""
    rises, last = [], 0.0
    for i, (label, now, peak, _) in enumerate(RECORDS):
        if peak > last + 1.0 or i == len(RECORDS) - 1:
            rises.append({"after": label, "rss_mb": round(now), "peak_mb": round(peak), "rise_mb": round(peak - last)})
        last = peak
    cpu = {label: c for label, _, _, c in reversed(RECORDS)}  # first occurrence of each label
    end = next(c for label, _, _, c in reversed(RECORDS) if label == "optimizer.step")
    start, first_gen = cpu["start"], cpu["before generate"]
    split = {"start-up": first_gen - start, "steps": end - first_gen, "end": RECORDS[-1][3] - end}
    gen = [c for label, _, _, c in RECORDS if label in ("before generate", "generate")]
    split["of which generation"] = sum(b - a for a, b in zip(gen[::2], gen[1::2], strict=True))
    return {"rises": rises, "cpu_s": {k: round(v, 2) for k, v in split.items()}}
