"""Launchers (synth/launch/) and the command-line paths of sharding: the rendered sbatch scripts
(snapshot), `synth-merge` refusing unfinished shards with one line, and kill -9 inside a shard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.io import LEDGER
from synth.launch import SlurmLauncher
from synth.launch.slurm import _array_spec, render
from synth.shard import Shard
from synth.testing.loopback import LoopbackServer
from tests.synth.snapshot_check import assert_snapshot

N = 48


def test_array_spec_compresses_runs():
    assert _array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and _array_spec([3]) == "3"


def test_rendered_sbatch_scripts_snapshot():
    lc = SlurmLauncher(
        shards=64,
        concurrent=16,
        partition="gpu",
        account="alignment",
        gpus_per_task=0,
        setup=["source /shared/venv/bin/activate"],
        sbatch=["--qos=normal"],
        command="synth",
    )
    overrides = [
        "pipeline=critique_revision",
        "llm=openai",
        "llm.base_url=[http://node1:8000/v1,http://node2:8000/v1]",
        "source=jsonl",
        "source.path=/data/prompts.jsonl",
        "output_dir=/scratch/run1",
        "llm.max_concurrency=32",
    ]
    files = render(
        lc, overrides, [i for i in range(64) if i not in (7, 8)], Path("/scratch/run1/slurm"), Path("/home/u")
    )
    text = "".join(f"==> {name} <==\n{body}" for name, body in sorted(files.items()))
    assert "--array=0-6,9-63%16" in files["shards.sbatch"]
    assert '"shard=${SLURM_ARRAY_TASK_ID}/64"' in files["shards.sbatch"]
    assert "--dependency=afterany:" in files["submit.sh"] and "merge=true" in files["merge.sbatch"]
    assert_snapshot("slurm_launcher", "sh", text)


FAKE_SBATCH = """#!PYTHON
# a stand-in for Slurm's sbatch: records its argv, cwd and the script's #SBATCH lines, answers like sbatch
import json, os, sys
log = os.environ["FAKE_SBATCH_LOG"]
calls = open(log).read().count("\\n") if os.path.exists(log) else 0
script = sys.argv[-1]
if os.environ.get("FAKE_SBATCH_FAIL"):
    print("sbatch: error: Batch job submission failed: Invalid account or account/partition", file=sys.stderr)
    sys.exit(1)
header = [x.strip() for x in open(script) if x.startswith("#SBATCH")]
with open(log, "a") as fh:
    fh.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "sbatch": header}) + "\\n")
job = 1001 + calls
print(f"{job};testcluster" if "--parsable" in sys.argv else f"Submitted batch job {job}")
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.replace("PYTHON", sys.executable, 1))
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))
    return lambda: [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def slurm_cfg(out: Path):
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(out))


def test_submit_runs_sbatch_for_the_array_then_the_merge_that_depends_on_it(tmp_path, fake_sbatch, capsys):
    from synth.launch.slurm import run_slurm

    out = tmp_path / "out"
    done = Shard(2, 4).folder(out)  # a finished shard is left out of the array
    done.mkdir(parents=True)
    (done / "manifest.json").write_text(json.dumps({"status": "finished"}))
    lc = SlurmLauncher(shards=4, concurrent=2, submit=True)
    result = run_slurm(slurm_cfg(out), lc, ["pipeline=generate", f"output_dir={out}"])

    script_dir = str(out / "slurm")
    array, merge = fake_sbatch()
    assert array["argv"] == ["--parsable", "shards.sbatch"] and array["cwd"] == script_dir
    assert "#SBATCH --array=0-1,3%2" in array["sbatch"]
    assert merge["argv"] == ["--parsable", "--dependency=afterany:1001", "merge.sbatch"] and merge["cwd"] == script_dir
    assert not any(x.startswith("#SBATCH --array") for x in merge["sbatch"])
    assert result["jobs"] == {"array": "1001", "merge": "1002"} and result["shards_to_run"] == [0, 1, 3]
    assert "submitted 3 shards as array job 1001, merge as job 1002 (after the array)" in capsys.readouterr().out


def test_submit_reports_sbatch_refusals_and_a_missing_sbatch_in_one_line(tmp_path, fake_sbatch, monkeypatch):
    from synth.errors import BackendError
    from synth.launch.slurm import run_slurm

    lc = SlurmLauncher(shards=2, submit=True)
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "1")
    with pytest.raises(
        BackendError, match="^sbatch failed: sbatch: error: Batch job submission failed: Invalid account"
    ):
        run_slurm(slurm_cfg(tmp_path / "out"), lc, ["pipeline=generate"])
    assert fake_sbatch() == []  # the merge was never submitted without its array
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BackendError, match="sbatch is not on PATH"):
        run_slurm(slurm_cfg(tmp_path / "out"), lc, ["pipeline=generate"])


