"""What the lease's fence costs a commit (synth/lease.py): `ChunkWriter.commit` with the fence against the
same commits without it, measured in the same run (CPU, no backend).

    python bench/lease_overhead.py [--chunks 1000] [--rows 4] [--rounds 3] [--dir /tmp/lease-bench]

Every commit appends small rows and a ledger line with fsync, as `synth` does; the fence adds a stat of the
next epoch file and a read of `.lease/current`. Prints both times, their ratio, and the fence alone (the
steady figure: on a disk shared with other work, fsync times vary between rounds by more than the fence
costs, so the ratio is noise around 1.0 there; on NFS each of the fence's two lookups is a round trip).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def commit_loop(folder: Path, chunks: int, rows: int, fence) -> float:
    from synth.io import ChunkWriter

    w = ChunkWriter(folder, ("completions",), fence=fence)
    started = time.perf_counter()
    for c in range(chunks):
        ids = [f"{c}-{r}" for r in range(rows)]
        w.commit(ids, {"completions": [{"id": i, "text": "x" * 200} for i in ids]}, {"out/completions": rows})
    return time.perf_counter() - started


def main() -> None:
    from synth.lease import Lease, LeaseConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating plain / fenced rounds; the best of each")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="lease-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    plain, fenced, check = [], [], []
    try:
        for k in range(args.rounds):
            plain.append(commit_loop(root / f"plain-{k}", args.chunks, args.rows, None))
            with Lease(root / f"fenced-{k}", LeaseConfig()) as lease:
                fenced.append(commit_loop(root / f"fenced-{k}", args.chunks, args.rows, lease.check))
                started = time.perf_counter()
                for _ in range(args.chunks):
                    lease.check()
                check.append(time.perf_counter() - started)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    p, f, c, per = min(plain), min(fenced), min(check), 1e6 / args.chunks
    print(f"{args.chunks} commits of {args.rows} rows, fsync'd, best of {args.rounds}:")
    print(f"  plain                   {p:.2f} s ({p * per:.0f} us/commit)")
    print(f"  with the lease's fence  {f:.2f} s ({f * per:.0f} us/commit) -> {f / p:.3f}x plain")
    print(f"  the fence alone         {c * per:.1f} us/check ({c / p:.3f} of the plain commits' time)")


if __name__ == "__main__":
    main()
