"""pipeline=ai_feedback (RL-CAI, arXiv 2212.08073 §4.1; RLAIF, arXiv 2309.00267 §2.1) against scripted backends."""

import math
import re

import pytest

from synth.constitution import load_constitution
from synth.io import read_jsonl
from synth.pipelines.ai_feedback import AIFeedbackConfig, AIFeedbackPipeline
from synth.pipelines.base import Context, run_pipeline
from synth.records import Completion, SourceItem, TokenLogprob, messages, stable_id
from synth.steps import compare
from synth.steps.filters import has_cjk
from tests.fakes import ScriptedLLM

OPTIONS = re.compile(r"\(A\) (.*)\n\(B\) (.*)\Z", re.DOTALL)


def context(llm, constitution="hhh_en"):
    return Context(
        factories={"policy": lambda: llm, "judge": lambda: llm}, constitution=load_constitution(constitution)
    )


def lp(p_a: float, extra=None) -> Completion:
    """A one-token completion whose top log-probs give p(A) = p_a (tokens written the awkward ways)."""
    top = {" A": math.log(p_a), "(B": math.log(1 - p_a), "The": math.log(0.001), **(extra or {})}
    return Completion(
        text="A", finish_reason="length", logprobs=[TokenLogprob(token=" A", logprob=math.log(p_a), top=top)]
    )


def slots(msgs):
    return OPTIONS.search(msgs[0].content).groups()


def responder(judge, policy=("harmful reply", "safe reply")):
    """Policy: sample i is policy[i] + prompt; judge: `judge(a_text, b_text, msgs, params, i)`."""

    def respond(msgs, params, i):
        if msgs[-1].role == "assistant":
            a, b = slots(msgs)
            return judge(a, b, msgs, params, i)
        return f"{policy[i]} to {msgs[-1].content}"

    return respond


def prefers_safe(strength=0.9):
    return lambda a, b, *_: lp(strength if a.startswith("safe") else 1 - strength)


def always_slot_a(a, b, *_):
    return lp(0.8)


def items(*prompts):
    return [SourceItem(id=f"i{k}", prompt=messages(("user", p))) for k, p in enumerate(prompts)]


def run(tmp_path, llm, its, ctx=None, **cfg):
    pipe = AIFeedbackPipeline(AIFeedbackConfig(**cfg))
    return run_pipeline(pipe, ctx or context(llm), tmp_path, its, chunk_size=8, show_progress=False)


# --------------------------------------------------------------------------- pure parts


def test_option_logprobs_match_tokenisation_variants():
    got = compare.option_logprobs({" A": -1.0, "A": -1.0, "(B": -2.0, "B)": -3.0, "The": -0.1, "a": -0.5, "AB": -0.2})
    assert got["A"] == pytest.approx(-1.0 + math.log(2))
    assert got["B"] == pytest.approx(math.log(math.exp(-2.0) + math.exp(-3.0)))
    assert set(got) == {"A", "B"}


def test_parse_logprobs_failure_bound_and_value():
    j = compare.parse_logprobs(lp(0.75))
    assert j.ok and j.parsed["p_a"] == pytest.approx(0.75) and not j.parsed["bounded"]
    neither = Completion(text="The", logprobs=[TokenLogprob(token="The", logprob=-0.1, top={"The": -0.1, "I": -2.0})])
    j = compare.parse_logprobs(neither)
    assert j.parse_status == "failed" and j.parsed is None and "neither option" in j.error  # not 50/50
    assert compare.parse_logprobs(Completion(text="A")).parse_status == "failed"  # no logprobs at all
    only_a = Completion(text="A", logprobs=[TokenLogprob(token="A", logprob=-0.1, top={"A": -0.1, "x": -3.0})])
    j = compare.parse_logprobs(only_a)  # B gets the smallest listed log-prob: an upper bound
    assert j.parsed["bounded"] and j.parsed["p_a"] == pytest.approx(1 / (1 + math.exp(-3.0 + 0.1)))


