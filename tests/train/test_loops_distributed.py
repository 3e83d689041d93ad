"""`accelerate launch` with two CPU processes (gloo) gives the same preference-loop loss curve as one
process with the same global batch: the loop shards each global batch, DDP averages the gradients.

accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process (its --cpu path is the simple
launcher); two CPU processes come from the torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=1,
which makes accelerate pick DistributedType.MULTI_CPU with the gloo backend.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.loop_helpers import FAST, compose, toy_pairs, write_records

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curve(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def launch_two(tmp_path: Path, *overrides: str, module: str = "train") -> subprocess.CompletedProcess:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        module,
        *overrides,
    ]
    # its own process group, so that a hang (a collective one process never reaches) kills the workers too
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"two-process run hung (killed after 240 s):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    from train.app import run

    data = write_records(tmp_path / "preferences.jsonl", toy_pairs(40))
    common = [*FAST, f"data.path={data}", "optim.max_steps=4", "loss=dpo", "data.eval_split=0.2"]
    one = tmp_path / "one"
    run(compose(*common, f"output_dir={one}", "optim.batch_size=4"))

    two = tmp_path / "two"
    proc = launch_two(tmp_path, *common, f"output_dir={two}", "optim.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["samples"] == 16  # 4 steps x 2 per process x 2 processes: both processes trained

    for (s1, l1, g1), (s2, l2, g2) in zip(curve(one), curve(two), strict=True):
        assert s1 == s2
        assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-3, abs=1e-5)
    # evaluation is sharded over the processes and averaged over all held-out rows
    ev1 = json.loads((one / "summary.json").read_text())["final_eval"]
    assert summary["final_eval"]["eval/loss"] == pytest.approx(ev1["eval/loss"], rel=1e-4)


@pytest.mark.slow
def test_two_process_kto_all_reduces_its_kl_estimate_and_evaluates(tmp_path):
    """KTO's z0 is all-reduced every micro-batch; evaluation (uneven shards) must not issue per-batch
    collectives, or the processes would wait on each other forever."""
    data = write_records(tmp_path / "preferences.jsonl", toy_pairs(30))
    out = tmp_path / "kto"
    proc = launch_two(
        tmp_path,
        *FAST,
        f"data.path={data}",
        "loss=kto",
        "optim.max_steps=2",
        "optim.batch_size=4",
        "data.eval_split=0.3",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in rows if "loss" in r) and any("eval/kl" in r for r in rows)
