"""`pipeline=bpo` and `pipeline=bpo_rewrite` (Black-Box Prompt Optimization,
Cheng et al. 2023, arXiv 2311.04155; code: thu-coai/BPO).

`bpo` builds rewriter training data from (prompt, good, bad) rows: our preferences.jsonl
(`source=jsonl`), hh-rlhf (`source=hh_rlhf source.turns=all`) or BPO's own JSON
(`source.fields.prompt=prompt source.fields.chosen=good_res source.fields.rejected=bad_res`).
Role `policy` = the construction LLM (gpt-3.5-turbo at T=0.9 in the repo). Each row of `sft.jsonl`
trains the REWRITER: user = the rewriter format around the original prompt, assistant = the optimised
prompt. Never responses (the rewriter learns to rewrite prompts, not to answer them).

`bpo_rewrite` applies a rewriter (role `policy`: any backend/model, e.g. a LoRA adapter from `train loop=sft`
via `llm.adapter=...`) to a prompt source -> `rewrites.jsonl` (original, rewritten). `safety: true` asks a
general instruction model to rewrite unsafe requests into their safe intent (rule 1 of BPO's no-context
construction prompt, thu-coai/BPO src/data_construction/chatgpt_infer.py). `respond: true` also answers the
rewritten prompt with role `target` (default: the policy) and writes `sft.jsonl` rows (original prompt -> that
answer), a prompt-sanitiser stage in front of any generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from synth.io import ChunkWriter
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.records import Message, Provenance, SFTRecord, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps import structure
from synth.steps.base import Call, assistant, run_calls
from synth.steps.bpo import (
    attach_context,
    build_construct,
    build_safety,
    parse_optimized,
    parse_rewrite,
    ratio_filter,
    rewriter_messages,
)
from synth.steps.candidates import CandidateSpec, register_candidates


class BpoConfig(PipelineConfig):
    name: str = "bpo"
    sampling: Sampling = Sampling(temperature=0.9, max_new_tokens=1024)  # chatgpt_infer.py: T=0.9
    require_end_marker: bool = True  # an answer without "[END]" may have run on into answering
    max_shrink_ratio: float = Field(2.0, ge=1)  # drop if words(orig)/words(opt) > 2 (process_optimized_prompts.py)
    max_growth_ratio: float = Field(6.0, ge=1)  # drop if words(opt)/words(orig) > 6
    context_field: str = "context"  # Alpaca-style context in the row (source meta), if any


class BpoPipeline(Pipeline):
    Config = BpoConfig
    outputs = ("sft",)
    roles = ("policy",)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        cfg = self.cfg
        usable = []
        for it in items:
            if it.category:
                state.count(f"category/{it.category}")
            if not (it.chosen and it.rejected):
                state.drop("no_preference_pair")
                continue
            usable.append(it)
        calls = [
            Call(
                it.id,
                build_construct(
                    ctx.language,
                    it.prompt_text,
                    it.chosen[-1].content,
                    it.rejected[-1].content,
                    self._context(it),
                    it.prompt[:-1],
                ),
            )
            for it in usable
        ]
        params = cfg.sampling.params()
        params = params.replace(regex=structure.bpo(params.max_new_tokens))
        results = run_calls(
            ctx,
            state,
            "bpo_construct",
            "policy",
            calls,
            params,
            parse=lambda t: parse_optimized(t, cfg.require_end_marker),
        )
        for it, (smp,) in zip(usable, results, strict=True):
            if not smp.ok:
                continue  # counted as parse_failed/bpo_construct or truncated/bpo_construct
            original, optimized = it.prompt_text, smp.parsed["optimized"]
            context = self._context(it)
            # the repo applies the length ratios to no-context data only; `[protected` always
            limits = (math.inf, math.inf) if context else (cfg.max_shrink_ratio, cfg.max_growth_ratio)
            reason = ratio_filter(original, optimized, *limits)
            if reason:
                state.drop(reason)
                continue
            state.emit("sft", self._row(it, ctx, original, optimized, context, smp.parsed["comparison"]))

    def _context(self, it: SourceItem) -> str:
        value = it.meta.get(self.cfg.context_field)
        return value if isinstance(value, str) else ""

    def _row(
        self, it: SourceItem, ctx: Context, original: str, optimized: str, context: str, comparison: str
    ) -> SFTRecord:
        # the same seeded draws for both sides: input and target get the same context layout
        final_in = attach_context(original, context, ctx.rng(it.id, "bpo_context"))
        final_out = attach_context(optimized, context, ctx.rng(it.id, "bpo_context"))
        return SFTRecord(
            id=stable_id(it.id, "bpo"),
            messages=[*rewriter_messages(ctx.language, final_in), assistant(final_out)],
            method="bpo",
            category=it.category,
            meta={
                "original_prompt": original,
                "optimized_prompt": optimized,
                "comparison": comparison,
                "context": context or None,
                "good_res": it.chosen[-1].content,
                "bad_res": it.rejected[-1].content,
                "history_turns": len(it.prompt) - 1,
            },
            provenance=Provenance(
                generator_model=ctx.llm("policy").model,
                sampling=self.cfg.sampling.model_dump(),
                **template_ref("bpo_construct", ctx.language),
            ),
        )


# --------------------------------------------------------------------------- bpo_rewrite


class BpoRewriteConfig(PipelineConfig):
    name: str = "bpo_rewrite"
    sampling: Sampling = Sampling(temperature=0.6, top_p=0.9, max_new_tokens=1024)  # thu-coai/BPO README inference
    safety: bool = False  # rewrite unsafe requests into their safe intent, general-model prompt
    max_shrink_ratio: float = Field(2.0, ge=1)  # same filters as the training data: a rewrite that lost or
    max_growth_ratio: float = Field(6.0, ge=1)  # ballooned the prompt is dropped (counted), not sent on
    respond: bool = False  # also answer the rewritten prompt with role `target` -> sft.jsonl
    # the black-box model that answers: {llm: {...}, model: {...}} as in conf/llm, conf/model; null = policy
    target: dict[str, Any] | None = None
    response_sampling: Sampling = Sampling(temperature=0.7, top_p=1.0, max_new_tokens=2048)  # thu-coai/BPO's Llama-2


class BpoRewritePipeline(Pipeline):
    Config = BpoRewriteConfig
    outputs = ("rewrites",)
    roles = ("policy", "target")

    def __init__(self, cfg: BpoRewriteConfig):
        super().__init__(cfg)
        if cfg.respond:
            self.outputs = ("rewrites", "sft")
        self._target = CandidateSpec(name="target", **cfg.target) if cfg.target else None

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:
        if self._target is not None:
            register_candidates(ctx, [self._target], writer.out_dir)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        cfg = self.cfg
        for it in items:
            if it.category:
                state.count(f"category/{it.category}")
        build = build_safety if cfg.safety else rewriter_messages
        calls = [Call(it.id, build(ctx.language, it.prompt_text), {"safety": cfg.safety}) for it in items]
        parse = (lambda t: parse_optimized(t, True)) if cfg.safety else parse_rewrite
        params = cfg.sampling.params()
        if cfg.safety:  # the construct format; a trained rewriter's free output is not constrained
            params = params.replace(regex=structure.bpo(params.max_new_tokens))
        results = run_calls(ctx, state, "bpo_rewrite", "policy", calls, params, parse=parse)
        rows = []
        for it, (smp,) in zip(items, results, strict=True):
            if not smp.ok:
                continue  # counted as parse_failed/bpo_rewrite or truncated/bpo_rewrite
            rewritten = smp.parsed["optimized"] if cfg.safety else smp.parsed
            reason = ratio_filter(it.prompt_text, rewritten, cfg.max_shrink_ratio, cfg.max_growth_ratio)
            if reason:
                state.drop(reason)
                continue
            rows.append(self._row(it, ctx, rewritten))
        if cfg.respond:
            self._respond(rows, ctx, state)
        for row in rows:
            state.emit("rewrites", row)

    def _row(self, it: SourceItem, ctx: Context, rewritten: str) -> dict[str, Any]:
        prompt = [*it.prompt[:-1], Message(role="user", content=rewritten)]  # ready for any generator
        tmpl = "bpo_safety" if self.cfg.safety else "bpo_rewriter"
        return {
            "id": stable_id(it.id, "bpo_rewrite", self.cfg.safety),
            "original": [m.model_dump() for m in it.prompt],
            "rewritten": rewritten,
            "prompt": [m.model_dump() for m in prompt],
            "safety": self.cfg.safety,
            "category": it.category,
            "meta": it.meta,
            "provenance": Provenance(
                generator_model=ctx.llm("policy").model,
                sampling=self.cfg.sampling.model_dump(),
                **template_ref(tmpl, ctx.language),
            ).model_dump(),
        }

    def _respond(self, rows: list[dict[str, Any]], ctx: Context, state: ChunkState) -> None:
        """The target answers the REWRITTEN prompt; the SFT row pairs that answer with the ORIGINAL
        prompt, so the trained model learns to engage safely with the raw request."""
        calls = [Call(r["id"], [Message(**m) for m in r["prompt"]]) for r in rows]
        role = self._target.role if self._target is not None else "target"
        results = run_calls(ctx, state, "bpo_respond", role, calls, self.cfg.response_sampling.params())
        for row, (smp,) in zip(rows, results, strict=True):
            if smp.completion.truncated:
                row["response"] = None
                state.drop("truncated_response")
                continue
            row["response"] = smp.text
            original = [Message(**m) for m in row["original"]]
            state.emit(
                "sft",
                SFTRecord(
                    id=stable_id(row["id"], "respond"),
                    messages=[*original, assistant(smp.text)],
                    method="bpo_rewrite",
                    category=row["category"],
                    meta={"rewritten_prompt": row["rewritten"], "safety": row["safety"]},
                    provenance=Provenance(
                        generator_model=ctx.llm(role).model, sampling=self.cfg.response_sampling.model_dump()
                    ),
                ),
            )
