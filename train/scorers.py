"""Scorers of the online loops: one batched call per step, NaN for an unscorable sample (never a
default score; the estimators give it zero advantage).

    function   a Python function named `module:function`, called once per step with keyword arguments
               it declares among prompts (list of message lists), completions (texts), completion_ids
               (token-id lists); returns one float (or None = unscorable) per completion
    model      a reward / cost model trained by `train loop=reward` (a `final/` folder: full weights or
               a LoRA adapter), scored on detokenised prompt + completion through its own chat template
    judge      an AI judge through a synth backend: MT-Bench rubric 1-10 (synth.steps.judge), or for
               online_dpo pairwise labels asked in both orders (ties and disagreements dropped)
    weighted   several of the above as one: Σ w_i (s_i − shift_i) / scale_i (e.g. a helpfulness reward
               model plus a harmlessness one, or a reward minus a weighted cost); NaN if any part is NaN

Built-in rule functions for toys and benchmarks: `train.scorers:even_token_fraction` (a reward) and
`train.scorers:quarter_token_fraction` (a cost that conflicts with it).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from synth.errors import ConfigError
from synth.llm import build_llm
from synth.llm.base import SamplingParams
from synth.records import Message
from synth.steps.judge import build_pairwise, build_rubric, parse_pairwise, parse_rating
from synth.steps.orders import combine_verdicts
from train.models import model_path

Messages = list[dict[str, str]]


def resolve_function(spec: str, where: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{where}={spec}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}={spec}: cannot import it ({e})") from None
    if not callable(fn):
        raise ConfigError(f"{where}={spec}: not callable")
    return fn


def _as_scores(values: Sequence[Any], n: int, where: str) -> Tensor:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{where} returned {len(values)} scores for {n} completions")
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


class FunctionScorer:
    def __init__(self, spec: str, where: str):
        self.fn = resolve_function(spec, where)
        self.where = f"{where}={spec}"
        params = inspect.signature(self.fn).parameters
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self.names = set(params)

    def __call__(self, prompts: list[Messages], completions: list[str], completion_ids: list[list[int]]) -> Tensor:
        avail = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        kwargs = avail if self.takes_all else {k: v for k, v in avail.items() if k in self.names}
        return _as_scores(self.fn(**kwargs), len(completions), self.where)


class ModelScorer:
    """A frozen scalar-head model (reward or cost). Rows go through in chunks of `batch_size`, right
    padded; the head reads the last non-pad token (as `train loop=reward` trained it)."""

    def __init__(self, path: str, batch_size: int, device, where: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        p = Path(model_path(path))
        try:
            if (p / "adapter_config.json").exists():
                from peft import AutoPeftModelForSequenceClassification

                model = AutoPeftModelForSequenceClassification.from_pretrained(str(p), num_labels=1).merge_and_unload()
            else:
                model = AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=1)
            self.tok = AutoTokenizer.from_pretrained(str(p))
        except OSError as e:
            raise ConfigError(f"{where}={path}: cannot load a reward/cost model ({str(e).splitlines()[0]})") from None
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        model.config.pad_token_id = self.tok.pad_token_id
        self.model = model.float().to(device).eval().requires_grad_(False)
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def __call__(self, prompts: list[Messages], completions: list[str], completion_ids: list[list[int]]) -> Tensor:
        texts = [
            self.tok.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
            for p, c in zip(prompts, completions, strict=True)
        ]
        out = []
        self.tok.padding_side = "right"
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[i : i + self.batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def build_judge_llm(judge) -> Any:
    """A synth backend for the judge (synth.llm.build_llm), or the object a `factory` returns."""
    if judge.factory is not None:
        return resolve_function(judge.factory, "judge.factory")()

    return build_llm(judge.llm, judge.model, cache_path=judge.cache_path)


def _messages(prompt: Messages):
    return [Message(role=m["role"], content=m["content"]) for m in prompt]


class RubricJudge:
    """MT-Bench single-answer grading [[1-10]] (synth.steps.judge.build_rubric / parse_rating), one
    backend call for all completions; a parse failure or a cut-off verdict is NaN."""

    def __init__(self, judge):
        self.llm, self.language = build_judge_llm(judge), judge.language
        self.params = SamplingParams(temperature=judge.temperature, max_new_tokens=judge.max_new_tokens)

    def __call__(self, prompts: list[Messages], completions: list[str], completion_ids: list[list[int]]) -> Tensor:
        requests = [build_rubric(self.language, _messages(p), c) for p, c in zip(prompts, completions, strict=True)]
        results = self.llm.generate(requests, self.params) if requests else []
        scores = []
        for group in results:
            comp = group[0]
            j = parse_rating(comp.text)
            scores.append(j.parsed if j.ok and comp.finish_reason != "length" else None)
        return _as_scores(scores, len(completions), "judge")


class PairwiseJudge:
    """OAIF labels (Guo et al. 2024, arXiv 2402.04792): every pair asked as (a, b) and (b, a) in ONE
    backend call; a wins only when both orders say so (synth.steps.orders.combine_verdicts). Returns per
    pair 1 (a preferred), 0 (b preferred) or None (tie, disagreement, parse failure: the pair is dropped)."""

    def __init__(self, judge):
        from synth.llm.base import SamplingParams

        self.llm, self.language = build_judge_llm(judge), judge.language
        self.params = SamplingParams(temperature=judge.temperature, max_new_tokens=judge.max_new_tokens)

    def __call__(self, prompts: list[Messages], a: list[str], b: list[str]) -> list[int | None]:
        requests = []
        for p, x, y in zip(prompts, a, b, strict=True):
            msgs = _messages(p)
            requests += [build_pairwise(self.language, msgs, x, y), build_pairwise(self.language, msgs, y, x)]
        results = self.llm.generate(requests, self.params) if requests else []
        out: list[int | None] = []
        for k in range(len(prompts)):
            verdicts = []
            for comp in (results[2 * k][0], results[2 * k + 1][0]):
                j = parse_pairwise(comp.text)
                verdicts.append(j.parsed if j.ok and comp.finish_reason != "length" else None)
            winner = combine_verdicts(*verdicts)
            out.append({"i": 1, "j": 0}.get(winner) if winner else None)
        return out


def combine_scores(
    columns: Sequence[Tensor],
    weights: Sequence[float],
    shifts: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
) -> Tensor:
    """Several reward models as one: s = Σ_i w_i (s_i − shift_i) / scale_i, [N] from M columns of [N].
    NaN (unscorable) in any column makes the combined score NaN: a missing term is never read as 0."""
    if not columns or len(columns) != len(weights):
        raise ValueError(f"need one weight per score column, got {len(columns)} columns and {len(weights)} weights")
    shifts = shifts if shifts is not None else [0.0] * len(columns)
    scales = scales if scales is not None else [1.0] * len(columns)
    total = torch.zeros_like(columns[0], dtype=torch.float32)
    for s, w, b, c in zip(columns, weights, shifts, scales, strict=True):
        total = total + w * (s.float() - b) / c
    return total


class WeightedScorer:
    """kind=weighted: every component scores the same completions (one batched call each), then
    :func:`combine_scores`."""

    def __init__(self, components, device, where: str):
        self.parts = [
            build_scorer(c.scorer, device, f"{where}.components[{i}].scorer") for i, c in enumerate(components)
        ]
        self.weights = [c.weight for c in components]
        self.shifts = [c.shift for c in components]
        self.scales = [c.scale for c in components]

    def __call__(self, prompts: list[Messages], completions: list[str], completion_ids: list[list[int]]) -> Tensor:
        columns = [part(prompts, completions, completion_ids) for part in self.parts]
        return combine_scores(columns, self.weights, self.shifts, self.scales)


def build_scorer(spec, device, where: str) -> Callable[[list[Messages], list[str], list[list[int]]], Tensor]:
    if spec.kind == "weighted":
        return WeightedScorer(spec.components, device, where)
    if spec.kind == "function":
        return FunctionScorer(spec.function, f"{where}.function")
    if spec.kind == "model":
        return ModelScorer(spec.path, spec.batch_size, device, f"{where}.path")
    return RubricJudge(spec.judge)


# ------------------------------------------------------------------------------------ rule rewards


def even_token_fraction(completion_ids: list[list[int]]) -> list[float]:
    """Fraction of even token ids in each completion (the CPU benchmark's rule: deterministic, cheap,
    about 0.5 for a random policy, so group statistics are exercised)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def quarter_token_fraction(completion_ids: list[list[int]]) -> list[float]:
    """Fraction of token ids divisible by 4 (a cost that conflicts with `even_token_fraction`:
    half of the even ids are costly, so the policy must move towards ids ≡ 2 mod 4)."""
    return [sum(1 for t in ids if t % 4 == 0) / max(len(ids), 1) for ids in completion_ids]
