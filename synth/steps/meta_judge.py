"""Meta-Rewarding's meta-judge (Wu et al. 2024, arXiv 2407.19594 §2.2): the model judges its own
judgements, so that the judge itself gets preference pairs to train on.

For one prompt, after the judge step scored every candidate m times:
1. `pick_response`: the candidate whose valid judge scores vary most (>= 2 valid scores, variance > 0);
   that is where the judgements disagree, hence where a better judgement can be told from a worse one.
2. `battles`: every unordered pair of its distinct judgements is shown to the meta-judge in BOTH orders
   (one batched call for the chunk); the score line is removed from both judgements inside the
   meta-judge prompt so that it compares reasoning, not numbers (NVIDIA NeMo-Aligner's choice).
3. `combine`: a judgement wins only when both orders name it; any other outcome (both orders pick the
   same slot: position bias, or each names a different one) is a tie; a parse failure in either order
   leaves the battle unresolved (left out of the table, never a default winner).
4. `elo`: a Bradley–Terry fit over the resolved battles (ties count half a win each way), reported as
   Elo = 400·θ + 1000 (synth.ranking.fit_bt).
5. `meta_pair`: chosen = the highest Elo, rejected = the lowest; no pair when any two Elos are equal,
   the texts are equal, either score is missing, the two scores are equal, or the chosen judgement is
   longer than the length limit (the paper's filter against ever longer judgements).
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.ranking import INIT, SCALE, fit_bt
from synth.records import Message, ParseResult, SourceItem
from synth.runtime import ChunkState, Context
from synth.steps import structure
from synth.steps.base import Call, run_calls, user
from synth.steps.judge import conversation
from synth.steps.orders import combine_verdicts
from synth.steps.self_reward import Scored

_SCORE_LINE = re.compile(r"^\s*(?:Score|得分)\s*[:：].*$", re.MULTILINE)
_WINNER = re.compile(r"(?:Winner\s*:\s*(?:Judgement|Judgment)|胜者\s*[:：]\s*评审)\s*([AB])", re.IGNORECASE)


def pick_response(cands: Sequence[Scored]) -> Scored | None:
    """The candidate with the highest (population) variance of its valid scores; ties: lowest index."""
    best, best_var = None, 0.0
    for c in cands:
        vals = [s for s in c.scores if s is not None]
        if len(vals) < 2:
            continue
        var = statistics.pvariance(vals)
        if var > best_var:
            best, best_var = c, var
    return best


@dataclass(frozen=True)
class JudgementText:
    index: int  # position among the candidate's m judge samples
    text: str
    score: float


def distinct_judgements(c: Scored) -> list[JudgementText]:
    """The candidate's parsed judgements, one per distinct text (the first sample of each)."""
    out, seen = [], set()
    for i, (text, score) in enumerate(zip(c.judgements, c.scores, strict=True)):
        if text is None or score is None or text.strip() in seen:
            continue
        seen.add(text.strip())
        out.append(JudgementText(i, text, score))
    return out


def strip_score(text: str) -> str:
    """The judgement without its `Score: k` line(s), as the meta-judge sees it."""
    return _SCORE_LINE.sub("", text).strip()


def build_meta_judge(language: str, prompt: Sequence[Message], response: str, a: str, b: str) -> list[Message]:
    return [
        user(
            render(
                "meta_judge",
                language,
                conversation=conversation(prompt),
                response=response,
                judgement_a=strip_score(a),
                judgement_b=strip_score(b),
            )
        )
    ]


def parse_winner(text: str) -> ParseResult:
    """The last `Winner: Judgement A|B` (or `胜者：评审 A|B`) -> "A" / "B"."""
    found = _WINNER.findall(text)
    if not found:
        return ParseResult(raw=text, error="no 'Winner: Judgement A|B' line")
    return ParseResult(raw=text, parsed=found[-1].upper(), parse_status="ok")


@dataclass
class Battle:
    i: JudgementText
    j: JudgementText
    verdicts: tuple[str | None, str | None]
    winner: str | None


def battles(
    ctx: Context,
    state: ChunkState,
    jobs: Sequence[tuple[SourceItem, Scored, list[JudgementText]]],
    params: SamplingParams,
) -> list[list[Battle]]:
    """ONE judge call: every pair of every job's judgements, in both orders. Per job, its battles."""
    calls, pairs = [], []
    for it, cand, judged in jobs:
        for ji, jj in itertools.combinations(judged, 2):
            for order, (a, b) in (("ij", (ji, jj)), ("ji", (jj, ji))):
                meta = {"order": order, "candidate": cand.index, "judgements": [ji.index, jj.index]}
                calls.append(Call(it.id, build_meta_judge(ctx.language, it.prompt, cand.text, a.text, b.text), meta))
            pairs.append((ji, jj))
    params = params.replace(regex=structure.meta_winner(params.max_new_tokens))
    results = run_calls(ctx, state, "meta_judge", "judge", calls, params, parse=parse_winner)
    out, k = [], 0
    for _, _, judged in jobs:
        mine = []
        for _ in range(len(judged) * (len(judged) - 1) // 2):
            ji, jj = pairs[k]
            v = tuple(s[0].parsed if s[0].ok else None for s in (results[2 * k], results[2 * k + 1]))
            mine.append(Battle(ji, jj, v, combine_verdicts(*v)))
            k += 1
        out.append(mine)
    return out


def elo(judged: Sequence[JudgementText], table: Sequence[Battle]) -> dict[int, float]:
    """Elo = 400·θ + 1000 from a Bradley–Terry fit over the resolved battles, for every judgement that
    took part in at least one (the others carry no information and are not ranked)."""
    resolved = [b for b in table if b.winner is not None]
    ids = sorted({x.index for b in resolved for x in (b.i, b.j)})
    if len(ids) < 2:
        return {}
    pos = {x: n for n, x in enumerate(ids)}
    a = np.array([pos[b.i.index] for b in resolved])
    bb = np.array([pos[b.j.index] for b in resolved])
    s = np.array([{"i": 1.0, "j": 0.0, "tie": 0.5}[b.winner] for b in resolved])
    theta = fit_bt(a, bb, s, len(ids))
    return {x: float(SCALE * theta[pos[x]] + INIT) for x in ids}


def meta_pair(
    judged: Sequence[JudgementText],
    ratings: dict[int, float],
    max_chosen_chars: int | None,
) -> tuple[JudgementText, JudgementText] | str:
    """(chosen, rejected), or the reason there is no pair."""
    if len(ratings) < 2:
        return "meta_fewer_than_2_rated"
    by_index = {j.index: j for j in judged}
    order = sorted(ratings, key=lambda x: (-ratings[x], x))
    top, bottom = order[0], order[-1]
    if any(np.isclose(ratings[a], ratings[b]) for a, b in itertools.pairwise(order)):
        return "meta_elo_not_unique"  # any tie, as NeMo-Aligner's implementation: the ranking is not clear-cut
    chosen, rejected = by_index[top], by_index[bottom]
    if chosen.text.strip() == rejected.text.strip():
        return "meta_identical_texts"
    if chosen.score == rejected.score:
        return "meta_equal_scores"
    if max_chosen_chars is not None and len(chosen.text) > max_chosen_chars:
        return "meta_chosen_too_long"
    return chosen, rejected
