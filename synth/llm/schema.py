"""JSON schemas as each backend accepts them.

Steps write one schema for every backend. Constrained local decoders (xgrammar in `hf`, vLLM) honour
string length caps (`maxLength`, `minLength`), which keep a small model from running out of tokens inside
a free-text field. OpenAI's strict structured outputs reject those keywords ("Supported schemas" in the
OpenAI Structured Outputs guide), so `for_openai_strict` drops them before a request is sent; the step's
own parser still validates the answer.
"""

from __future__ import annotations

from typing import Any

STRICT_UNSUPPORTED = ("maxLength", "minLength")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def for_openai_strict(schema: Any) -> Any:
    """A copy of `schema` without the keywords strict mode rejects, at every level of nesting (a
    property NAMED like a keyword is kept: only schema positions are rewritten)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in STRICT_UNSUPPORTED}
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: for_openai_strict(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [for_openai_strict(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = for_openai_strict(out[key])
    return out
