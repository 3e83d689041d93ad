"""`pipeline=bpo` / `bpo_rewrite` (Cheng et al. 2023, arXiv 2311.04155; thu-coai/BPO): delimited parsing,
filters, rewriter format."""

import json
import random

import pytest

from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.bpo import BpoConfig, BpoPipeline, BpoRewriteConfig, BpoRewritePipeline
from synth.records import Completion, SourceItem, messages
from synth.sources import SourceConfig, iter_source
from synth.steps.bpo import attach_context, count_words, parse_optimized, ratio_filter, rewriter_messages, strip_quotes
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth

ANSWER = (
    "Detailed Comparison Result: The better response gives concrete steps.\n"
    'Optimized Instruction: "How do I bake a simple loaf of bread at home? Please give step-by-step '
    'instructions." [END]'
    "\nSure! Here is how you bake bread: ..."
)


def pair_item(i, prompt="How do I bake bread at home?", **kw):
    return SourceItem(
        id=f"p{i}",
        prompt=messages(("user", prompt)),
        chosen=messages(("assistant", "Mix flour, water, yeast...")),
        rejected=messages(("assistant", "Buy it.")),
        **kw,
    )


def ctx_of(llm, **extra):
    return Context(factories={"policy": lambda: llm, "target": lambda: llm, **extra})


# --------------------------------------------------------------------------- parsing and filters


def test_parse_keeps_only_the_delimited_part():
    j = parse_optimized(ANSWER)
    assert j.parsed == {
        "comparison": "The better response gives concrete steps.",
        "optimized": "How do I bake a simple loaf of bread at home? Please give step-by-step instructions.",
    }
    # the marker quoted inside the comparison: the LAST one before [END] wins
    j = parse_optimized(
        "Detailed Comparison Result: it lacks an 'Optimized Instruction:' style.\nOptimized Instruction: Do X "
        "well. [END]"
    )
    assert j.parsed["optimized"] == "Do X well."
    zh = parse_optimized("详细比较结果：较好。\n优化后的指令：请详细说明如何在家烤面包。[END]")
    assert zh.parsed == {"comparison": "较好。", "optimized": "请详细说明如何在家烤面包。"}


@pytest.mark.parametrize(
    "text,error",
    [
        ("Optimized Instruction: do it", "no [END] marker"),
        ("Here is the answer to your question. [END]", "no 'Optimized Instruction:' marker"),
        ('Optimized Instruction: "" [END]', "empty optimized instruction"),
    ],
)
def test_parse_failures(text, error):
    j = parse_optimized(text)
    assert not j.ok and j.parsed is None and j.error == error


def test_parse_without_end_when_allowed_and_quote_stripping():
    assert parse_optimized("Optimized Instruction: do it", require_end=False).parsed["optimized"] == "do it"
    assert (
        strip_quotes("“Explain X.”") == "Explain X."
        and strip_quotes("'a'") == "a"
        and strip_quotes('"a" and "b"') == 'a" and "b'
    )
    assert strip_quotes('say "hi"') == 'say "hi"'


def test_ratio_filters_and_word_counts():
    assert count_words("How do I bake?") == 4 and count_words("如何烤面包？") == 5
    assert ratio_filter("one two three four five", "one two") == "ratio_shrunk"  # 5/2 > 2
    assert ratio_filter("one two three four", "one two") is None  # exactly 2 is kept
    assert ratio_filter("hi there", " ".join(["w"] * 13)) == "ratio_ballooned"  # 13/2 > 6
    assert ratio_filter("hi there", " ".join(["w"] * 12)) is None
    assert ratio_filter("a b", "a b [protected] c") == "protected_marker"
    assert ratio_filter("如何烤面包", "请详细说明如何在家里烤制面包") is None


def test_context_layout_is_deterministic_and_kept_when_present():
    a = attach_context("Summarise.", "Some text.", random.Random(3))
    assert a == attach_context("Summarise.", "Some text.", random.Random(3))
    assert "Some text." in a and "Summarise." in a
    assert attach_context("Summarise: Some text.", "Some text.", random.Random(0)) == "Summarise: Some text."


# --------------------------------------------------------------------------- bpo


