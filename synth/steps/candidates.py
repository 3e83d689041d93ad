"""Candidate responses for the ranking pipelines: sampled from one or several models, or read from data.

Each configured candidate model is its own role (`candidate/<name>`), built lazily with
`synth.llm.build_llm` the first time it is needed and cached on the Context with the other roles; a
candidate entry without llm/model settings samples from the policy. Every role gets ONE batched call
per chunk (all prompts x its n samples); several models mean several backends, hence one call each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synth.llm import build_llm
from synth.records import SourceItem
from synth.runtime import ChunkState, Context, Sampling
from synth.steps.base import Call, run_calls


@dataclass(frozen=True)
class Candidate:
    """One response to judge. `name` is the competitor (a model name for rating tables; "chosen" /
    "rejected" or "response_<i>" for data), `index` its position in the item's candidate list."""

    name: str
    text: str
    index: int
    from_model: bool


class CandidateSpec(BaseModel):
    """One competing model: `llm` + `model` as in conf/llm/*.yaml and conf/model/*.yaml (both, or
    neither for the policy itself), `n` samples per prompt with its own sampling settings."""

    model_config = ConfigDict(extra="forbid")
    name: str
    llm: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    n: int = Field(1, ge=1)
    sampling: Sampling = Sampling()

    @model_validator(mode="after")
    def _both_or_neither(self) -> CandidateSpec:
        if (self.llm is None) != (self.model is None):
            raise ValueError(
                f"candidate {self.name!r}: give both llm and model (its own backend) or neither (the policy)"
            )
        return self

    @property
    def role(self) -> str:
        return "policy" if self.llm is None else f"candidate/{self.name}"


def register_candidates(ctx: Context, specs: Sequence[CandidateSpec], cache_dir: Path | None) -> None:
    """Add a lazy factory per candidate backend; nothing is loaded until its first call."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    for spec in specs:
        if spec.llm is not None and spec.role not in ctx.factories:
            ctx.factories[spec.role] = _factory(spec, cache_dir)


def _factory(spec: CandidateSpec, cache_dir: Path | None):
    model = {"revision": None, "chat_template": None, **(spec.model or {})}
    cache = cache_dir / "cache.sqlite" if cache_dir is not None else None

    def build():
        return build_llm(spec.llm, model, cache_path=cache)

    return build


def sample_candidates(
    ctx: Context,
    state: ChunkState,
    items: Sequence[SourceItem],
    specs: Sequence[CandidateSpec],
    drop_truncated: bool = True,
) -> dict[str, list[Candidate]]:
    """Sample every spec's n responses for every item; truncated responses are dropped (counted),
    never judged, because they would become training targets (unless drop_truncated is off)."""
    out: dict[str, list[Candidate]] = {it.id: [] for it in items}
    for role in dict.fromkeys(s.role for s in specs):
        group = [s for s in specs if s.role == role]
        calls = [Call(it.id, list(it.prompt), {"candidate": s.name}) for it in items for s in group]
        params = [s.sampling.params(n=s.n) for _ in items for s in group]
        for call, samples in zip(calls, run_calls(ctx, state, "candidates", role, calls, params), strict=True):
            for smp in samples:
                if smp.completion.truncated and drop_truncated:
                    state.drop_part("candidate", "truncated_candidate")
                    continue
                name = call.meta["candidate"]
                out[call.item_id].append(Candidate(name, smp.text, 0, True))
    return {k: [Candidate(c.name, c.text, i, True) for i, c in enumerate(v)] for k, v in out.items()}


def data_candidates(item: SourceItem, field: str) -> list[Candidate]:
    """Responses already in the data: `field="pair"` takes the source's chosen/rejected; any other
    value names a list field of the row (strings, message lists, or {text|content|response, model})."""
    if field == "pair":
        pair = [("chosen", item.chosen), ("rejected", item.rejected)]
        return [Candidate(n, m[-1].content, i, False) for i, (n, m) in enumerate(pair) if m]
    raw = item.meta.get(field)
    if not isinstance(raw, list):
        raise ValueError(f"item {item.id}: field {field!r} must be a list of responses (got {type(raw).__name__})")
    return [_one(entry, i, item.id) for i, entry in enumerate(raw)]


def _one(entry: Any, i: int, item_id: str) -> Candidate:
    if isinstance(entry, str):
        return Candidate(f"response_{i}", entry, i, False)
    if isinstance(entry, list) and entry and isinstance(entry[-1], dict):
        return Candidate(f"response_{i}", str(entry[-1].get("content", "")), i, False)
    if isinstance(entry, dict):
        text = next((entry[k] for k in ("text", "content", "response") if k in entry), None)
        if isinstance(text, str):
            model = entry.get("model") or entry.get("name")
            return Candidate(str(model) if model else f"response_{i}", text, i, bool(model))
    raise ValueError(f"item {item_id}: response {i} is neither a string, a message list nor a {{text, model}} object")
