"""Multiple-choice comparison with soft labels (RL-CAI, Bai et al. 2022, arXiv 2212.08073, §4.1;
RLAIF, Lee et al. 2023, arXiv 2309.00267, §2.1).

One comparison = a conversation, two responses y1 / y2 and one principle's comparison question. It is
asked in BOTH orders (order 1: y1 is (A); order 2: y2 is (A)) because small judges keep picking the
same slot (position bias; Zheng et al. 2023, arXiv 2306.05685, measure it). Each order gives
q = p(y1 preferred):

- logprobs: the assistant turn is prefilled with the answer stem "The answer is: (" and ONE token is
  generated with top logprobs; the options are read from that position's top tokens;
- votes: k sampled answers after the same stem, q = votes(y1) / (votes(A) + votes(B));
- chain of thought (RL-CAI's CoT labels, RLAIF's two-step CoT): a first call samples the reasoning after
  "Let's think step by step:", a second call appends "So the answer is: (" and reads the answer as above; CoT
  probabilities are clamped to [0.4, 0.6] because they sit near 0 or 1.

A position whose top tokens hold neither option is a parse failure, never 50/50 (a made-up 50/50 would
enter the soft labels as a real judgement).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from synth.constitution import Principle
from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Completion, Message, ParseResult
from synth.steps import structure
from synth.steps.base import Call, assistant, run_calls, user
from synth.steps.critique import TURN_MARKERS, cut_at

OPTIONS = ("A", "B")
LabelMode = Literal["auto", "logprobs", "votes"]
# Characters around an option letter in a token: " A", "(A", "A)", "（A）", "**A".
_TOKEN_NOISE = " \t\n()（）[]*\"'"
_VOTE_START = re.compile(r"^\s*[\(（]?\s*([AB])(?![A-Za-z])")
_VOTE_ANYWHERE = re.compile(r"(?:answer is|答案是)\s*[:：]?\s*\**\s*[\(（]?\s*([AB])(?![A-Za-z])", re.IGNORECASE)
_ANSWER_MARKERS = ("So the answer is", "The answer is", "所以答案是", "答案是")


# --------------------------------------------------------------------------- prompts


def build_prompt(
    conversation: Sequence[Message],
    question: str,
    response_a: str,
    response_b: str,
    language: str,
    stage: Literal["answer", "reason", "cot_answer"],
    reasoning: str | None = None,
) -> list[Message]:
    """user(the MC question) + assistant prefill (the answer stem, or the CoT opening / closing)."""
    body = render(
        "mc_compare",
        language,
        conversation=[m.model_dump() for m in conversation],
        question=question,
        response_a=response_a,
        response_b=response_b,
    )
    stem = render("mc_answer_stem", language, stage=stage, reasoning=reasoning or "")
    return [user(body), assistant(stem)]


# --------------------------------------------------------------------------- parsers (pure)


def option_logprobs(top: dict[str, float]) -> dict[str, float]:
    """Option letter -> log-prob, summing (logsumexp) every top token that is that letter once spaces
    and brackets are stripped (" A", "A", "(A" and "A)" are different tokens of the same answer)."""
    out: dict[str, float] = {}
    for tok, lp in top.items():
        key = tok.strip(_TOKEN_NOISE)
        if key in OPTIONS:
            out[key] = lp if key not in out else float(_logaddexp(out[key], lp))
    return out


def _logaddexp(a: float, b: float) -> float:
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def parse_logprobs(comp: Completion) -> ParseResult:
    """p(A) from the first generated position's top log-probs. When only one option is in the top-k,
    the other gets the smallest listed log-prob (an upper bound on its true value), so p is a
    conservative estimate, flagged `bounded`. Neither option listed: parse failure."""
    if not comp.logprobs:
        return ParseResult(raw=comp.text, parse_status="failed", error="backend returned no logprobs")
    first = comp.logprobs[0]
    top = {**first.top, first.token: first.logprob}
    found = option_logprobs(top)
    if not found:
        shown = sorted(top, key=top.get, reverse=True)[:10]  # type: ignore[arg-type]
        return ParseResult(
            raw=comp.text, parse_status="failed", error=f"neither option in the top-{len(top)} tokens: {shown}"
        )
    floor = min(top.values())
    la, lb = found.get("A", floor), found.get("B", floor)
    p_a = 1.0 / (1.0 + math.exp(lb - la))
    return ParseResult(
        raw=comp.text,
        parsed={"p_a": p_a, "logprob_a": la, "logprob_b": lb, "bounded": len(found) < 2},
        parse_status="ok",
    )


def parse_vote(text: str) -> ParseResult:
    """ "A" / "B" from a sampled answer: the letter right after the stem, else the last "answer is (X)"."""
    m = _VOTE_START.match(text)
    if m is None:
        hits = _VOTE_ANYWHERE.findall(text)
        if not hits:
            return ParseResult(raw=text, parse_status="failed", error="no (A)/(B) answer")
        return ParseResult(raw=text, parsed=hits[-1], parse_status="ok")
    return ParseResult(raw=text, parsed=m.group(1), parse_status="ok")


def parse_reasoning(text: str) -> ParseResult:
    """The CoT reasoning, cut before any answer it already wrote (the answer is read in step two)."""
    body = cut_at(text, TURN_MARKERS + _ANSWER_MARKERS).strip()
    if not body:
        return ParseResult(raw=text, parse_status="failed", error="empty reasoning")
    return ParseResult(raw=text, parsed=body, parse_status="ok")


# --------------------------------------------------------------------------- soft-label math (pure)


def clamp(p: float, lo: float = 0.4, hi: float = 0.6) -> float:
    return min(max(p, lo), hi)


@dataclass
class SoftLabel:
    """p = p(y1 preferred), averaged over both orders and the principles whose two orders parsed."""

    p: float | None
    p_order1: float | None
    p_order2: float | None
    orders_agree: bool
    principles_used: int


def combine(per_principle: Sequence[tuple[float | None, float | None]]) -> SoftLabel:
    """Average each order over principles, then the two orders (RLAIF's position-debiased label, Lee et al.
    2023, arXiv 2309.00267, §2.1.1). A principle with a failed order is left out: one order alone is
    position-biased."""
    both = [(a, b) for a, b in per_principle if a is not None and b is not None]
    if not both:
        return SoftLabel(None, None, None, False, 0)
    p1 = sum(a for a, _ in both) / len(both)
    p2 = sum(b for _, b in both) / len(both)
    agree = (p1 - 0.5) * (p2 - 0.5) > 0  # both orders prefer the same response (MT-Bench's conservative rule)
    return SoftLabel((p1 + p2) / 2, p1, p2, agree, len(both))


# --------------------------------------------------------------------------- batched calls


@dataclass
class Comparison:
    item_id: str
    conversation: list[Message]
    y1: str
    y2: str
    principle: Principle

    def slots(self, order: int) -> tuple[str, str]:
        return (self.y1, self.y2) if order == 1 else (self.y2, self.y1)


@dataclass
class JudgeSettings:
    cot: bool
    label: LabelMode
    votes: int
    top_logprobs: int
    reason_params: SamplingParams
    vote_params: SamplingParams
    clamp_cot: tuple[float, float]


@dataclass
class OrderVerdict:
    """One order's result: p(y1 preferred) (None when it failed) and the CoT reasoning, if any."""

    p: float | None
    reasoning: str | None = None