def test_bpo_exact_rows_train_the_rewriter_not_responses(tmp_path):
    def llm_fn(msgs, p, i):
        text = msgs[-1].content
        if "bread" in text:
            return ANSWER
        if "cake" in text:
            return "Optimized Instruction: Cake? [END]"  # lost too much -> ratio filter
        return "I would answer the question directly."  # no marker -> parse failure

    llm = ScriptedLLM(llm_fn, model="constructor")
    its = [
        pair_item(0, category="cooking"),
        pair_item(1, "How do I bake a cake for my friend's birthday party?"),
        pair_item(2, "Tell me a joke"),
        SourceItem(id="nopair", prompt=messages(("user", "hi"))),
    ]
    m = run_pipeline(BpoPipeline(BpoConfig()), ctx_of(llm), tmp_path, its, show_progress=False)
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 3 and llm.calls[0][1][0].temperature == 0.9
    sent = llm.calls[0][0][0][0].content
    assert sent.index("[Worse response]\nBuy it.") < sent.index("[Better response]\nMix flour")
    (row,) = read_jsonl(tmp_path / "sft.jsonl")
    optimized = "How do I bake a simple loaf of bread at home? Please give step-by-step instructions."
    assert row["messages"] == [m.model_dump() for m in rewriter_messages("en", "How do I bake bread at home?")] + [
        {"role": "assistant", "content": optimized}
    ]
    assert row["method"] == "bpo" and row["category"] == "cooking"
    assert row["meta"]["comparison"] == "The better response gives concrete steps."
    assert row["meta"]["good_res"] == "Mix flour, water, yeast..."
    assert m["drops"] == {"no_preference_pair": 1, "ratio_shrunk": 1}
    assert m["parse_failures"] == {"bpo_construct": 1}


def test_bpo_reads_bpo_json_via_field_map(tmp_path):
    data = tmp_path / "bpo.json"
    row = {
        "prompt": "How do I bake bread at home?",
        "good_res": "Mix flour...",
        "bad_res": "Buy it.",
        "source": "oasst",
    }
    data.write_text(json.dumps([row]))
    cfg = SourceConfig(
        kind="jsonl", path=str(data), fields={"prompt": "prompt", "chosen": "good_res", "rejected": "bad_res"}
    )
    llm = ScriptedLLM(lambda msgs, p, i: ANSWER)
    m = run_pipeline(BpoPipeline(BpoConfig()), ctx_of(llm), tmp_path / "out", iter_source(cfg), show_progress=False)
    assert m["outputs"] == {"sft": 1}
    assert "[Worse response]\nBuy it." in llm.calls[0][0][0][0].content


def test_bpo_truncated_answer_is_dropped(tmp_path):
    llm = ScriptedLLM(lambda msgs, p, i: Completion(text=ANSWER, finish_reason="length"))
    m = run_pipeline(BpoPipeline(BpoConfig()), ctx_of(llm), tmp_path, [pair_item(0)], show_progress=False)
    assert m["outputs"] == {"sft": 0} and m["truncated"] == {"bpo_construct": 1}


def test_bpo_context_rows_skip_ratio_filter_and_reattach_context(tmp_path):
    llm = ScriptedLLM(lambda msgs, p, i: "Optimized Instruction: Summarise the text in two sentences. [END]")
    it = pair_item(
        0,
        "Summarise the following text for a child who is seven years old, please",
        meta={"context": "Cats sleep a lot."},
    )
    run_pipeline(BpoPipeline(BpoConfig()), ctx_of(llm), tmp_path, [it], show_progress=False)
    assert "[Context]\nCats sleep a lot." in llm.calls[0][0][0][0].content
    (row,) = read_jsonl(tmp_path / "sft.jsonl")
    assert "Cats sleep a lot." in row["messages"][0]["content"] and "Cats sleep a lot." in row["messages"][1]["content"]


# --------------------------------------------------------------------------- bpo_rewrite


def test_rewrite_uses_the_training_format_and_writes_rewrites(tmp_path):
    rewriter = ScriptedLLM(lambda msgs, p, i: '  "How can I bake bread at home, step by step?"  ', model="rewriter")
    its = [pair_item(0, category="cooking")]
    m = run_pipeline(BpoRewritePipeline(BpoRewriteConfig()), ctx_of(rewriter), tmp_path, its, show_progress=False)
    (req,) = rewriter.calls[0][0]
    assert req == rewriter_messages("en", "How do I bake bread at home?")  # == the user turn of a bpo training row
    params = rewriter.calls[0][1][0]
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.6, 0.9, 1024)
    (row,) = read_jsonl(tmp_path / "rewrites.jsonl")
    assert row["rewritten"] == "How can I bake bread at home, step by step?"
    assert row["original"] == [{"role": "user", "content": "How do I bake bread at home?"}]
    assert row["prompt"] == [{"role": "user", "content": "How can I bake bread at home, step by step?"}]
    assert row["category"] == "cooking" and row["safety"] is False and m["outputs"] == {"rewrites": 1}


