"""`pipeline=judge`: rank k responses per prompt with an AI judge (MT-Bench's judge protocols,
Zheng et al. 2023, arXiv 2306.05685; ratings as in lm-sys/FastChat's Chatbot Arena code).

Roles: candidates are sampled by the `candidates` models (each its own backend, or the policy), or
read from the data; the `judge` role (default: the policy backend itself) judges them.

Outputs:
- `preferences.jsonl`: hard pairs only (pairwise: a win in both orders, or an averaged log-prob
  verdict outside the tie band; listwise / rubric: best vs worst, or every strictly ordered pair);
- `ranked.jsonl`: all k responses with scores (wins, Borda points or mean ratings), for listwise losses;
- `battles.jsonl`: one row per resolved comparison, the input to the rating table.
- `mode=joint` (DOVE, Bansal et al. 2024, arXiv 2404.00530) writes `joint_preferences.jsonl` instead of
  preferences/ranked: the items of a chunk are paired at random (seeded), each contributing one
  (instruction, response) (`joint.response_index` of its candidates: 0 = the data's chosen, or the first
  sample), and the judge says which response serves its own instruction better, in both orders (the
  pairwise settings apply: a win only when both orders agree, or log-prob verdicts). Row shape
  (synth.records.JointPreferenceRecord): {"prompt_a", "response_a", "prompt_b", "response_b",
  "label": "a" | "b", "p_a", ...}; ties and disagreements are not written. An odd item left at the end
  of a chunk has no partner (counted). The DOVE paper trains on these joint rows together with the
  conditional pairs of `mode=pairwise` on the same data.
`finalize` adds to manifest.json the position-bias rate (how often slot A wins before the two orders
are combined), the swap consistency, and, when several models compete, a Bradley–Terry table with
bootstrap CIs and online Elo beside it (plus `bt_scores.png`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.io import ChunkWriter, read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.ranking import Battle, plot_ratings, position_bias, rate_pairwise
from synth.records import (
    JointPreferenceRecord,
    Message,
    PreferenceRecord,
    Provenance,
    RankedRecord,
    SourceItem,
    stable_id,
)
from synth.runtime import Sampling
from synth.steps.base import Call
from synth.steps.candidates import (
    Candidate,
    CandidateSpec,
    data_candidates,
    register_candidates,
    sample_candidates,
)
from synth.steps.filters import near_identical
from synth.steps.judge import PairResult, ask_both_orders, build_joint, judge_listwise, judge_pairs, judge_rubric


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairwiseSettings(_Strict):
    logprobs: bool = False  # soft verdict from A/B token log-probs at a "[[" prefill (RLAIF, arXiv 2309.00267)
    top_logprobs: int = Field(20, ge=1)  # vLLM's default --max-logprobs cap
    tie_band: float = Field(0.1, ge=0, le=0.5)  # |p - 0.5| <= tie_band is a tie (RLAIF's optional δ filter)


class ListwiseSettings(_Strict):
    samples: int = Field(1, ge=1)  # judge samples per prompt, each with its own shuffled order; Borda points averaged


class RubricSettings(_Strict):
    samples: int = Field(3, ge=1)  # m ratings per response, averaged (as Self-Rewarding's 3 judge samples)
    temperature: float = Field(0.7, ge=0)  # > 0 so the m samples differ
    min_valid: int = Field(1, ge=1)  # fewer parsed ratings than this leave the response out (never a default score)


class JointSettings(_Strict):
    response_index: int = Field(0, ge=0)  # which of an item's candidates it contributes (pair data: 0 = chosen)


class RatingSettings(_Strict):
    bootstrap: int = Field(1000, ge=1)  # resamples for the CIs (as FastChat's Arena ratings)
    elo_k: float = Field(4.0, gt=0)  # online Elo K (FastChat compute_elo)
    anchor: str | None = None  # model pinned to anchor_rating; null = mean 1000
    anchor_rating: float = Field(1000.0, gt=-1e9, lt=1e9)


class JudgeConfig(PipelineConfig):
    name: str = "judge"
    mode: Literal["pairwise", "listwise", "rubric", "joint"] = "pairwise"
    candidates: list[CandidateSpec] = []  # empty: responses come from the data (data_responses)
    data_responses: str = "pair"  # "pair" = the source's chosen/rejected; else a list field of the rows
    judge_sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=512)  # MT-Bench judges at T=0
    pairwise: PairwiseSettings = PairwiseSettings()
    listwise: ListwiseSettings = ListwiseSettings()
    rubric: RubricSettings = RubricSettings()
    joint: JointSettings = JointSettings()
    pairs: Literal["best_vs_worst", "all"] = "best_vs_worst"  # listwise / rubric pair selection
    rating: RatingSettings = RatingSettings()
    drop_truncated: bool = True  # sampled candidates cut at max_new_tokens are not judged (false: smoke tests)


class JudgePipeline(Pipeline):
    Config = JudgeConfig
    outputs = ("preferences", "ranked", "battles")
    roles = ("policy", "judge")

    def __init__(self, cfg: JudgeConfig):
        super().__init__(cfg)
        if cfg.mode == "joint":
            self.outputs = ("joint_preferences", "battles")

    def prefill_roles(self) -> tuple[str, ...]:
        logprobs = self.cfg.pairwise.logprobs and self.cfg.mode in ("pairwise", "joint")
        return ("judge",) if logprobs else ()  # A/B log-probs are read after a prefilled "[["

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:
        register_candidates(ctx, self.cfg.candidates, writer.out_dir)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        if self.cfg.mode == "joint":
            self._joint(items, ctx, state)
            return
        groups = self._groups(items, ctx, state)
        if self.cfg.mode == "pairwise":
            self._pairwise(groups, ctx, state)
        elif self.cfg.mode == "listwise":
            cfg = self.cfg.listwise
            results = judge_listwise(ctx, state, groups, self.cfg.judge_sampling.params(), cfg.samples)
            self._scored(
                groups, [r["scores"] for r in results], ctx, state, [{"rankings": r["rankings"]} for r in results]
            )
        else:
            cfg = self.cfg.rubric
            params = self.cfg.judge_sampling.params().replace(temperature=cfg.temperature)
            results = judge_rubric(ctx, state, groups, params, cfg.samples, cfg.min_valid)
            scores = [[c["mean"] for c in per] for per in results]
            self._scored(groups, scores, ctx, state, [{"ratings": [c["ratings"] for c in per]} for per in results])

    # ------------------------------------------------------------------ candidates

    def _groups(self, items, ctx: Context, state: ChunkState) -> list[tuple[SourceItem, list[Candidate]]]:
        if self.cfg.candidates:
            sampled = sample_candidates(ctx, state, items, self.cfg.candidates, self.cfg.drop_truncated)
        else:
            sampled = {it.id: data_candidates(it, self.cfg.data_responses) for it in items}
        groups = []
        for it in items:
            if it.category:
                state.count(f"category/{it.category}")
            if len(sampled[it.id]) < 2:
                state.drop("fewer_than_2_candidates")
                continue
            groups.append((it, sampled[it.id]))
        return groups

    # ------------------------------------------------------------------ pairwise

    def _pairwise(self, groups, ctx: Context, state: ChunkState) -> None:
        pw = self.cfg.pairwise
        params = self.cfg.judge_sampling.params()
        if pw.logprobs:
            params = params.replace(max_new_tokens=1, logprobs=True, top_logprobs=pw.top_logprobs)
        jobs = [(it, ci, cj) for it, cands in groups for ci, cj in itertools.combinations(cands, 2)]
        results = judge_pairs(ctx, state, jobs, params, pw.logprobs, pw.tie_band)
        by_item: dict[str, list[PairResult]] = {}
        for r in results:
            by_item.setdefault(r.item.id, []).append(r)
        for it, cands in groups:
            self._emit_pairs(it, cands, by_item.get(it.id, []), ctx, state)

    def _emit_pairs(self, it: SourceItem, cands: list[Candidate], results: list[PairResult], ctx, state) -> None:
        points = [0.0] * len(cands)
        for r in results:
            if r.winner is None:
                state.drop_part("pair", "pair_unresolved")  # a parse failure in either order: no label at all
                continue
            state.emit("battles", _battle(it, r))
            if r.winner == "tie":
                state.drop_part("pair", "pair_tie")
                points[r.i.index] += 0.5
                points[r.j.index] += 0.5
                continue
            win, lose = (r.i, r.j) if r.winner == "i" else (r.j, r.i)
            points[win.index] += 1
            p_win = None if r.p_i is None else (r.p_i if r.winner == "i" else 1 - r.p_i)
            extra = {"verdicts": {"ij": r.verdicts[0], "ji": r.verdicts[1]}, "order_ij": [r.i.name, r.j.name]}
            if near_identical(win.text, lose.text):
                state.drop_part("pair", "near_identical_pair")  # no signal in a pair of (near-)equal texts
                continue
            state.emit("preferences", self._pref(it, win, lose, ctx, p_chosen=p_win, meta=extra))
        if all(r.winner is not None for r in results):
            self._emit_ranked(it, cands, points, ctx, state, {"score": "wins + 0.5 x ties"})
        else:
            state.drop("ranked_incomplete")

    # ------------------------------------------------------------------ joint (DOVE)

    def _joint(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        if self.cfg.candidates:
            sampled = sample_candidates(ctx, state, items, self.cfg.candidates, self.cfg.drop_truncated)
        else:
            sampled = {it.id: data_candidates(it, self.cfg.data_responses) for it in items}
        idx, picked = self.cfg.joint.response_index, []
        for it in items:
            if it.category:
                state.count(f"category/{it.category}")
            if len(sampled[it.id]) <= idx:
                state.drop("joint_no_response")
                continue
            picked.append((it, sampled[it.id][idx]))
        order = list(range(len(picked)))
        ctx.rng("joint", *[it.id for it, _ in picked]).shuffle(order)  # the same chunk pairs the same way on a rerun
        if len(order) % 2:
            state.drop("joint_no_partner")
            order = order[:-1]
        pairs = [(picked[order[n]], picked[order[n + 1]]) for n in range(0, len(order), 2)]
        pw = self.cfg.pairwise
        params = self.cfg.judge_sampling.params()
        if pw.logprobs:
            params = params.replace(max_new_tokens=1, logprobs=True, top_logprobs=pw.top_logprobs)
        calls = []
        for (ia, ca), (ib, cb) in pairs:
            for order_name, ((p1, r1), (p2, r2)) in (("ab", ((ia, ca), (ib, cb))), ("ba", ((ib, cb), (ia, ca)))):
                calls.append(
                    Call(
                        ia.id,
                        build_joint(ctx.language, p1.prompt, r1.text, p2.prompt, r2.text, pw.logprobs),
                        {"order": order_name, "items": [ia.id, ib.id], "slot_a": p1.id, "slot_b": p2.id},
                    )
                )
        resolved = ask_both_orders(ctx, state, "judge_joint", calls, params, pw.logprobs, pw.tie_band)
        for ((ia, ca), (ib, cb)), (verdicts, winner, p_a) in zip(pairs, resolved, strict=True):
            if winner is None:
                state.drop_part("joint_pair", "pair_unresolved")
                continue
            state.emit(
                "battles",
                {
                    "id": stable_id(ia.id, ib.id, "joint_battle"),
                    "item_id": ia.id,
                    "partner_id": ib.id,
                    "kind": "joint",
                    "mode": "joint",
                    "model_a": ia.id,
                    "model_b": ib.id,
                    "winner": {"i": "a", "j": "b", "tie": "tie"}[winner],
                    "verdicts": list(verdicts),
                    "consistent": winner != "tie" or verdicts == ("C", "C"),
                    "p_a": p_a,
                },
            )
            if winner == "tie":
                state.drop_part("joint_pair", "pair_tie")  # DOVE removes ties
                continue
            state.emit(
                "joint_preferences",
                JointPreferenceRecord(
                    id=stable_id(ia.id, ib.id, "judge_joint"),
                    prompt_a=ia.prompt,
                    response_a=[Message(role="assistant", content=ca.text)],
                    prompt_b=ib.prompt,
                    response_b=[Message(role="assistant", content=cb.text)],
                    label="a" if winner == "i" else "b",
                    method="judge_joint",
                    p_a=p_a,
                    category_a=ia.category,
                    category_b=ib.category,
                    meta={
                        "item_a": ia.id,
                        "item_b": ib.id,
                        "response_a_name": ca.name,
                        "response_b_name": cb.name,
                        "same_instruction": ia.prompt == ib.prompt,
                        "verdicts": {"ab": verdicts[0], "ba": verdicts[1]},
                        "judge_model": ctx.llm("judge").model,
                    },
                    provenance=Provenance(
                        generator_model=None,
                        sampling=self.cfg.judge_sampling.model_dump(),
                        **template_ref("judge_joint", ctx.language),
                    ),
                ),
            )

    # ------------------------------------------------------------------ listwise / rubric

    def _scored(self, groups, scores_per_item, ctx: Context, state: ChunkState, metas: list[dict]) -> None:
        for (it, cands), scores, meta in zip(groups, scores_per_item, metas, strict=True):
            valid = [(c, s) for c, s in zip(cands, scores or [None] * len(cands), strict=True) if s is not None]
            if len(valid) < 2:
                state.drop("fewer_than_2_scored")
                continue
            kept = [c for c, _ in valid]
            self._emit_ranked(it, kept, [s for _, s in valid], ctx, state, meta)
            for a, b in itertools.combinations(valid, 2):
                if _rateable(a[0], b[0]):
                    state.emit("battles", _score_battle(it, a, b, self.cfg.mode))
            for (cw, sw), (cl, sl) in self._select(valid, state):
                if near_identical(cw.text, cl.text):
                    state.drop("near_identical_pair")
                    continue
                state.emit("preferences", self._pref(it, cw, cl, ctx, score_chosen=sw, score_rejected=sl, meta=meta))

    def _select(self, valid: list[tuple[Candidate, float]], state: ChunkState):
        ordered = sorted(valid, key=lambda cs: (-cs[1], cs[0].index))
        if self.cfg.pairs == "best_vs_worst":
            if ordered[0][1] == ordered[-1][1]:
                state.drop("tie")  # equal scores give no preference
                return []
            return [(ordered[0], ordered[-1])]
        return [(a, b) for a, b in itertools.combinations(ordered, 2) if a[1] > b[1]]

    # ------------------------------------------------------------------ rows

    def _pref(
        self, it: SourceItem, chosen: Candidate, rejected: Candidate, ctx: Context, **fields: Any
    ) -> PreferenceRecord:
        sc, sr = fields.pop("score_chosen", None), fields.pop("score_rejected", None)
        meta = {
            "mode": self.cfg.mode,
            "chosen_name": chosen.name,
            "rejected_name": rejected.name,
            "judge_model": ctx.llm("judge").model,
            **fields.pop("meta", {}),
        }
        return PreferenceRecord(
            id=stable_id(it.id, "judge", self.cfg.mode, chosen.index, rejected.index),
            prompt=it.prompt,
            chosen=[Message(role="assistant", content=chosen.text)],
            rejected=[Message(role="assistant", content=rejected.text)],
            method=f"judge_{self.cfg.mode}",
            score_chosen=sc,
            score_rejected=sr,
            margin=None if sc is None or sr is None else sc - sr,
            category=it.category,
            meta=meta,
            provenance=self._provenance(ctx, chosen),
            **fields,
        )

    def _emit_ranked(self, it, cands: list[Candidate], scores: list[float], ctx, state, meta: dict) -> None:
        state.emit(
            "ranked",
            RankedRecord(
                id=stable_id(it.id, "judge_ranked", self.cfg.mode),
                prompt=it.prompt,
                responses=[[Message(role="assistant", content=c.text)] for c in cands],
                scores=[float(s) for s in scores],
                method=f"judge_{self.cfg.mode}",
                category=it.category,
                meta={"names": [c.name for c in cands], "candidate_index": [c.index for c in cands], **meta},
                provenance=self._provenance(ctx, None),
            ),
        )

    def _provenance(self, ctx: Context, chosen: Candidate | None) -> Provenance:
        ref = template_ref(f"judge_{self.cfg.mode}", ctx.language)
        gen = chosen.name if chosen is not None and chosen.from_model else None
        return Provenance(generator_model=gen, sampling=self.cfg.judge_sampling.model_dump(), **ref)

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        return {"judge": judge_report(out_dir, self.cfg.mode, self.cfg.rating, ctx.seed)}


def _rateable(a: Candidate, b: Candidate) -> bool:
    """Battles worth keeping: model vs model (rating table) or the data's chosen vs rejected (agreement)."""
    return (a.from_model and b.from_model) or {a.name, b.name} == {"chosen", "rejected"}