@pytest.mark.parametrize(
    "text,want",
    [
        ("A) the first", "A"),
        (" (B)", "B"),
        ("B", "B"),
        ("I think so. The answer is: (A)", "A"),
        ("答案是：(B)", "B"),
        ("Both are bad", None),
        ("", None),
        ("AB", None),
    ],
)
def test_parse_vote(text, want):
    assert compare.parse_vote(text).parsed == want


def test_parse_reasoning_cuts_the_answer_it_already_wrote():
    assert compare.parse_reasoning(" (B) refuses.\nSo the answer is: (B)").parsed == "(B) refuses."
    assert compare.parse_reasoning("答案是 (A)").parse_status == "failed"


def test_combine_averages_orders_and_skips_half_failed_principles():
    label = compare.combine([(0.8, 0.6), (0.6, None), (0.4, 0.7)])
    assert label.p_order1 == pytest.approx(0.6) and label.p_order2 == pytest.approx(0.65)
    assert label.p == pytest.approx(0.625) and label.orders_agree is True and label.principles_used == 2
    assert compare.combine([(0.8, 0.3)]).orders_agree is False  # order 2 prefers y2: no agreement
    assert compare.combine([(0.5, 0.9)]).orders_agree is False  # an exact tie in one order is no agreement
    assert compare.combine([(None, 0.9)]).p is None
    assert compare.clamp(0.99) == 0.6 and compare.clamp(0.01) == 0.4 and compare.clamp(0.55) == 0.55


# --------------------------------------------------------------------------- exact rows


def test_exact_rows_both_orders_in_one_call(tmp_path):
    llm = ScriptedLLM(responder(prefers_safe(0.9)))
    ctx = context(llm)
    m = run(tmp_path, llm, items("q0", "q1"), ctx=ctx)
    assert len(llm.calls) == 2  # policy n=2 for the chunk; judge both orders of both items
    reqs, params = llm.calls[1]
    assert len(reqs) == 4 and all(p.logprobs and p.top_logprobs == 20 and p.max_new_tokens == 1 for p in params)
    assert [slots(r) for r in reqs[:2]] == [
        ("harmful reply to q0", "safe reply to q0"),
        ("safe reply to q0", "harmful reply to q0"),
    ]
    assert reqs[0][-1].role == "assistant" and reqs[0][-1].content == "The answer is: ("
    cons = ctx.constitution
    prefs, soft = read_jsonl(tmp_path / "preferences.jsonl"), read_jsonl(tmp_path / "soft_labels.jsonl")
    for k, q in enumerate(["q0", "q1"]):
        pid = ctx.rng(f"i{k}", "ai_feedback").sample(cons.judge_principles(), 1)[0].id
        y1, y2 = f"harmful reply to {q}", f"safe reply to {q}"
        assert soft[k] == {
            "id": stable_id(f"i{k}", "ai_feedback", y1, y2),
            "prompt": [{"role": "user", "content": q}],
            "response_a": y1,
            "response_b": y2,
            "p_a": pytest.approx(0.1),
            "p_a_order1": pytest.approx(0.1),
            "p_a_order2": pytest.approx(0.1),
            "orders_agree": True,
            "principle_ids": [pid],
            "per_principle": [
                {"principle_id": pid, "p_a_order1": pytest.approx(0.1), "p_a_order2": pytest.approx(0.1)}
            ],
            "cot": None,
            "clamped": False,
            "label_model": "fake-model",
            "parse_ok": True,
            "responses": "policy",
            "category": None,
            "hard_label": True,
        }
        assert prefs[k]["chosen"] == [{"role": "assistant", "content": y2}]
        assert prefs[k]["rejected"] == [{"role": "assistant", "content": y1}]
        assert prefs[k]["p_chosen"] == pytest.approx(0.9) and prefs[k]["principle_ids"] == [pid]
        assert prefs[k]["meta"]["p_chosen_order1"] == pytest.approx(0.9)
    assert m["outputs"] == {"preferences": 2, "soft_labels": 2} and m["drops"] == {}
    assert m["judge_health"]["orders_agree_rate"] == 1.0 and m["judge_health"]["mean_p_slot_a"] == pytest.approx(0.5)
    assert m["judge_health"]["chosen_longer_rate"] == 0.0  # "safe reply" is shorter than "harmful reply"
    trace = [t for t in read_jsonl(tmp_path / "trace.jsonl") if t["step"] == "compare"]
    assert sorted(t["order"] for t in trace) == [1, 1, 2, 2] and all(t["principle_id"] for t in trace)


