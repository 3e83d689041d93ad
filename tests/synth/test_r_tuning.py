"""`pipeline=r_tuning` (R-Tuning, arXiv 2311.09677): the probe, the matchers, the SFT targets, resume."""

import json

import pytest

from synth.errors import SourceError
from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.r_tuning import RTuningConfig, RTuningPipeline
from synth.records import Completion, SourceItem, messages
from synth.steps.knowledge import matches, normalize_answer, probe_answer, with_period
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs

SUFFIX = "Are you sure you accurately answered the question based on your internal knowledge?"


def test_probe_and_matchers():
    assert probe_answer(" Paris. It is the capital.") == "Paris"
    assert probe_answer("no full stop here") == "no full stop here"
    assert probe_answer("a. b", cut_at=None) == "a. b"
    assert matches("The capital is Paris", ["Paris"], "substring")
    assert not matches("the capital is paris", ["Paris"], "substring")  # the repository's test is case-sensitive
    assert matches("the capital is paris", ["Paris"], "normalized")
    assert matches("1990", ["1"], "substring")  # why containment inflates "certain" for short references
    assert not matches("1990", ["1"], "exact") and matches("The Eiffel Tower!", ["eiffel tower"], "exact")
    assert matches("Lutetia", ["Paris", "Lutetia"], "exact")  # any alias
    assert normalize_answer("The  Eiffel, Tower.") == "eiffel tower"
    assert with_period("Paris") == "Paris." and with_period("Paris.") == "Paris."


QA = [("What is the capital of France?", "Paris"), ("Who wrote Hamlet?", "Shakespeare"), ("What is 2+2?", "4")]


def items(field=None):
    out = []
    for i, (q, a) in enumerate(QA):
        if field:
            out.append(SourceItem(id=f"q{i}", prompt=messages(("user", q)), meta={field: [a, a.lower()]}))
        else:
            out.append(SourceItem(id=f"q{i}", prompt=messages(("user", q)), chosen=messages(("assistant", a))))
    return out


def knows_some(msgs, p, i):
    q = msgs[-1].content
    if "France" in q:
        return Completion(text="Paris. It is a large city with many", finish_reason="length")  # cut off: still read
    if "Hamlet" in q:
        return "shakespeare wrote it."
    return "I think it is 5."


def run(tmp_path, cfg=None, its=None):
    llm = ScriptedLLM(knows_some, model="m0")
    ctx = Context(factories={"policy": lambda: llm})
    m = run_pipeline(RTuningPipeline(RTuningConfig(**(cfg or {}))), ctx, tmp_path, its or items(), show_progress=False)
    return m, read_jsonl(tmp_path / "sft.jsonl"), llm


def test_unsure_targets_exact(tmp_path):
    m, rows, llm = run(tmp_path)
    assert len(llm.calls) == 1
    reqs, params = llm.calls[0]
    assert reqs[0][0].content == "Question: What is the capital of France? Answer:"
    assert params[0].temperature == 0.0 and params[0].max_new_tokens == 15 and params[0].n == 1
    got = [(r["messages"][0]["content"], r["messages"][1]["content"], r["meta"]["certain"]) for r in rows]
    assert got == [
        ("Question: What is the capital of France? Answer:", f"Paris. {SUFFIX} I am sure.", True),
        (
            "Question: Who wrote Hamlet? Answer:",
            f"Shakespeare. {SUFFIX} I am unsure.",
            False,
        ),  # case-sensitive substring
        ("Question: What is 2+2? Answer:", f"4. {SUFFIX} I am unsure.", False),
    ]
    assert rows[0]["meta"]["probe_answer"] == "Paris" and rows[0]["method"] == "r_tuning_unsure"
    assert m["r_tuning"] == {
        "method": "unsure",
        "match": "substring",
        "certain": 1,
        "uncertain": 2,
        "certain_rate": 0.3333,
    }
    assert m["parse_failures"] == {} and m["truncated"] == {"probe": 1}


