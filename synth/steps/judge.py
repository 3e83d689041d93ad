"""Judging steps for `pipeline=judge` (MT-Bench protocols, Zheng et al. 2023, arXiv 2306.05685;
lm-sys/FastChat fastchat/llm_judge): pairwise in both orders, listwise over a shuffled list, and pointwise
rubric grading with m samples averaged.

Pairwise follows MT-Bench's conservative swap rule: every pair is asked as (i, j) and as (j, i) in the same
batched call, and i wins only when both orders say so; disagreement is a tie. With `logprobs`, the verdict is
read from the A/B token probabilities at a prefilled "[[" stem and the two orders are averaged, p(i ≻ j) =
½(q_ij(A) + q_ji(B)) (RLAIF's position-debiased label, Lee et al. 2023, arXiv 2309.00267, §2.1.1), with a tie
band around 0.5. Parse failures are recorded and never become a winner or a score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Completion, Message, ParseResult, SourceItem
from synth.runtime import ChunkState, Context
from synth.steps import structure
from synth.steps.base import Call, Sample, assistant, run_calls, user
from synth.steps.candidates import Candidate
from synth.steps.compare import parse_logprobs
from synth.steps.orders import combine_verdicts

PREFILL = "[["  # answer stem for log-prob verdicts; the next token is A or B


def conversation(prompt: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in prompt]


# --------------------------------------------------------------------------- pairwise


def build_pairwise(language: str, prompt: Sequence[Message], a: str, b: str, direct: bool = False) -> list[Message]:
    text = render(
        "judge_pairwise", language, conversation=conversation(prompt), response_a=a, response_b=b, direct=direct
    )
    return [user(text), assistant(PREFILL)] if direct else [user(text)]


_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_pairwise(text: str) -> ParseResult:
    """The LAST `[[A]]` / `[[B]]` / `[[C]]` (an explanation may quote the format before the verdict)."""
    found = _VERDICT.findall(text)
    if not found:
        return ParseResult(raw=text, error="no [[A]], [[B]] or [[C]] verdict")
    return ParseResult(raw=text, parsed=found[-1], parse_status="ok")


def read_ab_logprobs(comp: Completion) -> ParseResult:
    """P(A) vs P(B) from the first generated token's top log-probs, read exactly as RL-CAI's
    comparisons read them (`compare.parse_logprobs`: " A", "A", "A]]" all count as A; one letter
    missing from the top-k gets the smallest listed log-prob, flagged `bounded`; neither letter is a
    failure, never 50/50)."""
    j = parse_logprobs(comp)
    if not j.ok:
        return j
    p_a = j.parsed["p_a"]
    return ParseResult(
        raw=comp.text, parsed={"A": p_a, "B": 1.0 - p_a, "bounded": j.parsed["bounded"]}, parse_status="ok"
    )


@dataclass
class PairResult:
    """One comparison of candidates i and j after both orders. `winner` is "i", "j", "tie", or None
    when either order failed to parse; `verdicts` are the raw slot verdicts of order (i,j) and (j,i)."""

    item: SourceItem
    i: Candidate
    j: Candidate
    verdicts: tuple[str | None, str | None]
    winner: str | None
    p_i: float | None = None


def combine_probs(p_ij: float, p_ji: float, tie_band: float) -> tuple[float, str]:
    """p(i ≻ j) averaged over both orders; inside 0.5 ± tie_band it is a tie."""
    p = 0.5 * (p_ij + p_ji)
    return p, ("i" if p > 0.5 + tie_band else "j" if p < 0.5 - tie_band else "tie")


def _slot_verdict(j: ParseResult) -> str | None:
    if not j.ok:
        return None
    if isinstance(j.parsed, dict):
        return "A" if j.parsed["A"] > 0.5 else "B" if j.parsed["A"] < 0.5 else "C"
    return j.parsed


def _usable(s: Sample, logprobs: bool) -> ParseResult:
    """A truncated text verdict is not trusted (a cut-off explanation may quote the format); a log-prob
    read stops after one token by design, so its "length" finish is expected."""
    if logprobs or not s.completion.truncated:
        return s.result
    return ParseResult(raw=s.text, error="truncated")


def judge_pairs(
    ctx: Context,
    state: ChunkState,
    jobs: Sequence[tuple[SourceItem, Candidate, Candidate]],
    params: SamplingParams,
    logprobs: bool = False,
    tie_band: float = 0.1,
) -> list[PairResult]:
    """ONE judge call for all pairs of the chunk in both orders."""
    calls = []
    for it, ci, cj in jobs:
        for order, (a, b) in (("ij", (ci, cj)), ("ji", (cj, ci))):
            meta = {"order": order, "slot_a": a.name, "slot_b": b.name, "candidates": [ci.index, cj.index]}
            calls.append(Call(it.id, build_pairwise(ctx.language, it.prompt, a.text, b.text, logprobs), meta))
    resolved = ask_both_orders(ctx, state, "judge_pairwise", calls, params, logprobs, tie_band)
    return [PairResult(it, ci, cj, v, w, p) for (it, ci, cj), (v, w, p) in zip(jobs, resolved, strict=True)]


def ask_both_orders(
    ctx: Context,
    state: ChunkState,
    step: str,
    calls: Sequence[Call],
    params: SamplingParams,
    logprobs: bool,
    tie_band: float,
) -> list[tuple[tuple[str | None, str | None], str | None, float | None]]:
    """Calls come in (i, j), (j, i) twos; ONE judge call for all. Per two: the slot verdicts, the
    winner ("i", "j", "tie" or None when either order failed) and p(i ≻ j) when read from log-probs.

    RLAIF's soft labels, with a chain-of-thought per order, are `steps.compare.judge_both_orders`."""
    if logprobs:
        samples = run_calls(ctx, state, step, "judge", calls, params, parse_completion=read_ab_logprobs)
    else:
        params = params.replace(regex=structure.pairwise(params.max_new_tokens))
        samples = run_calls(ctx, state, step, "judge", calls, params, parse=parse_pairwise)
    out = []
    for k in range(len(calls) // 2):
        usable = [_usable(samples[2 * k][0], logprobs), _usable(samples[2 * k + 1][0], logprobs)]
        v = (_slot_verdict(usable[0]), _slot_verdict(usable[1]))
        if logprobs and None not in v:
            p, winner = combine_probs(usable[0].parsed["A"], usable[1].parsed["B"], tie_band)
            out.append((v, winner, p))
        else:
            out.append((v, combine_verdicts(*v), None))
    return out


# --------------------------------------------------------------------------- joint (DOVE)


def build_joint(
    language: str, prompt_a: Sequence[Message], a: str, prompt_b: Sequence[Message], b: str, direct: bool = False
) -> list[Message]:
    """DOVE's joint comparison (Bansal et al. 2024, arXiv 2404.00530): two (instruction, response)
    pairs with different instructions; which response serves its own instruction better."""
    text = render(
        "judge_joint",
        language,
        conversation_a=conversation(prompt_a),
        response_a=a,
        conversation_b=conversation(prompt_b),
        response_b=b,
        direct=direct,
    )
    return [user(text), assistant(PREFILL)] if direct else [user(text)]


# --------------------------------------------------------------------------- listwise


def build_listwise(language: str, prompt: Sequence[Message], texts: Sequence[str]) -> list[Message]:
    return [user(render("judge_listwise", language, conversation=conversation(prompt), responses=list(texts)))]


_RANKING = re.compile(r"(?:Ranking|排序)\s*[:：]\s*([^\n]*)")


def parse_listwise(text: str) -> ParseResult:
    """The last `Ranking: [3] > [1] > [2]` line -> [3, 1, 2] (1-based slots, best first). It must be
    a permutation of 1..n; whether n is the number of responses shown is checked by the caller."""
    lines = _RANKING.findall(text)
    if not lines:
        return ParseResult(raw=text, error="no 'Ranking:' line")
    labels = [int(x) for x in re.findall(r"\[(\d+)\]", lines[-1])]
    if len(labels) < 2 or sorted(labels) != list(range(1, len(labels) + 1)):
        return ParseResult(raw=text, error=f"ranking {labels} is not a permutation of 1..n")
    return ParseResult(raw=text, parsed=labels, parse_status="ok")


def listwise_orders(ctx: Context, item_id: str, k: int, samples: int) -> list[list[int]]:
    """One shuffled presentation per judge sample (deterministic per item: resumes match)."""
    orders = []
    for s in range(samples):
        perm = list(range(k))
        ctx.rng(item_id, "listwise", s).shuffle(perm)
        orders.append(perm)
    return orders


def judge_listwise(
    ctx: Context,
    state: ChunkState,
    groups: Sequence[tuple[SourceItem, list[Candidate]]],
    params: SamplingParams,
    samples: int,
) -> list[dict[str, Any]]:
    """ONE call for every item x sample. Per item: the de-shuffled rankings (candidate indices, best
    first) and Borda scores (k-1 for first ... 0 for last) averaged over the valid samples, or None."""
    calls, plist = [], []
    for it, cands in groups:
        for perm in listwise_orders(ctx, it.id, len(cands), samples):
            texts = [cands[p].text for p in perm]
            calls.append(Call(it.id, build_listwise(ctx.language, it.prompt, texts), {"order": perm}))
            plist.append(params.replace(regex=structure.ranking(params.max_new_tokens, len(cands))))
    results = iter(run_calls(ctx, state, "judge_listwise", "judge", calls, plist, parse=parse_listwise))
    out = []
    for _it, cands in groups:
        k, rankings = len(cands), []
        for _ in range(samples):
            smp = next(results)[0]
            if not smp.ok:
                continue
            if len(smp.parsed) != k:
                state.drop_part("judge_sample", "listwise_incomplete_ranking")
                continue
            perm = smp.call.meta["order"]
            rankings.append([perm[label - 1] for label in smp.parsed])
        out.append({"rankings": rankings, "scores": _borda(rankings, k)})
    return out


def _borda(rankings: list[list[int]], k: int) -> list[float] | None:
    if not rankings:
        return None
    scores = [0.0] * k
    for r in rankings:
        for pos, idx in enumerate(r):
            scores[idx] += (k - 1 - pos) / len(rankings)
    return scores


# --------------------------------------------------------------------------- rubric (pointwise)


def build_rubric(language: str, prompt: Sequence[Message], response: str) -> list[Message]:
    return [user(render("judge_rubric", language, conversation=conversation(prompt), response=response))]


_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(text: str) -> ParseResult:
    """The last `[[n]]` with 1 <= n <= 10 (MT-Bench single-answer grading)."""
    found = _RATING.findall(text)
    if not found:
        return ParseResult(raw=text, error="no [[rating]]")
    value = float(found[-1])
    if not 1 <= value <= 10:
        return ParseResult(raw=text, error=f"rating {value} outside 1-10")
    return ParseResult(raw=text, parsed=value, parse_status="ok")


def judge_rubric(
    ctx: Context,
    state: ChunkState,
    groups: Sequence[tuple[SourceItem, list[Candidate]]],
    params: SamplingParams,
    samples: int,
    min_valid: int,
) -> list[list[dict[str, Any]]]:
    """ONE call: every candidate with n=samples. Per candidate: the valid ratings and their mean, or
    mean None when fewer than `min_valid` samples parsed (that candidate is then left out)."""
    calls = [
        Call(it.id, build_rubric(ctx.language, it.prompt, c.text), {"candidate": c.index})
        for it, cands in groups
        for c in cands
    ]
    params = params.replace(n=samples, regex=structure.rating(params.max_new_tokens))
    results = iter(run_calls(ctx, state, "judge_rubric", "judge", calls, params, parse=parse_rating))
    out = []
    for _, cands in groups:
        per = []
        for _ in cands:
            vals = [s.parsed if s.ok else None for s in next(results)]
            ok = [v for v in vals if v is not None]
            per.append({"ratings": vals, "mean": sum(ok) / len(ok) if len(ok) >= max(min_valid, 1) else None})
        out.append(per)
    return out
