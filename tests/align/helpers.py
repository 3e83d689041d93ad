"""Shared by the align tests: compose `align` as its command line would, shrink every stage to a few
rows and steps, and run it in-process against the scripted loopback server (policy, attacker and
judge) with the tiny model as the weights that train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from synth.io import read_jsonl

TRAIN_SMALL = [
    "optim.max_steps=2",
    "optim.batch_size=1",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=1",
    "log.tensorboard=false",
    "log.plot=false",
    "data.max_length=128",
    "data.max_prompt_length=64",
    "lora.r=4",
    "lora.alpha=8",
    "optim.lr=1.0e-2",
    "lora.dropout=0.0",
    "optim.packing=false",
    "optim.warmup_ratio=0.0",
]
EVAL_SMALL = [
    "suite.limit=4",
    "bootstrap=100",
    "sampling.max_new_tokens=8",
    "judges.sampling.max_new_tokens=64",
    "chunk_size=4",
]
CATEGORIES = {  # red_team: two taxonomy categories of the stage's constitution
    "safety_en": "pipeline.categories=[crime/drugs,harm_to_others/privacy]",
    "safety_zh": "pipeline.categories=['歧视/地域','健康/身体健康']",
}
STAGE_SMALL = {  # per pipeline: a handful of items
    "red_team": [
        "pipeline.families=[direct]",
        "pipeline.prompts_per_item=2",
        "pipeline.decoding=[{name:greedy,temperature:0.0,max_new_tokens:16},{name:hot,temperature:1.0,top_p:0.9,max_new_tokens:16}]",
    ],
    "critique_revision": ["pipeline.rounds=1", "pipeline.sampling.max_new_tokens=32", "pipeline.few_shot=false"],
    "generate": ["pipeline.sampling.max_new_tokens=16"],
    "self_rewarding": [
        "pipeline.k=3",
        "pipeline.sampling.max_new_tokens=16",
        "pipeline.judge_samples=2",
        "pipeline.new_prompts.per_seed=1",
        "pipeline.new_prompts.keep_seed_prompts=true",
    ],
}


def compose_align(out: Path, url: str, recipe: str, *extra: str) -> dict[str, Any]:
    """The composed config; the pseudo-override `no_evaluate` leaves the recipe's evaluate stage out."""
    from synth.align.stages import compose

    no_eval = "no_evaluate" in extra
    extra = tuple(e for e in extra if e != "no_evaluate")
    policy = (
        [] if "llm=hf" in extra else ["llm=openai", f"llm.base_url={url}", "llm.progress=false", "llm.max_retries=1"]
    )
    judge = (
        []
        if "judge=policy" in extra
        else [
            "judge=openai",
            f"judge.llm.base_url={url}",
            "judge.model.name_or_path=scripted-judge",
            "judge.llm.progress=false",
            "judge.llm.max_retries=1",
        ]
    )
    raw = compose(
        "align",
        [f"recipe={recipe}", *policy, *judge, f"output_dir={out}", "progress=false", "stop.rule=none", *extra],
        "test",
    )
    if no_eval:
        raw["recipe"]["stages"] = [s for s in raw["recipe"]["stages"] if s["tool"] != "evaluate"]
    raw["overrides"]["train"] += TRAIN_SMALL
    raw["overrides"]["evaluate"] += EVAL_SMALL
    for stage in raw["recipe"]["stages"]:
        ov = stage.setdefault("overrides", [])
        pipe = next((o.split("=", 1)[1] for o in ov if o.startswith("pipeline=")), None)
        ov += STAGE_SMALL.get(pipe, [])
        if pipe == "red_team":
            cons = next((o.split("=", 1)[1] for o in ov if o.startswith("constitution=")), "safety_en")
            ov.append(CATEGORIES[cons])
        if pipe == "generate" and not any("_target_" in o for o in ov):
            ov.append("pipeline.n=" + ("4" if stage["name"] == "sample" else "1"))
        if any(o == "loop=online_dpo" for o in ov):
            ov += ["loop.prompts_per_step=2", "loop.generation.max_new_tokens=8"]
        if stage["tool"] == "evaluate":
            ov.append("suite.gold_limit=0")
    return raw


def prompts_file(path: Path, n: int, answers: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"Tell me about item {i}.", **({"chosen": f"Item {i} is a thing."} if answers else {})}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prefs_file(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"A kind and complete answer {i}.", "rejected": f"No {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_file(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"I say {i}."}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ledger(out: Path) -> dict[str, Any]:
    return json.loads((out / "ledger.json").read_text())


# ------------------------------------------------------------------ kill -9 and compare (test_resume_*.py)
REPO = Path(__file__).resolve().parents[2]
CHUNK1 = ("overrides.synth=['chunk_size=1']", "overrides.evaluate=['chunk_size=1']")


def killed_run(out: Path, url: str, point: str, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "tests.align.kill_entry", str(out), url, "cai_rounds", point, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -9, (point, p.stdout[-2000:], p.stderr[-2000:])


def same_rows(out: Path, ref: Path, rel: str) -> None:
    rows, want = read_jsonl(out / rel), read_jsonl(ref / rel)
    assert len({r["id"] for r in rows}) == len(rows) == len(want) > 0
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in want)


def same_weights(out: Path, ref: Path, rel: str) -> None:
    a, b = load_file(out / rel / "adapter_model.safetensors"), load_file(ref / rel / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a), rel
