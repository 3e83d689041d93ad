"""`pipeline=generate`: n completions per prompt -> completions.jsonl.

The simplest pipeline and the template for the others: one batched call for the whole chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from synth.llm.base import SamplingParams
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.records import GenerationRecord, Provenance, SourceItem
from synth.steps.base import Call, run_calls


class Sampling(BaseModel):
    """Sampling settings as they appear in pipeline configs."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, ge=0)
    stop: list[str] = []

    def params(self, n: int = 1, **kw) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
            n=n, seed=self.seed, stop=tuple(self.stop), **kw,
        )


class GenerateConfig(PipelineConfig):
    name: str = "generate"
    n: int = Field(1, ge=1)
    sampling: Sampling = Sampling()
    drop_truncated: bool = False  # keep by default; every completion carries finish_reason


class GeneratePipeline(Pipeline):
    Config = GenerateConfig
    outputs = ("completions",)
    roles = ("policy",)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        cfg = self.cfg
        calls = [Call(it.id, list(it.prompt)) for it in items]
        results = run_calls(ctx, state, "generate", "policy", calls, cfg.sampling.params(n=cfg.n))
        model = ctx.llm("policy").model
        for it, samples in zip(items, results):
            comps = [s.completion for s in samples]
            if cfg.drop_truncated:
                kept = [c for c in comps if not c.truncated]
                state.drop_part("completion", "truncated", len(comps) - len(kept))
                comps = kept
            if it.category:
                state.count(f"category/{it.category}")
            state.emit("completions", GenerationRecord(
                id=it.id, prompt=it.prompt, completions=comps, model=model, category=it.category,
                provenance=Provenance(generator_model=model, sampling={**cfg.sampling.model_dump(), "n": cfg.n}),
            ))
