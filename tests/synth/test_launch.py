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
from tests.synth.openai_server import LoopbackServer
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
