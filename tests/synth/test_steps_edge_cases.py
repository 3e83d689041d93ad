"""Edge cases of step parsers that the pipeline tests reach only indirectly: the safety verdict's
category resolution and JSON scanning, and the BPO rewriter's output."""

from __future__ import annotations

import pytest

from synth.steps import bpo, safety_verdict

CATS = ["violence/weapons", "violence/threats", "privacy/doxxing", "crime/threats"]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("violence/weapons", "violence/weapons"),  # the exact path
        (" violence / weapons ", "violence/weapons"),  # spaced slash, padding
        ("doxxing", "privacy/doxxing"),  # a unique L2 name
        ("threats", None),  # an L2 name under two L1s is ambiguous: no guess
        ("weapons/violence", None),  # reversed path
        ("", None),
        (None, None),
        (3, None),
        (["violence/weapons"], None),  # not a string
    ],
)
def test_resolve_category(name, expected):
    assert safety_verdict.resolve_category(name, CATS) == expected


def test_verdict_takes_the_last_json_object_with_a_known_verdict():
    text = (
        'Answer as {"verdict": "safe|unsafe", "category": "..."}. '
        'My answer: {"verdict": "unsafe", "category": "doxxing"} trailing {"note": 1}'
    )
    j = safety_verdict.parse(text, CATS)
    assert j.ok and j.parsed == {"verdict": "unsafe", "category": "privacy/doxxing"}


@pytest.mark.parametrize(
    "text,expected",
    [
        ('{"verdict": "SAFE", "category": "violence/weapons"}', {"verdict": "safe", "category": None}),  # safe drops it
        (
            '{"verdict": "不安全", "category": "violence/weapons"}',
            {"verdict": "unsafe", "category": "violence/weapons"},
        ),
        ('{"verdict": "unsafe", "category": "made up"}', {"verdict": "unsafe", "category": None}),  # unknown category
        ("安全。", {"verdict": "safe", "category": None}),  # a bare verdict word
        ("Unsafe.", {"verdict": "unsafe", "category": None}),
    ],
)
def test_verdict_forms(text, expected):
    j = safety_verdict.parse(text, CATS)
    assert j.ok and j.parsed == expected


@pytest.mark.parametrize("text", ["", "maybe", '{"verdict": "borderline"}', '{"verdict": "unsafe"', "[1, 2]"])
def test_verdict_failures_are_failures_not_defaults(text):
    j = safety_verdict.parse(text, CATS)
    assert not j.ok and j.parsed is None


def test_schema_restricts_the_category_to_the_taxonomy():
    s = safety_verdict.schema(CATS)
    assert s["properties"]["category"]["enum"] == [*CATS, None]
    assert safety_verdict.schema([])["properties"]["category"] == safety_verdict.SCHEMA["properties"]["category"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("How do I bake bread?", "How do I bake bread?"),
        ('"How do I bake bread?" [END] ignored', "How do I bake bread?"),  # cut at [END], quotes stripped
        ("  padded  ", "padded"),
    ],
)
def test_bpo_rewrite(text, expected):
    j = bpo.parse_rewrite(text)
    assert j.ok and j.parsed == expected


@pytest.mark.parametrize("text", ["", "   ", '""', "[END] after the marker only"])
def test_bpo_empty_rewrite_is_a_failure(text):
    j = bpo.parse_rewrite(text)
    assert not j.ok and j.error == "empty rewrite"
