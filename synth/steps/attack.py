"""Red-team attacker step (red teaming with LMs, Perez et al. 2022, arXiv 2202.03286): an attacker model
writes adversarial test prompts for one taxonomy category and one attack family.

Each request asks for ONE prompt and is sampled n=k times (Perez et al.'s zero-shot generator draws
independent samples with nucleus sampling), so a malformed sample costs one prompt, not a list.
The parser strips echoed labels, list numbering and wrapping quotes; it does not cut at "User:" turns,
because in-context-example attacks contain fake dialogue on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from synth.llm.base import SamplingParams
from synth.prompts import render
from synth.records import Message, ParseResult
from synth.steps.base import Call, Sample, run_calls, user

# Common jailbreak families (role-play, goal hijacking, prompt leaking, in-context examples); each has a block
# in red_team_attack.<lang>.j2. (Generation exploitation is not a prompt family: it is the decoding sweep
# applied when the target answers: Huang et al. 2023, arXiv 2310.06987, Princeton-SysML/Jailbreak_LLM.)
FAMILIES = ("direct", "role_play", "goal_hijacking", "prompt_leaking", "in_context")

_LABEL = re.compile(r"^\s*(?:\*\*)?\s*(?:test prompt|prompt|测试提示词|提示词)\s*(?:\*\*)?\s*[:：]\s*", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d{1,2}\s*[.)、]|[-*•])\s+")
_QUOTES = [('"', '"'), ("“", "”"), ("「", "」"), ("'", "'")]


def parse(text: str) -> ParseResult:
    body = _NUMBERING.sub("", _LABEL.sub("", text.strip(), count=1), count=1).strip()
    for left, right in _QUOTES:
        if len(body) > 1 and body.startswith(left) and body.endswith(right):
            body = body[1:-1].strip()
    if not body:
        return ParseResult(raw=text, parse_status="failed", error="empty prompt")
    return ParseResult(raw=text, parsed=body, parse_status="ok")


@dataclass
class AttackTarget:
    item_id: str
    l1: str
    l2: str
    description: str
    guidance: str  # the taxonomy's red_team text
    family: str


def build_prompt(t: AttackTarget, language: str) -> list[Message]:
    return [
        user(
            render(
                "red_team_attack",
                language,
                l1=t.l1,
                l2=t.l2,
                description=t.description,
                guidance=t.guidance,
                family=t.family,
            )
        )
    ]


def attack(ctx, state, targets: Sequence[AttackTarget], params: SamplingParams, k: int) -> list[list[Sample]]:
    """ONE attacker call for the chunk: k samples per (category, family)."""
    calls = [
        Call(t.item_id, build_prompt(t, ctx.language), {"category": f"{t.l1}/{t.l2}", "attack_family": t.family})
        for t in targets
    ]
    return run_calls(ctx, state, "attack", "attacker", calls, params.replace(n=k), parse)
