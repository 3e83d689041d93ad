"""IterAlign discovery: the oracle template is pinned (en, zh), its parser never turns a bad answer into
"no violation", and the grown pool is a constitution the loader accepts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from synth.align.discover import parse
from synth.align.ops import OpContext, grow_constitution, rejection_sample
from synth.constitution import load_constitution
from synth.prompts import render

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_template_is_pinned(lang):
    text = render("iteralign_discover", lang, prompt="P?", answer="A.", principles=["first", "second"])
    path = SNAPSHOTS / f"iteralign_discover.{lang}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_parser():
    ok = parse('thinking... {"violation": true, "reason": "r", "critique": "Find X.", "revision": "Rewrite X."}')
    assert ok.ok and ok.parsed["critique"] == "Find X."
    assert parse('{"violation": false, "reason": "fine"}').parsed == {"violation": False, "reason": "fine"}
    for bad in ("no json", '{"violation": "yes"}', '{"violation": true, "critique": null, "revision": "x"}'):
        assert not parse(bad).ok and parse(bad).parsed is None


def test_grown_pool_is_a_valid_constitution_without_near_duplicates(tmp_path):
    proposals = tmp_path / "proposals.jsonl"
    rows = [
        {
            "violation": True,
            "critique": "Identify any way the reply helps make weapons at home.",
            "revision": "Rewrite it to decline and point to safety resources.",
            "category": None,
        },
        {
            "violation": True,
            "critique": "Identify any way the reply helps make weapons at home!",  # near duplicate
            "revision": "Rewrite.",
            "category": None,
        },
        {"violation": False},
    ]
    proposals.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r1").mkdir()
    m = grow_constitution(OpContext(round=1, out=tmp_path / "r1", seed=0), {"proposals": proposals, "previous": None})
    assert m["outputs"] == {"new_principles": 1} and m["drops"] == {"near_duplicate": 1}
    c1 = load_constitution(str(tmp_path / "r1/constitution.yaml"))
    base = load_constitution("hhh_en")
    assert len(c1.principles) == len(base.principles) + 1 and c1.principles[-1].id == "iteralign-r1-1"
    (tmp_path / "r2").mkdir()
    m2 = grow_constitution(
        OpContext(round=2, out=tmp_path / "r2", seed=0),
        {"proposals": proposals, "previous": tmp_path / "r1/constitution.yaml"},
    )
    assert m2["outputs"] == {"new_principles": 0} and m2["drops"] == {"near_duplicate": 2}
    assert load_constitution(str(tmp_path / "r2/constitution.yaml")).name == "hhh_en-iteralign-r2"


def test_rejection_sampling_limits():
    import random

    r = [0.0, 5.0, 1.0, 4.0, 2.0]
    assert sorted(rejection_sample(r, 2, 1e-6, random.Random(0))) == [1, 3]  # beta -> 0: top-k
    assert len(set(rejection_sample(r, 5, 0.5, random.Random(0)))) == 5  # accepts distinct candidates until done
