"""kill -9 an `evaluate` run at several points, then rerun the same command: every (prompt, sample) row
ends up exactly once, judged, and a last rerun makes no backend calls."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from synth.io import LEDGER
from synth.testing.loopback import LoopbackServer
from tests.synth.evaluate.scripted import judge_responder

N = 40


def responder(body):
    text = body["messages"][-1]["content"]
    if text.startswith("question"):
        return "I'm sorry, I can't." if text.endswith("3") else "answer to " + text
    return judge_responder(body)


def start(out, src, url, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "synth.evaluate",
        "suite=jsonl",
        f"suite.path={src}",
        "suite.prompt_kind=benign",
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=scripted-policy",
        "llm.max_retries=2",
        "llm.progress=false",
        "judge=openai",
        f"judge.llm.base_url={url}",
        "judge.model.name_or_path=scripted-judge",
        "judge.llm.progress=false",
        "n=2",
        "chunk_size=2",
        "progress=false",
        "bootstrap=100",
        f"output_dir={out}",
    ]
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def chunks(out):
    p = out / LEDGER
    return p.read_text().count("\n") if p.exists() else 0


@pytest.mark.slow
def test_kill_9_then_resume_is_exact_once(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(N)))
    out = tmp_path / "out"
    with LoopbackServer(responder=responder, latency_s=0.02) as server:
        kills = 0
        for wait in (2, 6, 11):
            proc = start(out, src, server.url, tmp_path)
            deadline = time.time() + 120
            while chunks(out) < wait and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                time.sleep(0.02 * kills)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        assert kills >= 2, "the run finished before it could be killed; make it slower"
        proc = start(out, src, server.url, tmp_path)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        seen = len(server.requests)
        proc = start(out, src, server.url, tmp_path)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
        assert len(server.requests) == seen  # a finished rerun makes no backend calls
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 2 * N
    assert {r["prompt_id"] for r in rows} == {f"q{i}" for i in range(N)}
    assert all(r["response"].startswith(("answer to question", "I'm sorry")) for r in rows)
    assert all(r["refusal_raw"] is not None for r in rows)  # every answer was judged once its chunk committed
    assert sum(r["refusal_str"] == "refusal" for r in rows) == 2 * 4  # q3, q13, q23, q33
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["outputs"] == {"results": 2 * N}
    s = json.loads((out / "summary.json").read_text())
    assert s["metrics"]["refusal"]["over_refusal_rate_benign"]["string_match"]["value"] == pytest.approx(0.1)
    assert s["metrics"]["refusal"]["over_refusal_rate_benign"]["string_match"]["ci_method"] == "prompt_bootstrap"
