"""`pipeline=rlrf`: Reinforcement Learning from Reflective Feedback data (Lee et al. 2024, arXiv 2403.14238).

Roles: `policy` samples n candidates and refines the best ones with the feedback (self-reflection);
`judge` is the fine-grained feedback model (default: the policy backend itself; the paper uses a
feedback model fine-tuned on GPT-4 feedback, so point judge= at a strong model when you can).

Per prompt, one batched call per stage:
1. sample n candidates; 2. per-aspect feedback {critique, rating 1-3} for each; 3. pick the top
`refine_top` by mean aspect rating; 4. the policy refines each with its feedback; 5. the refined
answers are judged again with the same aspects; 6. pairs (the paper's preference construction): chosen = the
highest-scoring response of the pool (n + refined; usually a refined one), rejected = the
lowest-scoring one; or, with `pairing: refined_vs_original`, each refined answer over its own original
when the re-judged score is higher. Rows keep the per-aspect ratings and critiques of both sides, so
each aspect can serve as its own reward channel.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synth.io import read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.pipelines.self_rewarding import length_stats
from synth.prompts import template_ref
from synth.records import Message, PreferenceRecord, Provenance, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps.base import Call, run_calls
from synth.steps.filters import near_identical
from synth.steps.rlrf import (
    Aspect,
    aspect_score,
    build_feedback,
    build_refine,
    feedback_schema,
    load_aspects,
    parse_feedback,
    select_aspects,
)


class RlrfConfig(PipelineConfig):
    name: str = "rlrf"
    n: int = Field(4, ge=1)  # candidates per prompt (the paper's pool is n + m = 30 [sum]; 4 + 2 keeps runs cheap)
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=1024)
    criteria: str = "default"  # default (shipped FLASK-style rubric) | constitution | <rubric YAML path>
    max_aspects: int = Field(6, ge=1)  # aspects judged per prompt (category matches first, then a seeded draw)
    feedback_sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=1024)
    refine_top: int = Field(2, ge=0)  # m: how many of the best candidates are refined
    refine_sampling: Sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=1024)
    pairing: Literal["best_vs_worst", "refined_vs_original"] = "best_vs_worst"
    iteration: int = Field(1, ge=0)
    drop_truncated: bool = True  # false only for smoke tests with models that never stop (tiny)


@dataclass
class Resp:
    """A response in the pool with its feedback; `refined_from` is the candidate index it refines."""

    index: int
    text: str
    feedback: dict[str, Any] | None = None
    score: float | None = None
    refined_from: int | None = None


class RlrfPipeline(Pipeline):
    Config = RlrfConfig
    outputs = ("preferences",)
    roles = ("policy", "judge")

    def __init__(self, cfg: RlrfConfig):
        super().__init__(cfg)
        self._aspects: list[Aspect] | None = None

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        if self._aspects is None:
            self._aspects = load_aspects(self.cfg.criteria, ctx.language, ctx.constitution)
        chosen_aspects = {it.id: self._select(ctx, it) for it in items}
        pools = self._sample(items, ctx, state)
        self._judge(items, pools, chosen_aspects, ctx, state, "rlrf_feedback", lambda r: r.refined_from is None)
        self._refine(items, pools, chosen_aspects, ctx, state)
        self._judge(items, pools, chosen_aspects, ctx, state, "rlrf_rejudge", lambda r: r.refined_from is not None)
        for it in items:
            if it.category:
                state.count(f"category/{it.category}")
            self._emit(it, pools[it.id], chosen_aspects[it.id], ctx, state)

    def _select(self, ctx: Context, it: SourceItem) -> list[Aspect]:
        category_of = (
            {p.id: p.category for p in ctx.constitution.principles} if self.cfg.criteria == "constitution" else None
        )
        return select_aspects(ctx, it, self._aspects, self.cfg.max_aspects, category_of)

    def _sample(self, items, ctx: Context, state: ChunkState) -> dict[str, list[Resp]]:
        calls = [Call(it.id, list(it.prompt)) for it in items]
        results = run_calls(ctx, state, "candidates", "policy", calls, self.cfg.sampling.params(n=self.cfg.n))
        pools = {}
        for it, samples in zip(items, results, strict=True):
            kept = [s.text for s in samples if not (s.completion.truncated and self.cfg.drop_truncated)]
            if len(kept) < len(samples):  # never a training target
                state.drop_part("candidate", "truncated_candidate", len(samples) - len(kept))
            pools[it.id] = [Resp(i, t) for i, t in enumerate(kept)]
        return pools

    def _judge(self, items, pools, aspects, ctx: Context, state: ChunkState, step: str, which) -> None:
        """ONE feedback call for every selected response of the chunk; score = mean aspect rating."""
        todo = [(it, r) for it in items for r in pools[it.id] if which(r)]
        calls = [
            Call(it.id, build_feedback(ctx.language, it.prompt, r.text, aspects[it.id]), {"response": r.index})
            for it, r in todo
        ]
        base = self.cfg.feedback_sampling.params()
        params = [base.replace(json_schema=feedback_schema(aspects[it.id], base.max_new_tokens)) for it, _ in todo]
        for (it, r), (smp,) in zip(
            todo, run_calls(ctx, state, step, "judge", calls, params, parse=parse_feedback), strict=True
        ):
            parsed = smp.parsed if smp.ok else None
            r.score = aspect_score(parsed, aspects[it.id])
            if parsed is not None and r.score is None:
                state.drop_part("candidate", "feedback_missing_aspects")  # parsed, but not every selected aspect rated
            r.feedback = parsed if r.score is not None else None

    def _refine(self, items, pools, aspects, ctx: Context, state: ChunkState) -> None:
        """The policy reflects on the feedback of its top candidates and rewrites them (ONE call)."""
        todo = []
        for it in items:
            scored = sorted((r for r in pools[it.id] if r.score is not None), key=lambda r: (-r.score, r.index))
            todo += [(it, r) for r in scored[: self.cfg.refine_top]]
        calls = [
            Call(it.id, build_refine(ctx.language, it.prompt, r.text, r.feedback, aspects[it.id]), {"refines": r.index})
            for it, r in todo
        ]
        results = run_calls(ctx, state, "rlrf_refine", "policy", calls, self.cfg.refine_sampling.params())
        for (it, r), (smp,) in zip(todo, results, strict=True):
            if (smp.completion.truncated and self.cfg.drop_truncated) or not smp.text.strip():
                state.drop_part("refinement", "refinement_truncated_or_empty")
                continue
            pool = pools[it.id]
            pool.append(Resp(len(pool), smp.text.strip(), refined_from=r.index))

    def _emit(self, it: SourceItem, pool: list[Resp], aspects: list[Aspect], ctx: Context, state: ChunkState) -> None:
        scored = [r for r in pool if r.score is not None]
        refined = [r for r in scored if r.refined_from is not None]
        if len(scored) < 2:
            state.drop("fewer_than_2_scored")
            return
        pairs = self._pairs(pool, scored, refined)
        if not pairs:
            state.drop("tie" if self.cfg.pairing == "best_vs_worst" else "no_refinement_improved")
        report = [{"from": r.refined_from, "before": pool[r.refined_from].score, "after": r.score} for r in refined]
        for chosen, rejected in pairs:
            if near_identical(chosen.text, rejected.text):
                state.drop("near_identical_pair")
                continue
            state.emit("preferences", self._row(it, chosen, rejected, aspects, report, ctx))

    def _pairs(self, pool: list[Resp], scored: list[Resp], refined: list[Resp]) -> list[tuple[Resp, Resp]]:
        if self.cfg.pairing == "refined_vs_original":
            return [(r, pool[r.refined_from]) for r in refined if r.score > pool[r.refined_from].score]
        # best of the pool (a refined answer wins a score tie: the spec's chosen side is "usually refined")
        chosen = max(scored, key=lambda r: (r.score, r.refined_from is not None, -r.index))
        rejected = min(scored, key=lambda r: (r.score, r.refined_from is not None, r.index))
        return [(chosen, rejected)] if chosen.score > rejected.score else []

    def _row(
        self, it: SourceItem, chosen: Resp, rejected: Resp, aspects: list[Aspect], report, ctx: Context
    ) -> PreferenceRecord:
        def side(r: Resp) -> dict[str, Any]:
            return {
                "source": "refined" if r.refined_from is not None else "sample",
                "refined_from": r.refined_from,
                "score": r.score,
                "feedback": r.feedback,
                "aspect_scores": {a.id: r.feedback[a.id]["rating"] for a in aspects},
            }

        principle_ids = [a.id for a in aspects] if self.cfg.criteria == "constitution" else []
        return PreferenceRecord(
            id=stable_id(it.id, "rlrf", self.cfg.iteration, chosen.index, rejected.index),
            prompt=it.prompt,
            chosen=[Message(role="assistant", content=chosen.text)],
            rejected=[Message(role="assistant", content=rejected.text)],
            method="rlrf",
            principle_ids=principle_ids,
            score_chosen=chosen.score,
            score_rejected=rejected.score,
            margin=chosen.score - rejected.score,
            category=it.category,
            meta={
                "source_id": it.id,
                "iteration": self.cfg.iteration,
                "pairing": self.cfg.pairing,
                "aspects": [a.id for a in aspects],
                "chosen": side(chosen),
                "rejected": side(rejected),
                "refinements": report,
                "judge_model": ctx.llm("judge").model,
            },
            provenance=Provenance(
                generator_model=ctx.llm("policy").model,
                sampling={**self.cfg.sampling.model_dump(), "n": self.cfg.n},
                iteration=self.cfg.iteration,
                **template_ref("rlrf_feedback", ctx.language),
            ),
        )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        """Refinement gains and length statistics (refinement tends to lengthen answers)."""
        rows = read_jsonl(out_dir / "preferences.jsonl")
        per_prompt = {r["meta"]["source_id"]: r["meta"]["refinements"] for r in rows}  # rows of one prompt share it
        gains = [x["after"] - x["before"] for refs in per_prompt.values() for x in refs]
        refined_chosen = sum(r["meta"]["chosen"]["source"] == "refined" for r in rows)
        return {
            "rlrf": {
                "iteration": self.cfg.iteration,
                **length_stats(rows),
                "chosen_is_refined_rate": round(refined_chosen / len(rows), 4) if rows else None,
                "refinement_score_gain_mean": round(statistics.mean(gains), 4) if gains else None,
                "refinements_improved_rate": round(sum(g > 0 for g in gains) / len(gains), 4) if gains else None,
            }
        }
