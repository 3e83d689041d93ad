"""Typed records shared by every pipeline and by `train`.

Preference rows use TRL's conversational columns (`prompt`: list of messages, `chosen` / `rejected`:
assistant messages) plus metadata, so TRL, OpenRLHF and our own `train` read them without conversion.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Record(BaseModel):
    """Base for every record: unknown keys are rejected so that typos in data are loud."""

    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=False)

    @classmethod
    def from_json(cls, line: str):
        return cls.model_validate_json(line)


class Message(Record):
    role: Role
    content: str


class TokenLogprob(Record):
    """One generated token with its log-prob and the top alternatives (token text -> log-prob)."""

    token: str
    logprob: float
    top: dict[str, float] = Field(default_factory=dict)


class Completion(Record):
    """One sampled completion as every backend returns it."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | ... (None when the backend does not say)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


ParseStatus = Literal["ok", "failed", "skipped"]


class ParseResult(Record):
    """What a step's parser made of one completion: a judge's verdict, a score, a revised text, a rewritten
    prompt. A failure keeps the raw text and sets `parsed` to None; it never becomes a default value (a
    default score would silently enter preference pairs)."""

    raw: str
    parsed: Any = None
    parse_status: ParseStatus = "failed"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.parse_status == "ok"


class Provenance(Record):
    generator_model: str | None = None
    generator_revision: str | None = None
    sampling: dict[str, Any] = Field(default_factory=dict)
    template_id: str | None = None
    template_hash: str | None = None
    iteration: int | None = None
    created_at: str | None = None


class SFTRecord(Record):
    id: str
    messages: list[Message]
    method: str
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class PreferenceRecord(Record):
    """TRL conversational preference row + metadata."""

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    method: str
    principle_ids: list[str] = Field(default_factory=list)
    score_chosen: float | None = None
    score_rejected: float | None = None
    margin: float | None = None
    p_chosen: float | None = None  # soft label, when the method produces one
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class RankedRecord(Record):
    """Prompt + k responses with scores (higher is better), for listwise objectives."""

    id: str
    prompt: list[Message]
    responses: list[list[Message]]
    scores: list[float]
    method: str
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class UnpairedRecord(Record):
    """KTO-style row: one completion with a desirable / undesirable label."""

    id: str
    prompt: list[Message]
    completion: list[Message]
    label: bool
    method: str
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class JointPreferenceRecord(Record):
    """DOVE / JPO joint preference (Bansal et al. 2024, arXiv 2404.00530): two (instruction, response)
    pairs, usually with different instructions, and which pair is preferred. `prompt_*` are message lists
    ending with a user turn, `response_*` assistant message lists (TRL's conversational shape per side);
    `label` "a" or "b" names the preferred pair (ties are not written). For a chosen/rejected view:
    chosen = (prompt_<label>, response_<label>), rejected = the other side."""

    id: str
    prompt_a: list[Message]
    response_a: list[Message]
    prompt_b: list[Message]
    response_b: list[Message]
    label: Literal["a", "b"]
    method: str
    p_a: float | None = None  # soft label P(a preferred), when read from log-probs
    category_a: str | None = None
    category_b: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class GenerationRecord(Record):
    """`pipeline=generate` output: n completions for one prompt."""

    id: str
    prompt: list[Message]
    completions: list[Completion]
    model: str
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)


class SourceItem(Record):
    """One input row from a source (`source=`): a conversation prefix ending with a user turn,
    optionally a preference pair, optionally a category label."""

    id: str
    prompt: list[Message]
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The last user turn (what most templates quote)."""
        return next(m.content for m in reversed(self.prompt) if m.role == "user")


def stable_id(*parts: Any, prefix: str = "") -> str:
    """Deterministic id from content: the same input gives the same id across runs and machines."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str)
    return prefix + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def messages(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role=r, content=c) for r, c in pairs]  # type: ignore[arg-type]
