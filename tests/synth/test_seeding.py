"""Reproducible synthesis: every sampled request is seeded from the run's seed and its own key
(synth.steps.base.seed_requests), so the same config + seed gives the same dataset, also after a
crash and resume; another seed gives another dataset."""

from __future__ import annotations

import pytest

from synth.io import read_jsonl
from synth.llm.base import SamplingParams, request_seed, sample_seed
from synth.records import messages
from synth.runtime import ChunkState, Context
from synth.steps.base import Call, run_calls, seed_requests
from tests.fakes import ScriptedLLM

T1 = SamplingParams(temperature=1.0, max_new_tokens=8)


def call(item: str, text: str = "q", **meta) -> Call:
    return Call(item, messages(("user", text)), meta)


# --------------------------------------------------------------------------- the helper


def test_seed_follows_the_request_key_not_its_position():
    a, b, c = call("i0"), call("i1"), call("i2")
    first = seed_requests(0, "answer", "policy", [a, b, c], T1)
    shuffled = seed_requests(0, "answer", "policy", [c, a], T1)  # another chunk / batch layout
    assert [p.seed for p in shuffled] == [first[2].seed, first[0].seed]
    assert len({p.seed for p in first}) == 3  # every item its own stream
    assert all(p.seed is not None and 0 <= p.seed < 2**31 for p in first)
    # the run seed, the step, the role, the meta and the prompt are all part of the key
    one = first[0].seed
    assert seed_requests(1, "answer", "policy", [a], T1)[0].seed != one
    assert seed_requests(0, "critique", "policy", [a], T1)[0].seed != one
    assert seed_requests(0, "answer", "judge", [a], T1)[0].seed != one
    assert seed_requests(0, "answer", "policy", [call("i0", round=2)], T1)[0].seed != one
    assert seed_requests(0, "answer", "policy", [call("i0", "other")], T1)[0].seed != one
    assert one == request_seed(0, "policy", "answer", "i0", {}, [{"role": "user", "content": "q"}])


def test_repeats_stay_distinct_explicit_seeds_and_greedy_are_kept():
    a = call("i0")
    twice = seed_requests(0, "answer", "policy", [a, call("i1"), a], T1)
    assert twice[0].seed != twice[2].seed  # asking twice gives two samples
    assert twice[0].seed == seed_requests(0, "answer", "policy", [a], T1)[0].seed
    explicit = seed_requests(0, "answer", "policy", [a, call("i1")], T1.replace(seed=5))
    assert [p.seed for p in explicit] == [5, 5]
    greedy = seed_requests(0, "answer", "policy", [a], T1.replace(temperature=0.0))
    assert greedy[0].seed is None  # greedy: no seed, so call-cache keys of judges do not change


def test_run_calls_hands_the_backend_seeded_params():
    llm = ScriptedLLM(lambda msgs, p, i: f"{p.seed}:{i}")
    ctx = Context(factories={"policy": lambda: llm}, seed=3)
    out = run_calls(ctx, ChunkState(), "answer", "policy", [call("i0"), call("i1")], T1.replace(n=2))
    (sent,) = [ps for _, ps in llm.calls]
    assert [p.seed for p in sent] == [
        p.seed for p in seed_requests(3, "answer", "policy", [call("i0"), call("i1")], T1)
    ]
    assert out[0][0].text != out[1][0].text and [s.index for s in out[0]] == [0, 1]


# --------------------------------------------------------------------------- over HTTP (llm=openai)


def _generate_over_http(tmp_path, server, name, *extra):
    from tests.synth.safety_helpers import prompts_file, run_synth

    src = prompts_file(tmp_path / "src.jsonl", ["q0", "q1"])
    before = len(server.chat_requests())
    run_synth(
        tmp_path / name,
        "pipeline=generate",
        "pipeline.n=2",
        "pipeline.sampling.temperature=0.8",
        "llm=openai",
        f"llm.base_url={server.url}",
        "model.name_or_path=scripted",
        "llm.progress=false",
        "source=jsonl",
        f"source.path={src}",
        *extra,
    )
    return [r.body for r in server.chat_requests()[before:]]


def test_openai_requests_carry_the_derived_seeds_and_send_seed_false_sends_none(tmp_path, make_openai_server):
    server = make_openai_server()  # answers "echo: <prompt> (seed s)"
    first = _generate_over_http(tmp_path, server, "a", "cache=false")
    again = _generate_over_http(tmp_path, server, "b")  # the call cache asks for what it lacks: all of it
    assert len(first) == 4 and all(b["n"] == 1 and b["temperature"] == 0.8 for b in first)  # a request per sample
    key = sorted((b["messages"][-1]["content"], b["seed"]) for b in first)
    assert key == sorted((b["messages"][-1]["content"], b["seed"]) for b in again)
    expected = []
    for q in ("q0", "q1"):
        (it,) = [r for r in read_jsonl(tmp_path / "a" / "completions.jsonl") if r["prompt"][0]["content"] == q]
        s = request_seed(0, "policy", "generate", it["id"], {}, [{"role": "user", "content": q}])
        expected += [(q, sample_seed(s, 0)), (q, sample_seed(s, 1))]
    assert key == sorted(expected)
    off = _generate_over_http(tmp_path, server, "c", "llm.send_seed=false")
    assert [(b["n"], "seed" in b) for b in off] == [(2, False), (2, False)]  # n in one request, no seed field


