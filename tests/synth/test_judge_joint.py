"""`pipeline=judge pipeline.mode=joint`: DOVE joint preferences over two (instruction, response) pairs."""

import pytest

from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.judge import JudgeConfig, JudgePipeline
from synth.records import JointPreferenceRecord, SourceItem, messages
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth


def items(n=4):
    return [
        SourceItem(
            id=f"x{i}",
            prompt=messages(("user", f"Request number {i}: how do I fix a bike?")),
            chosen=messages(("assistant", f"{'good' if i % 2 else 'poor'} answer {i}")),
            rejected=messages(("assistant", f"other answer {i}")),
            category=f"c{i}",
        )
        for i in range(n)
    ]


def exchanges(text):
    a = text.split("[Exchange A: reply]\n")[1].split("\n[End of exchange A]")[0]
    b = text.split("[Exchange B: reply]\n")[1].split("\n[End of exchange B]")[0]
    return a, b


def fair(msgs, p, i):
    a, b = exchanges(msgs[-1].content)
    if a.startswith("good") == b.startswith("good"):
        return "Both are alike.\n[[C]]"
    return f"Compared.\n[[{'A' if a.startswith('good') else 'B'}]]"


def run(tmp_path, fn=fair, cfg=None, its=None):
    llm = ScriptedLLM(fn, model="judge-m")
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm}, seed=3)
    m = run_pipeline(
        JudgePipeline(JudgeConfig(**{"mode": "joint", **(cfg or {})})),
        ctx,
        tmp_path,
        its or items(),
        show_progress=False,
    )
    return m, read_jsonl(tmp_path / "joint_preferences.jsonl"), llm


def test_joint_rows_shape_and_labels(tmp_path):
    m, rows, llm = run(tmp_path, its=items(6))
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 3 * 2  # 3 pairs of items, both orders, one call
    firsts = [exchanges(req[0].content) for req in llm.calls[0][0]]
    assert firsts[1] == firsts[0][::-1]  # the second request swaps the two exchanges
    for r in rows:
        JointPreferenceRecord.model_validate(r)
        assert set(r) >= {"prompt_a", "response_a", "prompt_b", "response_b", "label"}
        winner, loser = ("a", "b") if r["label"] == "a" else ("b", "a")
        assert r[f"response_{winner}"][0]["content"].startswith("good")
        assert r[f"response_{loser}"][0]["content"].startswith("poor")
        assert r["prompt_a"] != r["prompt_b"] and r["p_a"] is None and r["method"] == "judge_joint"
        n = int(r["meta"]["item_a"][1:])
        assert r["prompt_a"][0]["content"].startswith(f"Request number {n}:") and r["category_a"] == f"c{n}"
    items_seen = [x for b in read_jsonl(tmp_path / "battles.jsonl") for x in (b["model_a"], b["model_b"])]
    assert sorted(items_seen) == [f"x{i}" for i in range(6)]  # every item in exactly one pair
    ties = m["dropped_parts"].get("joint_pair", {}).get("pair_tie", 0)
    assert len(rows) + ties == 3 and m["outputs"] == {"joint_preferences": len(rows), "battles": 3}
    rep = m["judge"]
    assert rep["mode"] == "joint" and rep["swap_consistency"] == 1.0 and rep["position_bias"]["slot_a_win_rate"] == 0.5


def test_pairing_is_seeded_and_odd_items_counted(tmp_path):
    _, rows1, _ = run(tmp_path / "a", its=items(5))
    m, rows2, _ = run(tmp_path / "b", its=items(5))
    assert rows1 == rows2 and m["drops"] == {"joint_no_partner": 1}


def test_position_biased_judge_gives_no_rows(tmp_path):
    m, rows, _ = run(tmp_path, fn=lambda msgs, p, i: "[[A]]")
    assert rows == [] and m["dropped_parts"] == {"joint_pair": {"pair_tie": 2}}
    assert m["judge"]["swap_consistency"] == 0.0 and m["judge"]["position_bias"]["slot_a_win_rate"] == 1.0


