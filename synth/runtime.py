"""The run-time types every step and pipeline shares (steps import these, never synth.pipelines).

- `Context`: what a step may use: lazily built role backends, the constitution, the run seed;
- `ChunkState`: the rows, trace and counters of one chunk, committed together by the runner;
- `Sampling`: sampling settings as they appear in pipeline configs.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth.llm.base import LLM, SamplingParams
from synth.llm.merge import CallMerger, unwrap


@dataclass
class Context:
    """What a pipeline may use: lazily built role backends, the constitution, the run seed."""

    factories: dict[str, Callable[[], LLM]]
    constitution: Any = None  # synth.constitution.Constitution | None
    seed: int = 0
    # set by the runner while several chunks are in flight: in-process engines then get one merged call
    # for the concurrent calls of all chunks (synth.llm.merge)
    merger: CallMerger | None = None
    _built: dict[str, LLM] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)  # chunks in flight share the roles

    def llm(self, role: str) -> LLM:
        with self._lock:  # a role is built once, even when several chunk workers ask at the same time
            if role not in self._built:
                if role not in self.factories:
                    raise KeyError(f"no backend for role {role!r}; configured roles: {sorted(self.factories)}")
                self._built[role] = unwrap(self.factories[role]())  # a role aliasing another gets its backend
            llm = self._built[role]
        merger = self.merger
        return llm if merger is None else merger.wrap(llm)

    @property
    def language(self) -> str:
        return getattr(self.constitution, "language", "en") if self.constitution is not None else "en"

    def rng(self, *salt: Any) -> random.Random:
        """A deterministic RNG for one item/step: resumes and reruns draw the same principles."""
        return random.Random(f"{self.seed}|" + "|".join(map(str, salt)))

    def backend_counters(self) -> Counter[str]:
        out: Counter[str] = Counter()
        seen: set[int] = set()
        for role, llm in self._built.items():
            if id(llm) in seen:  # the judge may be the policy backend itself; count it once
                continue
            seen.add(id(llm))
            stats = getattr(llm, "stats", None)
            if stats is not None:
                out[f"retries/{role}"] += getattr(stats, "retries", 0)
                out[f"cache_hits/{role}"] += getattr(stats, "cache_hits", 0)
        return out


@dataclass
class ChunkState:
    """Rows, trace and counters produced by one chunk; committed together."""

    rows: dict[str, list[Any]] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def emit(self, output: str, row: Any) -> None:
        self.rows.setdefault(output, []).append(row)
        self.counters[f"out/{output}"] += 1

    def drop(self, reason: str, n: int = 1) -> None:
        """An input item that yields no row, for `reason` (manifest "drops": counts of items)."""
        self.counters[f"drop/{reason}"] += n

    def drop_part(self, unit: str, reason: str, n: int = 1) -> None:
        """A part of an item left out (a candidate, a pair, an attack prompt...) while the item may still
        yield rows (manifest "dropped_parts": counts per unit, never added to the item drops)."""
        self.counters[f"drop_part/{unit}/{reason}"] += n

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n


class Sampling(BaseModel):
    """Sampling settings as they appear in pipeline configs."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int | None = Field(None, ge=0)
    stop: list[str] = []

    def params(self, n: int = 1, **kw) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            n=n,
            seed=self.seed,
            stop=tuple(self.stop),
            **kw,
        )