def test_judge_that_always_picks_slot_a_yields_no_hard_labels(tmp_path):
    llm = ScriptedLLM(responder(always_slot_a))
    m = run(tmp_path, llm, items("q0", "q1", "q2"))
    assert m["outputs"] == {"preferences": 0, "soft_labels": 3}
    assert m["drops"] == {"orders_disagree": 3}
    for row in read_jsonl(tmp_path / "soft_labels.jsonl"):
        assert row["p_a"] == pytest.approx(0.5) and row["orders_agree"] is False and not row["hard_label"]
        assert row["p_a_order1"] == pytest.approx(0.8) and row["p_a_order2"] == pytest.approx(0.2)
    assert m["judge_health"]["mean_p_slot_a"] == pytest.approx(0.8) and m["judge_health"]["hard_labels"] == 0


def test_weak_agreeing_label_stays_soft(tmp_path):
    m = run(tmp_path, ScriptedLLM(responder(prefers_safe(0.52))), items("q"), band=0.05)
    assert m["outputs"] == {"preferences": 0, "soft_labels": 1} and m["drops"] == {"label_within_band": 1}


def test_neither_option_in_top_k_is_a_parse_failure_not_a_tie(tmp_path):
    junk = Completion(text="I", logprobs=[TokenLogprob(token="I", logprob=-0.1, top={"I": -0.1, "Well": -1.0})])
    m = run(tmp_path, ScriptedLLM(responder(lambda *a: junk)), items("q"), label="logprobs")
    assert m["drops"] == {"label_parse_failed": 1} and m["parse_failures"] == {"compare": 2}
    row = read_jsonl(tmp_path / "soft_labels.jsonl")[0]
    assert row["parse_ok"] is False and row["p_a"] is None and row["p_a_order1"] is None
    assert read_jsonl(tmp_path / "preferences.jsonl") == []


def test_cot_two_steps_and_clamp(tmp_path):
    def judge(a, b, msgs, params, i):
        stem = msgs[-1].content
        if stem.endswith("step by step:"):
            return "The safe one declines. So the answer is: (A)"
        assert "The safe one declines.\n\nSo the answer is: (" in stem
        return lp(0.99 if a.startswith("safe") else 0.01)

    llm = ScriptedLLM(responder(judge))
    m = run(tmp_path, llm, items("q"), cot=True)
    assert [len(r) for r, _ in llm.calls] == [1, 2, 2]  # respond, reasoning (both orders), answer stem
    assert llm.calls[1][1][0].temperature == 0.0  # greedy rationale (RLAIF's CoT)
    row = read_jsonl(tmp_path / "soft_labels.jsonl")[0]
    assert row["p_a_order1"] == pytest.approx(0.4) and row["p_a_order2"] == pytest.approx(0.4)
    assert row["clamped"] is True and row["cot"] == ["The safe one declines."] * 2
    assert read_jsonl(tmp_path / "preferences.jsonl")[0]["p_chosen"] == pytest.approx(0.6)
    assert m["outputs"]["preferences"] == 1


def test_votes_mode_counts_sampled_answers_and_parse_failures(tmp_path):
    def judge(a, b, msgs, params, i):
        safe = "A" if a.startswith("safe") else "B"
        other = "B" if safe == "A" else "A"
        return [f"{safe})", f" {safe}", f"{other})", "hmm"][i]

    llm = ScriptedLLM(responder(judge))
    m = run(tmp_path, llm, items("q"), label="votes", votes=4)
    assert [p.n for p in llm.calls[1][1]] == [4, 4]
    row = read_jsonl(tmp_path / "soft_labels.jsonl")[0]
    assert row["p_a"] == pytest.approx(1 / 3)  # y1 is the harmful reply: 1 of 3 parsed votes per order
    assert m["parse_failures"] == {"compare_vote": 2} and m["outputs"]["preferences"] == 1


