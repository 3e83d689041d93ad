"""Typed records: JSON round trips, unknown keys rejected, TRL column shape."""

import pytest
from pydantic import ValidationError

from synth.records import (
    Completion,
    GenerationRecord,
    Message,
    ParseResult,
    PreferenceRecord,
    RankedRecord,
    SFTRecord,
    SourceItem,
    TokenLogprob,
    UnpairedRecord,
    messages,
    stable_id,
)

P = messages(("system", "be kind"), ("user", "你好, how are you?"))
A = messages(("assistant", "fine"))
B = messages(("assistant", "go away"))

RECORDS = [
    Message(role="user", content="hi"),
    Completion(
        text="t",
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=2,
        logprobs=[TokenLogprob(token="A", logprob=-0.1, top={"A": -0.1, "B": -2.3})],
    ),
    ParseResult(raw="Score: 4", parsed=4, parse_status="ok"),
    ParseResult(raw="garbage", parsed=None, parse_status="failed", error="no score"),
    SFTRecord(id="s1", messages=P + A, method="cai_sl", category="侵犯他人/隐私权", meta={"rounds": [{"p": "x"}]}),
    PreferenceRecord(
        id="p1",
        prompt=P,
        chosen=A,
        rejected=B,
        method="rlaif",
        principle_ids=["h1"],
        score_chosen=4.5,
        score_rejected=2.0,
        margin=2.5,
        p_chosen=0.8,
    ),
    RankedRecord(id="r1", prompt=P, responses=[A, B], scores=[1.0, 0.0], method="judge"),
    UnpairedRecord(id="u1", prompt=P, completion=B, label=False, method="kto"),
    GenerationRecord(id="g1", prompt=P, completions=[Completion(text="x")], model="m"),
    SourceItem(id="i1", prompt=P, chosen=A, rejected=B, category="c"),
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_json_round_trip(rec):
    again = type(rec).from_json(rec.to_json())
    assert again == rec
    assert again.to_json() == rec.to_json()


def test_unknown_keys_and_bad_roles_rejected():
    with pytest.raises(ValidationError, match="extra"):
        PreferenceRecord.model_validate(
            {"id": "x", "prompt": [], "chosen": [], "rejected": [], "method": "m", "typo": 1}
        )
    with pytest.raises(ValidationError):
        Message(role="robot", content="x")


def test_preference_rows_use_trl_conversational_columns():
    row = RECORDS[5].model_dump()
    assert row["prompt"][-1] == {"role": "user", "content": "你好, how are you?"}
    assert row["chosen"] == [{"role": "assistant", "content": "fine"}]
    assert row["rejected"] == [{"role": "assistant", "content": "go away"}]


def test_judgement_and_completion_flags():
    assert RECORDS[2].ok and not RECORDS[3].ok and RECORDS[3].parsed is None
    assert RECORDS[1].truncated and not Completion(text="x", finish_reason="stop").truncated


def test_stable_id_is_deterministic_and_content_sensitive():
    assert stable_id("a", [1, 2]) == stable_id("a", [1, 2])
    assert stable_id("a", [1, 2]) != stable_id("a", [2, 1])
    assert len(stable_id("x")) == 16 and stable_id("x", prefix="p-").startswith("p-")
    assert SourceItem(id="i", prompt=P).prompt_text == "你好, how are you?"
