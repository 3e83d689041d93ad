"""The answer formats judge steps request from the backend (`SamplingParams.regex` / `json_schema`).

A backend that constrains decoding (hf with xgrammar, vLLM) can then only produce text the step's
parser reads, so a small local judge stops failing on format; a backend that cannot constrain ignores
the request and the same parser reads its free text. Each regex is the text format the prompt asks for:

    pairwise      <explanation>[[A]] | [[B]] | [[C]]              (MT-Bench pairwise)
    rubric        <explanation>[[n]], n in 1..10                   (MT-Bench single-answer grading)
    listwise      <explanation>Ranking: [i] > [j] > ...            (a permutation of 1..k when k <= 5)
    self-reward   <justification>Score: n, n in 0..5               (Self-Rewarding's additive prompt)
    meta-judge    <reasoning>Winner: Judgement A | B               (Meta-Rewarding's meta-judge)
    vote          (A) | (B) after the answer stem                  (RLAIF / CAI multiple choice)
    bpo           Detailed Comparison Result: ...\nOptimized Instruction: ... [END]

The explanation may not contain the characters that open the verdict ("[" or the marker's colon), so
the first one the model writes starts the verdict, and its length is capped at `max_new_tokens - 16`
characters: a token is at least one character, so the grammar forces the verdict in time. A verdict cut
off by max_new_tokens anyway (byte-level pieces of CJK text) is a "length" finish and a failure.
"""

from __future__ import annotations

import itertools
import re

_RESERVE = 16  # tokens kept for the verdict itself


def budget(max_new_tokens: int) -> int:
    """Characters allowed before the verdict."""
    return max(0, max_new_tokens - _RESERVE)


def pairwise(max_new_tokens: int) -> str:
    return rf"[^\[\]]{{0,{budget(max_new_tokens)}}}\[\[[ABC]\]\]"


def rating(max_new_tokens: int) -> str:
    return rf"[^\[\]]{{0,{budget(max_new_tokens)}}}\[\[(10|[1-9])\]\]"


def ranking(max_new_tokens: int, k: int) -> str:
    """k <= 5: the k! permutations spelled out, so the ranking is always complete; larger k: k labels
    of 1..k (a repeat is then possible and the parser rejects it)."""
    if k <= 5:
        orders = "|".join(" > ".join(rf"\[{i}\]" for i in perm) for perm in itertools.permutations(range(1, k + 1)))
    else:
        orders = rf"\[\d{{1,2}}\]( > \[\d{{1,2}}\]){{{k - 1}}}"
    return rf"[^\[\]:：]{{0,{budget(max_new_tokens)}}}(Ranking|排序)[:：] ?({orders})"


def score(max_new_tokens: int) -> str:
    return rf"[^:：]{{0,{budget(max_new_tokens)}}}(Score|得分)[:：] ?[0-5]"


def meta_winner(max_new_tokens: int) -> str:
    """The verdict is 19 characters ("Winner: Judgement A"), more than the usual reserve: keep twice it."""
    return rf"[^:：]{{0,{budget(max_new_tokens - _RESERVE)}}}(Winner: Judgement [AB]|胜者[:：] ?评审 [AB])"


VOTE = r" ?[\(（]?[AB][\)）]?"


def bpo(max_new_tokens: int) -> str:
    half = max(1, budget(max_new_tokens) // 2)
    return (
        rf"(Detailed Comparison Result|详细比较结果)[:：] ?[^\[:：]{{0,{half}}}\n"
        rf"(Optimized Instruction|优化后的指令)[:：] ?[^\[]{{1,{half}}} ?\[END\]"
    )


def matches(regex: str, text: str) -> bool:
    """Python's reading of the same regex (tests)."""
    return re.fullmatch(regex, text) is not None
