"""rlrf feedback JSON: critiques capped (`maxLength`) so a constrained backend cannot run out of tokens
inside one; the openai backend drops the caps that OpenAI's strict mode rejects."""

from __future__ import annotations

import json

import pytest

from synth.llm.base import SamplingParams
from synth.llm.schema import for_openai_strict
from synth.records import messages
from synth.steps.rlrf import Aspect, critique_cap, feedback_schema, parse_feedback

ASPECTS = [Aspect(id=i, name=i, description=i) for i in ("factuality", "readability")]


def test_cap_fills_the_token_budget_exactly():
    cap = critique_cap(ASPECTS, 200)
    longest = json.dumps({a.id: {"critique": "x" * cap, "rating": 3} for a in ASPECTS})
    assert 0 < cap and len(longest) <= 200 - 8 < len(longest) + len(ASPECTS)  # one more char each would not fit
    assert critique_cap(ASPECTS, 10) == 0  # never negative
    schema = feedback_schema(ASPECTS, 200)
    for a in ASPECTS:
        entry = schema["properties"][a.id]
        assert entry["properties"]["critique"] == {"type": "string", "maxLength": cap}
        assert entry["additionalProperties"] is False
    assert schema["required"] == ["factuality", "readability"] and schema["additionalProperties"] is False
    assert "maxLength" not in json.dumps(feedback_schema(ASPECTS))  # no budget given: no cap


def test_openai_strict_drops_length_keywords_only_in_schema_positions():
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["maxLength", "x"],
        "properties": {
            "maxLength": {"type": "string", "maxLength": 5, "minLength": 1},  # a property so named
            "x": {"type": "array", "items": {"type": "string", "maxLength": 3}},
            "y": {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]},
        },
        "$defs": {"d": {"type": "string", "minLength": 2}},
    }
    out = for_openai_strict(schema)
    assert set(out["properties"]) == {"maxLength", "x", "y"} and out["required"] == ["maxLength", "x"]
    assert out["properties"]["maxLength"] == {"type": "string"}
    assert out["properties"]["x"]["items"] == {"type": "string"}
    assert out["properties"]["y"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert out["$defs"]["d"] == {"type": "string"} and out["additionalProperties"] is False
    assert schema["properties"]["maxLength"]["maxLength"] == 5  # the caller's schema is not changed


def test_openai_backend_sends_the_schema_without_caps(openai_server):
    from synth.llm import build_llm

    llm = build_llm({"kind": "openai", "base_url": openai_server.url, "progress": False}, {"name_or_path": "m"})
    llm.generate([messages(("user", "q"))], SamplingParams(json_schema=feedback_schema(ASPECTS, 300)))
    sent = openai_server.chat_requests()[0].body["response_format"]["json_schema"]
    assert sent["strict"] is True and "maxLength" not in json.dumps(sent)
    assert sent["schema"] == for_openai_strict(feedback_schema(ASPECTS, 300))


@pytest.mark.parametrize("capped", [True, False])
def test_capped_feedback_always_ends_in_time_on_a_constrained_backend(tiny_hf_llm, capped):
    """At temperature 1 a random model rarely closes an unbounded string: without the cap some samples
    run into max_new_tokens; with it every sample ends, parses and rates every aspect."""
    pytest.importorskip("xgrammar")
    budget = 160
    p = SamplingParams(
        temperature=1.0,
        n=8,
        seed=11,
        max_new_tokens=budget,
        json_schema=feedback_schema(ASPECTS, budget if capped else None),
    )
    comps = tiny_hf_llm.generate([messages(("user", "Give feedback as JSON."))], p)[0]
    finished = [c for c in comps if c.finish_reason == "stop"]
    if capped:
        assert len(finished) == len(comps)
        for c in comps:
            parsed = parse_feedback(c.text).parsed
            assert set(parsed) == {"factuality", "readability"}, c.text
            assert all(len(v["critique"]) <= critique_cap(ASPECTS, budget) for v in parsed.values())
    else:
        assert len(finished) < len(comps)