@pytest.mark.slow
def test_rendered_scripts_run_as_slurm_would_run_them(tmp_path, fake_sbatch):
    """Each array task runs shards.sbatch with its SLURM_ARRAY_TASK_ID in --chdir, then merge.sbatch:
    the rendered command lines work (quoting, relative paths) and the merge is exact-once."""
    from synth.launch.slurm import run_slurm

    work = tmp_path / "work"
    work.mkdir()
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(12)))
    reply = lambda body: "answer to " + body["messages"][-1]["content"]  # noqa: E731
    with LoopbackServer(responder=reply) as server:
        overrides = [
            "pipeline=generate",
            "llm=openai",
            f"llm.base_url=[{server.url}]",
            "model.name_or_path=scripted",
            "source=jsonl",
            "source.path=prompts.jsonl",  # relative: the jobs start in --chdir
            "output_dir=out",
        ]
        repo = Path(__file__).resolve().parents[2]
        lc = SlurmLauncher(
            shards=2, submit=True, command=f"{sys.executable} -m synth", setup=[f"export PYTHONPATH={repo}"]
        )
        old = Path.cwd()
        os.chdir(work)
        try:
            run_slurm(slurm_cfg(work / "out"), lc, overrides)
        finally:
            os.chdir(old)
        array, merge = fake_sbatch()
        script_dir = Path(array["cwd"])
        chdir = next(x.split("=", 1)[1] for x in array["sbatch"] if x.startswith("#SBATCH --chdir="))
        for task in (0, 1):  # what Slurm does with --array=0-1
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task)}
            job = subprocess.run(
                ["bash", str(script_dir / "shards.sbatch")], cwd=chdir, env=env, capture_output=True, text=True
            )
            assert job.returncode == 0, job.stderr[-2000:]
        job = subprocess.run(["bash", str(script_dir / "merge.sbatch")], cwd=chdir, capture_output=True, text=True)
        assert job.returncode == 0, job.stderr[-2000:]
    rows = [json.loads(x) for x in (work / "out" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == 12
    assert json.loads((work / "out" / "manifest.json").read_text())["merged"] is True


def start_synth(out, src, url, cwd, *extra):
    cmd = [
        sys.executable,
        "-m",
        "synth",
        "pipeline=generate",
        "pipeline.n=2",
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=scripted",
        "source=jsonl",
        f"source.path={src}",
        f"output_dir={out}",
        "chunk_size=2",
        "progress=false",
        "llm.max_retries=2",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def committed(folder: Path) -> int:
    p = folder / LEDGER
    return p.read_text().count("\n") if p.exists() else 0


@pytest.mark.slow
def test_kill_9_inside_a_shard_then_rerun_and_merge(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(N)))
    out = tmp_path / "out"
    reply = lambda body: "answer to " + body["messages"][-1]["content"]  # noqa: E731
    with LoopbackServer(responder=reply, latency_s=0.05) as server:
        proc = start_synth(out, src, server.url, tmp_path, "shard=0/2")
        assert proc.wait(timeout=300) == 0
        merge = subprocess.run(
            [sys.executable, "-m", "synth.merge", f"output_dir={out}"], capture_output=True, text=True, cwd=tmp_path
        )
        assert merge.returncode == 2 and merge.stderr.count("\n") == 1 and "shards 1/2 missing" in merge.stderr

        shard = Shard(1, 2).folder(out)
        kills = 0
        for wait_chunks in (2, 4):  # kill -9 the shard's process mid-run, at two points
            # one chunk at a time, so the kill points fall mid-run (auto would put every chunk in flight at once)
            proc = start_synth(out, src, server.url, tmp_path, "shard=1/2", "chunks_in_flight=1")
            deadline = time.time() + 120
            while committed(shard) < wait_chunks and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                time.sleep(0.02 * kills)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        assert kills >= 1, "the shard finished before it could be killed; make it slower"
        merge = subprocess.run(
            [sys.executable, "-m", "synth.merge", f"output_dir={out}"], capture_output=True, text=True, cwd=tmp_path
        )
        assert merge.returncode == 2 and "shard 1/2 is 'running', not finished" in merge.stderr
        proc = start_synth(out, src, server.url, tmp_path, "shard=1/2")
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        assert json.loads((shard / "manifest.json").read_text())["resumed_from_previous_runs"] > 0
        proc = start_synth(out, src, server.url, tmp_path, "merge=true")
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == N
    trace_ids = {json.loads(x)["item_id"] for x in (out / "trace.jsonl").read_text().splitlines()}
    assert trace_ids == {r["id"] for r in rows}
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["processed"] == N and m["outputs"] == {"completions": N}
