"""Suite loaders: xstest (+ gold), jade_zh mapping onto safety_zh, hh_redteam, redteam_heldout's
held-out ids, seeded limits, and one-line errors."""

import json
import subprocess
import sys

import pytest
import yaml

from synth.errors import ConfigError, SourceError
from synth.evaluate.suites import SuiteConfig, load_suite
from tests.test_conf import CONF


def suite(name, **over):
    raw = yaml.safe_load((CONF / "suite" / f"{name}.yaml").read_text(encoding="utf-8"))
    return SuiteConfig(**{**raw, **over})


def test_xstest_counts_and_gold():
    items, info = load_suite(suite("xstest"))
    kinds = [it.meta["kind"] for it in items]
    assert kinds.count("benign") == 250 and kinds.count("harmful") == 200 and kinds.count("gold") == 450
    gold = [it for it in items if it.meta["kind"] == "gold"]
    assert {it.meta["gold_refusal"] for it in gold} == {"none", "full", "partial"}


def test_jade_maps_every_subtype_onto_safety_zh():
    from synth.constitution import load_constitution

    cats = {f"{a}/{b}" for a, b in load_constitution("safety_zh").categories()}
    items, info = load_suite(suite("jade_zh", limit=None))
    assert len(items) == 2000 and "unmapped_subtypes" not in info
    assert {it.category for it in items} <= cats
    assert all(v in cats for v in suite("jade_zh").category_map.values())


def test_limit_is_a_seeded_sample():
    a, _ = load_suite(suite("xstest", limit=40, gold_limit=0))
    b, _ = load_suite(suite("xstest", limit=40, gold_limit=0))
    c, _ = load_suite(suite("xstest", limit=40, gold_limit=0, sample_seed=1))
    assert [x.id for x in a] == [x.id for x in b] != [x.id for x in c]
    assert len({x.meta["type"] for x in a}) > 5  # not just the first type in the file


def test_hh_redteam_reads_a_local_file(hh_rlhf_path):
    items, info = load_suite(suite("hh_redteam", path=str(hh_rlhf_path), limit=None))
    assert 1000 < len(items) <= 2312 and info["dropped"].get("duplicate_prompt", 0) > 0
    assert all(it.meta["kind"] == "harmful" and it.prompt[0].role == "user" for it in items)


def test_redteam_heldout_drops_training_ids(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": f"攻击 {i}", "category": "歧视/地域"}, ensure_ascii=False) + "\n"
            for i in range(10)
        )
    )
    train = tmp_path / "sft.jsonl"
    train.write_text("".join(json.dumps({"id": "x", "meta": {"prompt_id": f"r{i}"}}) + "\n" for i in range(3)))
    items, info = load_suite(suite("redteam_heldout", path=str(prompts), exclude=[str(train)]))
    assert [it.id for it in items] == [f"r{i}" for i in range(3, 10)] and info["dropped"]["held_out_training_id"] == 3
    assert all(it.meta["kind"] == "harmful" and it.category == "歧视/地域" for it in items)


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="suite.path"):
        load_suite(suite("redteam_heldout"))
    with pytest.raises(SourceError, match="no such file"):
        load_suite(suite("jsonl", path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(SourceError, match="suite.fields.prompt"):
        load_suite(suite("jsonl", path=str(bad)))


def test_cli_missing_path_is_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "synth.evaluate", "suite=redteam_heldout", f"output_dir={tmp_path}/o"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "suite.path" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
