"""`align recipe=cai_rounds` end to end, 2 rounds: red-team the round's model, critique-revise, SFT, DPO,
evaluate; the round's model is what the next round red-teams; a finished recipe reruns for free."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from synth.align import app
from synth.io import read_jsonl
from tests.align.helpers import compose_align, ledger

pytestmark = pytest.mark.slow


def policy_models(server, marker: str) -> set[str]:
    """Served model names of the requests whose last message contains `marker`."""
    return {r.body["model"] for r in server.chat_requests() if marker in r.body["messages"][-1]["content"]}


def test_two_rounds_hand_each_round_its_model_and_rerun_is_free(tmp_path, server):
    out = tmp_path / "cai"
    raw = compose_align(out, server.url, "cai_rounds")
    summary = app.run(raw)
    assert summary["rounds_done"] == 2 and summary["stages_run_now"] == 11  # round-0 evaluate + 2 x 5 stages
    led = ledger(out)
    assert set(led["stages"]) == {"0/evaluate"} | {
        f"{k}/{s}" for k in (1, 2) for s in ("red_team", "critique_revision", "sft", "dpo", "evaluate")
    }

    # round k's red team attacks round k-1's model: the target answers name the served model they came from
    r1 = {row["answer"].rsplit(": ", 1)[0] for row in read_jsonl(out / "rounds/1/red_team/answers.jsonl")}
    r2 = {row["answer"].rsplit(": ", 1)[0] for row in read_jsonl(out / "rounds/2/red_team/answers.jsonl")}
    assert r1 == {"answer by builtin:tiny"} and r2 == {"answer by cai_rounds-r1-dpo"}
    assert "cai_rounds-r2-dpo" in policy_models(server, "")  # round 2's evaluate answers with round 2's model

    # in English (constitution safety_en): the attacks, the verdicts and the revisions came from the en templates
    prompts = read_jsonl(out / "rounds/1/red_team/prompts.jsonl")
    assert prompts and all(p["prompt"].startswith("Test prompt about ") for p in prompts)
    assert {p["category"] for p in prompts} == {"crime/drugs", "harm_to_others/privacy"}
    assert policy_models(server, "Reply with one JSON object and nothing else") == {"scripted-judge"}
    assert {a["verdict"] for a in read_jsonl(out / "rounds/1/red_team/answers.jsonl")} == {"safe", "unsafe"}
    sft = read_jsonl(out / "rounds/1/critique_revision/sft.jsonl")
    assert sft and all(r["messages"][-1]["content"].startswith("I can't help with that") for r in sft)

    # the weights: round 2 continues round 1's adapter (SFT then DPO), DPO's reference is the SFT'd model
    cfg_sft2 = (out / "rounds/2/sft/config.yaml").read_text()
    assert f"init_adapter: {out}/rounds/1/dpo/final" in cfg_sft2
    assert f"name_or_path: {out}/rounds/2/dpo.reference" in (out / "rounds/2/dpo/config.yaml").read_text()
    w1 = load_file(out / "rounds/1/dpo/final/adapter_model.safetensors")
    w2 = load_file(out / "rounds/2/dpo/final/adapter_model.safetensors")
    assert any(not (w1[k] == w2[k]).all() for k in w1)

    # the round report: rounds 0..2 from each round's evaluate, win rate vs the previous round, KL, plots
    rep = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    assert rep["rounds"][0]["win rate vs prev"]["value"] is None
    assert all(r["win rate vs prev"]["value"] == 0.5 for r in rep["rounds"][1:])  # first-slot judge: only ties
    assert rep["rounds"][0]["KL to initial (k3)"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert rep["rounds"][2]["KL to initial (k3)"]["value"] > 0
    assert (out / "plots/harm_vs_overrefusal.png").exists() and (out / "plots/win_rate.png").exists()
    assert "finished the 2 round(s) asked" in (out / "report.md").read_text()

    # a finished recipe: no backend call, no training step, same ledger
    seen, before = len(server.requests), (out / "ledger.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("rounds/*/*/final/*")}
    again = app.run(raw)
    assert again["stages_run_now"] == 0 and len(server.requests) == seen
    assert {p: p.stat().st_mtime_ns for p in out.glob("rounds/*/*/final/*")} == mtimes
    assert json.loads((out / "ledger.json").read_text())["stages"] == json.loads(before)["stages"]


def test_win_rate_stop_rule_stops_after_a_round_without_a_significant_win(tmp_path, server, data_dir):
    out = tmp_path / "stop"
    raw = compose_align(
        out,
        server.url,
        "oaif",
        "stop.rule=win_rate",
        "rounds=2",
        f"recipe.data.prompts.path={data_dir / 'prompts.jsonl'}",
    )
    summary = app.run(raw)
    # the scripted evaluate judge always picks slot A: the two orders disagree -> ties -> 0.5, not above 0.5
    assert summary["stopped"]["round"] == 1 and "not above 0.5" in summary["stopped"]["reason"]
    assert not (out / "rounds/2").exists()
    assert "stopped after round 1" in (out / "report.md").read_text()
    raw["stop"]["rule"] = "none"  # asking for every round lifts the stop
    assert app.run(raw)["rounds_done"] == 2
