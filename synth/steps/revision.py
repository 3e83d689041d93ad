"""SL-CAI revision step (Bai et al. 2022, arXiv 2212.08073, §3.1) and the cleaning of plain replies.

Revision transcript: ... user(critique request), assistant(critique), user(revision request) -> revision. The
revision becomes the reply the next round critiques, and the last one is the SFT target, so an echoed
"Revision:" label is stripped and the text is cut at an invented turn or section label (the paper's stop
points: the next request or human turn). An empty revision is a parse failure; a truncated one is not
`Sample.ok`; the pipeline drops both with a counted reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from synth.constitution import Principle
from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Message, ParseResult
from synth.steps.base import Call, Sample, assistant, run_calls, user
from synth.steps.critique import clean

_REVISION_ECHO = re.compile(
    r"^\s*(?:\*\*)?\s*(?:revision|revised (?:response|reply|answer)|rewritten (?:response|reply|answer)"
    r"|修改后的回复|修改后的回答|改写后的回复|改写后的回答|修改|改写)\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)
_REPLY_ECHO = re.compile(r"^\s*(?:assistant|助手)\s*[:：]\s*", re.IGNORECASE)


def parse(text: str) -> ParseResult:
    """The revised reply; empty after cleaning is a failure."""
    body = clean(text, _REVISION_ECHO)
    if not body:
        return ParseResult(raw=text, parse_status="failed", error="empty revision")
    return ParseResult(raw=text, parsed=body, parse_status="ok")


def parse_reply(text: str) -> ParseResult:
    """A plain reply (the initial answer, a helpful-only sample): cut at an invented turn."""
    body = clean(text, _REPLY_ECHO)
    if not body:
        return ParseResult(raw=text, parse_status="failed", error="empty reply")
    return ParseResult(raw=text, parsed=body, parse_status="ok")


def request(principle: Principle, language: str) -> str:
    return render("cai_revision_request", language, revision=principle.revision)


def build_prompt(
    critique_prompt: Sequence[Message], critique: str, principle: Principle, language: str
) -> list[Message]:
    """The critique call's messages + the critique + the revision request."""
    return [*critique_prompt, assistant(critique), user(request(principle, language))]


@dataclass
class RevisionInput:
    item_id: str
    critique_prompt: list[Message]
    critique: str
    principle: Principle


def revise(ctx, state, inputs: Sequence[RevisionInput], params: SamplingParams, round_: int) -> list[Sample]:
    """ONE backend call for every revision of this round; one sample per input."""
    calls = [
        Call(
            x.item_id,
            build_prompt(x.critique_prompt, x.critique, x.principle, ctx.language),
            {"round": round_, "principle_id": x.principle.id},
        )
        for x in inputs
    ]
    return [s[0] for s in run_calls(ctx, state, "revision", "policy", calls, params.replace(n=1), parse)]