def judge_both_orders(
    ctx, state, comps: Sequence[Comparison], s: JudgeSettings
) -> list[tuple[OrderVerdict, OrderVerdict]]:
    """(order 1, order 2) verdicts per comparison. Every stage is ONE backend call over all
    comparisons x both orders.

    This is RLAIF's soft-label reader (Lee et al. 2023, §2.1): each order gets its own chain-of-thought, and
    p(A) is read from log-probs (or votes) after a prefilled stem, then averaged over orders and principles
    (`combine`). The hard-verdict judge of `pipeline=judge` is `steps.judge.ask_both_orders` (MT-Bench's
    conservative both-orders rule)."""
    tasks = [(c, order) for c in comps for order in (1, 2)]
    reasons = _reason(ctx, state, tasks, s.reason_params) if s.cot else [None] * len(tasks)
    live = [i for i, r in enumerate(reasons) if r is not None or not s.cot]
    q_a: dict[int, float] = {}
    need_votes = live if s.label == "votes" else []
    if s.label != "votes":
        got, no_logprobs = _by_logprobs(ctx, state, tasks, reasons, live, s.top_logprobs)
        q_a.update(got)
        if s.label == "auto":  # the backend gave no logprobs: fall back to k sampled verdicts
            need_votes = no_logprobs
    q_a.update(_by_votes(ctx, state, tasks, reasons, need_votes, s.vote_params.replace(n=s.votes)))

    def verdict(i: int) -> OrderVerdict:
        if i not in q_a:
            return OrderVerdict(None, reasons[i])
        p = q_a[i] if tasks[i][1] == 1 else 1.0 - q_a[i]  # order 2 shows y1 as (B)
        return OrderVerdict(clamp(p, *s.clamp_cot) if s.cot else p, reasons[i])

    return [(verdict(k), verdict(k + 1)) for k in range(0, len(tasks), 2)]


