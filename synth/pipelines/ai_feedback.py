"""`pipeline=ai_feedback`: RL-CAI / RLAIF preference labelling (Bai et al. 2022, arXiv 2212.08073 §4.1;
Lee et al. 2023, arXiv 2309.00267 §2).

For each prompt (every stage is one batched call for the whole chunk):
1. two responses: two samples from the policy (`responses: policy`, n=2 in one call) or
   the source's chosen / rejected pair (`responses: source`; y1 = the source's chosen);
2. `principles_per_pair` judge principles drawn for this pair (a different random
   principle per comparison; more than one = the optional ensemble, averaged);
3. the judge role answers the multiple-choice question in BOTH orders (`synth.steps.compare`): soft
   p(y1) from option log-probs at the answer stem, or from k sampled verdicts; optional two-step CoT
   with the probabilities clamped to [0.4, 0.6];
4. soft_labels.jsonl: every pair, with p(y1), the per-order values, principle ids, whether the orders
   agree, parse_ok (soft preference record);
   preferences.jsonl: hard pairs only where both orders agree and |p - 0.5| >= `band` (a conservative
   rule). A judge that always picks slot (A) gives p = 0.5 with disagreeing orders, so it produces no
   hard labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.io import read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.records import Message, PreferenceRecord, Provenance, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps import compare
from synth.steps.base import Call, assistant, run_calls
from synth.steps.filters import near_identical
from synth.steps.revision import parse_reply


class AIFeedbackConfig(PipelineConfig):
    name: str = "ai_feedback"
    responses: Literal["policy", "source"] = "policy"
    sampling: Sampling = Sampling(temperature=1.0, max_new_tokens=512)  # T = 1
    principles_per_pair: int = Field(1, ge=1)  # > 1 = ensemble over principles
    label: compare.LabelMode = "auto"  # auto: logprobs, falling back to votes where none come back
    top_logprobs: int = Field(20, ge=2, le=20)  # vLLM's --max-logprobs and OpenAI's cap
    votes: int = Field(5, ge=1)  # k sampled verdicts per order when reading text (no paper value)
    vote_sampling: Sampling = Sampling(temperature=1.0, max_new_tokens=8)
    cot: bool = False  # two-step chain of thought
    cot_sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=512)  # greedy rationale
    cot_clamp: tuple[float, float] = (0.4, 0.6)  # clamp of the chain-of-thought preference
    band: float = Field(0.05, ge=0.0, lt=0.5)  # no hard label when |p - 0.5| < band
    near_identical: float = Field(0.9, gt=0, le=1)  # identical policy samples are not compared

    @field_validator("cot_clamp")
    @classmethod
    def _clamp_around_half(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= 0.5 <= v[1] <= 1.0:
            raise ValueError(f"cot_clamp must satisfy 0 <= lo <= 0.5 <= hi <= 1, got {list(v)}")
        return v


class SoftPreferenceRecord(BaseModel):
    """The soft preference record: `p_a` = p(response_a preferred) = p(y1)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    prompt: list[Message]
    response_a: str
    response_b: str
    p_a: float | None
    p_a_order1: float | None
    p_a_order2: float | None
    orders_agree: bool
    principle_ids: list[str]
    per_principle: list[dict[str, Any]]
    cot: list[str | None] | None
    clamped: bool
    label_model: str
    parse_ok: bool
    responses: str
    category: str | None = None
    hard_label: bool = False


