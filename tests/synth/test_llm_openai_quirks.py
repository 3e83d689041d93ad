"""llm=openai against servers that lack vLLM's extensions (the loopback server with them switched off):
`send_n: auto` (a server that answers n=k with one choice, as llama.cpp does), the assistant-prefill
probe (a server that ignores continue_final_message is refused before a label is read, and before any
other work in the pipelines that need it), and structured output (a server that answers response_format
json_schema with HTTP 500, as llama-cpp-python does, gets json_object with the schema)."""

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
    monkeypatch.setattr(openai_backend, "_STRUCTURED", {})


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


def test_ai_feedback_refuses_before_any_work_even_when_no_pair_reaches_the_judge(make_openai_server, tmp_path):
    """The llama.cpp run that was not refused: both policy samples alike (or cut off), so no pair was
    ever judged, no prefill request was made, the probe never ran and the run "finished". The check now
    runs at start-up, before the output folder is touched or a policy request sent, whatever the label mode."""
    from tests.synth.safety_helpers import loopback, run_synth

    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "How do I boil an egg?"}\n{"prompt": "Name a colour."}\n')
    server = make_openai_server(responder=lambda body: "Boil it.", prefill="ignore")  # identical samples
    for label in ("logprobs", "votes", "auto"):
        with pytest.raises(BackendError, match="does not continue an assistant prefill") as e:
            run_synth(
                tmp_path / label,
                "pipeline=ai_feedback",
                *loopback(server.url),
                "cache=false",
                "source=jsonl",
                f"source.path={src}",
                f"pipeline.label={label}",
            )
        assert "\n" not in str(e.value) and "pipeline.pairwise.logprobs=false" in str(e.value)
        assert not (tmp_path / label).exists()
    assert len(server.probe_requests()) == 1 and server.chat_requests() == []  # one probe, no policy request


def test_judge_logprobs_refused_at_start_up_and_text_verdicts_run(make_openai_server, tmp_path):
    from tests.synth.safety_helpers import loopback, run_synth

    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "How do I boil an egg?"}\n')
    server = make_openai_server(responder=lambda body: "Boil it.", prefill="ignore")
    common = (*loopback(server.url), "cache=false", "source=jsonl", f"source.path={src}", "pipeline=judge")
    with pytest.raises(BackendError, match="does not continue an assistant prefill"):
        run_synth(tmp_path / "lp", *common, "pipeline.pairwise.logprobs=true")
    assert server.chat_requests() == [] and not (tmp_path / "lp").exists()
    m = run_synth(tmp_path / "text", *common)  # text verdicts need no prefill: no probe, no refusal
    assert m["status"] == "finished" and len(server.probe_requests()) == 1


# ---- structured output ------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["safe", "unsafe"]},
        "why": {"type": "string", "maxLength": 50},
    },
    "required": ["verdict", "why"],
    "additionalProperties": False,
}
JSON_PARAMS = SamplingParams(max_new_tokens=32, json_schema=SCHEMA)
VERDICT = '{"verdict": "safe", "why": "ok"}'


def formats(server):
    return [(r.body.get("response_format") or {}).get("type") for r in server.chat_requests()]


def test_json_schema_server_gets_json_schema_with_no_extra_request(make_openai_server, caplog):
    server = make_openai_server(responder=lambda body: VERDICT)
    with caplog.at_level(logging.INFO, logger="synth.llm.openai"):
        out = backend(server.url).generate([messages(("user", str(i))) for i in range(4)], JSON_PARAMS)
    assert [g[0].text for g in out] == [VERDICT] * 4 and formats(server) == ["json_schema"] * 4
    sent = server.chat_requests()[0].body["response_format"]["json_schema"]
    assert sent["schema"] == openai_backend.for_openai_strict(SCHEMA) != SCHEMA and sent["strict"] is True
    assert [r.message for r in caplog.records if "response_format" in r.message] == [
        f"openai backend: {server.url} (model 'test-model') takes response_format json_schema for JSON answers"
    ]


def test_server_that_500s_on_json_schema_gets_json_object_with_the_schema(make_openai_server, caplog):
    """llama-cpp-python 0.3.36: json_schema -> HTTP 500; {type: json_object, schema} is its grammar form.
    Found on the first request (json_schema twice, then json_object), once per server and model, one
    warning line; every other request, concurrent or later, goes as json_object at once."""
    server = make_openai_server(responder=lambda body: VERDICT, structured="json_object", latency_s=0.05)
    llm = backend(server.url)
    with caplog.at_level(logging.INFO, logger="synth.llm.openai"):
        out = llm.generate([messages(("user", str(i))) for i in range(5)], JSON_PARAMS)
        assert all(g[0].text == VERDICT for g in out)
        assert formats(server) == ["json_schema", "json_schema"] + ["json_object"] * 5
        assert llm.stats.retries == 0  # the detection is not counted as retries of a failing server
        server.reset()
        backend(server.url).generate([messages(("user", "again"))], JSON_PARAMS)  # new backend, same server: cached
    assert formats(server) == ["json_object"]
    sent = server.chat_requests()[0].body["response_format"]
    assert sent == {"type": "json_object", "schema": SCHEMA}  # llama.cpp's grammar keeps maxLength: sent as is
    lines = [r for r in caplog.records if "response_format" in r.message]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "\n" not in lines[0].message
    assert (
        "rejected json_schema (5xx: HTTP 500" in lines[0].message and "json_object with the schema" in lines[0].message
    )


