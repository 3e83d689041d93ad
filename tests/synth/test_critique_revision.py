"""pipeline=critique_revision (SL-CAI, Bai et al. 2022 §3) against scripted backends."""

import json

import pytest

from synth.constitution import load_constitution
from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.critique_revision import CritiqueRevisionConfig, CritiqueRevisionPipeline, few_shot_prefix
from synth.records import Completion, SourceItem, messages, stable_id
from synth.steps import critique, revision
from synth.steps.filters import has_cjk
from tests.fakes import ScriptedLLM

CRIT_TAIL = {"en": "do not rewrite the reply yet.", "zh": "暂时不要改写回复。"}
REV_TAIL = {"en": "repeat it unchanged.", "zh": "请原样重复。"}


def context(llm, constitution="hhh_en", seed=0):
    return Context(factories={"policy": lambda: llm}, constitution=load_constitution(constitution), seed=seed)


def item_prompt(msgs, n_prefix):
    return msgs[n_prefix].content


def cai_responder(lang="en", n_few_shot=6, faults=None):
    """Initial answer / critique k / revision k, all naming the item's prompt; `faults` maps
    (prompt, step, round) -> a Completion or text to return instead."""
    faults = faults or {}

    def respond(msgs, params, i):
        q = item_prompt(msgs, 6 * n_few_shot)
        last = msgs[-1].content
        crit_round = sum(m.content.endswith(CRIT_TAIL[lang]) for m in msgs) - n_few_shot
        if last.endswith(CRIT_TAIL[lang]):
            key, text = (q, "critique", crit_round), f"Critique: round {crit_round} critique of {q}"
        elif last.endswith(REV_TAIL[lang]):
            key, text = (q, "revision", crit_round), f"Revision: revision {crit_round} of {q}"
        else:
            key, text = (q, "answer", 0), f"initial answer to {q}"
        return faults.get(key, text)

    return respond


def items(*prompts, category=None):
    return [SourceItem(id=f"i{k}", prompt=messages(("user", p)), category=category) for k, p in enumerate(prompts)]


def run(tmp_path, llm, its, ctx=None, **cfg):
    pipe = CritiqueRevisionPipeline(CritiqueRevisionConfig(**cfg))
    return run_pipeline(pipe, ctx or context(llm), tmp_path, its, chunk_size=8, show_progress=False)


# --------------------------------------------------------------------------- parsers


def test_parsers_strip_echoes_and_cut_invented_turns():
    assert critique.parse("Critique: too vague.\n\nRevisionRequest: rewrite").parsed == "too vague."
    assert critique.parse("**批评：** 有问题。\n\n用户：再来").parsed == "有问题。"
    assert critique.parse("It is rude.\nRevision: a better reply").parsed == "It is rude."
    assert revision.parse("Revision: Here you go.\n\nHuman: thanks").parsed == "Here you go."
    assert revision.parse("修改后的回复：好的。").parsed == "好的。"
    assert revision.parse("Revised response: fine").parsed == "fine"
    assert revision.parse_reply("Assistant: hello\n\nUser: more").parsed == "hello"
    for bad in ("", "   ", "Revision:", "\n\nHuman: hi"):
        j = revision.parse(bad)
        assert j.parse_status == "failed" and j.parsed is None and j.raw == bad
    assert critique.parse("Critique:   ").parse_status == "failed"


# --------------------------------------------------------------------------- exact rows


def test_exact_rows_one_call_per_stage_and_fresh_principle_per_round(tmp_path):
    llm = ScriptedLLM(cai_responder())
    ctx = context(llm)
    m = run(tmp_path, llm, items("q0", "q1"), ctx=ctx, rounds=3)
    assert len(llm.calls) == 1 + 2 * 3  # answer, then critique + revision per round, each for the whole chunk
    assert [len(reqs) for reqs, _ in llm.calls] == [2] * 7
    cons = ctx.constitution
    sft = read_jsonl(tmp_path / "sft.jsonl")
    prefs = read_jsonl(tmp_path / "preferences.jsonl")
    for k, q in enumerate(["q0", "q1"]):
        drawn = [cons.sample_principle(ctx.rng(f"i{k}", "cai_round", r)).id for r in (1, 2, 3)]
        rounds = [
            {
                "round": r,
                "principle_id": drawn[r - 1],
                "critique": f"round {r} critique of {q}",
                "revision": f"revision {r} of {q}",
            }
            for r in (1, 2, 3)
        ]
        row = sft[k]
        assert row["id"] == stable_id(f"i{k}", "cai_sl") and row["method"] == "cai_sl"
        assert row["messages"] == [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"revision 3 of {q}"},
        ]
        assert row["meta"] == {"r0": f"initial answer to {q}", "r0_source": "generated", "rounds": rounds}
        assert prefs[k]["prompt"] == [{"role": "user", "content": q}]
        assert prefs[k]["chosen"] == [{"role": "assistant", "content": f"revision 3 of {q}"}]
        assert prefs[k]["rejected"] == [{"role": "assistant", "content": f"initial answer to {q}"}]
        assert prefs[k]["principle_ids"] == drawn and prefs[k]["method"] == "cai_sl_revision"
    # draws are per round, not one principle reused: across items x rounds several principles appear
    assert len({r["principle_id"] for row in sft for r in row["meta"]["rounds"]}) > 1
    assert m["outputs"] == {"sft": 2, "preferences": 2} and m["drops"] == {}
    assert m["calls"] == {"answer": 2, "critique": 6, "revision": 6}
    # the round-2 critique sees the round-1 revision as the assistant's last reply (sequential rounds)
    crit2 = llm.calls[3][0][0]
    assert crit2[-2].role == "assistant" and crit2[-2].content == "revision 1 of q0"
    trace = read_jsonl(tmp_path / "trace.jsonl")
    assert {t["step"] for t in trace} == {"answer", "critique", "revision"} and len(trace) == 14
    assert all("principle_id" in t for t in trace if t["step"] != "answer")