def test_normalized_match_aliases_two_turn_and_source_prompt(tmp_path):
    cfg = {"match": "normalized", "reference": "answers", "target_format": "two_turn", "sft_prompt": "source"}
    m, rows, _ = run(tmp_path, cfg, items(field="answers"))
    assert [r["meta"]["certain"] for r in rows] == [True, True, False]
    assert [msg["role"] for msg in rows[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [msg["content"] for msg in rows[1]["messages"]] == [
        "Who wrote Hamlet?",
        "Shakespeare.",
        SUFFIX,
        "I am sure.",
    ]
    assert rows[2]["messages"][-1]["content"] == "I am unsure." and rows[2]["meta"]["references"] == ["4", "4"]


def test_unknown_method_refuses_only_when_uncertain(tmp_path):
    m, rows, _ = run(tmp_path, {"method": "unknown", "refusals": ["I do not know."]})
    assert [r["messages"][-1]["content"] for r in rows] == ["Paris.", "I do not know.", "I do not know."]
    m2, rows2, _ = run(tmp_path / "again", {"method": "unknown"})
    cfg = RTuningConfig()
    assert rows2[1]["messages"][-1]["content"] in cfg.refusals
    m3, rows3, _ = run(tmp_path / "third", {"method": "unknown"})
    assert [r["messages"] for r in rows3] == [r["messages"] for r in rows2]  # the refusal draw is seeded by the item id


def test_missing_reference_is_a_source_error_before_anything_runs(tmp_path):
    bad = items() + [SourceItem(id="x", prompt=messages(("user", "No answer here?")))]
    with pytest.raises(SourceError) as e:
        run(tmp_path, its=bad)
    assert "item x" in str(e.value) and "pipeline.reference" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "sft.jsonl").exists()


def test_rerun_makes_no_calls(tmp_path):
    run(tmp_path)
    m, rows, llm = run(tmp_path)
    assert llm.calls == [] and len(rows) == 3 and m["r_tuning"]["certain"] == 1


# --------------------------------------------------------------------------- real backends


def compose_run(tmp_path, *overrides, backend):
    from hydra import compose, initialize_config_module

    from synth.app import run

    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA), encoding="utf-8")
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(
            config_name="synth",
            overrides=[
                "pipeline=r_tuning",
                *backend,
                "source=jsonl",
                f"source.path={src}",
                "source.fields.prompt=question",
                "source.fields.chosen=answer",
                f"output_dir={tmp_path / 'out'}",
                "progress=false",
                *overrides,
            ],
        )
    return run(cfg)


def test_over_the_loopback_server(tmp_path):
    def responder(body):
        assert body["temperature"] == 0.0 and body["max_tokens"] == 15
        return "Paris. Definitely." if "France" in body["messages"][-1]["content"] else "No idea"

    with LoopbackServer(responder=responder) as server:
        m = compose_run(tmp_path, backend=("llm=openai", f"llm.base_url={server.url}", "model.name_or_path=scripted"))
    check_outputs(tmp_path / "out", m)
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [r["messages"][-1]["content"].endswith("I am sure.") for r in rows] == [True, False, False]


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = compose_run(tmp_path, "pipeline.match=normalized", backend=("llm=hf", "model=tiny"))
    check_outputs(tmp_path / "out", m)
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert len(rows) == 3 and m["r_tuning"]["certain"] + m["r_tuning"]["uncertain"] == 3
    assert all(r["messages"][-1]["content"].endswith(("I am sure.", "I am unsure.")) for r in rows)
    again = compose_run(tmp_path, "pipeline.match=normalized", backend=("llm=hf", "model=tiny"))
    assert again["resumed_from_previous_runs"] == 3


# --------------------------------------------------------------------------- R-Tuning-U (method=uncertain)

QA_U = [*QA, ("What is the capital of Italy?", "Rome")]
SAMPLED = {  # five sampled answers per question (the sample index picks one)
    "France": ["Paris."] * 5,  # all agree: entropy 0
    "Hamlet": ["Shakespeare.", "Shakespeare.", "Marlowe.", "Shakespeare.", "Bacon."],  # counts 3,1,1
    "2+2": ["4.", "5.", "22.", "four.", "3."],  # all differ: entropy ln 5
    "Italy": ["Rome.", "Rome.", "Rome.", "Rome.", "Milan."],  # counts 4,1
}


def sampled(msgs, p, i):
    q = msgs[-1].content
    return next(v for k, v in SAMPLED.items() if k in q)[i] + " More text"


def items_u(qa=QA_U):
    return [
        SourceItem(id=f"q{i}", prompt=messages(("user", q)), chosen=messages(("assistant", a)))
        for i, (q, a) in enumerate(qa)
    ]


