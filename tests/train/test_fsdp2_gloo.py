"""FSDP2 over gloo on 2 CPU processes trains like 1 process: same loss curve, same gathered weights, and
each rank holds about half the parameters. (accelerate's FSDP path needs GPUs; train refuses it on CPU,
see tests/train/test_distributed_checks.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def torchrun(tmp_path: Path, nproc: int, model_dir: Path) -> dict:
    from tests.train.test_loops_distributed import free_port

    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / f"run{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        exe,
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "train" / "fsdp2_entry.py"),
        str(model_dir),
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun hung:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return {**json.loads(Path(str(out) + ".json").read_text()), "state": torch.load(str(out) + ".pt")}


@pytest.mark.slow
def test_fsdp2_two_gloo_processes_match_one(tmp_path, tiny_model_dir):
    one, two = torchrun(tmp_path, 1, tiny_model_dir), torchrun(tmp_path, 2, tiny_model_dir)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert two["losses"][-1] < two["losses"][0]  # it trained
    assert one["local_params_rank0"] == one["full_params"] and two["local_params_rank0"] < 0.6 * two["full_params"]
    assert one["state"].keys() == two["state"].keys()
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, atol=1e-5, rtol=1e-4)