class AIFeedbackPipeline(Pipeline):
    Config = AIFeedbackConfig
    outputs = ("preferences", "soft_labels")
    roles = ("policy", "judge")

    def check_constitution(self, constitution) -> None:
        if constitution is None or not constitution.judge_principles():
            from synth.errors import ConstitutionError

            name = getattr(constitution, "name", None)
            raise ConstitutionError(
                f"pipeline=ai_feedback compares answers with the principles' `judge` questions and "
                f"constitution={name} has none; add `judge:` to its principles or use constitution=hhh_en"
            )

    def prefill_roles(self) -> tuple[str, ...]:
        return ("judge",)  # every label mode (log-probs, votes, CoT) reads after a prefilled answer stem

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        self.check_constitution(ctx.constitution)
        return super().items(ctx, source)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        pairs = self.responses(items, ctx, state)
        comps = [c for it, y1, y2 in pairs for c in self.comparisons(it, y1, y2, ctx)]
        judged = list(zip(comps, compare.judge_both_orders(ctx, state, comps, self.settings()), strict=True))
        m = self.cfg.principles_per_pair
        for n, (it, y1, y2) in enumerate(pairs):
            self.emit(it, y1, y2, judged[n * m : (n + 1) * m], ctx, state)

    def settings(self) -> compare.JudgeSettings:
        c = self.cfg
        return compare.JudgeSettings(
            cot=c.cot,
            label=c.label,
            votes=c.votes,
            top_logprobs=c.top_logprobs,
            reason_params=c.cot_sampling.params(),
            vote_params=c.vote_sampling.params(),
            clamp_cot=c.cot_clamp,
        )

    def responses(
        self, items: Sequence[SourceItem], ctx: Context, state: ChunkState
    ) -> list[tuple[SourceItem, str, str]]:
        if self.cfg.responses == "source":
            out = []
            for it in items:
                if not it.chosen or not it.rejected:
                    state.drop("no_source_pair")
                    continue
                out.append((it, it.chosen[-1].content, it.rejected[-1].content))
            return out
        return self.sample_pairs(items, ctx, state)

    def sample_pairs(
        self, items: Sequence[SourceItem], ctx: Context, state: ChunkState
    ) -> list[tuple[SourceItem, str, str]]:
        """ONE policy call, n=2 per prompt; truncated or empty samples are not compared."""
        calls = [Call(it.id, list(it.prompt)) for it in items]
        results = run_calls(ctx, state, "respond", "policy", calls, self.cfg.sampling.params(n=2), parse_reply)
        out = []
        for it, (a, b) in zip(items, results, strict=True):
            bad = next((s for s in (a, b) if not s.ok), None)
            if bad is not None:
                state.drop("response_truncated" if bad.completion.truncated else "response_empty")
            elif near_identical(a.parsed_text, b.parsed_text, self.cfg.near_identical):
                state.drop("responses_near_identical")
            else:
                out.append((it, a.parsed_text, b.parsed_text))
        return out

    def comparisons(self, it: SourceItem, y1: str, y2: str, ctx: Context) -> list[compare.Comparison]:
        """`principles_per_pair` distinct judge principles, from the item's category when it has some
        (repeats only when the pool is smaller than `principles_per_pair`)."""
        cons = ctx.constitution
        pool = [p for p in cons.principles_for(it.category) if p.judge] if it.category else []
        pool = pool or cons.judge_principles()
        rng = ctx.rng(it.id, "ai_feedback")
        picked = rng.sample(pool, min(self.cfg.principles_per_pair, len(pool)))
        picked += [rng.choice(pool) for _ in range(self.cfg.principles_per_pair - len(picked))]
        return [compare.Comparison(it.id, list(it.prompt), y1, y2, p) for p in picked]

    def emit(self, it: SourceItem, y1: str, y2: str, judged, ctx: Context, state: ChunkState) -> None:
        label = compare.combine([(v1.p, v2.p) for _, (v1, v2) in judged])
        rid = stable_id(it.id, "ai_feedback", y1, y2)
        soft = SoftPreferenceRecord(
            id=rid,
            prompt=it.prompt,
            response_a=y1,
            response_b=y2,
            p_a=label.p,
            p_a_order1=label.p_order1,
            p_a_order2=label.p_order2,
            orders_agree=label.orders_agree,
            principle_ids=[c.principle.id for c, _ in judged],
            per_principle=[
                {"principle_id": c.principle.id, "p_a_order1": v1.p, "p_a_order2": v2.p} for c, (v1, v2) in judged
            ],
            cot=[r for _, (v1, v2) in judged for r in (v1.reasoning, v2.reasoning)] if self.cfg.cot else None,
            clamped=self.cfg.cot,
            label_model=ctx.llm("judge").model,
            parse_ok=label.p is not None,
            responses=self.cfg.responses,
            category=it.category,
        )
        if it.category:
            state.count(f"category/{it.category}")
        reason = self.hard_label_blocker(label)
        if reason is not None:
            state.drop(reason)
        else:
            soft.hard_label = True
            state.emit("preferences", self.preference(it, y1, y2, label, soft, ctx))
        state.emit("soft_labels", soft)

    def hard_label_blocker(self, label: compare.SoftLabel) -> str | None:
        """Why this pair gets no hard label (it stays in soft_labels.jsonl), or None."""
        if label.p is None:
            return "label_parse_failed"
        if not label.orders_agree:
            return "orders_disagree"
        if abs(label.p - 0.5) < self.cfg.band:
            return "label_within_band"
        return None

    def preference(
        self, it: SourceItem, y1: str, y2: str, label: compare.SoftLabel, soft: SoftPreferenceRecord, ctx: Context
    ) -> PreferenceRecord:
        y1_wins = label.p > 0.5  # type: ignore[operator]
        flip = (lambda p: p) if y1_wins else (lambda p: 1.0 - p)
        ref = template_ref("mc_compare", ctx.language)
        return PreferenceRecord(
            id=soft.id,
            prompt=it.prompt,
            chosen=[assistant(y1 if y1_wins else y2)],
            rejected=[assistant(y2 if y1_wins else y1)],
            method="ai_feedback",
            principle_ids=soft.principle_ids,
            p_chosen=flip(label.p),
            category=it.category,
            meta={
                "p_chosen_order1": flip(label.p_order1),
                "p_chosen_order2": flip(label.p_order2),
                "cot": self.cfg.cot,
                "responses": self.cfg.responses,
                "source_chosen_won": y1_wins if self.cfg.responses == "source" else None,
            },
            provenance=Provenance(
                generator_model=ctx.llm("judge").model,
                sampling={"label": self.cfg.label, "cot": self.cfg.cot},
                template_id=ref["template_id"],
                template_hash=ref["template_hash"],
            ),
        )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        """Judge-health figures from the committed files (position consistency, slot-A rate,
        length bias; alignment with the source's labels when `responses: source`)."""
        rows = [r for r in read_jsonl(out_dir / "soft_labels.jsonl") if r["parse_ok"]]
        if not rows:
            return {"judge_health": {"labelled_pairs": 0}}
        # p(slot A chosen): order 1 shows y1 as (A), order 2 shows y2 as (A).
        slot_a = [x for r in rows for x in (r["p_a_order1"], 1.0 - r["p_a_order2"])]
        health: dict[str, Any] = {
            "labelled_pairs": len(rows),
            "orders_agree_rate": round(sum(r["orders_agree"] for r in rows) / len(rows), 4),
            "mean_p_slot_a": round(sum(slot_a) / len(slot_a), 4),
            "hard_labels": sum(r["hard_label"] for r in rows),
        }
        if self.cfg.responses == "source":  # AI labeler alignment with the dataset's chosen side
            health["source_alignment"] = round(sum(r["p_a"] > 0.5 for r in rows) / len(rows), 4)
        prefs = read_jsonl(out_dir / "preferences.jsonl")
        if prefs:  # verbosity bias: worth a look when chosen is longer in more than ~70% of pairs
            longer = sum(len(p["chosen"][-1]["content"]) > len(p["rejected"][-1]["content"]) for p in prefs)
            health["chosen_longer_rate"] = round(longer / len(prefs), 4)
        return {"judge_health": health}