def _battle(it: SourceItem, r: PairResult) -> dict[str, Any]:
    kind = "models" if r.i.from_model and r.j.from_model else "data"
    consistent = r.winner != "tie" or r.verdicts == ("C", "C")
    return {
        "id": stable_id(it.id, "battle", r.i.index, r.j.index),
        "item_id": it.id,
        "kind": kind,
        "mode": "pairwise",
        "model_a": r.i.name,
        "model_b": r.j.name,
        "winner": {"i": "a", "j": "b", "tie": "tie"}[r.winner],
        "verdicts": list(r.verdicts),
        "consistent": consistent,
        "p_a": r.p_i,
    }


def _score_battle(it: SourceItem, a: tuple[Candidate, float], b: tuple[Candidate, float], mode: str) -> dict[str, Any]:
    (ca, sa), (cb, sb) = a, b
    winner = "a" if sa > sb else "b" if sb > sa else "tie"
    kind = "models" if ca.from_model and cb.from_model else "data"
    return {
        "id": stable_id(it.id, "battle", ca.index, cb.index),
        "item_id": it.id,
        "kind": kind,
        "mode": mode,
        "model_a": ca.name,
        "model_b": cb.name,
        "winner": winner,
        "score_a": sa,
        "score_b": sb,
    }


# ---------------------------------------------------------------------- manifest report (finalize)