def test_response_index_and_rerun(tmp_path):
    m, rows, _ = run(tmp_path, cfg={"joint": {"response_index": 1}}, fn=lambda msgs, p, i: "[[B]]")
    assert rows == []  # always slot B: position bias, ties only
    m, rows, llm = run(
        tmp_path / "r",
        cfg={"joint": {"response_index": 1}},
        fn=lambda msgs, p, i: "[[A]]" if exchanges(msgs[-1].content)[0].endswith(("1", "3")) else "[[B]]",
    )
    assert rows and all(r[f"response_{r['label']}"][0]["content"].startswith("other answer") for r in rows)
    m, rows2, llm = run(tmp_path / "r", cfg={"joint": {"response_index": 1}}, fn=lambda msgs, p, i: 1 / 0)
    assert llm.calls == [] and rows2 == rows
    m, _, _ = run(tmp_path / "missing", cfg={"joint": {"response_index": 2}})
    assert m["drops"] == {"joint_no_response": 4}


def test_over_the_loopback_server(tmp_path):
    with LoopbackServer(
        responder=lambda body: fair([type("M", (), {"content": body["messages"][-1]["content"]})], None, 0)
    ) as server:
        m = run_synth(tmp_path, "judge", "pipeline.mode=joint", backend=loopback(server.url), n=4)
    check_outputs(tmp_path / "out", m)
    rows = read_jsonl(tmp_path / "out" / "joint_preferences.jsonl")
    # every reply in that file is the same text: the judge calls each pair a tie, and ties are not written
    assert m["parse_failures"] == {} and m["outputs"]["battles"] == 2 and rows == []
    assert m["dropped_parts"] == {"joint_pair": {"pair_tie": 2}}


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = run_synth(tmp_path, "judge", "pipeline.mode=joint", "pipeline.judge_sampling.max_new_tokens=24", n=4)
    check_outputs(tmp_path / "out", m)
    assert m["outputs"]["battles"] + m["dropped_parts"].get("joint_pair", {}).get("pair_unresolved", 0) == 2
    assert m["parse_failures"] == {}  # the [[A]]/[[B]]/[[C]] verdict is enforced by constrained decoding
    for r in read_jsonl(tmp_path / "out" / "joint_preferences.jsonl"):
        JointPreferenceRecord.model_validate(r)


def test_logprob_verdicts_give_soft_labels(tmp_path):
    import math

    from synth.records import Completion, TokenLogprob

    def judge(msgs, p, i):
        assert msgs[-1].role == "assistant" and msgs[-1].content == "[[" and p.max_new_tokens == 1 and p.logprobs
        a, _ = exchanges(msgs[0].content)
        p_slot_a = 0.8 if a.startswith("good") else 0.2  # a consistent judge: 0.8 for the good reply, either slot
        la, lb = math.log(p_slot_a), math.log(1 - p_slot_a)
        tok = "A" if la > lb else "B"
        return Completion(
            text=tok,
            finish_reason="length",
            logprobs=[TokenLogprob(token=tok, logprob=max(la, lb), top={"A": la, "B": lb})],
        )

    m, rows, _ = run(tmp_path, fn=judge, cfg={"pairwise": {"logprobs": True}})
    assert len(rows) == 2 and m["parse_failures"] == {}
    for r in rows:
        good_is_a = r["response_a"][0]["content"].startswith("good")
        assert r["label"] == ("a" if good_is_a else "b")
        assert r["p_a"] == pytest.approx(0.8 if good_is_a else 0.2)  # ½(0.8 + 0.8) or ½(0.2 + 0.2)


def test_chinese_constitution_joint_prompts_are_chinese(tmp_path):
    from synth.constitution import load_constitution
    from synth.steps.filters import has_cjk

    llm = ScriptedLLM(lambda msgs, p, i: "比较。\n[[A]]" if "[对话 A：回复]\n好" in msgs[-1].content else "[[B]]")
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm}, constitution=load_constitution("safety_zh"))
    its = [
        SourceItem(
            id=f"z{i}",
            prompt=messages(("user", f"问题 {i}")),
            chosen=messages(("assistant", "好的回答" if i else "差的回答")),
        )
        for i in range(2)
    ]
    run_pipeline(JudgePipeline(JudgeConfig(mode="joint")), ctx, tmp_path, its, show_progress=False)
    reqs = llm.calls[0][0]
    assert len(reqs) == 2 and all(has_cjk(r[0].content[:6]) and "Exchange" not in r[0].content for r in reqs)
    rows = read_jsonl(tmp_path / "joint_preferences.jsonl")
    assert len(rows) == 1 and rows[0][f"response_{rows[0]['label']}"][0]["content"] == "好的回答"