def test_auto_falls_back_to_votes_when_backend_gives_no_logprobs(tmp_path):
    def judge(a, b, msgs, params, i):
        return "A" if a.startswith("safe") else "B"  # plain text, never logprobs

    llm = ScriptedLLM(responder(judge))
    m = run(tmp_path, llm, items("q"), label="auto", votes=3)
    assert [len(r) for r, _ in llm.calls] == [1, 2, 2] and llm.calls[2][1][0].n == 3
    assert read_jsonl(tmp_path / "soft_labels.jsonl")[0]["p_a"] == pytest.approx(0.0)
    assert m["outputs"]["preferences"] == 1


def test_source_pairs_and_alignment(tmp_path):
    its = [
        SourceItem(
            id=f"s{k}",
            prompt=messages(("user", f"q{k}")),
            chosen=messages(("assistant", f"safe {k}")),
            rejected=messages(("assistant", f"harmful {k}")),
        )
        for k in range(2)
    ]
    its.append(SourceItem(id="nopair", prompt=messages(("user", "q"))))
    llm = ScriptedLLM(responder(prefers_safe(0.8)))
    m = run(tmp_path, llm, its, responses="source")
    assert len(llm.calls) == 1  # no policy call
    assert m["drops"] == {"no_source_pair": 1} and m["judge_health"]["source_alignment"] == 1.0
    assert [r["chosen"][0]["content"] for r in read_jsonl(tmp_path / "preferences.jsonl")] == ["safe 0", "safe 1"]


def test_ensemble_of_principles_is_averaged(tmp_path):
    strengths = iter([0.9, 0.9, 0.7, 0.7, 0.8, 0.8])

    def judge(a, b, *_):
        s = next(strengths)
        return lp(s if a.startswith("safe") else 1 - s)

    llm = ScriptedLLM(responder(judge))
    run(tmp_path, llm, items("q"), principles_per_pair=3)
    assert len(llm.calls[1][0]) == 6
    row = read_jsonl(tmp_path / "soft_labels.jsonl")[0]
    assert len(set(row["principle_ids"])) == 3
    assert row["p_a"] == pytest.approx(1 - 0.8)  # mean of 0.9, 0.7, 0.8 for the safe reply (y2)


def test_identical_policy_samples_and_truncated_ones_are_not_compared(tmp_path):
    def policy(msgs, params, i):
        q = msgs[-1].content
        if q == "same":
            return "one answer"
        if q == "cut" and i == 1:
            return Completion(text="half", finish_reason="length")
        return f"answer {i}"

    llm = ScriptedLLM(
        lambda msgs, p, i: always_slot_a(None, None) if msgs[-1].role == "assistant" else policy(msgs, p, i)
    )
    m = run(tmp_path, llm, items("same", "cut", "fine"))
    assert m["drops"] == {"responses_near_identical": 1, "response_truncated": 1, "orders_disagree": 1}


def test_chinese_constitution_sends_chinese_prompts(tmp_path):
    llm = ScriptedLLM(responder(prefers_safe(0.9), policy=("有害回复", "安全回复")))
    run(tmp_path, llm, items("怎么撬锁？"), ctx=context(llm, "safety_zh"), cot=True)
    for reqs, _ in llm.calls:
        for req in reqs:
            assert all(has_cjk(m.content) for m in req), [m.content for m in req]
    stems = {r[-1].content for reqs, _ in llm.calls[1:] for r in reqs}
    assert "让我们一步一步地思考：" in stems


def test_config_rejects_bad_clamp_and_unknown_keys():
    with pytest.raises(ValueError):
        AIFeedbackConfig(cot_clamp=(0.6, 0.4))
    with pytest.raises(ValueError):
        AIFeedbackConfig(tie_band=0.1)


# --------------------------------------------------------------------------- real backends


