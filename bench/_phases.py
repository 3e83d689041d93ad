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
RECORDS: list[tuple[str, float, float]] = []  # (label, rss MB now, high-water MB so far)


def probe(label: str) -> None:
    RECORDS.append((label, _proc.memory_info().rss / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def wrap(obj, name: str, label: str | None = None) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def inner(*a, **k):
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


def summary() -> list[dict]:
    """The probes at which the high-water mark rose (and by how much), in order, plus the final one."""
    out, last = [], 0.0
    for i, (label, now, peak) in enumerate(RECORDS):
        if peak > last + 1.0 or i == len(RECORDS) - 1:
            out.append({"after": label, "rss_mb": round(now), "peak_mb": round(peak), "rise_mb": round(peak - last)})
        last = peak
    return out