def test_server_without_response_format_gets_the_prompt_only(make_openai_server, caplog):
    server = make_openai_server(responder=lambda body: VERDICT, structured="none")
    with caplog.at_level(logging.WARNING, logger="synth.llm.openai"):
        out = backend(server.url).generate([messages(("user", "a")), messages(("user", "b"))], JSON_PARAMS)
    assert [g[0].text for g in out] == [VERDICT] * 2
    assert formats(server) == ["json_schema", "json_object", None, None]  # 400 is not retried
    (line,) = [r.message for r in caplog.records if "response_format" in r.message]
    assert "rejected json_schema" in line and "json_object" in line and "the prompt asks for JSON" in line


def test_transient_failures_are_not_taken_for_a_rejected_format(make_openai_server):
    """One 500, or a 503, on the first JSON request is the server, not the field: json_schema is kept."""
    one_500 = make_openai_server(responder=lambda body: VERDICT, schedule={0: "500"})
    backend(one_500.url).generate([messages(("user", "a"))], JSON_PARAMS)
    assert formats(one_500) == ["json_schema", "json_schema"]
    assert openai_backend._STRUCTURED[(one_500.url, "test-model")] == "json_schema"
    busy = make_openai_server(responder=lambda body: VERDICT, schedule={0: "503", 1: "503"})
    llm = backend(busy.url)
    llm.generate([messages(("user", "a"))], JSON_PARAMS)
    assert formats(busy) == ["json_schema"] * 3 and llm.stats.retries == 2
    assert openai_backend._STRUCTURED[(busy.url, "test-model")] == "json_schema"


def test_structured_output_setting_skips_the_detection(make_openai_server):
    server = make_openai_server(responder=lambda body: VERDICT, structured="json_object")
    backend(server.url, structured_output="json_object").generate([messages(("user", "a"))], JSON_PARAMS)
    assert formats(server) == ["json_object"] and openai_backend._STRUCTURED == {}
    backend(server.url, structured_output="none").generate([messages(("user", "a"))], JSON_PARAMS)
    assert formats(server) == ["json_object", None]
    plain = make_openai_server(responder=lambda body: "hi", structured="none")
    backend(plain.url).generate([messages(("user", "a"))], SamplingParams())  # no schema: nothing to detect
    assert formats(plain) == [None] and openai_backend._STRUCTURED == {}


@pytest.mark.parametrize("structured", ["json_object", "none"])
def test_red_team_runs_on_a_server_that_rejects_json_schema(make_openai_server, tmp_path, structured):
    """The red_team failure against llama.cpp (its JSON verdicts retried 7 times on HTTP 500, then the run
    failed) on the loopback server with json_schema switched off: the run finishes, verdicts parse."""
    from tests.synth.safety_helpers import check_outputs, loopback, run_synth
    from tests.synth.test_red_team import DECODING, http, red_team_responder

    server = make_openai_server(responder=http(red_team_responder()), structured=structured)
    m = run_synth(
        tmp_path / "red",
        "pipeline=red_team",
        "constitution=safety_zh",
        *loopback(server.url),
        "cache=false",
        "pipeline.categories=['歧视/地域']",
        "pipeline.families=[direct]",
        "pipeline.prompts_per_item=2",
        DECODING,
    )
    check_outputs(tmp_path / "red", m)
    assert m["outputs"] == {"prompts": 2, "answers": 4, "unsafe": 2} and m["parse_failures"] == {}
    sent = formats(server)
    if structured == "json_object":  # 4 verdicts: the first found the form (json_schema 500 twice)
        assert sent.count("json_schema") == 2 and sent.count("json_object") == 4 and sent[-4:] == ["json_object"] * 4
    else:  # json_schema and json_object refused once each, then 4 verdicts asked in the prompt only
        assert sent.count("json_schema") == 1 and sent.count("json_object") == 1 and sent[-4:] == [None] * 4


def test_prefill_is_checked_on_the_judge_role_server_only(make_openai_server, tmp_path):
    """judge= on its own server: the probe goes there (and the refusal names it), not to the policy's."""
    from tests.synth.safety_helpers import loopback, run_synth

    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "How do I boil an egg?"}\n')
    policy = make_openai_server(responder=lambda body: "Boil it.")
    judge = make_openai_server(responder=lambda body: "A", prefill="ignore")
    with pytest.raises(BackendError, match=f"{judge.url} does not continue"):
        run_synth(
            tmp_path / "o",
            "pipeline=ai_feedback",
            *loopback(policy.url),
            "+judge.llm={kind: openai, base_url: '" + judge.url + "', progress: false}",
            "source=jsonl",
            f"source.path={src}",
        )
    assert policy.requests == [] and len(judge.probe_requests()) == 1
