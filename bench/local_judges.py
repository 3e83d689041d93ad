"""Judge-step failure rates of the synth pipelines with a small local model on `llm=hf` (CPU).

    python bench/local_judges.py --model smollm2-135m --items 8 --out /tmp/judges
    python bench/local_judges.py --model-path /path/to/hf_folder ...     # any model the hf backend loads

Runs pipeline=judge (pairwise, rubric, listwise), self_rewarding, rlrf, red_team and bpo on the first
`--items` prompts of hh-rlhf harmless-base test (the local copy in ../shared/data, or --source) with
small token budgets, then reads every run's trace.jsonl and prints, per judge step, the samples that
gave no usable judgement: parse failures and verdicts cut off at max_new_tokens (finish "length").
Each pipeline runs as its own `python -m synth` process, so the same script measures any checkout
(PYTHONPATH=<checkout>); the model must then be a folder both can load (--model-path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

JUDGE_STEPS = (
    "judge_pairwise",
    "judge_rubric",
    "judge_listwise",
    "self_reward_judge",
    "rlrf_feedback",
    "verdict",
    "bpo_construct",
    "rlrf_rejudge",
)

RUNS = {
    # source.turns=all: hh-rlhf keeps the chosen/rejected pair of every dialogue (not only single-turn ones)
    "judge_pairwise": ["pipeline=judge", "source.turns=all", "pipeline.judge_sampling.max_new_tokens=256"],
    "judge_rubric": [
        "pipeline=judge",
        "source.turns=all",
        "pipeline.mode=rubric",
        "pipeline.rubric.samples=2",
        "pipeline.judge_sampling.max_new_tokens=256",
    ],
    "judge_listwise": [
        "pipeline=judge",
        "source.turns=all",
        "pipeline.mode=listwise",
        "pipeline.judge_sampling.max_new_tokens=256",
    ],
    "self_rewarding": [
        "pipeline=self_rewarding",
        "pipeline.k=2",
        "pipeline.judge_samples=2",
        "pipeline.sampling.max_new_tokens=128",
        "pipeline.judge_sampling.max_new_tokens=256",
        "pipeline.drop_truncated=false",
    ],
    "rlrf": [
        "pipeline=rlrf",
        "pipeline.n=2",
        "pipeline.refine_top=1",
        "pipeline.max_aspects=3",
        "pipeline.sampling.max_new_tokens=128",
        "pipeline.feedback_sampling.max_new_tokens=384",
        "pipeline.refine_sampling.max_new_tokens=128",
        "pipeline.drop_truncated=false",
    ],
    "red_team": [
        "pipeline=red_team",
        "constitution=safety_zh",
        "pipeline.categories=['歧视/地域','歧视/年龄']",
        "pipeline.families=[direct]",
        "pipeline.prompts_per_item=2",
        "pipeline.attacker_sampling.max_new_tokens=128",
        "pipeline.decoding=[{name:greedy,temperature:0.0,max_new_tokens:100},{name:hot,temperature:1.0,top_p:0.9,max_new_tokens:100}]",
    ],
    "bpo": ["pipeline=bpo", "source.turns=all", "pipeline.sampling.max_new_tokens=256"],
}


def default_source() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a conf/model preset")
    ap.add_argument("--model-path", default=None, help="model.name_or_path instead of the preset")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--source", default=str(default_source()))
    ap.add_argument("--out", default="/tmp/local_judges")
    ap.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(RUNS)}")
    args = ap.parse_args()
    model = [f"model.name_or_path={args.model_path}"] if args.model_path else [f"model={args.model}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    totals: dict[str, Counter] = {}
    for name, overrides in RUNS.items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / name
        cmd = [
            sys.executable,
            "-m",
            "synth",
            "llm=hf",
            "llm.device=cpu",
            *model,
            "source=hh_rlhf",
            f"source.path={args.source}",
            f"source.limit={args.items}",
            f"output_dir={out}",
            "cache=false",
            "progress=false",
            "seed=0",
            *overrides,
        ]
        if name == "red_team":  # the attacker writes the prompts; no source
            cmd = [c for c in cmd if not c.startswith("source")]
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        took = time.time() - t0
        if proc.returncode != 0:
            print(f"{name}: FAILED rc={proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
            continue
        for row in map(json.loads, (out / "trace.jsonl").read_text(encoding="utf-8").splitlines()):
            if row["step"] not in JUDGE_STEPS:
                continue
            c = totals.setdefault(row["step"], Counter())
            c["samples"] += 1
            c["parse_failed"] += row["parse_status"] == "failed"
            c["cut_off"] += row["finish_reason"] == "length"
            c["unusable"] += row["parse_status"] == "failed" or row["finish_reason"] == "length"
            if row["step"] == "judge_pairwise" and row["parse_status"] == "ok":
                c["verdict_" + str(row["parsed"])] += 1  # position bias shows as many A
        print(f"{name}: done in {took:.0f}s", flush=True)
    print(f"\n{'step':<20}{'samples':>8}{'parse_failed':>14}{'cut_off':>9}{'unusable':>10}{'rate':>8}")
    for step, c in totals.items():
        rate = c["unusable"] / c["samples"] if c["samples"] else float("nan")
        print(f"{step:<20}{c['samples']:>8}{c['parse_failed']:>14}{c['cut_off']:>9}{c['unusable']:>10}{rate:>8.0%}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(totals, indent=1))


if __name__ == "__main__":
    main()
