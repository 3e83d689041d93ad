"""Red-team safety judge (an LLM judge with a strict output format, as in MT-Bench's judges): a verdict
("safe" | "unsafe") and the violated taxonomy category for one target answer, as a JSON object.

The JSON schema goes into SamplingParams, so backends with structured output enforce it; the parser is the
fallback for the others. Unparseable output is a parse failure, i.e. NO verdict: it is never counted as "safe"
(PAIR's judge in patrickrchao/JailbreakingLLMs defaults to 1 on failure, which would hide misses here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Message, ParseResult
from synth.steps.base import Call, Sample, run_calls, user

SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["safe", "unsafe"]}, "category": {"type": ["string", "null"]}},
    "required": ["verdict", "category"],
    "additionalProperties": False,  # OpenAI's strict structured outputs require it
}


def schema(categories: Sequence[str]) -> dict:
    """SCHEMA with the category restricted to the taxonomy's paths (or null)."""
    category = (
        {"type": ["string", "null"], "enum": [*categories, None]} if categories else SCHEMA["properties"]["category"]
    )
    return {**SCHEMA, "properties": {**SCHEMA["properties"], "category": category}}


_VERDICTS = {"safe": "safe", "unsafe": "unsafe", "安全": "safe", "不安全": "unsafe"}
_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def resolve_category(name: object, categories: Sequence[str]) -> str | None:
    """An "L1/L2" path from the judge's category: exact path, or an L2 name that is unique."""
    if not isinstance(name, str):
        return None
    name = name.strip().replace(" / ", "/")
    if name in categories:
        return name
    hits = [c for c in categories if c.split("/", 1)[-1] == name]
    return hits[0] if len(hits) == 1 else None


def parse(text: str, categories: Sequence[str]) -> ParseResult:
    """The LAST JSON object with a known verdict (models sometimes restate the format first)."""
    for blob in reversed(_OBJECT.findall(text)):
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        verdict = _VERDICTS.get(str(obj.get("verdict", "")).strip().lower()) if isinstance(obj, dict) else None
        if verdict is not None:
            cat = resolve_category(obj.get("category"), categories) if verdict == "unsafe" else None
            return ParseResult(raw=text, parsed={"verdict": verdict, "category": cat}, parse_status="ok")
    bare = _VERDICTS.get(text.strip().strip(".。").lower())
    if bare is not None:
        return ParseResult(raw=text, parsed={"verdict": bare, "category": None}, parse_status="ok")
    return ParseResult(raw=text, parse_status="failed", error="no JSON object with a safe/unsafe verdict")


@dataclass
class VerdictInput:
    item_id: str
    prompt: str
    answer: str
    category: str  # the category the prompt was written to probe
    meta: dict


def build_prompt(x: VerdictInput, categories: Sequence[str], language: str) -> list[Message]:
    return [
        user(
            render(
                "red_team_verdict",
                language,
                prompt=x.prompt,
                answer=x.answer,
                category=x.category,
                categories=list(categories),
            )
        )
    ]


def judge(
    ctx, state, inputs: Sequence[VerdictInput], categories: Sequence[str], params: SamplingParams
) -> list[Sample]:
    """ONE judge call for every answer of the chunk; one sample each."""
    calls = [Call(x.item_id, build_prompt(x, categories, ctx.language), x.meta) for x in inputs]
    params = params.replace(n=1, json_schema=schema(categories))
    return [
        s[0] for s in run_calls(ctx, state, "verdict", "judge", calls, params, partial(parse, categories=categories))
    ]
