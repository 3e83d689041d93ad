"""llm=openai against the loopback server: request shape, faults and retries, timeouts, Retry-After,
several base URLs, the concurrency bound, and that the API key never leaks. Both transports."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import Counter

import pytest

from synth.llm import BackendError, build_llm
from synth.llm.base import SamplingParams, sample_seed
from synth.llm.openai import resolve_transport
from synth.records import messages

SECRET = "sk-test-DO-NOT-LEAK-4f9a1c"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "progress": False}
TRANSPORTS = ["lean", "openai"]


def backend(url, transport="lean", **settings):
    cfg = {"kind": "openai", "base_url": url, "transport": transport, **FAST, **settings}
    return build_llm(cfg, {"name_or_path": "test-model"})


def reqs(k, prefix="q"):
    return [messages(("user", f"{prefix}{i}")) for i in range(k)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_request_shape_and_mapping(make_openai_server, transport):
    server = make_openai_server()
    llm = backend(server.url, transport, extra_body={"repetition_penalty": 1.05})
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}
    p = SamplingParams(
        n=3,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        max_new_tokens=5,
        stop=("###",),
        logprobs=True,
        top_logprobs=2,
        json_schema=schema,
    )
    prefill = messages(("user", "judge this"), ("assistant", "The answer is: ("))
    out = llm.generate([messages(("user", "hello there")), prefill], p)
    bodies = [r.body for r in server.chat_requests()]
    assert len(bodies) == 2  # n=3 in one request each
    b = next(b for b in bodies if b["messages"][-1]["role"] == "user")
    assert b["n"] == 3 and b["temperature"] == 0.7 and b["top_p"] == 0.9 and b["top_k"] == 20
    assert b["max_tokens"] == 5 and b["stop"] == ["###"] and b["logprobs"] is True and b["top_logprobs"] == 2
    assert b["response_format"]["json_schema"]["schema"] == schema and b["repetition_penalty"] == 1.05
    assert b["model"] == "test-model" and "add_generation_prompt" not in b and "chat_template" not in b
    pb = next(b for b in bodies if b["messages"][-1]["role"] == "assistant")
    assert pb["add_generation_prompt"] is False and pb["continue_final_message"] is True
    assert [len(g) for g in out] == [3, 3] and out[0][0].text == "echo: hello there"
    c = out[0][0]
    assert c.finish_reason == "stop" and c.prompt_tokens == 2 and c.completion_tokens == 3
    assert [t.token for t in c.logprobs] == ["echo:", " hello", " there"] and c.logprobs[0].top == {
        "echo:": -0.1,
        "alt0": -2.0,
    }


def test_length_and_seeded_samples(openai_server):
    llm = backend(openai_server.url)
    out = llm.generate(reqs(1), SamplingParams(n=3, seed=9, max_new_tokens=1))
    seeds = sorted(r.body["seed"] for r in openai_server.chat_requests())
    assert seeds == sorted([9, sample_seed(9, 1), sample_seed(9, 2)])  # one request per seeded sample
    assert [c.finish_reason for c in out[0]] == ["length"] * 3
    assert [c.text for c in out[0]] == ["echo:"] * 3


def test_chat_template_override_is_sent(openai_server):
    llm = build_llm(
        {"kind": "openai", "base_url": openai_server.url, **FAST},
        {"name_or_path": "test-model", "chat_template": "{{ messages }}"},
    )
    llm.generate(reqs(1), SamplingParams())
    assert openai_server.chat_requests()[0].body["chat_template"] == "{{ messages }}"


def test_send_n_false_splits_samples(openai_server):
    out = backend(openai_server.url, send_n=False).generate(reqs(2), SamplingParams(n=4))
    assert [len(g) for g in out] == [4, 4]
    assert len(openai_server.chat_requests()) == 8 and {r.body["n"] for r in openai_server.chat_requests()} == {1}


@pytest.mark.parametrize(("transport", "stall"), [("lean", False), ("openai", False), ("lean", True)])
def test_mixed_faults_every_request_completes_exactly_once(make_openai_server, transport, stall):
    """stall: the server's event loop stops for 1.5 s once, as a loaded machine can stop it: the answers in
    flight then come after the client's timeout, and the accounting below must still hold."""
    from synth.testing.loopback import default_responder

    def responder(body):
        if stall and body["messages"][0]["content"] == "q30" and not stalled:
            stalled.append(time.monotonic())
            time.sleep(1.5)
        return default_responder(body)

    stalled: list[float] = []
    # "slow" answers after 30 s: a client timeout (1 s) always comes first, however loaded the machine
    server = make_openai_server(responder=responder, fault_rate=0.2, retry_after_s=0.02, slow_s=30.0, seed=3)
    llm = backend(server.url, transport, timeout_s=1.0, max_retries=10, max_concurrency=32)
    k = 120 if transport == "lean" else 60
    out = llm.generate(reqs(k), SamplingParams(n=2))
    # the client: every request completed exactly once, with its own answers
    assert [[c.text for c in g] for g in out] == [[f"echo: q{i}"] * 2 for i in range(k)]
    assert llm.stats.requests == k and llm.stats.completions == 2 * k
    seen = server.chat_requests()
    faults = Counter(r.fault for r in seen if r.fault)
    assert len(faults) >= 6  # the draw really mixed the kinds
    by_reason = Counter(llm.stats.retries_by_reason)
    assert set(by_reason) <= {"429", "5xx", "timeout", "connection", "malformed"}
    assert sum(by_reason.values()) == llm.stats.retries
    # every retry has a cause the server dealt: a retry for a reason never exceeds the faults of that kind
    assert 0 < by_reason["429"] + by_reason["5xx"] + by_reason["connection"] + by_reason["malformed"]
    assert by_reason["429"] <= faults["429"] and by_reason["5xx"] <= faults["500"] + faults["503"]
    broken = faults["reset"] + faults["truncated"] + faults["malformed"] + faults["empty_choices"]
    assert by_reason["connection"] + by_reason["malformed"] <= broken
    assert by_reason["timeout"] >= faults["slow"]  # each slow answer was given up on
    # the server: every request answered at least once, and more than once only for an attempt the client
    # gave up on. A timeout not explained by a slow fault ("late") is a normal answer (or fault, or request
    # not yet read) that a loaded machine delayed past 1 s; with none (a quiet machine), these checks are
    # the exact ones: len(seen) == k + retries, retries == faults, each prompt answered exactly once.
    late = by_reason["timeout"] - faults["slow"]
    answered = Counter(r.body["messages"][0]["content"] for r in seen if not r.fault)
    assert set(answered) == {f"q{i}" for i in range(k)}
    extra_answers = sum(answered.values()) - k
    unseen_attempts = k + llm.stats.retries - len(seen)  # timed out before the server read them
    assert 0 <= extra_answers <= late and 0 <= unseen_attempts <= late
    assert sum(faults.values()) <= llm.stats.retries  # no fault was taken as an answer
    if stall:  # the stall really made the client give up on answers (so the case above was exercised)
        assert stalled and late > 0 and extra_answers > 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_permanent_failure_raises_backend_error_quickly(make_openai_server, transport):
    server = make_openai_server(fault_rate=1.0, fault_kinds=("500",))
    llm = backend(server.url, transport, max_retries=3)
    threads = threading.active_count()
    t = time.monotonic()
    with pytest.raises(BackendError) as e:
        llm.generate(reqs(20), SamplingParams())
    assert time.monotonic() - t < 3
    msg = str(e.value)
    assert server.url in msg and "test-model" in msg and "5xx" in msg and "500" in msg
    assert set(llm.stats.errors) == {"5xx"}  # one or more requests failed for good before the rest were cancelled
    time.sleep(0.1)
    assert server.in_flight == 0
    llm.close()  # ends the backend's event-loop thread (and the SDK's resolver threads on it)
    assert threading.active_count() <= threads  # nothing left running


