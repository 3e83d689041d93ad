"""Run one stage of the main job as a child process and record its wall time and peak RSS.

    python scripts/stage.py <name> <stages.jsonl> -- <command> [args...]

Appends {"stage", "wall_s", "peak_rss_mb", "rc"} to <stages.jsonl> and exits with the command's status.
Peak RSS is the largest resident set of the command or any child it waited for (getrusage
RUSAGE_CHILDREN, kilobytes on Linux), so a stage that loads two models shows the larger process.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    name, log, cmd = argv[0], argv[1], argv[3:]
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    row = {"stage": name, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "rc": rc}
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"-- stage {name}: {wall:.0f}s wall, peak RSS {peak_kb / 1024:.0f} MB, exit {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
