"""`pipeline=self_rewarding` (Yuan et al. 2024, arXiv 2401.10020): one AIFT(M_t) round.

Roles: `policy` (M_t) samples k candidates per prompt and, optionally, writes new prompts by few-shot
self-instruct; `judge` scores each candidate m times with the additive 5-point rubric. The judge
defaults to the policy backend itself, as in the paper (self-judging by design: the manifest notes it).

Per prompt: k candidates (T=0.7, top_p=0.9, k=4) -> m=3 judgements each, averaged over the ones that
parse -> chosen = best mean, rejected = worst mean -> preferences.jsonl; ties and candidates without a
valid judgement never form pairs. `finalize` adds length statistics of chosen vs rejected
(judges favour longer answers; Self-Rewarding's responses grow longer every iteration).

With `meta_judge.enabled` (Meta-Rewarding, Wu et al. 2024, arXiv 2407.19594 §2.2) the same judge role
also acts as meta-judge: per prompt it takes the candidate whose judge scores vary most, compares every
pair of its judgements in both orders (a win only when both orders agree), ranks the judgements by a
Bradley–Terry/Elo fit and writes the best vs the worst to `judge_preferences.jsonl`: DPO pairs whose
prompt is the exact judge prompt of the actor step and whose chosen / rejected are full judgement texts
(score line included; it is removed only inside the meta-judge prompt). The actor pairs keep the
length-controlled selection (`length_control_rho`). See synth/steps/meta_judge.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.io import ChunkWriter, read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.ranking import position_bias
from synth.records import Message, PreferenceRecord, Provenance, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps.base import Call, run_calls
from synth.steps.filters import NearDuplicateIndex, near_identical
from synth.steps.meta_judge import battles, distinct_judgements, elo, meta_pair, pick_response
from synth.steps.self_reward import (
    Scored,
    build_judge,
    build_self_instruct,
    judge_candidates,
    parse_task,
    pick_examples,
    select_pair,
)


class NewPrompts(BaseModel):
    """Few-shot self-instruct prompt generation from the source's prompts as seeds (the paper's
    self-instruction creation step)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    per_seed: int = Field(1, ge=1)  # new prompts requested per seed item
    shots: int = Field(8, ge=1)  # demonstrations per request (the paper uses 8-shot)
    keep_seed_prompts: bool = False  # also build pairs for the seed prompts themselves
    near_duplicate_threshold: float = Field(
        0.7, gt=0, le=1
    )  # character-shingle Jaccard against seeds and earlier prompts
    sampling: Sampling = Sampling(temperature=0.6, top_p=0.9, max_new_tokens=256)  # as Oxen-AI's re-implementation


