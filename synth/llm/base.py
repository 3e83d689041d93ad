"""The one batch-first generation Protocol every backend implements.

A stage hands the WHOLE batch (all prompts x n samples) to `generate` in one call, so vLLM batches
continuously and the OpenAI client fills its concurrency (DESIGN.md §2 principle 5).

Conventions every backend honours:
- a request is a list of chat messages; the chat template is applied by the backend (or server);
- a request whose last message has role "assistant" is an *assistant prefill*: the backend continues
  that message instead of opening a new turn (hf: `continue_final_message=True`; vLLM / vLLM-serve:
  `add_generation_prompt=False, continue_final_message=True`);
- `params` is one SamplingParams for the whole batch or one per request;
- the result has one list per request, each with exactly `n` Completions, in request order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from synth.records import Completion, Message, TokenLogprob

__all__ = ["Completion", "Message", "TokenLogprob", "SamplingParams", "LLM", "Request", "as_params_list"]

Request = Sequence[Message]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # logprobs=True returns the chosen token's log-prob per position; top_logprobs=k adds the k best.
    logprobs: bool = False
    top_logprobs: int = 0
    # A JSON schema the answer must follow (judges). Backends with structured output enforce it;
    # others ignore it and the step's parser is the fallback.
    json_schema: dict[str, Any] | None = None

    def replace(self, **kw: Any) -> SamplingParams:
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def as_params_list(params: SamplingParams | Sequence[SamplingParams], n_requests: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n_requests
    params = list(params)
    if len(params) != n_requests:
        raise ValueError(f"got {len(params)} SamplingParams for {n_requests} requests")
    return params


@runtime_checkable
class LLM(Protocol):
    """A generation backend. `kind` is "hf" | "vllm" | "openai"; `model` names the model (hub id or path)."""

    kind: str
    model: str

    def generate(
        self, requests: Sequence[Request], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]: ...


def is_prefill(request: Request) -> bool:
    return len(request) > 0 and request[-1].role == "assistant"


@dataclass
class CallStats:
    """Counters a backend keeps; the pipeline copies them into manifest.json."""

    requests: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
