"""Peak RSS and losses of a short DPO run on hh-rlhf pairs, in a child process (CPU).

    python bench/dpo_memory.py --model smollm2-135m --pairs 32 --batch-size 4 --max-length 400
    PYTHONPATH=<other checkout> python bench/dpo_memory.py --model-path <hf folder>   # the same run there

Writes the first `--pairs` hh-rlhf harmless-base test pairs (the local copy in ../shared/data) as
preference rows, runs `python -m train loss=dpo ...` for `--steps` steps, and prints the child's peak
resident memory (getrusage ru_maxrss) and its per-step losses, so that two checkouts can be compared
row for row (same data, same seed, same steps). The machine's other load does not change RSS.

`--phases` runs the child through bench/_memprobe.py, which prints its resident memory and high-water
mark after each phase (tokenizer, data, policy load, packing check, reference pass, optimizer, and the
forward / backward / optimizer step / zero_grad of every step), to find where a peak comes from:

    python bench/dpo_memory.py --phases --steps 3 [--extra optim.gradient_checkpointing=true optim.release_memory=true]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def write_pairs(source: str, n: int, path: Path) -> Path:
    from synth.records import PreferenceRecord
    from synth.sources import SourceConfig, iter_source

    items = iter_source(SourceConfig(kind="hh_rlhf", path=source, limit=n, turns="all"))
    rows = [
        PreferenceRecord(id=it.id, prompt=it.prompt, chosen=it.chosen, rejected=it.rejected, method="hh_rlhf")
        for it in items
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=400)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--source",
        default=str(
            Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
        ),
    )
    ap.add_argument("--out", default="/tmp/dpo_memory")
    ap.add_argument("--extra", nargs="*", default=[], help="more train overrides")
    ap.add_argument(
        "--phases",
        action="store_true",
        help="print the child's RSS and high-water mark after each phase (bench/_memprobe.py)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    data = write_pairs(args.source, args.pairs, out / "pairs.jsonl")
    model = [f"model.name_or_path={args.model_path}"] if args.model_path else [f"model={args.model}"]
    child = [str(Path(__file__).with_name("_memprobe.py"))] if args.phases else ["-m", "train"]
    cmd = [
        sys.executable,
        *child,
        "loss=dpo",
        *model,
        f"data.path={data}",
        f"data.max_length={args.max_length}",
        f"optim.batch_size={args.batch_size}",
        "optim.grad_accum=1",
        f"optim.max_steps={args.steps}",
        f"output_dir={out / 'run'}",
        "progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "checkpoint.every_steps=0",
        "seed=0",
        *args.extra,
    ]
    if (out / "run").exists():
        import shutil

        shutil.rmtree(out / "run")
    t0 = time.time()
    proc = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True)
    took = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"train failed rc={proc.returncode}\n{proc.stderr[-3000:]}")
    if args.phases:
        print("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("phase ")), end="")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    losses = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in losses if "loss" in r}
    print(json.dumps({"peak_rss_gb": round(peak_gb, 2), "seconds": round(took, 1), "losses": losses}))


if __name__ == "__main__":
    main()
