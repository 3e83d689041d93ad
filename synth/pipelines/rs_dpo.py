"""`pipeline=rs_dpo`: RS-DPO's preference data (Khaki et al. 2024, arXiv 2402.10038, Algorithm 1).

Roles: `policy` is the SFT model the k responses are sampled from (RS-DPO is offline: sample from the
SFT model, not from the policy being trained); the scorer is, by `scorer.kind`,
- `model`: a reward model trained by `train loop=reward` (the paper's setting), in-process;
- `judge`: the `judge` role grading each response with the MT-Bench 1-10 rubric (m samples averaged);
- `function`: a Python `module:function(prompts, completions)` returning one float (or None) each.

Per prompt: k samples (one batched call per chunk) -> truncated and duplicate samples dropped -> rewards
(one scorer pass per chunk) -> every ordered pair (y_j, y_l) with σ((r_j − r_l)/τ) > η becomes a
preference row, chosen y_j, rejected y_l (largest gaps first, at most `max_pairs_per_prompt`).

Outputs: `preferences.jsonl` (TRL conversational columns, reward of each side, gap and σ in meta) and
`ranked.jsonl` (every scored sample with its reward, for listwise objectives). Train with `train
loop=preference loss=dpo` against the same SFT model as reference.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.io import ChunkWriter, read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.pipelines.self_rewarding import length_stats
from synth.prompts import template_ref
from synth.records import Message, PreferenceRecord, Provenance, RankedRecord, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps.base import Call, run_calls
from synth.steps.candidates import Candidate
from synth.steps.filters import near_identical
from synth.steps.judge import judge_rubric
from synth.steps.rejection import FunctionScorer, ModelScorer, gap_pairs, normalize, trace_scores, unique_texts


class ScorerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["model", "judge", "function"] = "model"
    path: str | None = None  # kind=model: a `train loop=reward` output folder (final/ or the run folder)
    function: str | None = None  # kind=function: module:function(prompts, completions) -> list[float | None]
    device: str = "auto"  # kind=model
    batch_size: int = Field(8, ge=1)  # kind=model
    judge_samples: int = Field(1, ge=1)  # kind=judge: ratings per response, averaged
    judge_sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=512)  # kind=judge (MT-Bench: T=0)

    @model_validator(mode="after")
    def _needs(self) -> ScorerSettings:
        if self.kind == "model" and not self.path:
            raise ValueError(
                "kind=model needs path=<a train loop=reward output folder> (or use kind=judge / kind=function)"
            )
        if self.kind == "function" and not self.function:
            raise ValueError("kind=function needs function=<module:function>")
        return self


class RsDpoConfig(PipelineConfig):
    name: str = "rs_dpo"
    k: int = Field(16, ge=2)  # samples per prompt
    sampling: Sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=512)
    scorer: ScorerSettings = ScorerSettings(kind="judge")
    tau: float = Field(1.0, gt=0)  # τ of σ((r_j − r_l)/τ)
    eta: float = Field(0.85, ge=0.5, lt=1)  # η; >= 0.5 so that a pair can never pass in both orders
    normalize: Literal["none", "prompt_z"] = "none"  # prompt_z: standardise rewards per prompt before the test
    max_pairs_per_prompt: int | None = Field(None, ge=1)  # None = every pair that passes (paper); grows as k²
    drop_truncated: bool = True  # a cut-off sample is not a training target (false only for tiny smoke tests)


class RsDpoPipeline(Pipeline):
    Config = RsDpoConfig
    outputs = ("preferences", "ranked")
    roles = ("policy", "judge")

    def __init__(self, cfg: RsDpoConfig):
        super().__init__(cfg)
        s = cfg.scorer
        self._scorer = (
            ModelScorer(s.path, s.device, s.batch_size)
            if s.kind == "model"
            else FunctionScorer(s.function)
            if s.kind == "function"
            else None
        )

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:
        if self.cfg.scorer.kind == "judge":
            ctx.llm("judge")  # fail before the first chunk when the judge cannot be built

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        groups = self._samples(items, ctx, state)
        rewards = self._score(groups, ctx, state)
        for (it, cands), rs in zip(groups, rewards, strict=True):
            self._emit(it, cands, rs, ctx, state)

    def _samples(
        self, items: Sequence[SourceItem], ctx: Context, state: ChunkState
    ) -> list[tuple[SourceItem, list[Candidate]]]:
        calls = [Call(it.id, list(it.prompt)) for it in items]
        results = run_calls(ctx, state, "candidates", "policy", calls, self.cfg.sampling.params(n=self.cfg.k))
        groups = []
        for it, samples in zip(items, results, strict=True):
            if it.category:
                state.count(f"category/{it.category}")
            texts = [s.text for s in samples if not (s.completion.truncated and self.cfg.drop_truncated)]
            if len(texts) < len(samples):
                state.drop_part("sample", "truncated_sample", len(samples) - len(texts))
            keep = unique_texts(texts)
            if len(keep) < len(texts):
                state.drop_part("sample", "duplicate_sample", len(texts) - len(keep))  # no signal in equal texts
            groups.append((it, [Candidate("policy", texts[i], n, True) for n, i in enumerate(keep)]))
        return groups

    def _score(self, groups, ctx: Context, state: ChunkState) -> list[list[float | None]]:
        s = self.cfg.scorer
        if s.kind == "judge":
            scorable = [(it, cands) for it, cands in groups if cands]
            results = iter(judge_rubric(ctx, state, scorable, s.judge_sampling.params(), s.judge_samples, 1))
            return [[c["mean"] for c in next(results)] if cands else [] for it, cands in groups]
        flat = [(it, c) for it, cands in groups for c in cands]
        prompts = [it.prompt for it, _ in flat]
        texts = [c.text for _, c in flat]
        scores = self._scorer(prompts, texts)
        trace_scores(state, "reward", self._scorer.name, [it.id for it, _ in flat], prompts, texts, scores)
        out, pos = [], 0
        for _, cands in groups:
            out.append(list(scores[pos : pos + len(cands)]))
            pos += len(cands)
        return out

    def _emit(
        self, it: SourceItem, cands: list[Candidate], raw: list[float | None], ctx: Context, state: ChunkState
    ) -> None:
        unscored = sum(r is None for r in raw)
        if unscored:
            state.drop_part("sample", "sample_without_reward", unscored)
        scored = [(c, r) for c, r in zip(cands, raw, strict=True) if r is not None]
        if len(scored) < 2:
            state.drop("fewer_than_2_scored")
            return
        cfg = self.cfg
        state.emit(
            "ranked",
            RankedRecord(
                id=stable_id(it.id, "rs_dpo_ranked"),
                prompt=it.prompt,
                responses=[[Message(role="assistant", content=c.text)] for c, _ in scored],
                scores=[float(r) for _, r in scored],
                method="rs_dpo",
                category=it.category,
                meta={"scorer": self._scorer_name(ctx), "source_meta": it.meta},
                provenance=self._provenance(ctx),
            ),
        )
        values = normalize([r for _, r in scored], cfg.normalize)
        pairs = gap_pairs(values, cfg.tau, cfg.eta)
        if cfg.max_pairs_per_prompt is not None and len(pairs) > cfg.max_pairs_per_prompt:
            state.drop_part("pair", "over_max_pairs_per_prompt", len(pairs) - cfg.max_pairs_per_prompt)
            pairs = pairs[: cfg.max_pairs_per_prompt]
        kept = 0
        for g in pairs:
            (cw, rw), (cl, rl) = scored[g.chosen], scored[g.rejected]
            if near_identical(cw.text, cl.text):
                state.drop_part("pair", "near_identical_pair")
                continue
            kept += 1
            state.emit(
                "preferences",
                PreferenceRecord(
                    id=stable_id(it.id, "rs_dpo", cw.text, cl.text),
                    prompt=it.prompt,
                    chosen=[Message(role="assistant", content=cw.text)],
                    rejected=[Message(role="assistant", content=cl.text)],
                    method="rs_dpo",
                    score_chosen=rw,
                    score_rejected=rl,
                    margin=rw - rl,
                    category=it.category,
                    meta={
                        "item_id": it.id,
                        "reward_gap": g.gap,
                        "sigmoid_gap": g.p,
                        "tau": cfg.tau,
                        "eta": cfg.eta,
                        "normalize": cfg.normalize,
                        "samples_scored": len(scored),
                        "scorer": self._scorer_name(ctx),
                        "source_meta": it.meta,
                    },
                    provenance=self._provenance(ctx),
                ),
            )
        if not kept:
            state.drop("no_pair_above_threshold")

    def _scorer_name(self, ctx: Context) -> str:
        s = self.cfg.scorer
        return f"judge:{ctx.llm('judge').model}" if s.kind == "judge" else f"{s.kind}:{self._scorer.name}"

    def _provenance(self, ctx: Context) -> Provenance:
        ref = template_ref("judge_rubric", ctx.language) if self.cfg.scorer.kind == "judge" else {}
        return Provenance(
            generator_model=ctx.llm("policy").model, sampling={**self.cfg.sampling.model_dump(), "n": self.cfg.k}, **ref
        )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        return {"rs_dpo": rs_dpo_report(out_dir)}


def rs_dpo_report(out_dir: Path) -> dict[str, Any]:
    """Pairs per prompt, reward gaps and the chosen-vs-rejected length bias, from the committed files."""
    rows = read_jsonl(out_dir / "preferences.jsonl")
    ranked = read_jsonl(out_dir / "ranked.jsonl")
    per_prompt = Counter(r["meta"]["item_id"] for r in rows)
    report: dict[str, Any] = {
        "prompts_scored": len(ranked),
        "pairs": len(rows),
        "prompts_with_pairs": len(per_prompt),
        "pairs_per_prompt_max": max(per_prompt.values(), default=0),
    }
    if rows:
        gaps = [r["meta"]["reward_gap"] for r in rows]
        report["reward_gap"] = {
            "mean": round(statistics.fmean(gaps), 4),
            "min": round(min(gaps), 4),
            "max": round(max(gaps), 4),
        }
    if ranked:
        report["reward"] = {"mean": round(statistics.fmean(s for r in ranked for s in r["scores"]), 4)}
    report.update(length_stats(rows))
    return report
