"""The regexes judge steps request (synth/steps/structure.py) admit exactly texts their parsers read."""

from __future__ import annotations

import re

import pytest

from synth.steps import structure
from synth.steps.bpo import parse_optimized
from synth.steps.compare import parse_vote
from synth.steps.judge import parse_listwise, parse_pairwise, parse_rating
from synth.steps.self_reward import parse_score

CASES = [
    (structure.pairwise(64), parse_pairwise, "Reply A answers the question.\n[[A]]", "A"),
    (structure.pairwise(64), parse_pairwise, "[[C]]", "C"),
    (structure.rating(64), parse_rating, "Helpful and correct. Rating: [[10]]", 10.0),
    (structure.ranking(64, 3), parse_listwise, "Two is best.\nRanking: [2] > [3] > [1]", [2, 3, 1]),
    (structure.ranking(64, 7), parse_listwise, "排序：[2] > [3] > [1] > [4] > [5] > [6] > [7]", [2, 3, 1, 4, 5, 6, 7]),
    (structure.score(64), parse_score, "It answers fully.\nScore: 4", 4.0),
    (structure.score(64), parse_score, "得分：0", 0.0),
    (structure.VOTE, parse_vote, "B)", "B"),
]


@pytest.mark.parametrize("regex,parse,text,want", CASES)
def test_every_text_the_grammar_admits_parses(regex, parse, text, want):
    assert structure.matches(regex, text)
    assert parse(text).parsed == want


def test_bpo_format_parses():
    text = "Detailed Comparison Result: the bad one is vague\nOptimized Instruction: Explain how bread rises. [END]"
    assert structure.matches(structure.bpo(128), text)
    assert parse_optimized(text).parsed == {
        "comparison": "the bad one is vague",
        "optimized": "Explain how bread rises.",
    }


def test_the_explanation_is_capped_so_the_verdict_fits_max_new_tokens():
    assert not structure.matches(structure.pairwise(20), "x" * 5 + "[[A]]")  # 20 - 16 = 4 characters
    assert structure.matches(structure.pairwise(20), "x" * 4 + "[[A]]")
    assert not structure.matches(structure.pairwise(64), "see [[B]] below [[A]]")  # no verdict inside the text
    assert not structure.matches(structure.ranking(64, 3), "Ranking: [1] > [1] > [2]")  # k <= 5: permutations only
    assert re.compile(structure.bpo(1))  # tiny budgets still compile
