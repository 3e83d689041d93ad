"""IterAlign constitution discovery (Chen et al., NAACL 2024, arXiv 2403.18341, §3 "constitution
proposal"): an oracle LLM (the `judge` role) reads each red-team (request, answer) of the current model
and, when the answer violates helpfulness, honesty or harmlessness, proposes one new general principle.

Source: red_team's answers.jsonl read with `source.fields.chosen=answer` (the answer arrives as the
item's assistant turn). Outputs: proposals.jsonl (every verdict and proposed principle) and
failures.jsonl (the violating requests, read by critique_revision as its source). An unparseable
verdict is a parse failure (counted), never "no violation". The principles are added to the
constitution pool by the `grow_constitution` op (synth/align/ops.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import Field

from synth.pipelines.base import Pipeline, PipelineConfig
from synth.prompts import render, template_ref
from synth.records import ParseResult, SourceItem
from synth.runtime import ChunkState, Context, Sampling
from synth.steps.base import Call, run_calls, user

_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


class DiscoverConfig(PipelineConfig):
    name: str = "iteralign_discover"
    sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=256)  # the oracle decodes greedily
    max_principles_shown: int = Field(30, ge=0)  # existing principles quoted to the oracle (dedup by the model)


def parse(text: str) -> ParseResult:
    """The last JSON object with a boolean `violation`; a violation needs both requests."""
    for blob in reversed(_OBJECT.findall(text)):
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("violation"), bool):
            continue
        if not obj["violation"]:
            return ParseResult(raw=text, parsed={"violation": False, "reason": obj.get("reason")}, parse_status="ok")
        crit, rev = obj.get("critique"), obj.get("revision")
        if isinstance(crit, str) and crit.strip() and isinstance(rev, str) and rev.strip():
            return ParseResult(
                raw=text,
                parsed={
                    "violation": True,
                    "reason": obj.get("reason"),
                    "critique": crit.strip(),
                    "revision": rev.strip(),
                },
                parse_status="ok",
            )
        return ParseResult(
            raw=text, parse_status="failed", error="violation without both a critique and a revision request"
        )
    return ParseResult(raw=text, parse_status="failed", error="no JSON object with a boolean violation")


class DiscoverPipeline(Pipeline):
    Config = DiscoverConfig
    outputs = ("proposals", "failures")
    roles = ("judge",)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        cons = ctx.constitution
        shown = [p.critique for p in cons.principles][: self.cfg.max_principles_shown]
        calls, kept = [], []
        for it in items:
            answer = it.chosen[-1].content.strip() if it.chosen else ""
            if not answer:
                state.drop("empty_answer")
                continue
            text = render("iteralign_discover", cons.language, prompt=it.prompt_text, answer=answer, principles=shown)
            calls.append(Call(it.id, [user(text)]))
            kept.append((it, answer))
        results = run_calls(ctx, state, "discover", "judge", calls, self.cfg.sampling.params(), parse=parse)
        ref = template_ref("iteralign_discover", cons.language)
        for (it, answer), samples in zip(kept, results, strict=True):
            s = samples[0]
            if not s.ok:
                state.drop("verdict_unparsed" if s.result and not s.result.ok else "verdict_truncated")
                continue
            v = s.parsed
            state.emit(
                "proposals",
                {
                    "id": it.id,
                    "prompt": it.prompt_text,
                    "answer": answer,
                    "category": it.category,
                    **v,
                    "judge_model": ctx.llm("judge").model,
                    **ref,
                },
            )
            if v["violation"]:
                state.emit(
                    "failures",
                    {
                        "id": it.id,
                        "prompt": it.prompt_text,
                        "category": it.category,
                        "answer": answer,
                        "reason": v.get("reason"),
                    },
                )
            else:
                state.count("no_violation")
