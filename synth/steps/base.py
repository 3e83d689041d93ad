"""What every step shares: one batched backend call, pure parsing, a trace row per sample.

A step module has three parts, so prompt building and parsing stay pure and testable and the one
model call is batched:
- `build_prompt(...) -> list[Message]`: pure; renders a template from synth/prompts;
- `parse(text) -> ParseResult`: pure; a failure returns parse_status "failed" and parsed None;
- a small batched function that builds all `Call`s of the chunk and hands them to `run_calls`, which
  makes exactly ONE `llm.generate` call for the whole stage.

`run_calls` gives every sampled request (temperature > 0) that has no seed of its own a seed derived from
the run's seed and the request's stable key (`seed_requests`), so the same config and seed give the same
data, also after a resume. It writes one trace row per (call, sample): the step, role, model, item id, the
prompt, the raw output, finish reason, parse status and parsed value, plus the call's meta (principle id,
order, ...), and counts parse failures as `parse_failed/<step>` in the chunk counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from synth.llm.base import SamplingParams, as_params_list, request_seed
from synth.records import Completion, Message, ParseResult

if TYPE_CHECKING:
    from synth.runtime import ChunkState, Context

Parser = Callable[[str], ParseResult]
# Parses the whole completion, for judgements read from token log-probs rather than from the text.
CompletionParser = Callable[[Completion], ParseResult]


@dataclass
class Call:
    """One request of a stage: which input it serves, the messages, and trace metadata."""

    item_id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One completion of a call, with its parse result when the step parses."""

    call: Call
    index: int
    completion: Completion
    result: ParseResult | None = None

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def parsed(self) -> Any:
        """The parser's value (a verdict dict, a score, a revised text...); None when unparsed or not parsed."""
        return self.result.parsed if self.result is not None else None

    @property
    def parsed_text(self) -> str:
        """The parsed value of a step whose parser returns text (a revision, a critique, a rewritten prompt)."""
        value = self.parsed
        if not isinstance(value, str):
            kind = type(value).__name__
            raise TypeError(f"sample {self.call.item_id}#{self.index}: the parsed value is {kind}, not text")
        return value

    @property
    def ok(self) -> bool:
        """Usable: parsed fine (when parsed) and not truncated at max_new_tokens."""
        parsed_ok = self.result is None or self.result.ok
        return parsed_ok and not self.completion.truncated


def run_calls(
    ctx: Context,
    state: ChunkState,
    step: str,
    role: str,
    calls: Sequence[Call],
    params: SamplingParams | Sequence[SamplingParams],
    parse: Parser | None = None,
    parse_completion: CompletionParser | None = None,
) -> list[list[Sample]]:
    """ONE backend call for the whole stage; parse every sample; trace and count. Returns, per call,
    its n samples in order. `parse` reads the text; `parse_completion` (instead) the whole Completion."""
    if not calls:
        return []
    params = seed_requests(getattr(ctx, "seed", 0), step, role, calls, params)
    llm = ctx.llm(role)
    results = llm.generate([c.messages for c in calls], params)
    if len(results) != len(calls):
        raise RuntimeError(f"backend {llm.kind} returned {len(results)} results for {len(calls)} requests")
    out: list[list[Sample]] = []
    for call, completions in zip(calls, results, strict=True):
        samples = []
        for i, comp in enumerate(completions):
            result = parse(comp.text) if parse is not None else (parse_completion(comp) if parse_completion else None)
            samples.append(Sample(call, i, comp, result))
            _trace(state, step, role, llm.model, call, i, comp, result)
        if completions:
            state.count("tokens/prompt", completions[0].prompt_tokens)
        state.count("tokens/completion", sum(c.completion_tokens for c in completions))
        out.append(samples)
    state.count(f"calls/{step}", len(calls))
    return out


def seed_requests(
    run_seed: int, step: str, role: str, calls: Sequence[Call], params: SamplingParams | Sequence[SamplingParams]
) -> list[SamplingParams]:
    """Per call, its params; a sampled one (temperature > 0) without a seed gets
    `request_seed(run_seed, role, step, item id, meta, messages)`: the key of the request, never its
    position in the batch or chunk, so a resumed or re-chunked run draws what an uninterrupted one would.
    The j-th repeat of an identical call in one stage (j >= 1) gets `request_seed(that seed, j)`: asking
    twice still gives two samples, as n > 1 does through `sample_seed`. An explicit seed (the pipeline's
    `sampling.seed`) is kept as it is; greedy requests stay unseeded (their call-cache keys do not change).
    """
    plist = as_params_list(params, len(calls))
    repeats: Counter[int] = Counter()
    out = []
    for call, p in zip(calls, plist, strict=True):
        if p.seed is not None or p.temperature == 0:
            out.append(p)
            continue
        msgs = [m.model_dump() for m in call.messages]
        seed = request_seed(run_seed, role, step, call.item_id, call.meta, msgs)
        j = repeats[seed]
        repeats[seed] += 1
        out.append(p.replace(seed=seed if j == 0 else request_seed(seed, j)))
    return out


def _trace(state, step, role, model, call: Call, index: int, comp: Completion, result: ParseResult | None) -> None:
    status = result.parse_status if result is not None else "skipped"
    if result is not None and not result.ok:
        state.count(f"parse_failed/{step}")
    if comp.truncated:
        state.count(f"truncated/{step}")
    state.trace.append(
        {
            "step": step,
            "role": role,
            "model": model,
            "item_id": call.item_id,
            "sample": index,
            "prompt": [m.model_dump() for m in call.messages],
            "output": comp.text,
            "finish_reason": comp.finish_reason,
            "parse_status": status,
            "parsed": result.parsed if result is not None else None,
            "parse_error": result.error if result is not None else None,
            **call.meta,
        }
    )


def user(content: str) -> Message:
    return Message(role="user", content=content)


def assistant(content: str) -> Message:
    return Message(role="assistant", content=content)
