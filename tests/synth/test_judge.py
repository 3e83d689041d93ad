"""`pipeline=judge`: parsing, the both-orders rule, listwise de-shuffling, rubric averaging, ratings."""

import json
import math

import pytest

from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.judge import JudgeConfig, JudgePipeline
from synth.records import Completion, SourceItem, TokenLogprob, messages
from synth.steps.judge import (
    combine_probs,
    parse_listwise,
    parse_pairwise,
    parse_rating,
    read_ab_logprobs,
)
from synth.steps.orders import combine_verdicts
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth


def pair_items(n=3, category=None):
    return [
        SourceItem(
            id=f"q{i}",
            prompt=messages(("user", f"question {i}")),
            chosen=messages(("assistant", f"good answer {i}")),
            rejected=messages(("assistant", f"bad answer {i}")),
            category=category,
        )
        for i in range(n)
    ]


def slots(text):
    """(reply A, reply B) from a rendered pairwise prompt."""
    a = text.split("[Reply A]\n")[1].split("\n[End of reply A]")[0]
    b = text.split("[Reply B]\n")[1].split("\n[End of reply B]")[0]
    return a, b


def fair_judge(msgs, params, i):
    a, b = slots(msgs[0].content)
    return "A is better. [[A]]" if a.startswith("good") else "B is better. [[B]]"


def run(tmp_path, cfg, items, judge, policy=None, **factories):
    policy = policy or ScriptedLLM(lambda m, p, i: "unused", model="policy-model")
    ctx = Context(factories={"policy": lambda: policy, "judge": lambda: judge, **factories})
    m = run_pipeline(JudgePipeline(JudgeConfig(**cfg)), ctx, tmp_path, items, show_progress=False)
    return m, {name: read_jsonl(tmp_path / f"{name}.jsonl") for name in ("preferences", "ranked", "battles")}


# --------------------------------------------------------------------------- parsers


def test_parse_pairwise_takes_last_verdict_and_fails_loudly():
    assert parse_pairwise("format is [[A]] or [[B]]; verdict: [[B]]").parsed == "B"
    assert parse_pairwise("[[C]]").parsed == "C"
    bad = parse_pairwise("A is better")
    assert not bad.ok and bad.parsed is None


def test_read_ab_logprobs_normalises_and_needs_a_letter():
    comp = Completion(
        text="A",
        logprobs=[TokenLogprob(token="A", logprob=math.log(0.6), top={" B": math.log(0.2), "C": math.log(0.1)})],
    )
    j = read_ab_logprobs(comp)
    assert j.ok and j.parsed["A"] == pytest.approx(0.75)
    none = read_ab_logprobs(Completion(text="x", logprobs=[TokenLogprob(token="x", logprob=-0.1, top={"y": -3.0})]))
    assert not none.ok and none.parsed is None  # never a 50/50 default
    assert not read_ab_logprobs(Completion(text="A")).ok


def test_read_ab_logprobs_one_letter_missing_is_a_flagged_bound_like_rl_cai():
    # B is not in the top-k: its log-prob is at most the smallest listed one (-4.0), so p(A) is a
    # conservative estimate (not 1.0), flagged as bounded, exactly as synth.steps.compare reads it.
    comp = Completion(text="A]]", logprobs=[TokenLogprob(token="A]]", logprob=-0.1, top={"C": -4.0})])
    j = read_ab_logprobs(comp)
    assert j.ok and j.parsed["bounded"] is True
    assert j.parsed["A"] == pytest.approx(1 / (1 + math.exp(-4.0 + 0.1)))


def test_combine_rules():
    assert combine_verdicts("A", "B") == "i"  # i in slot A, then i in slot B: both say i
    assert combine_verdicts("B", "A") == "j"
    assert combine_verdicts("A", "A") == "tie"  # slot A both times: inconsistent -> tie
    assert combine_verdicts("C", "B") == "tie"
    assert combine_verdicts(None, "B") is None
    assert combine_probs(0.9, 0.8, 0.1) == (pytest.approx(0.85), "i")
    assert combine_probs(0.9, 0.2, 0.1)[1] == "tie"  # position bias cancels out


def test_parse_listwise_and_rating():
    assert parse_listwise("...\nRanking: [2] > [3] > [1]").parsed == [2, 3, 1]
    assert parse_listwise("排序：[1] > [2]").parsed == [1, 2]
    assert not parse_listwise("Ranking: [1] > [1] > [2]").ok
    assert not parse_listwise("no ranking").ok
    assert parse_rating("good. Rating: [[7.5]]").parsed == 7.5
    assert not parse_rating("Rating: [[11]]").ok and not parse_rating("Rating: 7").ok


