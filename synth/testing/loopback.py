"""A loopback OpenAI-compatible chat-completions server for tests, examples and benchmarks.

Real HTTP/1.1 on 127.0.0.1 (keep-alive, Content-Length bodies), written on stdlib asyncio rather than
`http.server`: one event loop serves thousands of concurrent connections with no thread per
connection, which is what the 256-way concurrency benchmark needs on a 2-core machine, and it gives
exact control over the faults (reset sockets, truncated bodies).

    server = LoopbackServer(responder=fn, latency_s=0.2, fault_rate=0.2).start()
    server.url            # "http://127.0.0.1:<port>/v1"
    server.requests       # every request seen (thread-safe copy), with the fault it got
    server.max_in_flight  # most requests being answered at the same time
    server.stop()

Endpoints: `POST /v1/chat/completions` (n, logprobs/top_logprobs, usage, finish_reason, max_tokens in
whitespace "tokens") and `GET /v1/models`.

`responder(request_json) -> str | list[str] | dict` scripts the answers: a str is every choice's text, a
list gives choice i the item i % len (a str or a choice dict), a dict with "choices" is sent as the whole
body, any other dict is one choice `{"text", "finish_reason"?, "logprobs"?}` (logprobs in the OpenAI
`content` list shape). Default: an echo of the last message.

Faults (FAULTS): "429" (with Retry-After), "500", "503", "reset" (socket closed with RST, no answer),
"slow" (answer after `slow_s`, past a client's timeout), "malformed" (invalid JSON body), "truncated"
(Content-Length promises more than is sent, then close), "empty_choices". Injected at random with
`fault_rate` over `fault_kinds` (seeded), by `schedule` {request seq: kind}, or by `fault_fn(seq, body)`.
The non-transient FATAL_FAULTS "400", "401", "404" (bodies quoting the Authorization header back) are
for schedules and fault_fn only.

Assistant prefill: `prefill="continue"` (default, like vLLM's continue_final_message) answers the openai
backend's prefill probe by continuing it; `prefill="ignore"` (like llama.cpp) starts a new reply. Other
prefill requests go to the responder either way. `chat_requests()` leaves the probes out.

Structured output: `structured="json_schema"` (default) takes every response_format; "json_object" answers
`{type: json_schema}` with HTTP 500 and takes `{type: json_object, schema}`, like llama-cpp-python 0.3.36;
"none" answers any response_format with HTTP 400. Rejected requests are recorded with fault "rejected_format".

CLI: `python -m synth.testing.loopback --port 8000 --latency-ms 200` prints `READY <url>` and serves
until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from synth.llm.openai import PREFILL_PROBE_MESSAGES

FAULTS = ("429", "500", "503", "reset", "slow", "malformed", "truncated", "empty_choices")
# Not transient: only by schedule / fault_fn. Their bodies quote the Authorization header back, as some
# hosted APIs quote part of a wrong key, so tests can check that clients never surface it.
FATAL_FAULTS = ("400", "401", "404")
STRUCTURED = ("json_schema", "json_object", "none")  # the response_format types a server takes, see the docstring
Responder = Callable[[dict], "str | list | dict"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class RecordedRequest:
    seq: int
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    fault: str | None
    t: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def is_probe(body: dict | None) -> bool:
    """The openai backend's prefill probe: its fixed assistant prefill, sent with continue_final_message."""

    msgs = (body or {}).get("messages") or []
    return bool(
        body
        and body.get("continue_final_message")
        and msgs
        and msgs[-1].get("content") == PREFILL_PROBE_MESSAGES[-1].content
    )


def default_responder(body: dict) -> str:
    msgs = body.get("messages") or [{}]
    last = str(msgs[-1].get("content", ""))[:200]
    seed = body.get("seed")
    return f"echo: {last}" + (f" (seed {seed})" if seed is not None else "")


def _fake_logprobs(text: str, top: int) -> dict:
    """OpenAI-shaped logprobs for whitespace tokens: the chosen token first, invented alternatives."""
    content = []
    for i, tok in enumerate(text.split(" ")):
        alts = [{"token": tok, "logprob": -0.1, "bytes": list(tok.encode())}]
        alts += [{"token": f"alt{j}", "logprob": -2.0 - j, "bytes": None} for j in range(max(top - 1, 0))]
        content.append(
            {"token": tok if i == 0 else " " + tok, "logprob": -0.1, "bytes": None, "top_logprobs": alts[:top]}
        )
    return {"content": content}


def _choice(spec: Any, index: int, body: dict) -> dict:
    spec = {"text": spec} if isinstance(spec, str) else dict(spec)
    text, finish = spec["text"], spec.get("finish_reason", "stop")
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    words = text.split(" ")
    if limit is not None and len(words) > int(limit) and "finish_reason" not in spec:
        text, finish = " ".join(words[: int(limit)]), "length"
    choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if body.get("logprobs"):
        choice["logprobs"] = spec.get("logprobs") or _fake_logprobs(text, int(body.get("top_logprobs") or 0))
    return choice


