"""Split an hh-rlhf file into red-team seeds and held-out evaluation prompts, disjoint by prompt.

    python scripts/split_hh.py <hh-rlhf .jsonl(.gz)> <out_dir> [--heldout 0.5] [--rounds K --per-round N]

Every row goes to <out_dir>/seeds.jsonl or <out_dir>/heldout.jsonl (the original rows, unchanged) by a
hash of its first human turn, so two dialogues that open with the same request always land on the same
side: no evaluation prompt is ever a training prompt. The main job (scripts/demo.sh local) red-teams
with the seeds and evaluates on the held-out half.

With `--rounds K --per-round N` the seed side is also cut into <out_dir>/r1.jsonl ... rK.jsonl: N
dialogues each, in file order, no first turn in two files, so that every round of `align
recipe=cai_rounds preset=small` red-teams its model with prompts no earlier round trained on.
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
    ap.add_argument("--rounds", type=int, default=0, help="also write r1.jsonl .. r<K>.jsonl from the seeds")
    ap.add_argument("--per-round", type=int, default=24, help="seed dialogues per round file (default 24)")
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
    if args.rounds:
        per_round(out, args.rounds, args.per_round)


def per_round(out: Path, rounds: int, n: int) -> None:
    """seeds.jsonl -> r1.jsonl .. r<rounds>.jsonl, n dialogues each with distinct first turns."""
    seen: set[str] = set()
    rows = []
    for line in (out / "seeds.jsonl").read_text(encoding="utf-8").splitlines():
        first = parse_hh_dialogue(json.loads(line)["chosen"])[0].content.strip()
        if first not in seen:
            seen.add(first)
            rows.append(line)
    if len(rows) < rounds * n:
        sys.exit(f"--rounds {rounds} --per-round {n} needs {rounds * n} distinct seed prompts; {len(rows)} exist")
    for k in range(rounds):
        (out / f"r{k + 1}.jsonl").write_text("".join(r + "\n" for r in rows[k * n : (k + 1) * n]), encoding="utf-8")
    print(f"seeds per round: {rounds} file(s) of {n} distinct prompts -> {out}/r1..r{rounds}.jsonl")


if __name__ == "__main__":
    main()