def _http_responder(judge_p_a):
    """Loopback responder: policy replies by sample; at the stem, OpenAI-shaped top log-probs with the
    option tokens written as " A" and "(B" (the tokenisation variants the parser must merge)."""

    def respond(body):
        msgs = body["messages"]
        if msgs[-1]["role"] != "assistant":
            q = msgs[-1]["content"]
            return [f"harmful reply to {q}", f"safe reply to {q}"]
        a, b = OPTIONS.search(msgs[0]["content"]).groups()
        p_a = judge_p_a(a, b)
        top = [
            {"token": " A", "logprob": math.log(p_a)},
            {"token": "(B", "logprob": math.log(1 - p_a)},
            {"token": "The", "logprob": math.log(0.001)},
        ]
        return {"text": "A", "logprobs": {"content": [{"token": " A", "logprob": math.log(p_a), "top_logprobs": top}]}}

    return respond


def test_loopback_server_both_orders_and_slot_a_judge(tmp_path, make_openai_server):
    from tests.synth.safety_helpers import loopback, prompts_file, run_synth

    src = prompts_file(tmp_path / "src.jsonl", ["q0", "q1"])
    fair = make_openai_server(responder=_http_responder(lambda a, b: 0.9 if a.startswith("safe") else 0.1))
    m = run_synth(
        tmp_path / "fair",
        "pipeline=ai_feedback",
        *loopback(fair.url),
        "source=jsonl",
        f"source.path={src}",
        "cache=false",
    )
    prefs = read_jsonl(tmp_path / "fair" / "preferences.jsonl")
    assert [p["chosen"][0]["content"] for p in prefs] == ["safe reply to q0", "safe reply to q1"]
    assert all(p["p_chosen"] == pytest.approx(0.9) for p in prefs) and m["drops"] == {}
    stems = [r.body for r in fair.chat_requests() if r.body["messages"][-1]["role"] == "assistant"]
    assert len(stems) == 4 and all(b["logprobs"] and b["top_logprobs"] == 20 and b["max_tokens"] == 1 for b in stems)
    assert all(b["messages"][-1]["content"] == "The answer is: (" and b.get("continue_final_message") for b in stems)
    policy = [r.body for r in fair.chat_requests() if r.body["messages"][-1]["role"] == "user"]
    assert len(policy) == 2 and all(b["n"] == 2 for b in policy)

    biased = make_openai_server(responder=_http_responder(lambda a, b: 0.8))
    m = run_synth(
        tmp_path / "biased",
        "pipeline=ai_feedback",
        *loopback(biased.url),
        "source=jsonl",
        f"source.path={src}",
        "cache=false",
    )
    assert m["outputs"] == {"preferences": 0, "soft_labels": 2} and m["drops"] == {"orders_disagree": 2}


def test_end_to_end_tiny_hf_nonsense_completes(tmp_path):
    from tests.synth.safety_helpers import TINY, TINY_STOP, check_outputs, prompts_file, run_synth

    src = prompts_file(tmp_path / "src.jsonl", ["How do I pick a lock?", "Tell me a secret.", "Why is the sky blue?"])
    common = (
        "pipeline=ai_feedback",
        *TINY,
        "source=jsonl",
        f"source.path={src}",
        "pipeline.sampling.max_new_tokens=12",
        f"pipeline.sampling.stop={TINY_STOP}",
        "pipeline.sampling.seed=0",
    )
    # greedy reasoning on the tiny model repeats one token to the limit: sample it so it can stop
    cot = (
        "pipeline.cot=true",
        "pipeline.cot_sampling.max_new_tokens=40",
        f"pipeline.cot_sampling.stop={TINY_STOP}",
        "pipeline.cot_sampling.temperature=1.0",
        "pipeline.cot_sampling.seed=0",
    )
    for name, extra in [("plain", ()), ("cot", cot)]:
        out = tmp_path / name
        m = run_synth(out, *common, *extra)
        check_outputs(out, m)
        assert m["calls"]["compare"] > 0  # the stem was scored through the hf backend's top log-probs
        soft = read_jsonl(out / "soft_labels.jsonl")
        assert len(soft) + sum(v for k, v in m["drops"].items() if k.startswith("response")) == 3
        for row in soft:  # a label is a probability or an honest failure, never a default
            assert (row["p_a"] is None) == (not row["parse_ok"])
            assert row["p_a"] is None or (name == "plain" or 0.4 <= row["p_a"] <= 0.6)
