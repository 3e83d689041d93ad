"""Split an hh-rlhf file into red-team seeds and held-out evaluation prompts, disjoint by prompt.

    python scripts/split_hh.py <hh-rlhf .jsonl(.gz)> <out_dir> [--heldout 0.5]

Every row goes to <out_dir>/seeds.jsonl or <out_dir>/heldout.jsonl (the original rows, unchanged) by a
hash of its first human turn, so two dialogues that open with the same request always land on the same
side: no evaluation prompt is ever a training prompt. The main job (scripts/demo.sh local) red-teams
with the seeds and evaluates on the held-out half.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth.sources import iter_json_rows, parse_hh_dialogue  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("out_dir")
    ap.add_argument("--heldout", type=float, default=0.5, help="share of distinct prompts held out (default 0.5)")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"seeds": 0, "heldout": 0}
    with (
        (out / "seeds.jsonl").open("w", encoding="utf-8") as seeds,
        (out / "heldout.jsonl").open("w", encoding="utf-8") as held,
    ):
        for _, row in iter_json_rows(args.path):
            if not isinstance(row, dict):
                continue
            first = parse_hh_dialogue(row["chosen"])[0].content
            u = int(hashlib.sha256(first.encode()).hexdigest()[:8], 16) / 2**32
            side = "heldout" if u < args.heldout else "seeds"
            (held if side == "heldout" else seeds).write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[side] += 1
    print(f"split {args.path}: {counts['seeds']} seed dialogues, {counts['heldout']} held-out dialogues -> {out}")


if __name__ == "__main__":
    main()
