"""llm=openai against servers that lack vLLM's extensions (the loopback server with them switched off):
`send_n: auto` (a server that answers n=k with one choice, as llama.cpp does) and the assistant-prefill
probe (a server that ignores continue_final_message is refused before a label is read)."""

from __future__ import annotations

import logging

import pytest

from synth.llm import BackendError, build_llm
from synth.llm import openai as openai_backend
from synth.llm.base import SamplingParams
from synth.records import messages

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "progress": False}


def backend(url, model="test-model", **settings):
    return build_llm(
        {"kind": "openai", "base_url": url, "transport": "lean", **FAST, **settings}, {"name_or_path": model}
    )


def one_choice(body):
    """Like llama.cpp's server: one choice whatever n asks for; the text says which request it was."""
    k = sum(1 for _ in body["messages"])
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"{body['messages'][-1]['content']}#{k}"},
                "finish_reason": "stop",
            }
        ]
    }


@pytest.fixture(autouse=True)
def fresh_probe_cache(monkeypatch):
    monkeypatch.setattr(openai_backend, "_PREFILL_OK", {})


def test_send_n_auto_is_the_default_and_detects_a_server_that_ignores_n(make_openai_server, caplog):
    server = make_openai_server(responder=one_choice)
    llm = backend(server.url)
    assert llm.settings.send_n == "auto"
    with caplog.at_level(logging.WARNING, logger="synth.llm.openai"):
        out = llm.generate([messages(("user", "a")), messages(("user", "b"))], SamplingParams(n=3))
    assert (
        [len(g) for g in out] == [3, 3]
        and all(c.text == "a#1" for c in out[0])
        and all(c.text == "b#1" for c in out[1])
    )
    first = server.chat_requests()
    # each request asked once with n=3, got 1 choice, and the 2 missing samples came one request each
    assert sorted(r.body["n"] for r in first) == [1, 1, 1, 1, 3, 3]
    assert sum("answered n=3 with 1 choice" in r.message for r in caplog.records) == 1  # warned once
    server.reset()
    out = llm.generate([messages(("user", "c"))], SamplingParams(n=4))  # detected once: n=1 from the start
    assert len(out[0]) == 4 and [r.body["n"] for r in server.chat_requests()] == [1, 1, 1, 1]


def test_send_n_auto_keeps_n_on_a_server_that_honours_it(openai_server):
    llm = backend(openai_server.url)
    for _ in range(2):
        out = llm.generate([messages(("user", "a"))], SamplingParams(n=4))
        assert len(out[0]) == 4
    assert [r.body["n"] for r in openai_server.chat_requests()] == [4, 4]


def test_send_n_true_still_refuses_fewer_choices(make_openai_server):
    server = make_openai_server(responder=one_choice)
    with pytest.raises(BackendError, match="returned 1 choices for n=2"):
        backend(server.url, send_n=True).generate([messages(("user", "a"))], SamplingParams(n=2))


PREFILL = messages(("user", "Which is better, (A) or (B)?"), ("assistant", "The answer is: ("))
LOGPROBS = SamplingParams(max_new_tokens=1, logprobs=True, top_logprobs=5)


def test_prefill_probe_passes_on_a_server_that_continues_and_is_cached(make_openai_server):
    server = make_openai_server(responder=lambda body: "A")
    llm = backend(server.url)
    llm.generate([PREFILL], LOGPROBS)
    llm.generate([PREFILL], LOGPROBS)
    backend(server.url).generate([PREFILL], LOGPROBS)  # a new backend for the same server: cached, no probe
    probes = server.probe_requests()
    assert len(probes) == 1 and len(server.chat_requests()) == 3
    p = probes[0].body
    assert p["continue_final_message"] is True and p["add_generation_prompt"] is False and p["temperature"] == 0.0
    backend(server.url, model="other-model").generate([PREFILL], LOGPROBS)  # per server AND model
    assert len(server.probe_requests()) == 2


def test_prefill_probe_refuses_a_server_that_ignores_prefill_in_one_line(make_openai_server):
    server = make_openai_server(responder=lambda body: "(", prefill="ignore")
    llm = backend(server.url)
    llm.generate([messages(("user", "no prefill here"))], SamplingParams())  # plain requests need no probe
    assert server.probe_requests() == []
    with pytest.raises(BackendError) as e:
        llm.generate([PREFILL], LOGPROBS)
    msg = str(e.value)
    assert "\n" not in msg and server.url in msg and "continue_final_message" in msg and "logprobs=false" in msg
    assert len(server.probe_requests()) == 1 and len(server.chat_requests()) == 1  # the label request never went out
    with pytest.raises(BackendError):  # cached: refused again without a second probe
        llm.generate([PREFILL], LOGPROBS)
    assert len(server.probe_requests()) == 1


def test_prefill_trust_skips_the_probe(make_openai_server):
    server = make_openai_server(responder=lambda body: "A", prefill="ignore")
    backend(server.url, prefill="trust").generate([PREFILL], LOGPROBS)
    assert server.probe_requests() == [] and len(server.chat_requests()) == 1


def test_ai_feedback_logprob_labels_refused_on_a_server_without_prefill(make_openai_server, tmp_path):
    """The whole command: ai_feedback's log-prob labelling against a llama.cpp-like server stops with the
    one-line BackendError before any label is read (no silently wrong P(A))."""
    from tests.synth.safety_helpers import loopback, run_synth

    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "How do I boil an egg?"}\n')
    server = make_openai_server(
        responder=lambda body: ["Boil it for nine minutes.", "Fry it in a pan, quickly and hot, then serve."],
        prefill="ignore",
    )
    with pytest.raises(BackendError, match="does not continue an assistant prefill"):
        run_synth(
            tmp_path / "out",
            "pipeline=ai_feedback",
            *loopback(server.url),
            "cache=false",
            "source=jsonl",
            f"source.path={src}",
            "pipeline.label=logprobs",
        )
    assert all("continue_final_message" not in r.body for r in server.chat_requests())
