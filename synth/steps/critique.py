"""SL-CAI critique step (Bai et al. 2022, arXiv 2212.08073, §3.1): the model critiques its own last reply
under one constitution principle.

The transcript is a chat: ... user(prompt), assistant(reply), user(critique request) -> critique. The paper's
transcript labels ("CritiqueRequest:", "Revision:", "Human:") are not sent, but models echo them; the parser
strips an echoed "Critique:" label and cuts at the next section label or invented human turn (the paper's
transcripts stop at the next RevisionRequest or a blank Human turn; without this cut a model may answer as the
human). Backends honour the stop strings too; the cut makes the result backend-independent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from synth.constitution import Principle
from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Message, ParseResult
from synth.steps.base import Call, Sample, run_calls, user

# Where an invented next turn begins (the model starts writing the human's part).
TURN_MARKERS = ("\n\nHuman:", "\n\nUser:", "\nHuman:", "\nUser:", "\n\n用户：", "\n用户：", "\n\n用户:", "\n用户:")
# Section labels of the paper's transcript; any of them starts text that is not part of this step.
SECTION_MARKERS = (
    "CritiqueRequest:",
    "Critique Request:",
    "RevisionRequest:",
    "Revision Request:",
    "批评请求：",
    "批评请求:",
    "修改请求：",
    "修改请求:",
)
# Stop strings sent to the backend, at most 4 (the OpenAI API's limit); the parser cuts the rest.
STOPS = {
    "en": ("RevisionRequest:", "CritiqueRequest:", "\n\nHuman:", "\n\nUser:"),
    "zh": ("修改请求：", "批评请求：", "\n\n用户：", "\n\nHuman:"),
}
_CRITIQUE_ECHO = re.compile(
    r"^\s*(?:\*\*)?\s*(?:critique|批评意见|批评)\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*", re.IGNORECASE
)
# A critique that goes on to write its own revision: the revision part is not critique.
_REVISION_LABEL = re.compile(
    r"\n\s*(?:\*\*)?\s*(?:revision|revised response|修改后的回复|修改后的回答)\s*(?:\*\*)?\s*[:：]", re.IGNORECASE
)


def stops(language: str) -> tuple[str, ...]:
    return STOPS.get(language, STOPS["en"])


def cut_at(text: str, markers: Sequence[str]) -> str:
    """Text up to the first of `markers` (whichever comes first)."""
    end = len(text)
    for m in markers:
        i = text.find(m)
        if i != -1:
            end = min(end, i)
    return text[:end]


def clean(text: str, echo: re.Pattern[str] | None) -> str:
    """Cut at an invented turn or section label, then strip an echoed label at the start."""
    text = cut_at(text, TURN_MARKERS + SECTION_MARKERS)
    if echo is not None:
        text = echo.sub("", text, count=1)
    return text.strip()


def parse(text: str) -> ParseResult:
    """The critique text; empty after cleaning is a failure (it cannot feed a revision)."""
    body = clean(text, _CRITIQUE_ECHO)
    m = _REVISION_LABEL.search(body)
    body = body[: m.start()].strip() if m else body
    if not body:
        return ParseResult(raw=text, parse_status="failed", error="empty critique")
    return ParseResult(raw=text, parsed=body, parse_status="ok")


def request(principle: Principle, language: str) -> str:
    return render("cai_critique_request", language, critique=principle.critique)


def build_prompt(history: Sequence[Message], principle: Principle, language: str) -> list[Message]:
    """The transcript so far (ending with the assistant's last reply) + the critique request."""
    return [*history, user(request(principle, language))]


@dataclass
class CritiqueInput:
    item_id: str
    history: list[Message]  # ends with the reply to critique
    principle: Principle


def critique(ctx, state, inputs: Sequence[CritiqueInput], params: SamplingParams, round_: int) -> list[Sample]:
    """ONE backend call for every critique of this round; one sample per input."""
    calls = [
        Call(
            x.item_id,
            build_prompt(x.history, x.principle, ctx.language),
            {"round": round_, "principle_id": x.principle.id},
        )
        for x in inputs
    ]
    return [s[0] for s in run_calls(ctx, state, "critique", "policy", calls, params.replace(n=1), parse)]