Task = tuple[Comparison, int]


def _call(task: Task, language: str, stage: str, reasoning: str | None = None) -> Call:
    comp, order = task
    a, b = comp.slots(order)
    msgs = build_prompt(comp.conversation, comp.principle.judge or "", a, b, language, stage, reasoning)  # type: ignore[arg-type]
    return Call(comp.item_id, msgs, {"principle_id": comp.principle.id, "order": order, "stage": stage})


def _answer_stage(reasoning: str | None) -> str:
    return "answer" if reasoning is None else "cot_answer"


def _reason(ctx, state, tasks: Sequence[Task], params: SamplingParams) -> list[str | None]:
    calls = [_call(t, ctx.language, "reason") for t in tasks]
    samples = run_calls(ctx, state, "compare_reason", "judge", calls, params.replace(n=1), parse_reasoning)
    # A truncated reasoning is not used (counted as truncated/compare_reason): its order fails.
    return [s[0].parsed_text if s[0].ok else None for s in samples]


def _by_logprobs(ctx, state, tasks, reasons, idx: list[int], top_logprobs: int) -> tuple[dict[int, float], list[int]]:
    """One token after the stem with its top log-probs. Returns p(A) per task and the tasks whose
    completion carried no logprobs at all. The call counts as truncated/compare (max_new_tokens=1)."""
    calls = [_call(tasks[i], ctx.language, _answer_stage(reasons[i]), reasons[i]) for i in idx]
    params = SamplingParams(temperature=1.0, max_new_tokens=1, n=1, logprobs=True, top_logprobs=top_logprobs)
    samples = run_calls(ctx, state, "compare", "judge", calls, params, parse_completion=parse_logprobs)
    got, missing = {}, []
    for i, (smp,) in zip(idx, samples, strict=True):
        if smp.result is not None and smp.result.ok:
            got[i] = smp.parsed["p_a"]
        elif not smp.completion.logprobs:
            missing.append(i)
    return got, missing


def _by_votes(ctx, state, tasks, reasons, idx: list[int], params: SamplingParams) -> dict[int, float]:
    """k sampled answers after the stem; p(A) = share of A among the answers that parsed."""
    calls = [_call(tasks[i], ctx.language, _answer_stage(reasons[i]), reasons[i]) for i in idx]
    samples = run_calls(ctx, state, "compare_vote", "judge", calls, params.replace(regex=structure.VOTE), parse_vote)
    out = {}
    for i, group in zip(idx, samples, strict=True):
        votes = [s.parsed for s in group if s.result is not None and s.result.ok]
        if votes:
            out[i] = votes.count("A") / len(votes)
    return out