# --------------------------------------------------------------------------- end to end on the tiny model


def _cai(tmp_path, out_name, *extra):
    from tests.synth.safety_helpers import TINY, TINY_STOP, prompts_file, run_synth

    src = prompts_file(
        tmp_path / "src.jsonl", ["How do I pick a lock?", "Tell me a secret.", "Why is the sky blue?", "Hi there."]
    )
    out = tmp_path / out_name
    m = run_synth(
        out,
        "pipeline=critique_revision",
        *TINY,
        "source=jsonl",
        f"source.path={src}",
        "pipeline.rounds=1",
        "pipeline.few_shot=false",
        "pipeline.initial=generate",
        "pipeline.sampling.temperature=1.0",
        "pipeline.sampling.max_new_tokens=10",
        f"pipeline.sampling.stop={TINY_STOP}",
        "chunk_size=2",
        "cache=false",
        *extra,
    )
    return out, m


def _data(out) -> dict[str, str]:
    return {name: (out / f"{name}.jsonl").read_text() for name in ("sft", "preferences", "trace")}


def _item_prompts(requests) -> set[str]:
    return {req[0].content for req in requests}  # few_shot=false: the first message is the item's prompt


@pytest.mark.slow
def test_critique_revision_same_seed_same_data_other_seed_other_data_and_resume(tmp_path, monkeypatch):
    from synth.llm.hf import HFBackend

    real, seen = HFBackend.generate, []

    def record(self, requests, params):
        seen.append(_item_prompts(requests))
        return real(self, requests, params)

    monkeypatch.setattr(HFBackend, "generate", record)
    a, ma = _cai(tmp_path, "a")
    monkeypatch.setattr(HFBackend, "generate", real)
    b, _ = _cai(tmp_path, "b")
    assert ma["status"] == "finished" and ma["calls"]["answer"] == 4 and ma["outputs"]["sft"] >= 1
    assert _data(a) == _data(b)  # unseeded pipeline sampling at T = 1: same command, same files
    c, _ = _cai(tmp_path, "c", "seed=1")
    assert _data(c)["trace"] != _data(a)["trace"]

    # kill the run at the last model call of the second chunk (items 3 and 4; the first chunk is
    # committed), then rerun the same command: the redone chunk draws what the uninterrupted run drew
    chunk2 = {"Why is the sky blue?", "Hi there."}
    last = max(i for i, prompts in enumerate(seen) if prompts & chunk2)
    calls = []

    def crash(self, requests, params):
        calls.append(1)
        if len(calls) == last + 1:
            raise RuntimeError("killed")
        return real(self, requests, params)

    monkeypatch.setattr(HFBackend, "generate", crash)
    with pytest.raises(RuntimeError, match="killed"):
        _cai(tmp_path, "resumed")
    monkeypatch.setattr(HFBackend, "generate", real)
    resumed, mr = _cai(tmp_path, "resumed")
    assert mr["resumed_from_previous_runs"] == 2 and mr["status"] == "finished"
    assert _data(resumed) == _data(a)


def test_evaluate_answers_are_seeded_per_prompt_from_the_run_seed(tmp_path, make_openai_server):
    from hydra import compose, initialize_config_module

    from synth.evaluate import app
    from tests.synth.evaluate.scripted import judge_responder

    server = make_openai_server(responder=judge_responder)

    def policy_seeds(name, *extra):
        before = len(server.chat_requests())
        overrides = [
            "llm=openai",
            f"llm.base_url={server.url}",
            "model.name_or_path=scripted",
            "llm.progress=false",
            "judge=policy",
            "allow_self_judge=true",
            "suite=xstest",
            "suite.limit=3",
            "suite.gold_limit=0",
            "progress=false",
            "bootstrap=100",
            "cache=false",
            f"output_dir={tmp_path / name}",
            *extra,
        ]
        with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
            cfg = compose(config_name="evaluate", overrides=overrides)
        assert cfg.sampling.seed is None  # derived per prompt, not one seed for every prompt
        app.run(cfg)
        sampled = [r.body for r in server.chat_requests()[before:] if r.body["temperature"] > 0]
        return sorted((b["messages"][-1]["content"], b["seed"]) for b in sampled)

    a = policy_seeds("a")
    assert len(a) == 3 and len({s for _, s in a}) == 3  # every prompt its own seed
    assert policy_seeds("b") == a
    assert [s for _, s in policy_seeds("c", "seed=1")] != [s for _, s in a]