# --------------------------------------------------------------------------- pairwise


def test_pairwise_exact_rows_and_one_call_in_both_orders(tmp_path):
    judge = ScriptedLLM(fair_judge, model="judge-model")
    m, out = run(tmp_path, {}, pair_items(3, category="harm/x"), judge)
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 6  # 3 pairs x 2 orders, one call
    firsts = [slots(req[0].content)[0] for req in judge.calls[0][0]]
    assert firsts[:2] == ["good answer 0", "bad answer 0"]
    pref = out["preferences"][0]
    assert pref["chosen"] == [{"role": "assistant", "content": "good answer 0"}]
    assert pref["rejected"] == [{"role": "assistant", "content": "bad answer 0"}]
    assert pref["method"] == "judge_pairwise" and pref["category"] == "harm/x"
    assert pref["meta"]["verdicts"] == {"ij": "A", "ji": "B"} and pref["meta"]["judge_model"] == "judge-model"
    assert out["ranked"][0]["scores"] == [1.0, 0.0] and out["ranked"][0]["meta"]["names"] == ["chosen", "rejected"]
    assert m["outputs"] == {"preferences": 3, "ranked": 3, "battles": 3}
    assert m["per_category"] == {"harm/x": 3}
    rep = m["judge"]
    assert rep["position_bias"]["slot_a_win_rate"] == 0.5 and rep["swap_consistency"] == 1.0
    assert rep["agreement_with_source"] == {"rate": 1.0, "decisive": 3}
    assert "bradley_terry" not in rep  # chosen vs rejected are not competing models


def test_judge_that_always_prefers_slot_a_gives_no_hard_pairs(tmp_path):
    judge = ScriptedLLM(lambda msgs, p, i: "[[A]]")
    m, out = run(tmp_path, {}, pair_items(4), judge)
    assert out["preferences"] == []
    assert m["drops"] == {} and m["dropped_parts"] == {"pair": {"pair_tie": 4}}
    assert m["judge"]["position_bias"]["slot_a_win_rate"] == 1.0
    assert m["judge"]["swap_consistency"] == 0.0
    assert [b["winner"] for b in out["battles"]] == ["tie"] * 4


def test_failed_order_gives_no_label_and_no_ranked_row(tmp_path):
    def judge(msgs, p, i):
        a, _ = slots(msgs[0].content)
        if a == "bad answer 1":
            return "I cannot decide"  # order (j, i) of item 1 fails to parse
        return fair_judge(msgs, p, i)

    m, out = run(tmp_path, {}, pair_items(2), judge=ScriptedLLM(judge))
    assert [r["chosen"][0]["content"] for r in out["preferences"]] == ["good answer 0"]
    assert m["drops"] == {"ranked_incomplete": 1} and m["dropped_parts"] == {"pair": {"pair_unresolved": 1}}
    assert m["parse_failures"] == {"judge_pairwise": 1}
    assert len(out["battles"]) == 1 and len(out["ranked"]) == 1
    trace = [r for r in read_jsonl(tmp_path / "trace.jsonl") if r["parse_status"] == "failed"]
    assert trace[0]["output"] == "I cannot decide" and trace[0]["parsed"] is None


def test_truncated_text_verdict_is_not_trusted(tmp_path):
    judge = ScriptedLLM(
        lambda msgs, p, i: Completion(text="Format: [[A]] or [[B]]. Reply A is", finish_reason="length")
    )
    m, out = run(tmp_path, {}, pair_items(1), judge)
    assert out["preferences"] == [] and m["drops"] == {"ranked_incomplete": 1}
    assert m["dropped_parts"] == {"pair": {"pair_unresolved": 1}}
    assert m["truncated"] == {"judge_pairwise": 2}


def test_pairwise_logprobs_averages_both_orders_with_tie_band(tmp_path):
    def judge(msgs, p, i):
        assert (
            msgs[-1].role == "assistant" and msgs[-1].content == "[[" and p.top_logprobs == 20 and p.max_new_tokens == 1
        )
        a, _ = slots(msgs[0].content)
        good_first = a.startswith("good")
        item = int(a.split()[-1])
        # item 0: strong preference for good; item 1: pure slot-A bias (0.7 for slot A in both orders)
        p_a = (0.9 if good_first else 0.2) if item == 0 else 0.7
        return Completion(
            text="A",
            finish_reason="length",
            logprobs=[TokenLogprob(token="A", logprob=math.log(p_a), top={"B": math.log(1 - p_a)})],
        )

    m, out = run(tmp_path, {"pairwise": {"logprobs": True}}, pair_items(2), ScriptedLLM(judge))
    assert len(out["preferences"]) == 1
    assert out["preferences"][0]["p_chosen"] == pytest.approx(0.5 * (0.9 + 0.8))
    assert m["drops"] == {} and m["dropped_parts"] == {"pair": {"pair_tie": 1}}
    assert m["judge"]["position_bias"]["slot_a_win_rate"] == 0.75


