"""DeepSpeed ZeRO-3 through `accelerate launch` (conf/accelerate/zero3.yaml) trains our DPO loop like one
plain process with the same global batch: same loss curve, same final weights, and the DeepSpeed path
taken (its sharded state saved with the checkpoint). Marker `gpu`: skipped without a CUDA device or
without deepspeed (`pip install 'rlaif-forge[deepspeed]'`); 2 GPUs when there are, else 1.

`zero3_run` is written so that it also runs on CPU with one process (DeepSpeed falls back to gloo; with
more CPU processes accelerate miscounts them and train/distributed.py refuses): `python -m
tests.train.test_distributed_zero3` does that, as a check of this harness on a machine without GPUs.
"""

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
import yaml

from tests.train.test_loops import FAST, compose, state_dict, toy_pairs, write_records
from tests.train.test_loops_distributed import curve, free_port

REPO = Path(__file__).resolve().parents[2]
STEPS, MICRO = 4, 2


def zero3_config(folder: Path, n: int) -> Path:
    """conf/accelerate/zero3.yaml for n local processes in fp32, clipping like the plain run (optim.max_grad_norm)."""
    cfg = yaml.safe_load((REPO / "conf" / "accelerate" / "zero3.yaml").read_text())
    cfg.update(num_processes=n, mixed_precision="no", main_process_port=free_port())
    cfg["deepspeed_config"]["gradient_clipping"] = 1.0
    path = folder / "zero3.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def zero3_run(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """The plain run (one process, batch MICRO x n) in this process, then the ZeRO-3 launch (n processes, MICRO
    each); returns their output folders after checking the launch succeeded."""
    from train.app import run

    data = write_records(tmp_path / "preferences.jsonl", toy_pairs(40))
    common = [*FAST, f"data.path={data}", f"optim.max_steps={STEPS}", "loss=dpo", f"checkpoint.every_steps={STEPS}"]
    one, three = tmp_path / "plain", tmp_path / "zero3"
    run(compose(*common, f"output_dir={one}", f"optim.batch_size={MICRO * n}"))

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher is not None, "the accelerate launcher is not installed"
    cmd = [launcher, "launch", "--config_file", str(zero3_config(tmp_path, n)), "-m", "train", *common]
    cmd += [f"output_dir={three}", f"optim.batch_size={MICRO}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    return one, three


def check_same_training(one: Path, three: Path, n: int) -> tuple[float, float]:
    """Asserts the two runs trained alike; returns (largest relative loss gap, largest weight gap)."""
    summary = json.loads((three / "summary.json").read_text())
    assert summary["samples"] == STEPS * MICRO * n  # every process trained its share of each global batch
    assert (three / "checkpoints" / f"step-{STEPS:08d}" / "accelerate_state").is_dir()  # DeepSpeed's sharded state
    loss_gap = 0.0
    for (s1, l1, _), (s3, l3, _) in zip(curve(one), curve(three), strict=True):
        assert s1 == s3 and l3 == pytest.approx(l1, rel=1e-3, abs=1e-4), (s1, l1, l3)
        loss_gap = max(loss_gap, abs(l3 - l1) / abs(l1))
    plain, sharded = state_dict(one / "final"), state_dict(three / "final")
    assert plain.keys() == sharded.keys()  # the gathered save holds every parameter, whole
    weight_gap = 0.0
    for k, v in plain.items():
        assert sharded[k].shape == v.shape, k
        torch.testing.assert_close(sharded[k].float(), v.float(), rtol=1e-3, atol=1e-4, msg=k)
        weight_gap = max(weight_gap, (sharded[k].float() - v.float()).abs().max().item())
    return loss_gap, weight_gap


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero3_dpo_matches_one_plain_process(tmp_path):
    pytest.importorskip("deepspeed")
    n = min(2, torch.cuda.device_count())
    one, three = zero3_run(tmp_path, n)
    check_same_training(one, three, n)


if __name__ == "__main__":  # the harness on CPU, one process (see the module docstring)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("RLAIF_FORGE_HOME", str(Path(d) / "home"))
        one, three = zero3_run(Path(d), 1)
        loss_gap, weight_gap = check_same_training(one, three, 1)
        print(f"zero3 on CPU (1 process) == plain run: loss rel gap {loss_gap:.2e}, weight gap {weight_gap:.2e}")