class MetaJudge(BaseModel):
    """Meta-Rewarding's meta-judge (arXiv 2407.19594 §2.2): judge-preference pairs for training the judge."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=512)  # not fixed by the paper; greedy
    max_chosen_chars: int | None = Field(None, ge=1)  # drop a pair whose chosen judgement is longer (length filter)


class SelfRewardingConfig(PipelineConfig):
    name: str = "self_rewarding"
    k: int = Field(4, ge=2)  # candidates per prompt (N = 4 in the paper)
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=1024)  # the paper's candidate sampling
    judge_samples: int = Field(3, ge=1)  # m judgements per candidate, averaged (3 in the paper)
    judge_sampling: Sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=512)
    min_valid_judgements: int = Field(1, ge=1)  # failed judgements are dropped, the candidate only when all fail
    length_control_rho: float = Field(0.0, ge=0, le=1)  # Meta-Rewarding's ρ (arXiv 2407.19594); 0 = max vs min
    iteration: int = Field(1, ge=0)  # t of AIFT(M_t), written on every row
    new_prompts: NewPrompts = NewPrompts()
    meta_judge: MetaJudge = MetaJudge()
    drop_truncated: bool = True  # false only for smoke tests with models that never stop (tiny)

    @model_validator(mode="after")
    def _meta_needs_several_judgements(self) -> SelfRewardingConfig:
        if self.meta_judge.enabled and self.judge_samples < 2:
            raise ValueError("meta_judge.enabled needs judge_samples >= 2 (it compares judgements of one response)")
        return self


class SelfRewardingPipeline(Pipeline):
    Config = SelfRewardingConfig
    outputs = ("preferences",)
    roles = ("policy", "judge")

    def __init__(self, cfg: SelfRewardingConfig):
        super().__init__(cfg)
        self.outputs = (
            ("preferences",)
            + (("prompts",) if cfg.new_prompts.enabled else ())
            + (("judge_preferences",) if cfg.meta_judge.enabled else ())
        )
        self._seeds: list[str] = []
        self._dedup: NearDuplicateIndex | None = None

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        items = list(super().items(ctx, source))
        self._seeds = [it.prompt_text for it in items]  # the few-shot pool for new prompts
        return items

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:
        np_cfg = self.cfg.new_prompts
        if np_cfg.enabled:  # dedup against the seeds and every prompt earlier chunks committed
            self._dedup = NearDuplicateIndex(np_cfg.near_duplicate_threshold)
            for i, seed in enumerate(self._seeds):
                self._dedup.add(f"seed/{i}", seed)
            for row in read_jsonl(writer.path("prompts")):
                self._dedup.add(row["id"], row["prompt"][-1]["content"])

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        targets = list(items) if (not self.cfg.new_prompts.enabled or self.cfg.new_prompts.keep_seed_prompts) else []
        if self.cfg.new_prompts.enabled:
            targets += self._new_prompts(items, ctx, state)
        for it in targets:
            if it.category:
                state.count(f"category/{it.category}")
        groups = self._candidates(targets, ctx, state)
        params = self.cfg.judge_sampling.params()
        scored = judge_candidates(ctx, state, groups, params, self.cfg.judge_samples, self.cfg.min_valid_judgements)
        for (it, _), cands in zip(groups, scored, strict=True):
            self._emit(it, cands, ctx, state)
        if self.cfg.meta_judge.enabled:
            self._meta_judge([it for it, _ in groups], scored, ctx, state)

    def _new_prompts(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> list[SourceItem]:
        cfg = self.cfg.new_prompts
        calls = [
            Call(it.id, build_self_instruct(ctx.language, pick_examples(ctx, self._seeds, it.id, cfg.shots)))
            for it in items
        ]
        results = run_calls(
            ctx, state, "self_instruct", "policy", calls, cfg.sampling.params(n=cfg.per_seed), parse=parse_task
        )
        out = []
        for it, samples in zip(items, results, strict=True):
            for smp in samples:
                if not smp.ok:
                    continue  # counted as parse_failed/self_instruct (or truncated/self_instruct)
                text = smp.parsed
                new = SourceItem(
                    id=stable_id(it.id, "self_instruct", smp.index),
                    prompt=[Message(role="user", content=text)],
                    category=it.category,
                    meta={"generated_from": it.id},
                )
                dup = self._dedup.add_unless_duplicate(new.id, smp.parsed)
                if dup is not None:
                    state.drop_part("new_prompt", f"new_prompt_{dup[0]}_duplicate")
                    continue
                state.emit("prompts", new)
                out.append(new)
        return out

    def _candidates(
        self, targets: list[SourceItem], ctx: Context, state: ChunkState
    ) -> list[tuple[SourceItem, list[str]]]:
        calls = [Call(it.id, list(it.prompt)) for it in targets]
        results = run_calls(ctx, state, "candidates", "policy", calls, self.cfg.sampling.params(n=self.cfg.k))
        groups = []
        for it, samples in zip(targets, results, strict=True):
            texts = [s.text for s in samples if not (s.completion.truncated and self.cfg.drop_truncated)]
            if len(texts) < len(samples):  # a truncated answer is not a training target
                state.drop_part("candidate", "truncated_candidate", len(samples) - len(texts))
            groups.append((it, texts))
        return groups

    def _emit(self, it: SourceItem, cands: list[Scored], ctx: Context, state: ChunkState) -> None:
        unscored = sum(c.mean is None for c in cands)
        if unscored:
            state.drop_part("candidate", "candidate_without_valid_judgement", unscored)
        pair = select_pair(cands, self.cfg.length_control_rho)
        if pair is None:
            state.drop("tie" if sum(c.mean is not None for c in cands) >= 2 else "fewer_than_2_scored")
            return
        chosen, rejected = pair
        if near_identical(chosen.text, rejected.text):
            state.drop("near_identical_pair")  # no signal in a pair of (near-)equal texts
            return
        policy, judge = ctx.llm("policy").model, ctx.llm("judge").model
        state.emit(
            "preferences",
            PreferenceRecord(
                id=stable_id(it.id, "self_rewarding", self.cfg.iteration),
                prompt=it.prompt,
                chosen=[Message(role="assistant", content=chosen.text)],
                rejected=[Message(role="assistant", content=rejected.text)],
                method="self_rewarding",
                score_chosen=chosen.mean,
                score_rejected=rejected.mean,
                margin=chosen.mean - rejected.mean,
                category=it.category,
                meta={
                    "iteration": self.cfg.iteration,
                    "chosen_index": chosen.index,
                    "rejected_index": rejected.index,
                    "candidates": [{"text": c.text, "scores": c.scores, "mean": c.mean} for c in cands],
                    "judge_model": judge,
                    "self_judged": judge == policy,
                    "source_meta": it.meta,
                },
                provenance=Provenance(
                    generator_model=policy,
                    sampling={**self.cfg.sampling.model_dump(), "n": self.cfg.k},
                    iteration=self.cfg.iteration,
                    **template_ref("self_reward_judge", ctx.language),
                ),
            ),
        )

    def _meta_judge(
        self, targets: list[SourceItem], scored: list[list[Scored]], ctx: Context, state: ChunkState
    ) -> None:
        """One meta-judge call for the chunk; at most one judge-preference pair per prompt."""
        jobs = []
        for it, cands in zip(targets, scored, strict=True):
            cand = pick_response(cands)
            judged = distinct_judgements(cand) if cand is not None else []
            if len(judged) < 2:
                state.drop_part("meta_pair", "meta_no_disagreeing_judgements")
                continue
            jobs.append((it, cand, judged))
        cfg = self.cfg.meta_judge
        for (it, cand, judged), table in zip(jobs, battles(ctx, state, jobs, cfg.sampling.params()), strict=True):
            unresolved = sum(b.winner is None for b in table)
            if unresolved:
                state.drop_part("meta_battle", "meta_battle_unresolved", unresolved)
            ratings = elo(judged, table)
            pair = meta_pair(judged, ratings, cfg.max_chosen_chars)
            if isinstance(pair, str):
                state.drop_part("meta_pair", pair)
                continue
            chosen, rejected = pair
            judge = ctx.llm("judge").model
            state.emit(
                "judge_preferences",
                PreferenceRecord(
                    id=stable_id(it.id, "meta_judge", self.cfg.iteration),
                    prompt=build_judge(ctx.language, it.prompt, cand.text),
                    chosen=[Message(role="assistant", content=chosen.text)],
                    rejected=[Message(role="assistant", content=rejected.text)],
                    method="meta_judge",
                    score_chosen=ratings[chosen.index],
                    score_rejected=ratings[rejected.index],
                    margin=ratings[chosen.index] - ratings[rejected.index],
                    category=it.category,
                    meta={
                        "iteration": self.cfg.iteration,
                        "item_id": it.id,
                        "candidate_index": cand.index,
                        "judge_score_chosen": chosen.score,
                        "judge_score_rejected": rejected.score,
                        "elo": {str(k): round(v, 3) for k, v in ratings.items()},
                        "battles": [
                            {"judgements": [b.i.index, b.j.index], "verdicts": list(b.verdicts), "winner": b.winner}
                            for b in table
                        ],
                        "judge_model": judge,
                        "self_judged": judge == ctx.llm("policy").model,
                    },
                    provenance=Provenance(
                        generator_model=judge,
                        sampling=cfg.sampling.model_dump(),
                        iteration=self.cfg.iteration,
                        **template_ref("meta_judge", ctx.language),
                    ),
                ),
            )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        rows = read_jsonl(out_dir / "preferences.jsonl")
        report = {
            "iteration": self.cfg.iteration,
            **length_stats(rows),
            **score_stats(rows),
            "self_judged_rows": sum(bool(r["meta"].get("self_judged")) for r in rows),
        }
        if self.cfg.meta_judge.enabled:
            report["meta_judge"] = meta_judge_report(out_dir)
        return {"self_rewarding": report}


def meta_judge_report(out_dir: Path) -> dict[str, Any]:
    """Judge-preference pairs and the meta-judge's known biases (arXiv 2407.19594 §4: it favours the
    higher-scored judgement and the first slot): the share of pairs whose chosen judgement has the
    higher score, the slot-A win rate of single-order verdicts, and the judgement lengths."""

    rows = read_jsonl(out_dir / "judge_preferences.jsonl")
    verdicts = [
        r["parsed"]
        for r in read_jsonl(out_dir / "trace.jsonl")
        if r["step"] == "meta_judge" and r["parse_status"] == "ok"
    ]
    report: dict[str, Any] = {"pairs": len(rows), "position_bias": position_bias(verdicts)}
    if rows:
        higher = sum(r["meta"]["judge_score_chosen"] > r["meta"]["judge_score_rejected"] for r in rows)
        report["chosen_has_higher_score_rate"] = round(higher / len(rows), 4)
        report.update(length_stats(rows))
    return report


def length_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Chosen vs rejected length in characters (logged every iteration: judges favour
    length, Zheng et al. 2023, arXiv 2306.05685; warn when the
    chosen answer is the longer one in more than ~70% of pairs)."""
    if not rows:
        return {"length": None}
    lc = [len(r["chosen"][-1]["content"]) for r in rows]
    lr = [len(r["rejected"][-1]["content"]) for r in rows]
    longer = sum(a > b for a, b in zip(lc, lr, strict=True)) / len(rows)
    return {
        "length": {
            "chosen_mean_chars": round(statistics.mean(lc), 1),
            "rejected_mean_chars": round(statistics.mean(lr), 1),
            "chosen_median_chars": statistics.median(lc),
            "rejected_median_chars": statistics.median(lr),
            "chosen_longer_rate": round(longer, 4),
            "length_bias_alert": longer > 0.7,
        }
    }


def score_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean chosen/rejected scores and margin; a skewed score distribution shows up here
    (most Self-Rewarding judgements land on 4)."""
    if not rows:
        return {"scores": None}
    return {
        "scores": {
            "chosen_mean": round(statistics.mean(r["score_chosen"] for r in rows), 4),
            "rejected_mean": round(statistics.mean(r["score_rejected"] for r in rows), 4),
            "margin_mean": round(statistics.mean(r["margin"] for r in rows), 4),
        }
    }