def test_timeouts_are_retried_then_reported(make_openai_server):
    server = make_openai_server(schedule={0: "slow", 1: "slow"}, slow_s=2.0)
    llm = backend(server.url, timeout_s=0.2, max_retries=3)
    (c,) = llm.generate(reqs(1), SamplingParams())[0]
    assert c.text == "echo: q0" and llm.stats.retries_by_reason == {"timeout": 2}
    always_slow = make_openai_server(fault_rate=1.0, fault_kinds=("slow",), slow_s=2.0)
    with pytest.raises(BackendError, match="timeout: no answer within 0.2s"):
        backend(always_slow.url, timeout_s=0.2, max_retries=1).generate(reqs(1), SamplingParams())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_after_is_honoured(make_openai_server, transport):
    server = make_openai_server(schedule={0: "429"}, retry_after_s=0.6)
    llm = backend(server.url, transport)
    llm.generate(reqs(1), SamplingParams())
    first, second = server.chat_requests()
    assert first.fault == "429" and second.fault is None
    assert second.t - first.t >= 0.6  # backoff alone would be <= 0.05 s here
    assert llm.stats.retries_by_reason == {"429": 1}


def test_several_base_urls_share_the_load_and_dead_ones_are_avoided(make_openai_server):
    a, b = make_openai_server(latency_s=0.02), make_openai_server(latency_s=0.02)
    llm = backend([a.url, b.url], max_concurrency=8)
    out = llm.generate(reqs(40), SamplingParams())
    assert len(out) == 40 and len(a.chat_requests()) >= 10 and len(b.chat_requests()) >= 10
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    llm = backend([dead, a.url], max_concurrency=4)
    assert [g[0].text for g in llm.generate(reqs(10), SamplingParams())] == [f"echo: q{i}" for i in range(10)]
    assert set(llm.stats.retries_by_reason) <= {"connection"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrency_bound(make_openai_server, transport):
    server = make_openai_server(latency_s=0.05)
    llm = backend(server.url, transport, max_concurrency=6)
    llm.generate(reqs(60), SamplingParams())
    assert server.max_in_flight == 6


def test_rejected_request_is_data_but_all_rejected_is_an_error(make_openai_server):
    server = make_openai_server(schedule={0: "400"})
    llm = backend(server.url, max_concurrency=1)
    out = llm.generate(reqs(3), SamplingParams(n=2))
    assert [c.finish_reason for c in out[0]] == ["error", "error"] and out[1][0].text == "echo: q1"
    assert llm.stats.errors == {"http_400": 1} and llm.stats.retries == 0
    worse = make_openai_server(fault_fn=lambda seq, body: "400")
    with pytest.raises(BackendError, match="every request"):
        backend(worse.url).generate(reqs(2), SamplingParams())
    (alone,) = backend(worse.url).generate(reqs(1), SamplingParams())  # one request: still data
    assert alone[0].finish_reason == "error"


@pytest.mark.parametrize("kind", ["401", "404"])
def test_wrong_key_or_model_fails_at_once(make_openai_server, kind):
    server = make_openai_server(fault_fn=lambda seq, body: kind)
    with pytest.raises(BackendError) as e:
        backend(server.url, max_retries=5).generate(reqs(5), SamplingParams())
    assert server.url in str(e.value) and f"HTTP {kind}" in str(e.value)
    assert len(server.chat_requests()) <= 5  # no retries


def test_server_ignoring_n_is_a_clear_error(make_openai_server):
    server = make_openai_server(
        responder=lambda body: {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]
        }
    )
    with pytest.raises(BackendError, match="send_n=auto or false"):
        backend(server.url, send_n=True).generate(reqs(1), SamplingParams(n=2))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_api_key_never_leaks(make_openai_server, monkeypatch, caplog, capsys, transport):
    monkeypatch.setenv("FORGE_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # the SDK's and httpx's debug logs included
    ok = make_openai_server(fault_rate=0.3, retry_after_s=0.01, slow_s=1.0)
    cfg = {"api_key_env": "FORGE_TEST_KEY", "timeout_s": 0.3, "max_retries": 8}
    llm = backend(ok.url, transport, **cfg)
    llm.generate(reqs(10), SamplingParams())
    assert {r.authorization for r in ok.chat_requests()} == {f"Bearer {SECRET}"}  # it was sent
    texts = [repr(llm), str(llm), repr(llm.settings), str(llm.settings.model_dump()), str(llm.identity)]
    for kind in ("401", "400"):  # these bodies quote the Authorization header back
        bad = make_openai_server(fault_fn=lambda seq, body, kind=kind: kind)
        with pytest.raises(BackendError) as e:
            backend(bad.url, transport, **cfg).generate(reqs(2), SamplingParams())
        texts += [str(e.value), repr(e.value)]
        texts += [str(x) for x in (e.value.__cause__, e.value.__context__) if x is not None]
    out, err = capsys.readouterr()
    texts += [out, err, caplog.text] + [str(r.args) for r in caplog.records]
    leaked = [i for i, t in enumerate(texts) if SECRET in t or SECRET[-8:] in t]
    assert leaked == [], "the key (or its tail) appears in texts number " + str(leaked)


def test_unset_key_env_sends_empty(openai_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend(openai_server.url).generate(reqs(1), SamplingParams())
    assert openai_server.chat_requests()[0].authorization == "Bearer EMPTY"


def test_works_from_a_thread_and_inside_a_running_loop(openai_server):
    llm = backend(openai_server.url)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("t", llm.generate(reqs(3), SamplingParams())))
    t.start()
    t.join(10)

    async def inside():
        return llm.generate(reqs(2), SamplingParams())

    assert len(result["t"]) == 3 and len(asyncio.run(inside())) == 2


def test_transport_auto():
    assert resolve_transport("auto", "http://127.0.0.1:8000/v1") == "lean"
    assert resolve_transport("auto", "https://api.openai.com/v1") == "openai"
    assert resolve_transport("openai", "http://127.0.0.1:8000/v1") == "openai"


def test_settings_are_validated():
    with pytest.raises(ValueError) as e:
        build_llm({"kind": "openai", "base_url": "http://x/v1", "max_concurency": 3}, {"name_or_path": "m"})
    assert str(e.value).startswith(
        "llm=openai: unknown key 'max_concurency'; valid keys:"
    ) and "max_concurrency" in str(e.value)
    with pytest.raises(ValueError, match="base_url"):
        build_llm({"kind": "openai", "base_url": "localhost:8000"}, {"name_or_path": "m"})


def test_lean_reader_chunked_gzip_and_retry_after_formats():
    import email.utils
    import gzip

    from synth.llm._http import _decompress, _read_body, _read_head, _retry_after

    async def read(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        status, headers = await _read_head(reader)
        return status, _decompress(await _read_body(reader, headers), headers.get("content-encoding", ""))

    body = gzip.compress(b'{"choices": []}')
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n" + chunks + b"0\r\n\r\n"
    assert asyncio.run(read(raw)) == (200, b'{"choices": []}')
    assert asyncio.run(read(b"HTTP/1.0 503 Busy\r\n\r\nread to close")) == (503, b"read to close")
    assert _retry_after({"retry-after-ms": "1500"}) == 1.5 and _retry_after({"retry-after": "2"}) == 2.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after({"retry-after": when}) <= 30 and _retry_after({}) is None


@pytest.mark.parametrize(
    "field,expect",
    [
        ("none", None),
        ("structured_outputs", {"structured_outputs": {"regex": r"\[\[(A|B)\]\]"}}),
        ("guided_regex", {"guided_regex": r"\[\[(A|B)\]\]"}),
    ],
)
def test_regex_constraint_is_sent_only_when_the_server_extension_is_named(openai_server, field, expect):
    backend(openai_server.url, regex_field=field).generate(reqs(1), SamplingParams(regex=r"\[\[(A|B)\]\]"))
    body = openai_server.chat_requests()[0].body
    sent = {k: body[k] for k in ("structured_outputs", "guided_regex") if k in body}
    assert sent == (expect or {})
