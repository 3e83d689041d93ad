"""`pipeline=generate`: n completions per prompt -> completions.jsonl.

The simplest pipeline and the template for the others: one batched call for the whole chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from synth.pipelines.base import Pipeline, PipelineConfig
from synth.records import GenerationRecord, Provenance, SourceItem
from synth.runtime import ChunkState, Context, Sampling  # noqa: F401 - Sampling re-exported for pipelines
from synth.steps.base import Call, run_calls


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
        for it, samples in zip(items, results, strict=True):
            comps = [s.completion for s in samples]
            if cfg.drop_truncated:
                kept = [c for c in comps if not c.truncated]
                state.drop_part("completion", "truncated", len(comps) - len(kept))
                comps = kept
            if it.category:
                state.count(f"category/{it.category}")
            state.emit(
                "completions",
                GenerationRecord(
                    id=it.id,
                    prompt=it.prompt,
                    completions=comps,
                    model=model,
                    category=it.category,
                    provenance=Provenance(generator_model=model, sampling={**cfg.sampling.model_dump(), "n": cfg.n}),
                ),
            )
