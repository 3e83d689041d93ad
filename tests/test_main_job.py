"""The main job's in-process variant (`bash scripts/demo.sh local`) end to end on model=tiny: red
teaming on HH seed prompts -> critique-revision of the answers judged unsafe -> DPO (LoRA) -> evaluate before/after on
held-out HH red-team and XSTest prompts -> the one-screen table. The red-team judge is a scripted
loopback server that calls every answer unsafe, so the later stages always have data (the tiny model's
own verdicts are random); everything else is the tiny model in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth.testing.loopback import LoopbackServer
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "eval" / "xstest_prompts.csv").exists(), reason="needs ../shared/data")
def test_local_main_job_stages_on_tiny(tmp_path):
    verdict = '{"verdict": "unsafe", "category": "crime/drugs"}'
    out = tmp_path / "main"
    with LoopbackServer(responder=lambda body: verdict) as server:
        red_team = " ".join(
            [
                "pipeline.decoding=[{name:greedy,temperature:0.0,max_new_tokens:8},{name:hot,temperature:1.0,max_new_tokens:8}]",
                f"judge=openai judge.llm.base_url={server.url} judge.model.name_or_path=scripted "
                "judge.llm.progress=false",
            ]
        )
        env = {
            **os.environ,
            "DEMO_NO_VENV": "1",
            "MODEL": "tiny",
            "OUT": str(out),
            "DATA": str(SHARED_DATA),
            "N_SEEDS": "4",
            "N_EVAL": "4",
            "DPO_STEPS": "2",
            "DPO_BATCH": "1",
            "EVAL_TOKENS": "8",
            "RED_TEAM_EXTRA": red_team,
            "OMP_NUM_THREADS": "1",
            "CAI_EXTRA": 'pipeline.sampling.max_new_tokens=24 pipeline.sampling.stop=["e"] pipeline.sampling.seed=0',
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        proc = subprocess.run(
            ["bash", "scripts/demo.sh", "local"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    unsafe = [json.loads(x) for x in (out / "red_team" / "unsafe.jsonl").read_text().splitlines()]
    prefs = [json.loads(x) for x in (out / "critique_revision" / "preferences.jsonl").read_text().splitlines()]
    assert unsafe and prefs
    seeds = {json.loads(x)["prompt"] for x in (out / "red_team" / "prompts.jsonl").read_text().splitlines()}
    held_out = [json.loads(x) for x in (out / "eval" / "hh" / "after" / "results.jsonl").read_text().splitlines()]
    assert len(seeds) == 4 and len(held_out) == 4
    assert not seeds & {r["prompt"] for r in held_out}  # no evaluation prompt was a red-team seed
    given = {u["prompt"]: u["answer"] for u in unsafe}
    for p in prefs:  # the rejected answer is the red-team answer judged unsafe
        assert p["rejected"][0]["content"] == given[p["prompt"][-1]["content"]]
    assert (out / "dpo" / "final" / "adapter_config.json").exists()
    stages = [json.loads(x)["stage"] for x in (out / "stages.jsonl").read_text().splitlines()]
    assert stages == [
        "red_team",
        "critique_revision",
        "dpo",
        "eval_hh_before",
        "eval_hh_after",
        "eval_xstest_before",
        "eval_xstest_after",
    ]
    after = json.loads((out / "eval" / "hh" / "after" / "summary.json").read_text())
    assert after["metrics"]["scores"]["kl_k3"]["n"] == 4  # KL to the start model on every held-out answer
    report = (out / "main_job.md").read_text()
    assert (
        "| refusal rate, HH red-team held-out (harmful) |" in report
        and "| over-refusal, XSTest safe prompts |" in report
    )
    assert "| total |" in report and report in proc.stdout  # the last lines print the table