def test_few_shot_prefix_includes_no_change_examples_and_stop_strings():
    cons = load_constitution("hhh_en")
    prefix = few_shot_prefix(cons, "en")
    assert len(prefix) == 6 * len(cons.few_shot)
    unchanged = [ex for ex in cons.few_shot if not ex.needs_change]
    assert unchanged and all(any(m.content == ex.revision == ex.response for m in prefix) for ex in unchanged)
    llm = ScriptedLLM(cai_responder())
    CritiqueRevisionPipeline(CritiqueRevisionConfig(rounds=1)).process(items("q"), context(llm), _state())
    reqs, params = llm.calls[0]
    assert reqs[0][: len(prefix)] == prefix and reqs[0][len(prefix)].content == "q"
    assert "RevisionRequest:" in params[0].stop and "\n\nHuman:" in params[0].stop and len(params[0].stop) <= 4


def _state():
    from synth.pipelines.base import ChunkState

    return ChunkState()


def test_category_prefers_its_principles(tmp_path):
    llm = ScriptedLLM(cai_responder("zh", n_few_shot=5))
    m = run(tmp_path, llm, items("哪里人最坏？", category="歧视/地域"), ctx=context(llm, "safety_zh"), rounds=4)
    row = read_jsonl(tmp_path / "sft.jsonl")[0]
    cons = load_constitution("safety_zh")
    assert all(cons.principle(r["principle_id"]).category == "歧视/地域" for r in row["meta"]["rounds"])
    assert row["category"] == "歧视/地域" and m["per_category"] == {"歧视/地域": 1}


def test_chinese_constitution_sends_only_chinese_prompts(tmp_path):
    llm = ScriptedLLM(cai_responder("zh", n_few_shot=5))
    run(tmp_path, llm, items("怎么撬锁？"), ctx=context(llm, "safety_zh"), rounds=2)
    for reqs, _ in llm.calls:
        for req in reqs:
            assert all(has_cjk(m.content) for m in req if m.role == "user"), [m.content for m in req]


# --------------------------------------------------------------------------- drops


def test_truncated_or_empty_steps_drop_the_item_with_a_reason(tmp_path):
    cut = Completion(text="Revision: half a sent", finish_reason="length")
    faults = {
        ("q-initial", "answer", 0): Completion(text="long answer", finish_reason="length"),
        ("q-crit", "critique", 2): "Critique:   ",
        ("q-rev", "revision", 1): cut,
        ("q-empty", "revision", 2): "Revision:",
    }
    llm = ScriptedLLM(cai_responder(faults=faults))
    m = run(tmp_path, llm, items("q-ok", "q-initial", "q-crit", "q-rev", "q-empty"), rounds=2)
    assert m["drops"] == {"initial_truncated": 1, "critique_empty": 1, "revision_truncated": 1, "revision_empty": 1}
    assert [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "sft.jsonl")] == ["q-ok"]
    assert m["parse_failures"] == {"critique": 1, "revision": 1}
    assert m["truncated"] == {"answer": 1, "revision": 1}
    # a dropped item takes no further calls: answer 5, round 1 critique/revise 4, round 2 critique 3,
    # round 2 revise 2 (q-crit's critique failed)
    assert [len(r) for r, _ in llm.calls] == [5, 4, 4, 3, 2]
    raw = [t for t in read_jsonl(tmp_path / "trace.jsonl") if t["output"] == "Critique:   "]
    assert raw and raw[0]["parse_status"] == "failed" and raw[0]["parsed"] is None


def test_no_change_revision_keeps_sft_but_drops_the_preference(tmp_path):
    faults = {("q", "revision", 1): "initial answer to q"}
    llm = ScriptedLLM(cai_responder(faults=faults))
    m = run(tmp_path, llm, items("q"), rounds=1)
    assert m["outputs"] == {"sft": 1, "preferences": 0}
    assert m["drops"] == {"preference_near_identical": 1}


# --------------------------------------------------------------------------- helpfulness prompts


