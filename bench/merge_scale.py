"""Merge time and peak memory for sharded outputs of 100k and 1M synthetic rows (CPU, no backend).

    python bench/merge_scale.py --rows 1000000 --shards 8 [--dir /tmp/merge-bench]

Writes `--shards` finished shard folders the way `synth ... shard=i/n` leaves them (rows of ~300 bytes in
completions.jsonl and trace.jsonl, a ledger line per 1,000-row chunk, manifest, shard.json), then runs
`synth-merge` on them in a child process and reports its wall time and peak RSS (getrusage ru_maxrss).
Baselines measured in the same run: the same merge at a tenth of the rows (memory must not grow with the
row count), and a plain byte copy of the same files (`cat`-like; what merge's time should be close to).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

CHUNK = 1000


def write_shards(root: Path, rows: int, n: int) -> int:
    """Finished shard folders holding `rows` rows in all; returns the bytes written."""
    from synth.app import run_fingerprint, validate
    from synth.io import LEDGER, write_json_atomic
    from synth.merge import write_shard_info
    from synth.records import stable_id
    from synth.shard import Shard, shard_of

    pipeline = {"_target_": "synth.pipelines.generate.GeneratePipeline", "name": "generate", "n": 1}
    cfg = validate(
        {
            "llm": {"kind": "hf"},
            "model": {"name_or_path": "x"},
            "pipeline": pipeline,
            "output_dir": str(root),
            "shard": f"0/{n}",
        }
    )
    fp = run_fingerprint(cfg)
    shards = [Shard(i, n) for i in range(n)]
    handles = []
    for s in shards:
        folder = s.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        handles.append(
            {
                "dir": folder,
                "out": open(folder / "completions.jsonl", "w"),
                "trace": open(folder / "trace.jsonl", "w"),
                "ledger": open(folder / LEDGER, "w"),
                "ids": [],
                "rows": 0,
            }
        )
    total = 0

    def flush(h):
        h["out"].flush()
        h["trace"].flush()
        sizes = {"completions": h["out"].tell(), "trace": h["trace"].tell()}
        h["ledger"].write(
            json.dumps(
                {
                    "chunk": 0,
                    "ids": h["ids"],
                    "sizes": sizes,
                    "counters": dict(Counter({"out/completions": len(h["ids"]), "calls/generate": 1})),
                }
            )
            + "\n"
        )
        h["ids"] = []

    for k in range(rows):
        item = stable_id("bench", k)
        h = handles[shard_of(item, n)]
        text = f"answer number {k} " + "x" * 200
        line = json.dumps(
            {
                "id": item,
                "prompt": [{"role": "user", "content": f"question {k}"}],
                "completions": [{"text": text, "finish_reason": "stop"}],
            }
        )
        h["out"].write(line + "\n")
        h["trace"].write(json.dumps({"item_id": item, "step": "generate", "parse_status": "ok"}) + "\n")
        total += len(line) + 1
        h["ids"].append(item)
        h["rows"] += 1
        if len(h["ids"]) == CHUNK:
            flush(h)
    for s, h in zip(shards, handles, strict=True):
        if h["ids"]:
            flush(h)
        for f in ("out", "trace", "ledger"):
            h[f].close()
        write_json_atomic(
            h["dir"] / "manifest.json",
            {"status": "finished", "inputs": h["rows"], "resumed_from_previous_runs": 0, "duplicate_inputs_skipped": 0},
        )
        write_shard_info(h["dir"], s, fp, pipeline, "hhh_en", 0)
    return total


def merge_child(root: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `synth-merge` in a child process."""
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "synth.merge", f"output_dir={root}", "progress=false"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def plain_copy(root: Path, n_bytes_dir: Path) -> float:
    t = time.perf_counter()
    for name in ("completions", "trace"):
        with open(n_bytes_dir / f"copy-{name}.jsonl", "wb") as dst:
            for folder in sorted((root / "shards").iterdir()):
                with open(folder / f"{name}.jsonl", "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/merge-bench")
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    results = {}
    for rows in (args.rows // 10, args.rows):  # the small run first: ru_maxrss of children only grows
        root = base / f"rows-{rows}"
        t = time.perf_counter()
        size = write_shards(root, rows, args.shards)
        made = time.perf_counter() - t
        wall, rss = merge_child(root)
        copy = plain_copy(root, base)
        results[rows] = (wall, rss, copy, size)
        print(
            f"{rows:>9} rows ({size / 2**20:.0f} MiB completions, {args.shards} shards, written in {made:.1f}s): "
            f"merge {wall:.2f}s, peak RSS {rss:.0f} MiB; plain copy of the same files {copy:.2f}s",
            flush=True,
        )
        (base / "copy-completions.jsonl").unlink()
        (base / "copy-trace.jsonl").unlink()
    small, big = results[args.rows // 10], results[args.rows]
    print(
        f"ratios: merge/plain-copy time at {args.rows} rows = {big[0] / big[2]:.2f}x; peak RSS {args.rows} rows / "
        f"{args.rows // 10} rows = {big[1] / small[1]:.2f}x (1.0 = independent of the row count)"
    )
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
