"""Child of `bench/dpo_memory.py --phases`: `python -m train <overrides>` with the preference loop's
phases instrumented. After each phase it prints one line `phase <name> rss_gb=<now> peak_gb=<high-water
mark so far>` to stderr; the phase that raises the high-water mark is where the peak comes from (torch's
allocations are invisible to tracemalloc, so this reads getrusage / psutil)."""

from __future__ import annotations

import functools
import resource
import sys
import time

import psutil

_proc = psutil.Process()
_t0 = time.perf_counter()


def probe(name: str) -> None:
    now = _proc.memory_info().rss / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"phase {name} rss_gb={now:.3f} peak_gb={peak:.3f} t={time.perf_counter() - _t0:.1f}",
        file=sys.stderr,
        flush=True,
    )


def wrap(module, name: str, label: str | None = None):
    fn = getattr(module, name)

    @functools.wraps(fn)
    def inner(*a, **k):
        probe(f"before {label or name}")
        out = fn(*a, **k)
        probe(f"after {label or name}")
        return out

    setattr(module, name, inner)


def main() -> None:
    import train.loops.common as common
    import train.loops.preference as pref

    for name in ("load_tokenizer", "load_data", "load_policy", "packing_ok", "precompute", "build_optimizer"):
        wrap(pref, name)

    def accumulate_step(accelerator, model, optimizer, scheduler, max_grad_norm, metrics, loss):
        with accelerator.accumulate(model):
            value, values = loss()
            probe("step forward")
            accelerator.backward(value)
            probe("step backward")
            metrics.add(values)
            if accelerator.sync_gradients:
                if max_grad_norm is not None:
                    metrics.add({"grad_norm": accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)})
                optimizer.step()
                probe("step optimizer")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                probe("step zero_grad")
        return accelerator.sync_gradients

    pref.accumulate_step = accumulate_step
    common.accumulate_step = accumulate_step
    probe("start")
    from train.__main__ import main as train_main

    train_main()
    probe("end")


if __name__ == "__main__":
    main()