# --------------------------------------------------------------------------- listwise / rubric


def quality(text):
    return int(text.split("q=")[1].split()[0])


def response_items():
    """Rows with a `responses` field of {text, model}; the reply's quality q is written in its text."""

    def responses(i):
        return [{"text": f"reply q={q} for {i}", "model": f"m{q}"} for q in (3, 1, 2)]

    return [
        SourceItem(id=f"r{i}", prompt=messages(("user", f"ask {i}")), meta={"responses": responses(i)})
        for i in range(4)
    ]


def listwise_judge(msgs, p, i):
    text = msgs[0].content
    blocks = [text.split(f"[{k}]\n")[1].split("\n[End")[0] for k in (1, 2, 3)]
    order = sorted(range(3), key=lambda k: -quality(blocks[k]))
    return "fine\nRanking: " + " > ".join(f"[{k + 1}]" for k in order)


def test_listwise_deshuffles_and_scores_by_borda(tmp_path):
    judge = ScriptedLLM(listwise_judge)
    cfg = {"mode": "listwise", "data_responses": "responses", "listwise": {"samples": 2}, "rating": {"bootstrap": 20}}
    m, out = run(tmp_path, cfg, response_items(), judge)
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 8  # 4 items x 2 shuffled samples
    presented = {
        tuple(quality(b) for b in [req[0].content.split(f"[{k}]\n")[1] for k in (1, 2, 3)]) for req in judge.calls[0][0]
    }
    assert len(presented) > 1  # the order really is shuffled
    for row in out["ranked"]:
        assert row["scores"] == [2.0, 0.0, 1.0] and row["meta"]["names"] == ["m3", "m1", "m2"]
    pref = out["preferences"][0]
    assert (pref["chosen"][0]["content"], pref["rejected"][0]["content"]) == ("reply q=3 for 0", "reply q=1 for 0")
    bt = m["judge"]["bradley_terry"]
    assert [r["model"] for r in bt["models"]] == ["m3", "m2", "m1"]
    assert (tmp_path / "bt_scores.png").exists()
    assert m["judge"]["position_bias"]["rankings"] == 8


def test_listwise_incomplete_ranking_is_dropped_not_padded(tmp_path):
    judge = ScriptedLLM(lambda msgs, p, i: "Ranking: [2] > [1]")
    m, out = run(tmp_path, {"mode": "listwise", "data_responses": "responses"}, response_items()[:2], judge)
    assert out["ranked"] == [] and out["preferences"] == []
    assert m["drops"] == {"fewer_than_2_scored": 2}
    assert m["dropped_parts"] == {"judge_sample": {"listwise_incomplete_ranking": 2}}


def test_rubric_averages_valid_samples_and_drops_ties(tmp_path):
    def judge(msgs, p, i):
        assert p.n == 3 and p.temperature == 0.7
        q = quality(msgs[0].content.split("[Reply]\n")[1])
        return "no rating" if (q == 2 and i == 0) else f"ok. Rating: [[{q * 2 + i}]]"

    m, out = run(
        tmp_path,
        {"mode": "rubric", "data_responses": "responses", "pairs": "all", "rating": {"bootstrap": 10}},
        response_items()[:1],
        ScriptedLLM(judge),
    )
    ranked = out["ranked"][0]
    assert ranked["scores"] == [7.0, 3.0, 5.5]  # q=2: samples 1 and 2 only -> (5 + 6) / 2
    assert ranked["meta"]["ratings"][2] == [None, 5.0, 6.0]
    pairs = [(r["chosen"][0]["content"][:9], r["rejected"][0]["content"][:9], r["margin"]) for r in out["preferences"]]
    assert pairs == [("reply q=3", "reply q=2", 1.5), ("reply q=3", "reply q=1", 4.0), ("reply q=2", "reply q=1", 2.5)]
    assert m["parse_failures"] == {"judge_rubric": 1}

    const = ScriptedLLM(lambda msgs, p, i: "Rating: [[5]]")
    m2, out2 = run(tmp_path / "const", {"mode": "rubric", "data_responses": "responses"}, response_items()[:2], const)
    assert out2["preferences"] == [] and m2["drops"] == {"tie": 2}


