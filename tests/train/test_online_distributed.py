"""Two CPU processes (accelerate, gloo) equal one process on the same global rollout: group statistics
and the KL metric are gathered, the token-mean is over the whole optimizer step on all processes, and
DDP averages the gradients. The generator is replaced by a deterministic one (tests/train/
online_ddp_entry.py): hf sampling draws one random stream per process, so real samples differ with the
process count. One mini-batch per rollout: with several, each process shuffles its own rows into
mini-batches (as TRL and OpenRLHF do per rank), so their composition depends on the process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train.online_helpers import WORDS
from tests.train.test_loops_distributed import REPO, launch_two

COMMON = [
    "progress=false",
    "log.plot=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
    "optim.scheduler=constant",
    "optim.warmup_ratio=0",
    "optim.lr=1e-2",
    "loop=grpo",
    "loop.reward.function=train.scorers:even_token_fraction",
    "loop.generation.max_new_tokens=8",
    "loop.prompts_per_step=4",
    "loop.samples_per_prompt=4",
    "optim.max_steps=3",
    "loss.fn.aggregation=token_mean",
    "loop.kl.coef=0.04",
]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_online_grpo_equals_one_process(tmp_path):
    prompts = tmp_path / "prompts.jsonl"  # all distinct: the stand-in generator keys its samples on the prompt
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{WORDS[i % 13]} {WORDS[(i * 5) % 13]} {i}"}) + "\n" for i in range(32))
    )
    one = tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.train.online_ddp_entry",
            *COMMON,
            f"data.path={prompts}",
            f"output_dir={one}",
            "optim.batch_size=4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    proc = launch_two(
        tmp_path,
        *COMMON,
        f"data.path={prompts}",
        f"output_dir={two}",
        "optim.batch_size=2",
        module="tests.train.online_ddp_entry",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(rows(one), rows(two), strict=True):
        for k in ("reward/mean", "kl", "loss", "grad_norm", "completions/mean_length"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