def judge_report(out_dir: Path, mode: str, rating: RatingSettings, seed: int) -> dict[str, Any]:
    """Judge-health figures and ratings from the committed files (no backend calls; idempotent)."""
    battles = read_jsonl(out_dir / "battles.jsonl")
    report: dict[str, Any] = {"mode": mode, "battles": len(battles), "position_bias": _position_stats(out_dir, mode)}
    if mode in ("pairwise", "joint") and battles:
        report["swap_consistency"] = round(sum(b["consistent"] for b in battles) / len(battles), 4)
    rated = [Battle(b["model_a"], b["model_b"], b["winner"]) for b in battles if b["kind"] == "models"]
    if len({m for b in rated for m in (b.model_a, b.model_b)}) >= 2:
        anchor = (rating.anchor, rating.anchor_rating) if rating.anchor else None
        bt = rate_pairwise(rated, "bt", anchor, rating.bootstrap, seed)
        elo = rate_pairwise(rated, "elo", anchor, rating.bootstrap, seed, rating.elo_k)
        plot_ratings(bt, out_dir / "bt_scores.png")
        report.update(
            bradley_terry=bt, elo={"method": "elo", "k": rating.elo_k, "models": elo["models"]}, chart="bt_scores.png"
        )
    pair = [b for b in battles if b["kind"] == "data" and b["winner"] != "tie"]
    if pair:  # AI-labeller alignment with the data's own label (RLAIF's "AI labeler alignment", arXiv 2309.00267)
        chosen_won = sum((b["model_a"] if b["winner"] == "a" else b["model_b"]) == "chosen" for b in pair)
        report["agreement_with_source"] = {"rate": round(chosen_won / len(pair), 4), "decisive": len(pair)}
    return report


def _position_stats(out_dir: Path, mode: str) -> dict[str, Any] | None:
    """Pairwise: slot-A win rate of single-order verdicts before combining (0.5 = unbiased).
    Listwise: how often the reply shown first is ranked first, against chance (1/k)."""
    rows = [
        r for r in read_jsonl(out_dir / "trace.jsonl") if r["step"] == f"judge_{mode}" and r["parse_status"] == "ok"
    ]
    if mode in ("pairwise", "joint"):
        verdicts = [(r["parsed"] if isinstance(r["parsed"], str) else _soft_slot(r["parsed"]["A"])) for r in rows]
        return position_bias(verdicts)
    if mode == "listwise" and rows:
        top = sum(r["parsed"][0] == 1 for r in rows) / len(rows)
        chance = sum(1 / len(r["parsed"]) for r in rows) / len(rows)
        return {"slot1_ranked_first_rate": round(top, 4), "chance": round(chance, 4), "rankings": len(rows)}
    return None


def _soft_slot(p_a: float) -> str:
    return "A" if p_a > 0.5 else "B" if p_a < 0.5 else "C"
