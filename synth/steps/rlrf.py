"""RLRF steps (Lee et al. 2024, arXiv 2403.14238): aspects, fine-grained feedback, refinement.

- Aspects come from a rubric file (FLASK-style, three levels each; the default ships in
  synth/prompts/rlrf_rubric.<lang>.yaml) or from the constitution's principles; a subset relevant to
  the prompt is selected (the item's category first, then a deterministic draw).
- Feedback is one JSON object `{aspect: {critique, rating 1-3}}` per response (structured output via
  a JSON schema where the backend supports it); a response's score is the mean aspect rating, and only
  when EVERY selected aspect was rated (a missing aspect is never filled in).
- Refinement: the policy rewrites its response given the feedback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.prompts import TEMPLATE_DIR, render
from synth.records import Message, ParseResult, SourceItem
from synth.runtime import Context
from synth.steps.base import user
from synth.steps.judge import conversation


class Aspect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    name: str
    description: str
    levels: dict[int, str] | None = None  # 1..3; None = the generic three-level scale of the template


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aspects: list[Aspect] = Field(min_length=1)


def load_aspects(criteria: str, language: str, constitution: Any = None) -> list[Aspect]:
    """`default` = the shipped rubric for the language; `constitution` = one aspect per principle
    (its comparison question, else its critique request); anything else = a rubric YAML path."""
    if criteria == "constitution":
        if constitution is None:
            raise ValueError("criteria=constitution needs a constitution")
        return [Aspect(id=p.id, name=p.id, description=p.judge or p.critique) for p in constitution.principles]
    path = TEMPLATE_DIR / f"rlrf_rubric.{language}.yaml" if criteria == "default" else Path(criteria).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"rubric file {path} not found (pipeline.criteria=default|constitution|<path>)")
    try:
        return Rubric.model_validate(yaml.safe_load(path.read_text(encoding="utf-8"))).aspects
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def select_aspects(
    ctx: Context,
    item: SourceItem,
    aspects: Sequence[Aspect],
    max_aspects: int,
    category_of: dict[str, str] | None = None,
) -> list[Aspect]:
    """At most `max_aspects`: those matching the item's category first (constitution criteria), then a
    deterministic draw per item from the rest; returned in rubric order."""
    if len(aspects) <= max_aspects:
        return list(aspects)
    cat = item.category or ""
    match = [a for a in aspects if cat and (category_of or {}).get(a.id, "").startswith(cat)]
    rest = [a for a in aspects if a not in match]
    picked = match[:max_aspects]
    picked += ctx.rng(item.id, "rlrf_aspects").sample(rest, max_aspects - len(picked))
    return [a for a in aspects if a in picked]


def build_feedback(language: str, prompt: Sequence[Message], response: str, aspects: Sequence[Aspect]) -> list[Message]:
    return [
        user(
            render(
                "rlrf_feedback",
                language,
                conversation=conversation(prompt),
                response=response,
                aspects=[a.model_dump() for a in aspects],
            )
        )
    ]


_RESERVE = 8  # tokens kept spare (an end-of-turn token, a tokenizer that merges less than one char per token)


def critique_cap(aspects: Sequence[Aspect], max_new_tokens: int) -> int:
    """Characters each `critique` may hold so that the whole object fits in `max_new_tokens`.

    The JSON around the critiques (keys, braces, ratings, with the ", " and ": " separators xgrammar
    writes; a compact writer needs less) is measured, the rest is shared equally. A token is at least one character of
    ASCII text, so a constrained answer then ends in time; text that takes more than one token per
    character (byte-level pieces of CJK, JSON escapes) can still be cut off, which is a failure."""
    frame = json.dumps({a.id: {"critique": "", "rating": 1} for a in aspects}, ensure_ascii=False)
    return max(0, (max_new_tokens - _RESERVE - len(frame)) // max(1, len(aspects)))


def feedback_schema(aspects: Sequence[Aspect], max_new_tokens: int | None = None) -> dict[str, Any]:
    """{aspect: {critique, rating 1-3}} for every selected aspect, in rubric order (the order a constrained
    model writes them). With `max_new_tokens` each critique gets `maxLength` (`critique_cap`), so a
    backend that constrains (hf with xgrammar, vLLM) cannot run out of tokens inside a critique; the
    openai backend drops `maxLength`, which OpenAI's strict mode rejects (synth/llm/schema.py)."""
    critique: dict[str, Any] = {"type": "string"}
    if max_new_tokens is not None:
        critique["maxLength"] = critique_cap(aspects, max_new_tokens)
    entry = {
        "type": "object",
        "properties": {"critique": critique, "rating": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["critique", "rating"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {a.id: entry for a in aspects},
        "required": [a.id for a in aspects],
        "additionalProperties": False,
    }  # OpenAI's strict structured outputs require it on every object


_FENCE = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def parse_feedback(text: str) -> ParseResult:
    """{aspect: {"critique": str, "rating": 1|2|3}} from a JSON object (fenced or bare). Which aspects
    must be present is checked by the caller (it knows the prompt's selection)."""
    fenced = _FENCE.findall(text)
    blob = fenced[-1] if fenced else text[text.find("{") : text.rfind("}") + 1]
    try:
        data = json.loads(blob, strict=False)  # a raw control character inside a critique is not worth a failure
    except json.JSONDecodeError as e:
        return ParseResult(raw=text, error=f"not a JSON object ({e.msg})")
    if not isinstance(data, dict) or not data:
        return ParseResult(raw=text, error="not a non-empty JSON object")
    out = {}
    for key, val in data.items():
        rating = val.get("rating") if isinstance(val, dict) else None
        if isinstance(rating, bool) or rating not in (1, 2, 3) or not isinstance(val.get("critique"), str):
            return ParseResult(raw=text, error=f"aspect {key!r}: needs a critique string and a rating 1-3")
        out[key] = {"critique": val["critique"].strip(), "rating": int(rating)}
    return ParseResult(raw=text, parsed=out, parse_status="ok")


def aspect_score(parsed: dict[str, Any] | None, aspects: Sequence[Aspect]) -> float | None:
    """Mean rating over the selected aspects; None unless every one of them was rated."""
    if parsed is None or any(a.id not in parsed for a in aspects):
        return None
    return sum(parsed[a.id]["rating"] for a in aspects) / len(aspects)


def build_refine(
    language: str, prompt: Sequence[Message], response: str, feedback: dict[str, Any], aspects: Sequence[Aspect]
) -> list[Message]:
    items = [{"name": a.name, **feedback[a.id]} for a in aspects]
    return [user(render("rlrf_refine", language, conversation=conversation(prompt), response=response, feedback=items))]
