"""`pipeline=r_tuning` (R-Tuning, arXiv 2311.09677): the probe, the matchers, the SFT targets, resume."""

import json

import pytest

from synth.errors import SourceError
from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.r_tuning import RTuningConfig, RTuningPipeline
from synth.records import Completion, SourceItem, messages
from synth.steps.knowledge import matches, normalize_answer, probe_answer, with_period
from tests.fakes import ScriptedLLM
from tests.synth.openai_server import LoopbackServer
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
