"""preset=<size> (conf/preset/), the estimate printed before a run, and one-line ConstitutionErrors at
start-up when a constitution lacks what a pipeline needs (no folder, no config.yaml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from synth.app import build_pipeline, run
from synth.constitution import load_constitution
from synth.errors import ConstitutionError
from synth.pipelines.base import print_estimate
from tests.synth.test_cli import compose


def pipeline_of(*overrides):
    from omegaconf import OmegaConf

    cfg = compose(*overrides, "output_dir=/tmp/unused")
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_preset_changes_nothing():
    for name in ("critique_revision", "red_team", "generate", "ai_feedback"):
        assert (
            pipeline_of(f"pipeline={name}")["pipeline"] == pipeline_of(f"pipeline={name}", "preset=default")["pipeline"]
        )


def test_small_preset_sets_tokens_rounds_few_shot_temperature_and_the_command_line_wins():
    cfg = pipeline_of("pipeline=critique_revision", "preset=small")
    p = cfg["pipeline"]
    assert cfg["preset"] == "small"
    assert (p["rounds"], p["few_shot"], p["sampling"]["temperature"], p["sampling"]["max_new_tokens"]) == (
        1,
        False,
        0.7,
        256,
    )
    assert p["near_identical"] == 0.9 and p["initial"] == "given"  # untouched keys stay
    build_pipeline(p)  # still a valid pipeline config
    p = pipeline_of("pipeline=critique_revision", "preset=small", "pipeline.rounds=3")["pipeline"]
    assert p["rounds"] == 3 and p["few_shot"] is False
    rt = pipeline_of("pipeline=red_team", "preset=small")["pipeline"]
    assert rt["prompts_per_item"] == 1 and [d["name"] for d in rt["decoding"]] == ["greedy", "t0.7_p1.0"]
    assert rt["attacker_sampling"]["max_new_tokens"] == 64 and rt["judge_sampling"]["temperature"] == 0.0
    build_pipeline(rt)
    # a pipeline without a small_<name>.yaml keeps its own settings under preset=small
    assert pipeline_of("pipeline=bpo", "preset=small")["pipeline"] == pipeline_of("pipeline=bpo")["pipeline"]


def test_estimate_bounds_the_work_and_is_printed(capsys):
    rt = build_pipeline(pipeline_of("pipeline=red_team", "preset=small")["pipeline"])
    # 10 items: 10 attacker requests, <= 10 prompts x 2 settings answers + as many verdicts
    assert rt.estimate(10) == {"requests": 10 + 2 * 20, "new_tokens": 10 * (64 + 96 + 96) + 20 * 96}
    cai = build_pipeline(pipeline_of("pipeline=critique_revision")["pipeline"])
    assert cai.estimate(5) == {"requests": 5 * 9, "new_tokens": 5 * 9 * 1500}  # 4 rounds, 1,500 tokens: the defaults
    print_estimate(cai, 5)
    assert (
        capsys.readouterr().out.strip()
        == "== critique_revision: 5 inputs to do; at most 45 requests and 67,500 new tokens"
    )


def test_safety_en_is_an_english_taxonomy_in_safety_zh_shape():
    c = load_constitution("safety_en")
    assert c.language == "en" and len(c.taxonomy) == 6 and len(c.categories()) == 15
    paths = {f"{a}/{b}" for a, b in c.categories()}
    assert all(c.principles_for(p) for p in paths)  # every category has a principle
    assert all(p.judge for p in c.principles)
    assert all(c.taxonomy_category(p).red_team and c.taxonomy_category(p).description for p in paths)
    assert {ex.needs_change for ex in c.few_shot} == {True, False}


def test_red_team_without_a_taxonomy_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConstitutionError, match="constitution=hhh_en has none; use constitution=safety_en"):
        run(compose("pipeline=red_team", "constitution=hhh_en", f"output_dir={out}"))
    assert not out.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "synth", "pipeline=red_team", "constitution=hhh_en", f"output_dir={out}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and "safety_en" in err[0]
    assert not out.exists()  # no folder, so no stray config.yaml


def test_ai_feedback_without_judge_questions_is_one_line(tmp_path):
    mine = tmp_path / "nojudge.yaml"
    mine.write_text(
        "name: nojudge\nlanguage: en\ndescription: d\nprinciples:\n"
        "  - {id: a, category: c, critique: find problems, revision: fix them}\n"
    )
    out = tmp_path / "o"
    with pytest.raises(ConstitutionError, match="constitution=nojudge has none"):
        run(
            compose(
                "pipeline=ai_feedback",
                f"constitution={mine}",
                "source=jsonl",
                f"source.path={tmp_path}/x.jsonl",
                f"output_dir={out}",
            )
        )
    assert not out.exists()
