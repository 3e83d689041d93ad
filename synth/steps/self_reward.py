"""Self-Rewarding steps (Yuan et al. 2024, arXiv 2401.10020; the ρ selector of Meta-Rewarding,
Wu et al. 2024, arXiv 2407.19594).

- `judge_candidates`: the model judges each of its own k candidates m times with the additive 5-point
  prompt, in ONE call (k requests per prompt, n=m); scores are averaged over the parsed judgements.
- `select_pair`: chosen = best mean, rejected = worst mean; a tie gives no pair.
- `build_self_instruct` / `parse_task`: few-shot generation of new prompts from seed prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Message, ParseResult, SourceItem
from synth.runtime import ChunkState, Context
from synth.steps import structure
from synth.steps.base import Call, run_calls, user
from synth.steps.judge import conversation

# The judge prompt ends with `Score: <total points>` (arXiv 2401.10020, Fig. 2); we parse
# `Score:\s*([0-5](?:\.\d+)?)\s*$`, last match; 得分 is the Chinese template's marker
_SCORE = re.compile(r"(?:Score|得分)\s*[:：]\s*([0-5](?:\.\d+)?)\s*$", re.MULTILINE)


def build_judge(language: str, prompt: Sequence[Message], response: str) -> list[Message]:
    return [user(render("self_reward_judge", language, conversation=conversation(prompt), response=response))]


def parse_score(text: str) -> ParseResult:
    """The last `Score: <k>` at the end of a line, 0 <= k <= 5. Anything else is a failed judgement."""
    found = _SCORE.findall(text)
    if not found:
        return ParseResult(raw=text, error="no 'Score: <0-5>' line")
    value = float(found[-1])
    if value > 5:
        return ParseResult(raw=text, error=f"score {value} outside 0-5")
    return ParseResult(raw=text, parsed=value, parse_status="ok")


@dataclass
class Scored:
    """One candidate with its m judge scores (None = a failed or truncated judgement) and their mean
    over the valid ones (None when fewer than min_valid parsed: the candidate is then left out), and the
    judgement texts themselves (None where the score is None), which the meta-judge compares."""

    index: int
    text: str
    scores: list[float | None]
    mean: float | None
    judgements: list[str | None] = field(default_factory=list)


def judge_candidates(
    ctx: Context,
    state: ChunkState,
    groups: Sequence[tuple[SourceItem, list[str]]],
    params: SamplingParams,
    samples: int,
    min_valid: int,
) -> list[list[Scored]]:
    """ONE judge call: every candidate of every prompt, n=samples each."""
    calls = [
        Call(it.id, build_judge(ctx.language, it.prompt, text), {"candidate": i})
        for it, texts in groups
        for i, text in enumerate(texts)
    ]
    params = params.replace(n=samples, regex=structure.score(params.max_new_tokens))
    results = iter(run_calls(ctx, state, "self_reward_judge", "judge", calls, params, parse=parse_score))
    out = []
    for _, texts in groups:
        scored = []
        for i, text in enumerate(texts):
            judged = next(results)
            vals = [s.parsed if s.ok else None for s in judged]
            ok = [v for v in vals if v is not None]
            raw = [s.text if s.ok else None for s in judged]
            scored.append(Scored(i, text, vals, sum(ok) / len(ok) if len(ok) >= max(min_valid, 1) else None, raw))
        out.append(scored)
    return out


def select_pair(cands: Sequence[Scored], rho: float = 0.0) -> tuple[Scored, Scored] | None:
    """Meta-Rewarding's length-controlled selection (arXiv 2407.19594); rho=0 is Self-Rewarding's max vs min
    (arXiv 2401.10020), with the shortest of the best and the longest of the worst breaking score ties.
    chosen = shortest with mean >= (1-ρ)·Smax + ρ·Smin; rejected = longest with mean <= (1-ρ)·Smin + ρ·Smax.
    None when fewer than two candidates were scored or the chosen does not score strictly higher."""
    valid = [c for c in cands if c.mean is not None]
    if len(valid) < 2:
        return None
    s_max, s_min = max(c.mean for c in valid), min(c.mean for c in valid)
    top = [c for c in valid if c.mean >= (1 - rho) * s_max + rho * s_min - 1e-9]
    bottom = [c for c in valid if c.mean <= (1 - rho) * s_min + rho * s_max + 1e-9]
    chosen = min(top, key=lambda c: (len(c.text), c.index))
    rejected = max(bottom, key=lambda c: (len(c.text), -c.index))
    if chosen.mean <= rejected.mean:  # ties (e.g. constant scores) give no pair (Self-Rewarding discards them)
        return None
    return chosen, rejected


# --------------------------------------------------------------------------- new prompts (self-instruct)


def build_self_instruct(language: str, examples: Sequence[str]) -> list[Message]:
    return [user(render("self_instruct", language, examples=list(examples)))]


_TASK = re.compile(r"<task>(.*?)</task>", re.DOTALL)


def parse_task(text: str) -> ParseResult:
    """The first complete `<task>...</task>`, stripped; a missing or empty one is a failure."""
    m = _TASK.search(text)
    if not m or not m.group(1).strip():
        return ParseResult(raw=text, error="no non-empty <task>...</task>")
    return ParseResult(raw=text, parsed=m.group(1).strip(), parse_status="ok")


def pick_examples(ctx: Context, seeds: Sequence[str], item_id: str, shots: int) -> list[str]:
    """`shots` seed prompts for one generation request, drawn per item (resumes draw the same)."""
    rng = ctx.rng(item_id, "self_instruct")
    return rng.sample(list(seeds), min(shots, len(seeds)))
