"""Commits per second of `synth.io.ChunkWriter`, this tree's against an earlier revision's, same run.

    python bench/chunk_commit.py --commits 100 --baseline-rev f6a4579

Each case commits `--commits` chunks of `--rows` rows into a fresh folder on the disk of `--dir`
(default: the system temporary folder), with the output files of a real pipeline and the files a
chunk of it really writes. The baseline is `synth/io.py` as it was at `--baseline-rev` (read with
`git show`, loaded as its own module); the two writers commit the same chunks one commit each in turn,
so both meet the same load on the shared disk. Prints commits/s of each (from the median commit time),
the ratio this / baseline, and fsyncs per commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, declared outputs, files chunk i writes): the shapes of real chunks
CASES = [
    (
        "red_team: 'unsafe' in 1 chunk of 8",
        ("prompts", "answers", "unsafe"),
        lambda i: ("prompts", "answers", "trace") + (("unsafe",) if i % 8 == 0 else ()),
    ),
    ("ai_feedback without soft labels", ("preferences", "soft_labels"), lambda i: ("preferences", "trace")),
    ("judge joint: battles only", ("joint_preferences", "battles"), lambda i: ("battles", "trace")),
    ("chunk dropped everything", ("sft", "preferences"), lambda i: ()),
    ("control: every file written", ("sft", "preferences"), lambda i: ("sft", "preferences", "trace")),
]


def load_writer(rev: str | None):
    """ChunkWriter of this tree (rev None) or of synth/io.py at git revision `rev`."""
    if rev is None:
        from synth.io import ChunkWriter

        return ChunkWriter
    src = subprocess.run(["git", "show", f"{rev}:synth/io.py"], cwd=ROOT, check=True, capture_output=True, text=True)
    path = Path(tempfile.mkdtemp()) / f"io_{rev}.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location(f"io_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ChunkWriter


class FsyncCounter:
    def __init__(self) -> None:
        self.n = 0
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        self.n += 1
        self.real(fd)


def run_case(writers: dict, outputs, writes, commits: int, rows: int, folder: Path, counter: FsyncCounter) -> dict:
    """Commit the same chunks with every writer, one commit of each in turn (so a change of load on the
    shared disk hits both alike); return {writer: (commits/s from the median commit, fsyncs per commit)}.
    The median keeps a stall of the shared disk (another process's flush) out of the figure."""
    ws = {k: cls(folder / k, outputs, resume=False) for k, cls in writers.items()}
    row = {"id": "x", "text": "y" * 200}
    chunks = [{name: [row] * rows for name in writes(i)} for i in range(commits)]
    spent: dict[str, list[float]] = {k: [] for k in ws}
    syncs = dict.fromkeys(ws, 0)
    for i, chunk in enumerate(chunks):
        for k, w in ws.items():
            counter.n = 0
            t = time.perf_counter()
            w.commit([f"c{i}"], chunk, {})
            spent[k].append(time.perf_counter() - t)
            syncs[k] += counter.n
    return {k: (1 / statistics.median(spent[k]), syncs[k] / commits) for k in ws}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=100)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per writer; the best is kept")
    ap.add_argument("--baseline-rev", default="f6a4579", help="git revision whose synth/io.py is the baseline")
    ap.add_argument("--dir", default=None, help="where to write (its disk is measured)")
    args = ap.parse_args()
    writers = {"this": load_writer(None), "baseline": load_writer(args.baseline_rev)}
    counter = FsyncCounter()
    os.fsync = counter  # both writers call os.fsync through their module's `os`
    print(
        f"{args.commits} commits of {args.rows} rows per written file; best of {args.repeats}; "
        f"baseline synth/io.py at {args.baseline_rev}; load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'case':<38} {'baseline c/s':>12} {'this c/s':>9} {'this/base':>9} {'fsyncs/commit base -> this':>27}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, outputs, writes in CASES:
            best = {k: (0.0, 0.0) for k in writers}
            for r in range(args.repeats):
                got = run_case(writers, outputs, writes, args.commits, args.rows, Path(tmp) / str(r), counter)
                best = {k: max(best[k], got[k]) for k in writers}
            (b, bs), (t, ts) = best["baseline"], best["this"]
            print(f"{name:<38} {b:>12.0f} {t:>9.0f} {t / b:>8.2f}x {bs:>14.2f} -> {ts:.2f}")


if __name__ == "__main__":
    main()
