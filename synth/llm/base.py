"""The one batch-first generation Protocol every backend implements.

A stage hands the WHOLE batch (all prompts x n samples) to `generate` in one call, so vLLM batches
continuously and the OpenAI client fills its concurrency (a stage never loops over
single prompts).

Conventions every backend honours:
- a request is a list of chat messages; the chat template is applied by the backend (or server);
- a request whose last message has role "assistant" is an *assistant prefill*: the backend continues
  that message instead of opening a new turn (hf: `continue_final_message=True`; vLLM / vLLM-serve:
  `add_generation_prompt=False, continue_final_message=True`);
- `params` is one SamplingParams for the whole batch or one per request;
- the result has one list per request, each with exactly `n` Completions, in request order;
- with a seed, sample i is drawn with seed `sample_seed(seed, i)` (see below), so results do not depend
  on batching, on n, or on which samples the call cache already holds; pipelines give every sampled
  request a seed (`request_seed`, applied in synth.steps.base.run_calls), so a run is reproducible;
- backends expose `stats: CallStats` (not part of the Protocol, so test fakes need not have it) and
  `identity: dict` (what the call cache keys on: kind, model, revision, adapter, template).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from synth.errors import BackendError, ConfigError  # noqa: F401 - BackendError is re-exported: backends raise it from here
from synth.records import Completion, Message, TokenLogprob

__all__ = [
    "Completion",
    "Message",
    "TokenLogprob",
    "SamplingParams",
    "LLM",
    "Request",
    "as_params_list",
    "BackendError",
    "CallStats",
    "sample_seed",
    "request_seed",
    "split_seeded",
    "settings_from_config",
    "ModelSettings",
    "adapter_fingerprint",
]

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
    # A regular expression the whole answer must match (A/B verdicts, `Rating: [[n]]`, `Score: N`), same
    # contract as json_schema: enforced by hf (xgrammar) and vLLM, ignored elsewhere. At most one of the two.
    regex: str | None = None

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
    """Counters a backend keeps (as its `stats` attribute); the pipeline copies them into manifest.json.

    `requests` counts requests handed to `generate`, `calls` the `generate` calls, `retries` every retried
    HTTP attempt with its reason in `retries_by_reason` ("429", "5xx", "timeout", "connection",
    "malformed"), `errors` requests that failed for good by reason, `cache_hits` samples served by the
    call cache without a backend call."""

    requests: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    retries_by_reason: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0

    def count_retry(self, reason: str) -> None:
        self.retries += 1
        self.retries_by_reason[reason] = self.retries_by_reason.get(reason, 0) + 1

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def add_completions(self, groups: Sequence[Sequence[Completion]]) -> None:
        for group in groups:
            for c in group:
                self.completions += 1
                self.prompt_tokens += c.prompt_tokens
                self.completion_tokens += c.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- seeds ------------------------------------------------------------------------------------------
# Contract every backend and the call cache share: sample i of a request with seed s is drawn as its
# own n=1 sample with seed `sample_seed(s, i)`. Sample 0 keeps s itself, so a seeded n=1 request is
# what users expect; later samples get a hashed seed (not s+i) so that runs with seeds 0, 1, 2 do not
# share samples. Because a sample depends only on (request, params, seed, i), the cache can ask for
# just the missing samples and still get exactly what a fresh run would have produced.


def sample_seed(seed: int, index: int) -> int:
    if index == 0:
        return seed
    digest = hashlib.sha256(f"rlaif-forge-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def request_seed(run_seed: int, *key: Any) -> int:
    """The seed of one request, derived from the run's seed and a stable key of the request (the item id,
    the step and role, the call's metadata, ...; never its position in a batch or chunk), so the same run
    draws the same samples whatever the chunking, the batching, a resume or the other items. A 31-bit
    hash, as `sample_seed`: every backend and server takes it."""
    blob = json.dumps([run_seed, *key], ensure_ascii=False, sort_keys=True, default=str, separators=(",", ":"))
    digest = hashlib.sha256(f"rlaif-forge-request:{blob}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def split_seeded(params: SamplingParams) -> list[SamplingParams]:
    """One params per sample when a seed is set (n=1, seed=sample_seed(seed, i)); else [params]."""
    if params.seed is None or params.n == 1:
        return [params]
    return [params.replace(n=1, seed=sample_seed(params.seed, i)) for i in range(params.n)]


def adapter_fingerprint(path: str | None) -> str | None:
    """sha256 over a LoRA adapter folder's config and weights: part of the cache identity, so that an
    adapter retrained in place does not serve stale samples."""
    if path is None:
        return None
    from pathlib import Path

    folder, h = Path(path), hashlib.sha256()
    files = sorted(f for f in folder.glob("adapter_*") if f.is_file()) if folder.is_dir() else []
    if not files:
        raise ValueError(f"adapter {path!r}: no adapter_config.json / adapter_model.* found there")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# --- config validation --------------------------------------------------------------------------------


class ModelSettings(BaseModel):
    """The `model` config group as backends read it. Extra keys are ignored here, not rejected: the group
    is shared with `train`, which reads keys of its own."""

    model_config = ConfigDict(extra="ignore")

    name_or_path: str
    revision: str | None = None
    chat_template: str | None = None  # None = the tokenizer's (or server's) own template
    gguf_file: str | None = None  # a GGUF file inside name_or_path (synth/modelfiles.py)


_S = TypeVar("_S")
_SECRETISH = re.compile(r"(_env|key|token|secret|password|url)$", re.IGNORECASE)


def settings_from_config(model_cls: type[_S], cfg: Mapping[str, Any], where: str) -> _S:
    """Validate a backend's settings with its pydantic model (extra="forbid") and turn the first error
    into ONE line that names the key and the valid keys, e.g.
    `llm=hf: unknown key 'batchsize'; valid keys: adapter, batch_size, ...`."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(dict(cfg))  # type: ignore[attr-defined]
    except ValidationError as exc:
        valid = ", ".join(sorted(model_cls.model_fields))  # type: ignore[attr-defined]
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            msg = f"{where}: unknown key {key!r}; valid keys: {valid}"
        elif _SECRETISH.search(key):  # never quote what may be a credential
            msg = f"{where}: {key}: {err['msg'].removeprefix('Value error, ')}"
        else:
            msg = (
                f"{where}: {key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r}); "
                f"valid keys: {valid}"
            )
        raise ConfigError(msg) from None
