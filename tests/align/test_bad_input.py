"""Bad input stops `align` with one line: unknown tools, ops, pipelines and references list the valid
names; a stage that produced 0 rows is named with its manifest's drop reasons and nothing trains on it;
changed settings between rounds are refused unless forced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synth.align import app
from synth.errors import ConfigError, DataError
from tests.align.helpers import compose_align, ledger
from tests.align.scripted import responder

REPO = Path(__file__).resolve().parents[2]


def with_stage(raw, i, **changes):
    raw["recipe"]["stages"][i].update(changes)
    return raw


@pytest.mark.parametrize(
    "change,match",
    [
        ({"tool": "shell"}, r"unknown tool 'shell' \(valid: synth, train, evaluate, op\)"),
        (
            {"tool": "op", "op": "magic", "overrides": []},
            r"unknown op 'magic' \(valid: c_dpo_dual, c_dpo_relabel, grow_constitution, raft_select, rso_pairs, "
            r"spin_pairs\)",
        ),
        (
            {"overrides": ["pipeline=nope"]},
            r"stage red_team: unknown pipeline 'nope' \(valid: .*critique_revision.*red_team",
        ),
        ({"inputs": {"source": "later/unsafe.jsonl"}}, r"names no earlier stage \(valid: none"),
    ],
)
def test_unknown_names_list_the_valid_ones_before_anything_runs(tmp_path, change, match):
    raw = with_stage(compose_align(tmp_path / "x", "http://127.0.0.1:9/v1", "cai_rounds"), 0, **change)
    with pytest.raises(ConfigError, match=match):
        app.run(raw)
    assert not (tmp_path / "x" / "ledger.json").exists()


def test_a_self_judged_win_rate_is_refused_before_round_one(tmp_path):
    raw = compose_align(tmp_path / "x", "http://127.0.0.1:9/v1", "cai_rounds", "judge=policy")
    with pytest.raises(ConfigError, match=r"stage evaluate: the win rate .* judged by the policy itself"):
        app.run(raw)
    assert not (tmp_path / "x" / "rounds").exists()


def test_unknown_loss_in_a_later_stage_fails_at_start(tmp_path):
    raw = compose_align(tmp_path / "x", "http://127.0.0.1:9/v1", "cai_rounds")
    raw["recipe"]["stages"][3]["overrides"].append("loss=nope")
    with pytest.raises(ConfigError, match=r"stage dpo: unknown loss 'nope' \(valid: .*dpo.*ipo"):
        app.run(raw)


def test_a_stage_with_zero_rows_stops_the_recipe_naming_it_and_its_drops(tmp_path, make_server, data_dir):
    def parrot(body):  # the policy answers with the ground truth itself: SPIN has no pair to learn from
        text = body["messages"][-1]["content"]
        if text.startswith("Tell me about item "):
            return f"Item {text.split()[-1].rstrip('.')} is a thing."
        return responder(body)

    server = make_server(parrot)
    out = tmp_path / "spin"
    raw = compose_align(out, server.url, "spin", "no_evaluate", f"recipe.data.sft.path={data_dir / 'sft_pairs.jsonl'}")
    with pytest.raises(
        DataError,
        match=r"round 1, stage pairs produced 0 rows in preferences.jsonl \(4 input\(s\); "
        r"drop/generation_equals_ground_truth=4\)",
    ):
        app.run(raw)
    assert not (out / "rounds/1/dpo").exists()  # nothing trained on an empty file
    assert set(ledger(out)["stages"]) == {"1/generate", "1/pairs"}


@pytest.mark.slow
def test_changed_settings_between_rounds_are_refused_unless_forced(tmp_path, server, data_dir):
    out = tmp_path / "oaif"
    args = ("no_evaluate", f"recipe.data.prompts.path={data_dir / 'prompts.jsonl'}")
    app.run(compose_align(out, server.url, "oaif", "rounds=1", *args))
    changed = compose_align(out, server.url, "oaif", "rounds=2", *args)
    changed["recipe"]["stages"][0]["overrides"].append("loss.fn.beta=0.2")
    with pytest.raises(ConfigError, match=r"settings changed since round\(s\) 1 ran .*force=true"):
        app.run(changed)
    assert set(ledger(out)["stages"]) == {"1/online_dpo"}
    changed["force"] = True
    assert app.run(changed)["stages_run_now"] == 1
    led = ledger(out)
    assert len(led["history"]) == 1 and led["history"][0]["until"] == "1" and "2/online_dpo" in led["stages"]
    assert "beta: 0.2" in (out / "rounds/2/online_dpo/config.yaml").read_text()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "synth.align", "recipe=spin", f"output_dir={tmp_path / 'x'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: missing required value(s): recipe.data.sft.path (set them on the command line, e.g. "
        "recipe.data.sft.path=...)"
    ]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "synth.align",
            "recipe=cai_rounds",
            "recipe.stages.1.overrides=['pipeline=nope']",
            f"output_dir={tmp_path / 'x'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "stage critique_revision: unknown pipeline 'nope' (valid: ai_feedback, bpo" in p.stderr