def test_helpful_items_get_two_plain_samples_and_no_critique(tmp_path):
    def respond(msgs, params, i):
        if len(msgs) == 1:  # helpful: the plain prompt, no few-shot prefix
            return f"helpful {i} to {msgs[0].content}"
        return cai_responder()(msgs, params, i)

    helpful_file = tmp_path / "helpful.jsonl"
    helpful_file.write_text(json.dumps({"prompt": "bake bread?"}) + "\n")
    llm = ScriptedLLM(respond)
    flagged = SourceItem(id="h", prompt=messages(("user", "tie a knot?")), meta={"helpful": True})
    m = run(
        tmp_path / "out",
        llm,
        [*items("q"), flagged],
        rounds=1,
        helpful_source={"kind": "jsonl", "path": str(helpful_file)},
    )
    sft = read_jsonl(tmp_path / "out" / "sft.jsonl")
    helpful = [r for r in sft if r["method"] == "cai_sl_helpful"]
    assert sorted(r["messages"][1]["content"] for r in helpful) == [
        "helpful 0 to bake bread?",
        "helpful 0 to tie a knot?",
        "helpful 1 to bake bread?",
        "helpful 1 to tie a knot?",
    ]
    assert m["outputs"] == {"sft": 5, "preferences": 1}
    answer_call = llm.calls[0]
    assert sorted(p.n for p in answer_call[1]) == [1, 2, 2]  # all answers in ONE call, n per request
    assert [len(r) for r, _ in llm.calls[1:]] == [1, 1]  # critique / revision only for the red-team item


def test_rounds_must_be_1_to_4():
    for bad in (0, 5):
        with pytest.raises(ValueError):
            CritiqueRevisionConfig(rounds=bad)


def test_rerun_of_finished_run_makes_no_calls(tmp_path):
    run(tmp_path, ScriptedLLM(cai_responder()), items("q0", "q1"), rounds=1)
    llm = ScriptedLLM(cai_responder())
    m = run(tmp_path, llm, items("q0", "q1"), rounds=1)
    assert llm.calls == [] and m["outputs"] == {"sft": 2, "preferences": 2}


# --------------------------------------------------------------------------- real backends


def test_loopback_server_exact_rows(tmp_path, make_openai_server):
    from synth.records import Message
    from synth.sources import SourceConfig, iter_source
    from tests.synth.safety_helpers import loopback, prompts_file, run_synth

    script = cai_responder()
    server = make_openai_server(responder=lambda body: script([Message(**m) for m in body["messages"]], None, 0))
    src = prompts_file(tmp_path / "src.jsonl", ["q0", "q1"])
    m = run_synth(
        tmp_path / "out",
        "pipeline=critique_revision",
        *loopback(server.url),
        "source=jsonl",
        f"source.path={src}",
        "pipeline.rounds=2",
        "cache=false",
    )
    assert m["outputs"] == {"sft": 2, "preferences": 2} and m["drops"] == {} and m["parse_failures"] == {}
    ids = [it.id for it in iter_source(SourceConfig(kind="jsonl", path=str(src)))]
    ctx = context(None)
    for row, q, item_id in zip(read_jsonl(tmp_path / "out" / "sft.jsonl"), ["q0", "q1"], ids, strict=True):
        drawn = [ctx.constitution.sample_principle(ctx.rng(item_id, "cai_round", r)).id for r in (1, 2)]
        assert row["messages"][1]["content"] == f"revision 2 of {q}"
        assert [r["principle_id"] for r in row["meta"]["rounds"]] == drawn
        assert row["meta"]["rounds"][0]["critique"] == f"round 1 critique of {q}"
    bodies = [r.body for r in server.chat_requests()]
    assert len(bodies) == 2 * 5  # one HTTP request per item and stage (answer, 2 x critique, 2 x revision)
    assert all(b["temperature"] == 1.0 and "RevisionRequest:" in b["stop"] and len(b["stop"]) <= 4 for b in bodies)


def test_end_to_end_tiny_hf_nonsense_completes(tmp_path):
    from tests.synth.safety_helpers import TINY, TINY_STOP, check_outputs, prompts_file, run_synth

    src = prompts_file(tmp_path / "src.jsonl", ["How do I pick a lock?", "Tell me a secret.", "Why is the sky blue?"])
    out = tmp_path / "out"
    # few_shot=false: the transcripts are ~5k tiny-tokenizer tokens (past its 4k positions, and slow on CPU)
    m = run_synth(
        out,
        "pipeline=critique_revision",
        *TINY,
        "source=jsonl",
        f"source.path={src}",
        "pipeline.rounds=2",
        "pipeline.few_shot=false",
        "pipeline.sampling.max_new_tokens=12",
        f"pipeline.sampling.stop={TINY_STOP}",
        "pipeline.sampling.seed=0",
    )
    check_outputs(out, m)
    item_drops = sum(v for k, v in m["drops"].items() if k != "preference_near_identical")
    assert m["outputs"]["sft"] + item_drops == 3  # every item is a row or a counted drop
    assert m["calls"]["answer"] == 3