def test_rewrite_safety_mode_and_respond(tmp_path):
    def fn(msgs, p, i):
        text = msgs[-1].content
        if "working on AI safety" in text:
            if "poison" in text:
                return (
                    "Detailed Comparison Result: asks for harm.\n"
                    "Optimized Instruction: How can I keep my neighbour's dog safe from accidental poisoning? [END]"
                )
            return "Sure, here is how."  # answers instead of rewriting -> parse failure
        return "Keep chemicals locked away and call a vet if the dog seems unwell."

    llm = ScriptedLLM(fn)
    its = [
        SourceItem(id="u", prompt=messages(("user", "How do I poison my neighbour's dog?"))),
        SourceItem(id="v", prompt=messages(("user", "How do I bake bread?"))),
    ]
    m = run_pipeline(
        BpoRewritePipeline(BpoRewriteConfig(safety=True, respond=True)), ctx_of(llm), tmp_path, its, show_progress=False
    )
    (row,) = read_jsonl(tmp_path / "rewrites.jsonl")
    assert row["rewritten"].startswith("How can I keep") and row["response"].startswith("Keep chemicals")
    (sft,) = read_jsonl(tmp_path / "sft.jsonl")
    assert sft["messages"][0] == {
        "role": "user",
        "content": "How do I poison my neighbour's dog?",
    }  # the ORIGINAL prompt
    assert (
        sft["messages"][1]["content"].startswith("Keep chemicals")
        and sft["meta"]["rewritten_prompt"] == row["rewritten"]
    )
    assert m["parse_failures"] == {"bpo_rewrite": 1} and m["calls"] == {"bpo_respond": 1, "bpo_rewrite": 2}


def test_respond_with_its_own_target_backend(tmp_path):
    rewriter = ScriptedLLM(lambda msgs, p, i: "How can I bake bread at home, step by step?", model="rewriter")
    target = ScriptedLLM(lambda msgs, p, i: "Mix flour and water, knead, rise, bake.", model="black-box")
    cfg = BpoRewriteConfig(respond=True, target={"llm": {"kind": "openai"}, "model": {"name_or_path": "black-box"}})
    ctx = ctx_of(rewriter, **{"candidate/target": lambda: target})
    run_pipeline(BpoRewritePipeline(cfg), ctx, tmp_path, [pair_item(0)], show_progress=False)
    assert target.calls[0][0][0][-1].content == "How can I bake bread at home, step by step?"  # the rewritten prompt
    (sft,) = read_jsonl(tmp_path / "sft.jsonl")
    assert sft["provenance"]["generator_model"] == "black-box" and len(rewriter.calls) == 1


# --------------------------------------------------------------------------- real backends


def test_over_the_loopback_server(tmp_path):
    def responder(body):
        text = body["messages"][-1]["content"]
        assert body["temperature"] == 0.9
        if "case 1" in text:
            return "Just walk home. [END]"  # no marker: a parse failure
        return (
            "Detailed Comparison Result: the better one gives concrete advice.\nOptimized Instruction: What "
            "practical steps "
            "can I take to stay safe when walking home alone at night? [END]"
        )

    with LoopbackServer(responder=responder) as server:
        m = run_synth(tmp_path, "bpo", backend=loopback(server.url))
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    assert len(rows) == 2 and m["parse_failures"] == {"bpo_construct": 1}
    user_turn = rewriter_messages("en", "How can I stay safe when walking home at night, case 0?")[0].model_dump()
    assert rows[0]["messages"] == [
        user_turn,
        {
            "role": "assistant",
            "content": "What practical steps can I take to stay safe when walking home alone at night?",
        },
    ]
    check_outputs(tmp_path / "out", m)


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = run_synth(tmp_path, "bpo", "pipeline.sampling.max_new_tokens=8")
    check_outputs(tmp_path / "out", m)
    assert m["parse_failures"]["bpo_construct"] + m["truncated"].get("bpo_construct", 0) >= 3
    m = run_synth(
        tmp_path / "r",
        "bpo_rewrite",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.respond=true",
        "pipeline.response_sampling.max_new_tokens=8",
    )
    check_outputs(tmp_path / "r" / "out", m)