def build_body(body: dict, answer: Any) -> dict:
    """The chat.completion JSON for a request given the responder's answer."""
    if isinstance(answer, dict) and "choices" in answer:
        return answer
    n = int(body.get("n") or 1)
    specs = answer if isinstance(answer, list) else [answer]
    choices = [_choice(specs[i % len(specs)], i, body) for i in range(n)]
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = sum(len(c["message"]["content"].split()) for c in choices)
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "loopback"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class LoopbackServer:
    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency_s: float = 0.0,
        jitter_s: float = 0.0,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = FAULTS,
        schedule: dict[int, str] | None = None,
        fault_fn: Callable[[int, dict | None], str | None] | None = None,
        retry_after_s: float = 1.0,
        slow_s: float = 30.0,
        seed: int = 0,
        models: tuple[str, ...] = ("test-model",),
        host: str = "127.0.0.1",
        port: int = 0,
        record_bodies: bool = True,
        prefill: str = "continue",
        structured: str = "json_schema",
    ) -> None:
        unknown = set(fault_kinds) - set(FAULTS) | set((schedule or {}).values()) - set(FAULTS + FATAL_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; valid: {FAULTS + FATAL_FAULTS}")
        self.responder = responder or default_responder
        self.latency_s, self.fault_rate, self.fault_kinds = latency_s, fault_rate, tuple(fault_kinds)
        self.jitter_s = jitter_s  # each answer waits latency_s + U(0, jitter_s) (seeded)
        self.schedule, self.fault_fn = dict(schedule or {}), fault_fn
        self.retry_after_s, self.slow_s, self.models = retry_after_s, slow_s, models
        self.host, self.port, self.record_bodies = host, port, record_bodies
        if prefill not in ("continue", "ignore"):
            raise ValueError(
                f"prefill must be 'continue' (vLLM's continue_final_message) or 'ignore' (llama.cpp), got {prefill!r}"
            )
        self.prefill = prefill
        if structured not in STRUCTURED:
            raise ValueError(f"structured must be one of {STRUCTURED}, got {structured!r}")
        self.structured = structured
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._seq = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Connection] = set()

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LoopbackServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve_thread, args=(ready,), daemon=True, name="loopback-openai")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("loopback server did not start")
        return self

    def _serve_thread(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            self._loop.create_server(lambda: _Connection(self), self.host, self.port, backlog=4096)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)  # type: ignore[union-attr]
        self._loop = None

    async def _shutdown(self) -> None:
        self._server.close()  # type: ignore[union-attr]
        for conn in list(self._conns):
            conn.abort()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- inspection ------------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self, probes: bool = False) -> list[RecordedRequest]:
        """Chat requests in arrival order; the openai backend's prefill probes only with probes=True."""
        return [r for r in self.requests if r.path.endswith("/chat/completions") and (probes or not is_probe(r.body))]

    def probe_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions") and is_probe(r.body)]

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self.max_in_flight = 0

    # ---- requests (called by _Connection on the loop thread) --------------------------------------
    def _record(self, method: str, path: str, headers: dict, body: dict | None) -> RecordedRequest:
        """Number the request, choose its fault (POSTs only) and keep it, all under one lock."""
        with self._lock:
            seq = self._seq
            self._seq += 1
            fault = self._pick_fault(seq, body) if method == "POST" else None
            rec = RecordedRequest(seq, method, path, headers, body if self.record_bodies else None, fault)
            self._requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return rec

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _pick_fault(self, seq: int, body: dict | None) -> str | None:
        if self._rejects_format(body):
            return "rejected_format"
        if seq in self.schedule:
            return self.schedule[seq]
        if self.fault_fn is not None:
            return self.fault_fn(seq, body)
        if self.fault_rate and self._rng.random() < self.fault_rate:
            return self._rng.choice(self.fault_kinds)
        return None

    def _rejects_format(self, body: dict | None) -> bool:
        kind = ((body or {}).get("response_format") or {}).get("type")
        return kind is not None and (
            self.structured == "none" or (self.structured, kind) == ("json_object", "json_schema")
        )

    def _answer(self, rec: RecordedRequest, body: dict | None) -> tuple[int, bytes, dict, str]:
        """(status, body bytes, extra headers, action) where action is "send", "reset" or "truncate"."""
        if rec.method == "GET" and rec.path.rstrip("/").endswith("/models"):
            data = [{"id": m, "object": "model", "owned_by": "loopback"} for m in self.models]
            return 200, json.dumps({"object": "list", "data": data}).encode(), {}, "send"
        if rec.method != "POST" or not rec.path.rstrip("/").endswith("/chat/completions"):
            return 404, json.dumps({"error": {"message": f"no route {rec.path}"}}).encode(), {}, "send"
        kind = rec.fault
        if kind == "rejected_format":  # llama-cpp-python 0.3.36 answers json_schema like this (a 500)
            status = 500 if self.structured == "json_object" else 400
            msg = (  # several lines, a traceback's start included, as llama-cpp-python sends it
                "1 validation error:\n  {'loc': ('body', 'response_format', 'type'), "
                "'msg': \"Input should be 'text' or 'json_object'\"}\n\n  File \"app.py\""
            )
            return status, json.dumps({"error": {"message": msg}}).encode(), {}, "send"
        if kind is None and is_probe(body):  # the openai backend's prefill probe (synth/llm/openai.py)
            text = "eight, nine" if self.prefill == "continue" else "Sure! One, two, three"
            return 200, json.dumps(build_body(body, text)).encode(), {}, "send"
        if kind is None or kind == "slow":
            return 200, json.dumps(build_body(body, self.responder(body))).encode(), {}, "send"
        if kind == "429":
            return 429, b'{"error": {"message": "rate limited"}}', {"Retry-After": f"{self.retry_after_s:g}"}, "send"
        if kind in ("500", "503"):
            return int(kind), json.dumps({"error": {"message": f"injected {kind}"}}).encode(), {}, "send"
        if kind in FATAL_FAULTS:
            quoted = rec.headers.get("authorization", "")
            return int(kind), json.dumps({"error": {"message": f"injected {kind} for {quoted}"}}).encode(), {}, "send"
        if kind == "reset":
            return 0, b"", {}, "reset"
        if kind == "malformed":
            return 200, b'{"id": "x", "choices": [{"index": 0, "mess', {}, "send"
        full = json.dumps(build_body(body, self.responder(body))).encode()
        if kind == "truncated":
            return 200, full, {}, "truncate"
        return 200, json.dumps({**json.loads(full), "choices": []}).encode(), {}, "send"  # empty_choices

    def _delay(self, rec: RecordedRequest) -> float:
        if rec.method != "POST":
            return 0.0
        jitter = self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0
        return self.latency_s + jitter + (self.slow_s if rec.fault == "slow" else 0.0)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: parse requests from the byte stream, answer each after the
    server's latency with `call_later` (no task or coroutine per request: cheap at high concurrency)."""

    def __init__(self, server: LoopbackServer) -> None:
        self.server, self.buf = server, b""
        self.transport: asyncio.Transport | None = None
        self.timers: set[asyncio.TimerHandle] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        for timer in self.timers:
            timer.cancel()
            self.server._done()
        self.timers.clear()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (request := self._parse()) is not None:
            method, path, headers, body = request
            rec = self.server._record(method, path, headers, body)
            keep_alive = headers.get("connection", "").lower() != "close"
            delay = self.server._delay(rec)
            if delay:
                holder: list[asyncio.TimerHandle] = []
                timer = asyncio.get_running_loop().call_later(delay, self._reply, rec, body, keep_alive, holder)
                holder.append(timer)
                self.timers.add(timer)
            else:
                self._reply(rec, body, keep_alive, [])

    def _parse(self) -> tuple[str, str, dict, dict | None] | None:
        """One complete request off the buffer, or None when more bytes are needed."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        size = int(headers.get("content-length", 0))
        if len(self.buf) < end + 4 + size:
            return None
        raw, self.buf = self.buf[end + 4 : end + 4 + size], self.buf[end + 4 + size :]
        return method, path, headers, (json.loads(raw) if raw else None)

    def _reply(self, rec: RecordedRequest, body: dict | None, keep_alive: bool, holder: list) -> None:
        for timer in holder:
            self.timers.discard(timer)
        self.server._done()
        if self.transport is None or self.transport.is_closing():
            return
        status, data, extra, action = self.server._answer(rec, body)
        if action == "reset":  # RST, no answer
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return
        keep_alive = keep_alive and action == "send"
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'X')}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        head += [f"{k}: {v}" for k, v in extra.items()]
        payload = data if action == "send" else data[: len(data) // 2]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        if not keep_alive:
            self.transport.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Loopback OpenAI-compatible server (scripted echo answers).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="plus uniform 0..jitter per answer")
    ap.add_argument("--responder", default=None, help="module:function scripting the answers (default: echo)")
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of " + ",".join(FAULTS))
    ap.add_argument("--retry-after-s", type=float, default=1.0)
    ap.add_argument("--model", default="test-model")
    ap.add_argument("--structured", choices=STRUCTURED, default="json_schema", help="response_format types taken")
    ap.add_argument("--prefill", choices=("continue", "ignore"), default="continue")
    args = ap.parse_args(argv)
    responder = None
    if args.responder:
        module, _, fn = args.responder.partition(":")
        responder = getattr(importlib.import_module(module), fn)
    server = LoopbackServer(
        responder=responder,
        latency_s=args.latency_ms / 1000,
        jitter_s=args.jitter_ms / 1000,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k for k in args.faults.split(",") if k),
        retry_after_s=args.retry_after_s,
        models=(args.model,),
        host=args.host,
        port=args.port,
        record_bodies=False,
        structured=args.structured,
        prefill=args.prefill,
    ).start()
    print(f"READY {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
