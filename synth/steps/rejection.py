"""Rejection-sampling steps for `pipeline=rs_dpo` (Khaki et al. 2024, arXiv 2402.10038): score the k
samples of each prompt, then keep the pairs whose reward gap clears a threshold.

- `unique_texts`: duplicate samples are dropped before pairing (a pair of equal texts has no signal);
- `gap_pairs`: the paper's Algorithm 1 ("Preference Data Generation via Rejection Sampling"): over every
  ordered pair (j, l), j != l, the pair (chosen y_j, rejected y_l) is kept when
  σ((r_j − r_l) / τ) > η. With η >= 0.5 only r_j > r_l can pass, so no pair is kept in both orders;
- `normalize`: optional per-prompt standardisation of the rewards, because η only has a meaning together
  with τ and the reward scale (a reward model's logits and a judge's 1-10 rating differ);
- scorers: a reward model (`ModelScorer`, in-process, one batched pass per chunk), a Python function
  (`FunctionScorer`), or the `judge` role grading with the MT-Bench 1-10 rubric (synth.steps.judge).
  A sample the scorer cannot score is None: it never gets a default reward and never enters a pair.
"""

from __future__ import annotations

import importlib
import math
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from synth.errors import ConfigError
from synth.records import Message
from synth.runtime import ChunkState


def unique_texts(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct text (whitespace at the ends ignored)."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        key = t.strip()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def normalize(rewards: Sequence[float | None], mode: str) -> list[float | None]:
    """`none`: as given. `prompt_z`: (r − mean) / std over this prompt's scored samples (population std;
    all equal -> all 0, so no pair passes)."""
    if mode == "none":
        return list(rewards)
    vals = [r for r in rewards if r is not None]
    if len(vals) < 2:
        return list(rewards)
    mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
    return [None if r is None else (0.0 if sd == 0 else (r - mu) / sd) for r in rewards]


@dataclass(frozen=True)
class GapPair:
    chosen: int  # index into the prompt's samples
    rejected: int
    gap: float  # r_chosen − r_rejected (on the scale the threshold saw)
    p: float  # σ(gap / τ)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def gap_pairs(rewards: Sequence[float | None], tau: float, eta: float, cap: int | None = None) -> list[GapPair]:
    """Algorithm 1 of RS-DPO: every ordered pair (j, l), j != l, both scored, with σ((r_j − r_l)/τ) > η.
    Sorted by gap, largest first (ties: lower indices first); `cap` keeps that many of them (None = all,
    as in the paper; the count grows as k²)."""
    out = []
    for j, rj in enumerate(rewards):
        for l, rl in enumerate(rewards):  # noqa: E741 - the paper's index names
            if j == l or rj is None or rl is None:
                continue
            p = _sigmoid((rj - rl) / tau)
            if p > eta:
                out.append(GapPair(j, l, rj - rl, p))
    out.sort(key=lambda g: (-g.gap, g.chosen, g.rejected))
    return out if cap is None else out[:cap]


# --------------------------------------------------------------------------- scorers (no backend role)

Prompts = Sequence[Sequence[Message]]


class ModelScorer:
    """A reward model saved by `train loop=reward` (full weights or a LoRA adapter), loaded on first use
    and scored in batches exactly as `evaluate` scores (synth.evaluate.scoring.ScalarScorer). One chunk
    scores at a time: chunks in flight (a server policy) share the one in-process model."""

    def __init__(self, path: str, device: str, batch_size: int):
        self.path, self.device, self.batch_size = path, device, batch_size
        self._model = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.path

    def __call__(self, prompts: Prompts, texts: Sequence[str]) -> list[float | None]:
        with self._lock:
            return self._score(prompts, texts)

    def _score(self, prompts: Prompts, texts: Sequence[str]) -> list[float | None]:
        if self._model is None:
            from synth.evaluate.scoring import ScalarScorer

            try:
                self._model = ScalarScorer(self.path, self.device, self.batch_size)
            except (OSError, ConfigError) as e:  # the loader's own error names model.name_or_path
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(
                    f"pipeline.scorer.path={self.path}: cannot load a reward model ({why}); "
                    "pass a `train loop=reward` output folder"
                ) from None
        return [None if not math.isfinite(v) else float(v) for v in self._model(prompts, texts)] if texts else []


class FunctionScorer:
    """`module:function(prompts, completions) -> list[float | None]`: a rule reward, or a wrapper around
    any scoring service. Prompts are message lists ({role, content} dicts)."""

    def __init__(self, spec: str):
        module, _, attr = spec.partition(":")
        try:
            self.fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(
                f"pipeline.scorer.function={spec}: cannot import it ({e}); expected module:function"
            ) from None
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec

    def __call__(self, prompts: Prompts, texts: Sequence[str]) -> list[float | None]:
        if not texts:
            return []
        values = list(self.fn(prompts=[[m.model_dump() for m in p] for p in prompts], completions=list(texts)))
        if len(values) != len(texts):
            raise ValueError(f"scorer {self.spec} returned {len(values)} scores for {len(texts)} completions")
        return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


def trace_scores(
    state: ChunkState,
    step: str,
    scorer_name: str,
    item_ids: Sequence[str],
    prompts: Prompts,
    texts: Sequence[str],
    scores: Sequence[float | None],
) -> None:
    """One trace row per scored sample (the scorer is not a chat backend, so run_calls does not write
    them); an unscorable sample counts as a parse failure of `step`."""
    for item_id, prompt, text, score in zip(item_ids, prompts, texts, scores, strict=True):
        if score is None:
            state.count(f"parse_failed/{step}")
        state.trace.append(
            {
                "step": step,
                "role": "scorer",
                "model": scorer_name,
                "item_id": item_id,
                "sample": 0,
                "prompt": [m.model_dump() for m in prompt],
                "output": text,
                "finish_reason": None,
                "parse_status": "ok" if score is not None else "failed",
                "parsed": score,
                "parse_error": None if score is not None else "no finite score",
            }
        )
    state.count(f"calls/{step}", len(texts))
