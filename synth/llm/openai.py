"""`llm=openai`: any OpenAI-compatible chat-completions server (vLLM serve, SGLang, TGI, llama.cpp,
Ollama, hosted APIs).

One `generate` call = one `asyncio.run`: every (request, sample group) becomes one HTTP request, all
in flight together under `asyncio.Semaphore(max_concurrency)`, spread over the base URLs (least busy
first). Network faults are handled here and only here (one place for retries, so no caller retries twice):
429 (Retry-After honoured), 5xx, 408/409, timeouts, connection errors/resets and malformed or truncated bodies are
retried with exponential backoff and full jitter, on another base URL when there is one; when the
retries run out a `BackendError` names the server, the model and the last failure. Client-side
retries are off (the SDK's `max_retries=0`) so that retries live in one place.

Two transports share that logic:
- `openai`: the `openai` AsyncOpenAI client (proxies, TLS, everything the SDK supports);
- `lean`: a small stdlib-asyncio HTTP/1.1 keep-alive client. The SDK costs ~2.5 ms of CPU per request
  on a 2-core box, which caps one process near 300 requests/s; the lean client costs ~0.2 ms, which is
  what fast self-hosted servers at concurrency 64-256 need (bench/synth_throughput.py).
`transport: auto` (default) uses `lean` for plain-http URLs that no proxy setting applies to (local
vLLM / SGLang servers) and the SDK otherwise (https, proxies, hosted APIs).

The API key is read from the env var named by `api_key_env` ("EMPTY" when unset, for local servers)
and lives only inside the transport; it is never in a repr, a log line, an exception or a config.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import threading
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.llm._http import (
    FatalHTTP,
    LeanEndpoint,
    Retryable,
    SDKEndpoint,
    classify_status,
)
from synth.llm.base import (
    BackendError,
    CallStats,
    Completion,
    ModelSettings,
    Request,
    SamplingParams,
    TokenLogprob,
    as_params_list,
    is_prefill,
    split_seeded,
)
from synth.llm.schema import for_openai_strict
from synth.records import Message
from synth.secrets import looks_like_key, strip_url_credentials
from synth.secrets import register as register_secret

log = logging.getLogger(__name__)
_MAX_RETRY_AFTER_S = 600.0
# Prefill probe results, per (base URL, model) for the whole process: one probe per server.
_PREFILL_OK: dict[tuple[str, str], bool] = {}
_PREFILL_LOCK = threading.Lock()
# Structured-output form each (base URL, model) accepts, found on the first JSON-schema request (see
# OpenAIBackend._post): "json_schema" (OpenAI, vLLM, SGLang), "json_object" (json_object with a "schema"
# key: llama-cpp-python, which answers json_schema with HTTP 500) or "none" (no response_format: the
# JSON is asked for in the prompt only, and the step's parser checks it).
_STRUCTURED: dict[tuple[str, str], str] = {}
_STRUCTURED_FORMS = ("json_schema", "json_object", "none")
PREFILL_PROBE_MESSAGES = [
    Message(role="user", content="Count from one to ten in words, separated by commas."),
    Message(role="assistant", content="one, two, three, four, five, six, seven,"),
]


class OpenAISettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["openai"] = "openai"
    base_url: str | list[str] = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(64, ge=1)
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    # true: one request with n=k (vLLM serve supports it); false: k requests with n=1; auto: n=k until a
    # server answers with fewer choices (llama.cpp returns 1), then one request per sample from then on.
    send_n: bool | Literal["auto"] = "auto"
    # Assistant prefill (the log-prob / vote labels of ai_feedback, pairwise logprobs=true) is vLLM's
    # `continue_final_message` extension. probe: before the first prefill request, one probe request per
    # server checks that it continues the assistant message (cached per server and model); a server that
    # does not is refused with one line. trust: skip the probe.
    prefill: Literal["probe", "trust"] = "probe"
    # How a step's JSON schema is sent: auto (default) sends response_format json_schema and, when a server
    # rejects it (HTTP 400/422/500), tries json_object with the schema, then no response_format (the prompt
    # asks for JSON and the step parses it); the form that works is kept per server and model and logged
    # once. json_schema / json_object / none: that form, without detection.
    structured_output: Literal["auto", "json_schema", "json_object", "none"] = "auto"
    transport: Literal["auto", "lean", "openai"] = "auto"
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    progress: bool = True  # tqdm over finished requests for large calls
    # Regex-constrained answers (the judges' verdict formats) are a server extension, off by default so a
    # hosted API never sees an unknown field: "structured_outputs" (vLLM >= 0.10.2 serve) or
    # "guided_regex" (older vLLM serve, SGLang's regex is "regex"). Off: the step parses free text.
    regex_field: Literal["none", "structured_outputs", "guided_regex", "regex"] = "none"
    # Sampled requests carry a `seed` (the pipelines seed every one: synth.steps.base.seed_requests), one
    # request per sample (base.py's seed contract). false: no `seed` field, for a server that rejects it
    # (samples are then not reproducible), and n > 1 goes as one request again.
    send_seed: bool = True

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: str | list[str]) -> str | list[str]:
        urls = [v] if isinstance(v, str) else list(v)
        if not urls or any(not u.startswith(("http://", "https://")) for u in urls):
            raise ValueError("base_url must be an http(s) URL or a non-empty list of them")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if looks_like_key(v):  # the message must not quote the value: it is probably the key
            raise ValueError(
                "must be the NAME of an environment variable holding the key, and the value given "
                "looks like a key itself; export MY_KEY=<key> and pass llm.api_key_env=MY_KEY"
            )
        return v

    @property
    def urls(self) -> list[str]:
        return [u.rstrip("/") for u in ([self.base_url] if isinstance(self.base_url, str) else self.base_url)]


def resolve_transport(setting: str, url: str) -> str:
    """auto -> lean for plain http with no proxy in the way, else the SDK (see module docstring)."""
    if setting != "auto":
        return setting
    parts = urlsplit(url)
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")
    return "lean" if parts.scheme == "http" and not proxied else "openai"


class OpenAIBackend:
    kind = "openai"

    def __init__(self, settings: OpenAISettings, model: ModelSettings) -> None:
        self.settings = settings
        self.model = model.name_or_path
        self.identity = {
            "kind": self.kind,
            "model": self.model,
            "revision": model.revision,
            "chat_template": model.chat_template,
        }
        self.chat_template = model.chat_template
        self.honours_seeds = settings.send_seed  # the call cache splits seeded samples only when seeds are sent
        self.stats = CallStats()
        self._urls = settings.urls
        self._last_rejection = ""
        self._loop_thread: _LoopThread | None = None
        self._stats_lock = threading.Lock()
        self._n_ignored = False  # send_n auto: a server answered n=k with fewer choices
        self._structured_locks: dict[str, asyncio.Lock] = {}  # per base URL, used on the loop thread only

    def __repr__(self) -> str:  # no key here, ever
        urls = [strip_url_credentials(u) for u in self._urls]
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={urls!r}, max_concurrency={self.settings.max_concurrency})"
        )

    # ---- the Protocol ----------------------------------------------------------------------------
    streams_results = True  # generate(..., on_result=) reports each request's answers as they arrive

    def generate(
        self,
        requests: Sequence[Request],
        params: SamplingParams | Sequence[SamplingParams],
        on_result: Callable[[int, list[Completion]], None] | None = None,
    ) -> list[list[Completion]]:
        """All requests concurrently (at most `max_concurrency` in flight over every call running at
        once, from any thread). `on_result(r, completions)` is called as soon as request r is answered,
        from the backend's event-loop thread, so the call cache keeps answers that arrive before a
        later request of the same call fails for good."""
        params_list = as_params_list(params, len(requests))
        self._check_prefill(requests)
        jobs = [(r, unit) for r, p in enumerate(params_list) for unit in self._units(p)]
        bodies = [self._body(requests[r], unit) for r, unit in jobs]
        with self._stats_lock:
            self.stats.calls += 1
            self.stats.requests += len(requests)
        results = self._loop().run(self._run_all(bodies, jobs, on_result))
        out: list[list[Completion]] = [[] for _ in requests]
        for (r, _), comps in zip(jobs, results, strict=True):
            out[r].extend(comps)
        self._check_not_all_failed(out)
        with self._stats_lock:
            self.stats.add_completions(out)
        return out

    def _loop(self) -> _LoopThread:
        """The backend's event loop and its semaphore: one per process (a forked child starts its own),
        created once even when several chunk workers make their first call at the same time."""
        with self._stats_lock:
            if self._loop_thread is None or not self._loop_thread.alive():
                self._loop_thread = _LoopThread(self.settings.max_concurrency)
                self._structured_locks = {}  # asyncio locks belong to the old loop
            return self._loop_thread

    def close(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.close()
            self._loop_thread = None

    def _units(self, p: SamplingParams) -> list[SamplingParams]:
        """Seeded samples go one per request (seed contract in base.py); else n in one request or k."""
        send_n = self.settings.send_n
        if p.seed is not None and not self.settings.send_seed:
            p = p.replace(seed=None)
        if p.seed is not None or send_n is True or (send_n == "auto" and not self._n_ignored):
            return split_seeded(p)
        return [p.replace(n=1)] * p.n

    # ---- assistant prefill (vLLM's continue_final_message) ---------------------------------------
    def _check_prefill(self, requests: Sequence[Request]) -> None:
        if any(is_prefill(r) for r in requests):
            self.check_prefill()

    def check_prefill(self) -> None:
        """Probe each server once (cached per server and model) and refuse, in one line, a server that
        does not continue an assistant message. Such a server answers a new turn instead, so a label read
        "at the answer stem" (log-probs of (A)/(B), votes) would be read at the wrong position and still
        parse. Called before the first prefill request, and by pipelines that read labels after a prefill
        at start-up (`synth.llm.require_prefill`), so that the refusal comes before any other work."""
        if self.settings.prefill == "trust":
            return
        with _PREFILL_LOCK:
            unknown = [u for u in self._urls if (u, self.model) not in _PREFILL_OK]
            if unknown:
                found = self._loop().run(self._probe_prefill(unknown))
                _PREFILL_OK.update({(u, self.model): ok for u, ok in zip(unknown, found, strict=True)})
        bad = [strip_url_credentials(u) for u in self._urls if not _PREFILL_OK[(u, self.model)]]
        if bad:
            raise BackendError(
                f"openai backend: {', '.join(bad)} does not continue an assistant prefill (vLLM's "
                "continue_final_message; "
                "llama.cpp and hosted APIs start a new turn), so labels read after a prefilled answer stem "
                "would be wrong; "
                "use pipeline=judge with text verdicts (pipeline.pairwise.logprobs=false) or serve the judge with vLLM "
                "(llm.prefill=trust skips this check)"
            )

    async def _probe_prefill(self, urls: list[str]) -> list[bool]:
        """One greedy request per server: a counting sequence left open in the assistant turn. A server
        that continues it answers "eight"; one that ignores the prefill starts a new reply."""
        body = self._body(PREFILL_PROBE_MESSAGES, SamplingParams(temperature=0.0, max_new_tokens=3))
        out = []
        for u in urls:
            key = os.environ.get(self.settings.api_key_env) or "EMPTY"
            register_secret(key)
            ep = {"lean": LeanEndpoint, "openai": SDKEndpoint}[resolve_transport(self.settings.transport, u)](
                u, key, self.settings.timeout_s, self.settings.max_concurrency
            )
            try:
                comps = await self._call([ep], self._loop_thread.sem, body, 1, None)
            finally:
                await ep.aclose()
            text = comps[0].text.strip().lower() if comps else ""
            ok = text.startswith("eight")
            log.info(
                "openai backend: prefill probe of %s answered %r: %s",
                strip_url_credentials(u),
                text[:20],
                "continues the assistant message" if ok else "does NOT continue the assistant message",
            )
            out.append(ok)
        return out

    def _body(self, request: Request, p: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request],
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            self.settings.max_tokens_field: p.max_new_tokens,
        }
        if p.top_k is not None:
            body["top_k"] = p.top_k  # vLLM / SGLang extension
        if p.seed is not None and self.settings.send_seed:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.logprobs or p.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = p.top_logprobs
        if p.json_schema is not None:
            # the step's own schema; _post sends it in the form the server takes (strict json_schema
            # without maxLength / minLength, or json_object with the length caps kept)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": p.json_schema, "strict": True},
            }
        elif p.regex is not None and self.settings.regex_field != "none":  # a server extension: opt-in
            body.update(_regex_body(self.settings.regex_field, p.regex))
        if is_prefill(request):  # vLLM extension: continue the assistant message
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        if self.chat_template is not None:  # vLLM extension: model.chat_template overrides the server's
            body["chat_template"] = self.chat_template
        return {**body, **self.settings.extra_body}

    # ---- async core ------------------------------------------------------------------------------
    async def _run_all(
        self,
        bodies: list[dict],
        jobs: list[tuple[int, SamplingParams]],
        on_result: Callable[[int, list[Completion]], None] | None,
    ) -> list[list[Completion]]:
        endpoints = self._endpoints()
        sem = self._loop_thread.sem  # shared by every call in flight on this loop: one concurrency bound
        bar = _progress(len(bodies), self.settings.progress)
        results: list[list[Completion] | None] = [None] * len(bodies)
        units_left = collections.Counter(r for r, _ in jobs)

        async def one(i: int) -> list[Completion]:
            results[i] = await self._call(endpoints, sem, bodies[i], jobs[i][1].n, bar)
            r = jobs[i][0]
            units_left[r] -= 1
            if on_result is not None and units_left[r] == 0:
                on_result(r, [c for j, (rj, _) in enumerate(jobs) if rj == r for c in results[j]])
            return results[i]

        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(len(bodies))]
            return await _gather_or_cancel(tasks)
        finally:
            if bar is not None:
                bar.close()

    def _endpoints(self) -> list[LeanEndpoint | SDKEndpoint]:
        """The endpoints of this loop, shared by every call (run on the loop, so no lock): their keep-alive
        connections outlive a call. One pool per call would open a new connection for nearly every request
        once chunks overlap (the calls' requests interleave in the semaphore); measured at C = 256 that cost
        0.14 ms of client CPU per request and 6% of the throughput. A new API key gets new endpoints."""
        key = os.environ.get(self.settings.api_key_env) or "EMPTY"
        register_secret(key)
        shared = self._loop_thread.endpoints
        if key not in shared:
            s = self.settings
            make = {"lean": LeanEndpoint, "openai": SDKEndpoint}
            shared[key] = [
                make[resolve_transport(s.transport, u)](u, key, s.timeout_s, s.max_concurrency) for u in self._urls
            ]
        return shared[key]

    async def _call(self, endpoints: list, sem: asyncio.Semaphore, body: dict, n: int, bar: Any) -> list[Completion]:
        last: Retryable | None = None
        avoid = None
        for attempt in range(self.settings.max_retries + 1):
            async with sem:  # the backoff sleep below does not hold a slot
                ep = _pick(endpoints, avoid)
                try:
                    comps = _parse(await self._post(ep, body), n, fewer_ok=self.settings.send_n == "auto")
                    if bar is not None:
                        bar.update(1)
                    if len(comps) == n:
                        return comps
                except Retryable as exc:
                    last, avoid = exc, ep
                    comps = None
                except FatalHTTP as exc:
                    return self._fatal(exc, ep, n)
            if comps is not None:  # fewer choices than n (send_n auto): the rest one request each, outside the slot
                self._note_n_ignored(ep.url, n, len(comps))
                one = {**body, "n": 1}
                rest = await asyncio.gather(*(self._call(endpoints, sem, one, 1, None) for _ in range(n - len(comps))))
                return comps + [c for group in rest for c in group]
            if attempt < self.settings.max_retries:
                self.stats.count_retry(last.reason)
                await asyncio.sleep(self._delay(attempt, last.retry_after))
        self.stats.count_error(last.reason)  # type: ignore[union-attr]
        raise BackendError(
            f"openai backend: {avoid.url} failed for model {self.model!r} after "
            f"{self.settings.max_retries + 1} attempts; last failure: {last}"
        )

    # ---- structured output: which response_format the server accepts -----------------------------
    async def _post(self, ep: Any, body: dict) -> Any:
        """POST `body`, its JSON schema (if any) in the form this server accepts. The first JSON-schema
        request to a server whose form is unknown finds the form (one request at a time per server; the
        others wait for the answer) and is answered on the way."""
        setting = self.settings.structured_output
        if not _asks_json_schema(body):
            return await ep.post_chat(body)
        if setting != "auto":
            return await ep.post_chat(_with_structured(body, setting))
        key = (ep.url, self.model)
        if key not in _STRUCTURED:
            lock = self._structured_locks.setdefault(ep.url, asyncio.Lock())
            async with lock:
                if key not in _STRUCTURED:
                    return await self._detect_structured(ep, body, key)
        return await ep.post_chat(_with_structured(body, _STRUCTURED[key]))

    async def _detect_structured(self, ep: Any, body: dict, key: tuple[str, str]) -> Any:
        """Send `body` as json_schema, then json_object with the schema, then without response_format,
        until the server takes one; remember that form for (server, model) and log it in one line. Only
        a refusal that can be about the field (HTTP 400/422, or 500 twice running for json_schema) moves
        to the next form; anything else (429, 503, a timeout), or a plain request failing too, is raised
        for the retry loop with nothing remembered."""
        rejected: list[str] = []
        for form in _STRUCTURED_FORMS:
            for attempt in range(2 if form == "json_schema" else 1):  # a one-off 500 is not a rejection
                try:
                    data = await ep.post_chat(_with_structured(body, form))
                except (Retryable, FatalHTTP) as exc:
                    if form == "none" or not _may_reject_format(exc):
                        raise
                    if attempt == 0 and form == "json_schema" and isinstance(exc, Retryable):
                        continue
                    rejected.append(f"{form} ({' '.join(str(exc).split())[:160]})")  # one line
                    break
                _STRUCTURED[key] = form
                self._log_structured(ep.url, form, rejected)
                return data
        raise AssertionError("unreachable: form 'none' returns or raises")

    def _log_structured(self, url: str, form: str, rejected: list[str]) -> None:
        where = f"openai backend: {strip_url_credentials(url)} (model {self.model!r})"
        if form == "json_schema":
            log.info("%s takes response_format json_schema for JSON answers", where)
            return
        how = {
            "json_object": "sending response_format json_object with the schema from now on",
            "none": "sending no response_format from now on: the prompt asks for JSON and the step parses it",
        }[form]
        log.warning(
            "%s rejected %s; %s (llm.structured_output=%s skips this check)", where, "; ".join(rejected), how, form
        )

    def _note_n_ignored(self, url: str, n: int, got: int) -> None:
        with self._stats_lock:
            first, self._n_ignored = not self._n_ignored, True
        if first:
            log.warning(
                "openai backend: %s answered n=%d with %d choice(s); sending one request per sample from now on "
                "(llm.send_n=false does so from the start)",
                strip_url_credentials(url),
                n,
                got,
            )

    def _fatal(self, exc: FatalHTTP, ep: Any, n: int) -> list[Completion]:
        """401/403/404 (wrong key, URL or model) and an ignored `n` abort the call.

        Other 4xx (e.g. a prompt longer than the context) are about this request only: it becomes an empty
        completion with finish_reason "error" (a bad generation is data), unless every request of the call
        fails that way (see below)."""
        if exc.abort:
            raise BackendError(f"openai backend: {ep.url} refused model {self.model!r}: {exc}") from None
        self.stats.count_error(f"http_{exc.status}")
        if self.stats.errors[f"http_{exc.status}"] <= 3:
            log.warning("openai backend: %s rejected a request for model %r: %s", ep.url, self.model, exc)
        self._last_rejection = f"{ep.url}: {exc}"
        return [Completion(text="", finish_reason="error") for _ in range(n)]

    def _check_not_all_failed(self, out: list[list[Completion]]) -> None:
        """Two or more requests, all rejected: the settings are wrong (an unsupported parameter, say), not
        the data. One rejected request alone stays data, or one bad prompt would block a rerun forever."""
        flat = [c for group in out for c in group]
        if len(out) >= 2 and all(c.finish_reason == "error" for c in flat):
            raise BackendError(
                f"openai backend: every request for model {self.model!r} was rejected; last: {self._last_rejection}"
            )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (uniform in [0, min(max, base * 2^attempt)]); a Retry-After is a lower bound, up to
        10 minutes (a day-long quota reset should fail loudly after the retries, not hang the run)."""
        s = self.settings
        jitter = random.uniform(0, min(s.backoff_max_s, s.backoff_base_s * 2**attempt))
        return max(min(retry_after, _MAX_RETRY_AFTER_S), jitter) if retry_after is not None else jitter


# ---- helpers -----------------------------------------------------------------------------------------


def _pick(endpoints: list, avoid: Any) -> Any:
    """Least busy endpoint; a retry avoids the endpoint that just failed when there is another."""
    candidates = [e for e in endpoints if e is not avoid] or endpoints
    best = min(candidates, key=lambda e: (e.busy, e.served))
    return best


def _parse(data: Any, n: int, fewer_ok: bool = False) -> list[Completion]:
    """A chat.completion body -> n Completions (fewer when `fewer_ok` and the server ignored n); anything
    malformed is retryable."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise Retryable("malformed", "response has no choices")
    if len(choices) > n or (len(choices) < n and not fewer_ok):
        raise FatalHTTP(
            200, f"server returned {len(choices)} choices for n={n}; set llm.send_n=auto or false", abort=True
        )
    usage = data.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_total = int(usage.get("completion_tokens") or 0)
    out = []
    for i, ch in enumerate(sorted(choices, key=lambda c: c.get("index", 0))):
        content = (ch.get("message") or {}).get("content")
        if not isinstance(content, str):
            raise Retryable("malformed", "a choice has no message content")
        # usage is per request; with several choices completion tokens are shared out evenly (approximate)
        share = completion_total // len(choices) + (1 if i < completion_total % len(choices) else 0)
        out.append(
            Completion(
                text=content,
                finish_reason=ch.get("finish_reason"),
                prompt_tokens=prompt_tokens,
                completion_tokens=share,
                logprobs=_logprobs(ch.get("logprobs")),
            )
        )
    return out


def _logprobs(lp: Any) -> list[TokenLogprob] | None:
    content = lp.get("content") if isinstance(lp, dict) else None
    if content is None:
        return None
    return [
        TokenLogprob(
            token=t["token"],
            logprob=float(t["logprob"]),
            top={a["token"]: float(a["logprob"]) for a in (t.get("top_logprobs") or [])},
        )
        for t in content
    ]


async def _gather_or_cancel(tasks: list[asyncio.Future]) -> list[Any]:
    """Like gather, but the first exception cancels the rest (and waits for them): no hanging tasks."""
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    # reading every finished task's exception also keeps asyncio from logging "never retrieved"
    errors = [t.exception() for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
    if errors:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise errors[0]
    return [t.result() for t in tasks]


def _asks_json_schema(body: dict) -> bool:
    rf = body.get("response_format")
    return isinstance(rf, dict) and rf.get("type") == "json_schema"


def _with_structured(body: dict, form: str) -> dict:
    """`body` (built with response_format json_schema and the step's schema) as sent in `form`:
    json_schema with the schema OpenAI's strict mode accepts (no maxLength / minLength); json_object with
    the schema as is (llama-cpp-python turns it into a grammar, length caps included); or no
    response_format at all."""
    if not _asks_json_schema(body):
        return body
    rest = {k: v for k, v in body.items() if k != "response_format"}
    if form == "json_schema":
        spec = body["response_format"]["json_schema"]
        return {
            **rest,
            "response_format": {
                "type": "json_schema",
                "json_schema": {**spec, "schema": for_openai_strict(spec["schema"])},
            },
        }
    if form == "json_object":
        return {
            **rest,
            "response_format": {"type": "json_object", "schema": body["response_format"]["json_schema"]["schema"]},
        }
    return rest


def _may_reject_format(exc: Exception) -> bool:
    """Could this failure be the server refusing a response_format? A 400 / 422, or a 500 (llama-cpp-python
    answers an unknown response_format type with 500); not 429, 502-504, timeouts, resets or bad keys."""
    if isinstance(exc, FatalHTTP):
        return not exc.abort and exc.status in (400, 422)
    return isinstance(exc, Retryable) and exc.reason == "5xx" and "HTTP 500" in str(exc)


def _regex_body(field: str, regex: str) -> dict[str, Any]:
    """The request-body fields that ask an OpenAI-compatible server for a regex-constrained answer."""
    return {"structured_outputs": {"regex": regex}} if field == "structured_outputs" else {field: regex}


class _LoopThread:
    """An event loop running in a daemon thread. Every `generate` of one backend runs its requests here,
    whatever thread calls it (the runner's chunk workers, a notebook with its own running loop), so that
    one semaphore bounds the requests in flight across all of them."""

    def __init__(self, max_concurrency: int) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.sem = asyncio.Semaphore(max_concurrency)  # used only on self.loop
        self.endpoints: dict[str, list[Any]] = {}  # API key -> endpoints (connection pools) on self.loop
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-backend", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive()

    def run(self, coro: Any) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:  # Ctrl-C or a failure: stop this call's requests, not the loop
            fut.cancel()
            raise

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close_endpoints(), self.loop).result(10)
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.loop.shutdown_default_executor(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    async def _close_endpoints(self) -> None:
        endpoints = [e for group in self.endpoints.values() for e in group]
        self.endpoints.clear()
        await asyncio.gather(*(e.aclose() for e in endpoints), return_exceptions=True)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total < 256:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="openai", unit="req", leave=False)


__all__ = ["OpenAIBackend", "OpenAISettings", "resolve_transport", "classify_status"]
