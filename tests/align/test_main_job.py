"""The main job's recipe settings (`align recipe=cai_rounds preset=small`, conf/preset/recipe/small_cai_rounds.yaml)
end to end, 2 rounds, with the scripted loopback server as policy and judge and model=tiny as the weights that
train: every round red-teams with its own HH seed file, critique-revision revises the answer to every red-team
prompt, and the report carries the string-match refusal columns and the time per stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from synth.align import app
from synth.io import read_jsonl
from synth.sources import parse_hh_dialogue
from tests.align.helpers import REPO, compose_align, ledger
from tests.conftest import SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz").exists(), reason="needs ../shared/data"
    ),
]

SHRINK = {  # after the preset's own stage overrides: a few tokens and steps
    "red_team": ["pipeline.decoding=[{name:t0.7,temperature:0.7,top_p:1.0,max_new_tokens:16}]"],
    "critique_revision": ["pipeline.sampling.max_new_tokens=32"],
    "sft": ["optim.max_steps=2", "optim.batch_size=1", "data.max_length=128"],
    "dpo": ["optim.max_steps=2", "optim.batch_size=1", "data.max_length=128"],
    "evaluate": ["suite.limit=6", "chunk_size=6", "sampling.max_new_tokens=8", "bootstrap=100"],  # one chunk: see note
}


def test_preset_small_runs_two_rounds_on_fresh_seeds_and_revises_every_answer(tmp_path, server):
    out = tmp_path / "main"
    subprocess.run(
        [
            sys.executable,
            "scripts/split_hh.py",
            str(SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"),
            str(out / "seeds"),
            "--rounds",
            "2",
            "--per-round",
            "3",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    raw = compose_align(out, server.url, "cai_rounds", "preset=small")
    assert raw["preset"] == "small" and raw["stop"]["rule"] == "none"
    for stage, extra in SHRINK.items():
        raw["stage_overrides"][stage] += extra
    summary = app.run(raw)
    assert summary["rounds_done"] == 2 and summary["stages_run_now"] == 11

    for k in (1, 2):
        seeds = {parse_hh_dialogue(r["chosen"])[0].content.strip() for r in read_jsonl(out / f"seeds/r{k}.jsonl")}
        prompts = read_jsonl(out / f"rounds/{k}/red_team/prompts.jsonl")
        assert {p["prompt"] for p in prompts} == seeds and all(p["attack_family"] == "seed" for p in prompts)
        answers = read_jsonl(out / f"rounds/{k}/red_team/answers.jsonl")
        assert len(answers) == 3 and {a["verdict"] for a in answers} <= {"safe", "unsafe", None}
        # every red-team answer is revised (SL-CAI), whatever its verdict: it is the rejected side
        prefs = read_jsonl(out / f"rounds/{k}/critique_revision/preferences.jsonl")
        assert {p["rejected"][0]["content"] for p in prefs} == {a["answer"] for a in answers}
        cfg = (out / f"rounds/{k}/red_team/config.yaml").read_text()
        assert "preset: small" in cfg and f"seeds/r{k}.jsonl" in cfg
    r1 = {p["prompt"] for p in read_jsonl(out / "rounds/1/red_team/prompts.jsonl")}
    r2 = {p["prompt"] for p in read_jsonl(out / "rounds/2/red_team/prompts.jsonl")}
    assert not r1 & r2  # round 2 attacks with prompts round 1 never trained on

    ev = yaml.safe_load((out / "rounds/2/evaluate/config.yaml").read_text())
    assert ev["judges"]["harm"] is False and ev["suite"]["name"] == "xstest" and ev["allow_self_judge"] is True
    rep = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    assert all(r["over-refusal (string match)"]["value"] is not None for r in rep["rounds"])
    assert all(r["harmful rate"]["value"] is None for r in rep["rounds"])  # no harm judge in this preset
    md = (out / "report.md").read_text()
    assert "refusal rate, harmful (string match)" in md and "| 2/dpo |" in md  # the time-per-stage table
    clocks = [e["clock"] for e in ledger(out)["stages"].values()]
    assert len(clocks) == 11 and all(c["wall_s"] >= 0 and c["cpu_s"] >= 0 and c["peak_rss_mb"] > 0 for c in clocks)


def test_stage_overrides_and_inputs_name_real_stages(tmp_path, server):
    from synth.errors import ConfigError

    raw = compose_align(tmp_path / "x", server.url, "cai_rounds", "+stage_overrides.redteam=['pipeline.seeds=true']")
    with pytest.raises(
        ConfigError, match=r"stage_overrides.redteam: recipe cai_rounds has no such stage \(valid: red_team"
    ):
        app.run(raw)
    raw = compose_align(tmp_path / "y", server.url, "cai_rounds", "+stage_inputs.sft={data.path:'nowhere/sft.jsonl'}")
    with pytest.raises(ConfigError, match="nowhere/sft.jsonl"):
        app.run(raw)