def run_u(tmp_path, its=None, chunk_size=32, **cfg):
    llm = ScriptedLLM(sampled, model="m0")
    ctx = Context(factories={"policy": lambda: llm})
    pipe = RTuningPipeline(RTuningConfig(method="uncertain", **cfg))
    m = run_pipeline(pipe, ctx, tmp_path, its or items_u(), chunk_size=chunk_size, show_progress=False)
    return m, read_jsonl(tmp_path / "sft.jsonl"), llm


def test_uncertain_splits_at_the_median_answer_entropy(tmp_path):
    import math

    from synth.pipelines.r_tuning import answer_entropy

    m, rows, llm = run_u(tmp_path)
    assert len(llm.calls) == 1  # one batched call: 5 samples per question
    p = llm.calls[0][1][0]
    assert (p.n, p.temperature, p.top_k, p.max_new_tokens) == (5, 0.7, 50, 15)
    # H = −Σ p ln p: France 0; Hamlet (3,1,1)/5; 2+2 ln 5; Italy (4,1)/5
    h = {
        "q0": 0.0,
        "q1": -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)),
        "q2": math.log(5),
        "q3": -(0.8 * math.log(0.8) + 0.2 * math.log(0.2)),
    }
    assert answer_entropy(["a", "a", "b", "a", "c"]) == pytest.approx(h["q1"])
    probes = {r["id"]: r for r in read_jsonl(tmp_path / "probes.jsonl")}
    assert {k: v["entropy"] for k, v in probes.items()} == pytest.approx(h)
    assert probes["q1"]["answers"] == ["Shakespeare", "Shakespeare", "Marlowe", "Shakespeare", "Bacon"]
    # sorted: q0 (0) < q3 (0.50) < q1 (0.95) < q2 (1.61); floor(4 × 0.5) = 2 are sure; the file keeps input order
    got = [(r["messages"][-1]["content"], r["meta"]["certain"]) for r in rows]
    assert got == [
        (f"Paris. {SUFFIX} I am sure.", True),
        (f"Shakespeare. {SUFFIX} I am unsure.", False),  # the reference answer, whatever was sampled
        (f"4. {SUFFIX} I am unsure.", False),
        (f"Rome. {SUFFIX} I am sure.", True),
    ]
    assert rows[0]["method"] == "r_tuning_uncertain" and rows[0]["messages"][0]["content"].startswith("Question: ")
    r = m["r_tuning"]
    assert (r["certain"], r["uncertain"], r["all_agree"], r["sft_rows"]) == (2, 2, 1, 4)
    assert r["entropy_split_at"] == pytest.approx(h["q3"]) and m["outputs"] == {"probes": 4}


def test_uncertain_ties_keep_input_order_and_resume_rebuilds_the_same_file(tmp_path):
    same = [("What is the capital of France?", "Paris")] * 3
    its = [
        SourceItem(id=f"t{i}", prompt=messages(("user", q)), chosen=messages(("assistant", a)))
        for i, (q, a) in enumerate(same)
    ]
    _, rows, _ = run_u(tmp_path / "ties", its)
    assert [r["meta"]["certain"] for r in rows] == [True, False, False]  # floor(1.5) = 1: the first of the tie

    fresh = run_u(tmp_path / "fresh", chunk_size=2)[1]
    part = tmp_path / "part"
    run_u(part, items_u()[:2], chunk_size=2)  # a first run that saw half the data (finalized on 2 items)
    m, rows, llm = run_u(part, chunk_size=2)
    assert len(llm.calls) == 1 and m["resumed_from_previous_runs"] == 2  # only the second chunk is probed
    assert rows == fresh  # the split is over every committed probe, whatever the run boundaries
    _, again, llm = run_u(part, chunk_size=2)
    assert llm.calls == [] and again == fresh


def test_uncertain_over_the_loopback_server(tmp_path):
    def responder(body):
        assert body["temperature"] == 0.7 and body["max_tokens"] == 15 and body["n"] == 5
        if "France" in body["messages"][-1]["content"]:
            return ["Paris."] * 5
        return [f"Guess {i}." for i in range(5)]

    with LoopbackServer(responder=responder) as server:
        m = compose_run(
            tmp_path,
            "pipeline.method=uncertain",
            # n=5 in one request (the scripted server answers with 5 choices): no per-sample seeded requests
            backend=("llm=openai", f"llm.base_url={server.url}", "model.name_or_path=scripted", "llm.send_seed=false"),
        )
    check_outputs(tmp_path / "out", m)
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert [r["messages"][-1]["content"].endswith("I am sure.") for r in rows] == [True, False, False]
