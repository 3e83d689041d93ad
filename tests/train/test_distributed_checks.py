"""train/distributed.py: launches that would silently train otherwise are refused with one line; the
conf/accelerate/ launch configs load in accelerate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from synth.errors import ConfigError
from train.distributed import check_launch, check_sharded_reference, params_sharded, set_deepspeed_batch

REPO = Path(__file__).resolve().parents[2]


def fake(kind: str, procs: int, zero_stage: int | None = None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    return SimpleNamespace(
        distributed_type=SimpleNamespace(value=kind),
        num_processes=procs,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


@pytest.fixture
def env(monkeypatch):
    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_fsdp_asked_but_not_set_up_is_refused(env):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="asked for FSDP but accelerate set up MULTI_CPU"):
        check_launch(fake("MULTI_CPU", 2))  # ACCELERATE_USE_CPU=1: the FSDP plugin is ignored
    with pytest.raises(ConfigError, match="asked for FSDP but accelerate set up NO"):
        check_launch(fake("NO", 1))  # no device: each process trains alone
    check_launch(fake("FSDP", 2))


def test_deepspeed_world_mismatch_is_refused(env):
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes were launched but accelerate reports num_processes=1"):
        check_launch(fake("DEEPSPEED", 1, zero_stage=3))  # what ZeRO-3 through accelerate on CPU reports
    check_launch(fake("DEEPSPEED", 2, zero_stage=3))


def test_plain_ddp_and_single_process_pass(env):
    check_launch(fake("NO", 1))
    env.setenv("WORLD_SIZE", "2")
    check_launch(fake("MULTI_CPU", 2))


def test_reference_updates_refused_under_sharded_parameters():
    assert params_sharded(fake("FSDP", 2)) and params_sharded(fake("DEEPSPEED", 2, 3))
    assert not params_sharded(fake("DEEPSPEED", 2, 2)) and not params_sharded(fake("MULTI_GPU", 2))
    with pytest.raises(ConfigError, match="TR-DPO"):
        check_sharded_reference(fake("FSDP", 2), tr_dpo=True, recompute=False)
    with pytest.raises(ConfigError, match="sDPO / Curry-DPO"):
        check_sharded_reference(fake("DEEPSPEED", 2, 3), tr_dpo=False, recompute=True)
    check_sharded_reference(fake("DEEPSPEED", 2, 2), tr_dpo=True, recompute=True)  # ZeRO-2: parameters whole
    check_sharded_reference(fake("MULTI_GPU", 2), tr_dpo=True, recompute=True)


def test_deepspeed_batch_sizes_are_set_from_the_loop():
    """Our loops prepare no DataLoader, so DeepSpeed's batch keys come from optim.batch_size / grad_accum."""
    acc = fake("DEEPSPEED", 4, zero_stage=3)
    acc.state.deepspeed_plugin.deepspeed_config = {"gradient_accumulation_steps": "auto", "zero_optimization": {}}
    set_deepspeed_batch(acc, micro_batch=2, grad_accum=3)
    conf = acc.state.deepspeed_plugin.deepspeed_config
    assert conf["train_micro_batch_size_per_gpu"] == 2 and conf["gradient_accumulation_steps"] == 3
    assert conf["train_batch_size"] == 2 * 3 * 4
    conf["gradient_accumulation_steps"] = 1
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 but optim.grad_accum=3"):
        set_deepspeed_batch(acc, micro_batch=2, grad_accum=3)
    set_deepspeed_batch(fake("MULTI_GPU", 2), micro_batch=2, grad_accum=3)  # no DeepSpeed: nothing to set


@pytest.mark.parametrize("name", ["ddp_multinode", "fsdp2", "zero2", "zero3"])
def test_accelerate_launch_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml"))
    assert (
        cfg.distributed_type.value
        == {"ddp_multinode": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[name]
    )
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name.startswith("zero"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])


ENTRY = """
from types import SimpleNamespace
from train.loops.common import make_accelerator
acc = make_accelerator(SimpleNamespace(optim=SimpleNamespace(grad_accum=1, mixed_precision="no")))
print("TRAINED AS", acc.distributed_type, acc.num_processes, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("use_cpu", ["1", "0"])
def test_real_accelerate_fsdp_launch_on_cpu_is_refused(tmp_path, use_cpu):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    from tests.train.test_loops_distributed import free_port

    (tmp_path / "entry.py").write_text(ENTRY)
    env = {**os.environ, "ACCELERATE_USE_CPU": use_cpu, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        launcher,
        "launch",
        "--use_fsdp",
        "--fsdp_version",
        "2",
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
        "entry.py",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert "TRAINED AS" not in out, out
    assert "asked for FSDP" in err, err[-2000:]


@pytest.fixture(scope="module")
def loop_files(tmp_path_factory):
    from tests.train.test_loops import toy_pairs, toy_ranked, write_records

    d = tmp_path_factory.mktemp("zero3_refusals")
    return {
        "pairs": write_records(d / "preferences.jsonl", toy_pairs(24)),
        "ranked": write_records(d / "ranked.jsonl", toy_ranked(16)),
    }


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("tr_dpo", ["loop.reference.update=tr_dpo_soft"], "TR-DPO"),
        ("sdpo", ["loop.sdpo_stages=2"], "sDPO / Curry-DPO"),
        ("curry", ["loop.curriculum=curry"], "sDPO / Curry-DPO"),
        ("dpo", [], None),
    ],
)
def test_the_preference_loop_refuses_reference_updates_when_parameters_are_sharded(
    loop_files, tmp_path, monkeypatch, name, overrides, message
):
    """The real loop under a launch that shards the parameters (FSDP / ZeRO-3, made to look so here):
    TR-DPO, sDPO and Curry-DPO refuse before the first step; plain DPO (one precomputed reference) trains."""
    import train.distributed
    from tests.train.test_loops import train as run_train

    monkeypatch.setattr(train.distributed, "params_sharded", lambda accelerator: True)
    data = loop_files["ranked" if name == "curry" else "pairs"]
    args = [f"data.path={data}", "optim.batch_size=4", "optim.max_steps=1", *overrides]
    if message is None:
        assert run_train(tmp_path, *args)["steps"] == 1
        return
    with pytest.raises(ConfigError, match=message):
        run_train(tmp_path, *args)
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()
