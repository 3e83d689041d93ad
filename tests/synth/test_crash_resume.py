"""kill -9 at arbitrary moments, then the same command: every input id ends up exactly once.

A real `synth` subprocess talks to the loopback OpenAI-compatible server over HTTP; we SIGKILL it
several times mid-run (between and during chunk commits), then let the last run finish.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from synth.io import LEDGER
from synth.testing.loopback import LoopbackServer

N = 60


def start_synth(out, src, url, tmp_path):
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
        "chunk_size=4",
        "progress=false",
        "llm.max_retries=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def committed_chunks(out):
    p = out / LEDGER
    return p.read_text().count("\n") if p.exists() else 0


@pytest.mark.slow
def test_kill_9_then_resume_gives_exact_once_output(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(N)))
    out = tmp_path / "out"
    with LoopbackServer(
        responder=lambda body: "answer to " + body["messages"][-1]["content"], latency_s=0.05
    ) as server:
        kills = 0
        for wait_chunks in (2, 5, 9):  # kill after different amounts of progress
            proc = start_synth(out, src, server.url, tmp_path)
            deadline = time.time() + 120
            while committed_chunks(out) < wait_chunks and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                time.sleep(0.03 * kills)  # land at a different point inside the next chunk each time
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        assert kills >= 2, "the run finished before it could be killed; make it slower"
        proc = start_synth(out, src, server.url, tmp_path)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == N
    assert all(
        len(r["completions"]) == 2 and r["completions"][0]["text"].startswith("answer to question") for r in rows
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["outputs"] == {"completions": N} and manifest["processed"] == N
    trace_ids = {json.loads(line)["item_id"] for line in (out / "trace.jsonl").read_text().splitlines()}
    assert trace_ids == set(ids)