# --------------------------------------------------------------------------- several models


def test_candidate_models_each_one_call_and_bt_table(tmp_path):
    strength = {"alpha": 3, "beta": 2, "gamma": 1}
    models = {n: ScriptedLLM(lambda msgs, p, i, n=n: f"{n} says q={strength[n]} #{i}", model=n) for n in strength}

    def judge(msgs, p, i):
        a, b = slots(msgs[0].content)
        return "[[A]]" if quality(a) > quality(b) else "[[B]]" if quality(b) > quality(a) else "[[C]]"

    cands = [
        {"name": n, "llm": {"kind": "fake"}, "model": {"name_or_path": n}, "n": 2 if n == "alpha" else 1}
        for n in strength
    ]
    factories = {f"candidate/{n}": (lambda n=n: models[n]) for n in strength}
    m, out = run(
        tmp_path, {"candidates": cands, "rating": {"bootstrap": 50}}, pair_items(3), ScriptedLLM(judge), **factories
    )
    for llm in models.values():
        assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 3  # one call per model per chunk
    assert models["alpha"].calls[0][1][0].n == 2
    bt = m["judge"]["bradley_terry"]
    assert [r["model"] for r in bt["models"]] == ["alpha", "beta", "gamma"]
    assert bt["battle_count"]["alpha"]["gamma"] == 6
    assert m["judge"]["elo"]["models"][0]["model"] == "alpha"
    assert (tmp_path / "bt_scores.png").read_bytes()[:4] == b"\x89PNG"
    # alpha#0 vs alpha#1 tie (same quality): not a battle for the table, dropped as a pair
    assert m["drops"] == {} and m["dropped_parts"] == {"pair": {"pair_tie": 3}}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["judge"]["bradley_terry"]["models"][0]["model"] == "alpha"


def test_rerun_of_finished_run_makes_no_calls_and_same_report(tmp_path):
    m1, _ = run(tmp_path, {}, pair_items(2), ScriptedLLM(fair_judge))
    judge2 = ScriptedLLM(fair_judge)
    m2, out = run(tmp_path, {}, pair_items(2), judge2)
    assert judge2.calls == [] and len(out["preferences"]) == 2
    assert m2["judge"] == m1["judge"]


# --------------------------------------------------------------------------- real backends


def test_pairwise_over_the_loopback_server(tmp_path):
    def responder(body):
        a, _ = slots(body["messages"][-1]["content"])
        return "Reasoning.\n[[A]]" if a.startswith("Stay") else "Reasoning.\n[[B]]"

    with LoopbackServer(responder=responder) as server:
        m = run_synth(tmp_path, "judge", backend=loopback(server.url))
        bodies = [r.body for r in server.chat_requests()]
    assert len(bodies) == 6 and all(b["temperature"] == 0.0 for b in bodies)  # 3 pairs x 2 orders
    rows = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("Stay on lit streets and tell a friend.", "Just run.")
    ] * 3
    assert all(r["category"] == "safety/personal" and r["meta"]["judge_model"] == "scripted" for r in rows)
    check_outputs(tmp_path / "out", m)

    with LoopbackServer(responder=lambda body: "[[A]]") as server:  # always slot A, over HTTP
        m = run_synth(tmp_path / "a", "judge", backend=loopback(server.url))
    assert m["outputs"]["preferences"] == 0 and m["judge"]["position_bias"]["slot_a_win_rate"] == 1.0


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = run_synth(tmp_path, "judge", "pipeline.judge_sampling.max_new_tokens=8")
    check_outputs(tmp_path / "out", m)
    # the hf backend constrains the verdict to `...[[A|B|C]]` (xgrammar): even the random model gives one
    assert m["parse_failures"].get("judge_pairwise", 0) == 0 and m["calls"]["judge_pairwise"] > 0
    cands = "pipeline.candidates=[{name:tiny,n:3,sampling:{max_new_tokens:8,temperature:1.0}}]"
    m = run_synth(
        tmp_path / "r",
        "judge",
        "pipeline.mode=rubric",
        "pipeline.judge_sampling.max_new_tokens=8",
        cands,
        "pipeline.drop_truncated=false",
    )  # the tiny model never stops
    check_outputs(tmp_path / "r" / "out", m)
    assert m["calls"]["candidates"] == 3 and m["parse_failures"].get("judge_rubric", 0) == 0
