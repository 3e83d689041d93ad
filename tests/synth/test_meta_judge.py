"""Meta-Rewarding's meta-judge inside `pipeline=self_rewarding` (arXiv 2407.19594 §2.2)."""

import pytest

from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.self_rewarding import SelfRewardingConfig, SelfRewardingPipeline
from synth.records import SourceItem, messages
from synth.steps import structure
from synth.steps.meta_judge import (
    Battle,
    JudgementText,
    distinct_judgements,
    elo,
    meta_pair,
    parse_winner,
    pick_response,
    strip_score,
)
from synth.steps.orders import combine_verdicts
from synth.steps.self_reward import Scored, build_judge
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth


def J(i, score, text=None):
    return JudgementText(i, text or f"judgement {i}\nScore: {score}", score)


def test_pick_response_by_score_variance():
    c = [
        Scored(0, "a", [3.0, 3.0, 3.0], 3.0),
        Scored(1, "b", [1.0, 5.0, None], 3.0),
        Scored(2, "c", [2.0, 4.0, 3.0], 3.0),
        Scored(3, "d", [0.0, None, None], 0.0),
    ]
    assert pick_response(c).index == 1  # variance 4 beats 2/3; a single valid score never qualifies
    assert pick_response(c[:1]) is None and pick_response([]) is None


def test_distinct_judgements_and_strip_score():
    c = Scored(0, "a", [4.0, None, 4.0, 2.0], 3.3, ["x\nScore: 4", "broken", " x\nScore: 4", "y\nScore: 2"])
    assert [(j.index, j.score) for j in distinct_judgements(c)] == [(0, 4.0), (3, 2.0)]
    assert strip_score("Good points.\nScore: 4\n") == "Good points."
    assert strip_score("理由。\n得分：3") == "理由。"


def test_parse_winner_and_combine():
    assert parse_winner("A is wrong.\nWinner: Judgement B").parsed == "B"
    assert parse_winner("winner: judgment a").parsed == "A"
    assert parse_winner("Winner: Judgement A ... Winner: Judgement B").parsed == "B"  # the last one
    assert parse_winner("胜者：评审 A").parsed == "A"
    assert not parse_winner("Judgement B is better").ok
    assert (
        combine_verdicts("A", "B") == "i" and combine_verdicts("B", "A") == "j"
    )  # both orders name the same judgement
    assert (
        combine_verdicts("A", "A") == "tie" and combine_verdicts("B", "B") == "tie"
    )  # the same slot both times: position bias
    assert combine_verdicts(None, "A") is None
    assert structure.matches(structure.meta_winner(64), "The first is right.\nWinner: Judgement A")
    assert not structure.matches(structure.meta_winner(64), "Winner: Judgement C")


def test_elo_ranking_and_meta_pair_rules():
    js = [J(0, 4.0), J(1, 3.0), J(2, 2.0)]
    table = [
        Battle(js[0], js[1], ("A", "B"), "i"),
        Battle(js[0], js[2], ("A", "B"), "i"),
        Battle(js[1], js[2], ("A", "B"), "i"),
    ]
    r = elo(js, table)
    assert r[0] > r[1] > r[2]
    assert r[1] == pytest.approx(1000.0, abs=1e-6) and r[0] + r[2] == pytest.approx(2000.0)  # symmetric: θ has mean 0
    chosen, rejected = meta_pair(js, r, None)
    assert (chosen.index, rejected.index) == (0, 2)
    assert meta_pair(js, r, max_chosen_chars=5) == "meta_chosen_too_long"
    # 0 beats both, 1 vs 2 is a tie: the two lowest share an Elo -> no pair
    tied = [table[0], table[1], Battle(js[1], js[2], ("A", "A"), "tie")]
    assert meta_pair(js, elo(js, tied), None) == "meta_elo_not_unique"
    middle = [table[0], table[1], Battle(js[1], js[2], ("B", "A"), "j")]  # 0 > 2 > 1 on paper, but 1 vs 2 flipped:
    assert meta_pair(js, elo(js, middle), None) != "meta_elo_not_unique"  # 0 beats both; 2 beats 1: all distinct
    four = js + [J(3, 1.0)]  # 0 beats all, 3 loses to all, 1 vs 2 a tie: top and bottom are clear, the middle is not
    b4 = [Battle(four[0], four[k], ("A", "B"), "i") for k in (1, 2, 3)] + [
        Battle(four[k], four[3], ("A", "B"), "i") for k in (1, 2)
    ]
    r4 = elo(four, b4 + [Battle(four[1], four[2], ("A", "A"), "tie")])
    assert r4[0] > r4[1] > r4[3] and r4[1] == pytest.approx(r4[2])
    assert meta_pair(four, r4, None) == "meta_elo_not_unique"  # any tie drops the pair (NeMo-Aligner's rule)
    same = [J(0, 3.0), J(1, 3.0, "other\nScore: 3")]
    assert meta_pair(same, elo(same, [Battle(same[0], same[1], ("A", "B"), "i")]), None) == "meta_equal_scores"
    unresolved = [Battle(js[0], js[1], (None, "B"), None)]
    assert elo(js, unresolved) == {} and meta_pair(js, {}, None) == "meta_fewer_than_2_rated"


# --------------------------------------------------------------------------- in the pipeline


def items(n=2):
    return [
        SourceItem(id=f"s{i}", prompt=messages(("user", f"How do I grow tomatoes, case {i}?")), category="garden")
        for i in range(n)
    ]


ANSWERS = ["Water them.", "Sun, water and stakes.", "Buy tomatoes.", "Plant in spring, stake them, water at the base."]


def judge_text(i):
    # three judgements per candidate with different scores; sample 2 is the "careful" one
    return [f"Quick look.\nScore: {2}", f"Generous.\nScore: {5}", f"Careful: checks every criterion.\nScore: {3}"][i]


def meta_verdict(text, biased=False):
    if biased:
        return "Winner: Judgement A"
    a = text.split("<judgement_a>")[1].split("</judgement_a>")[0]
    b = text.split("<judgement_b>")[1].split("</judgement_b>")[0]
    assert "Score:" not in a and "Score:" not in b  # the score lines are stripped inside the meta prompt
    rank = {"Careful: checks every criterion.": 3, "Quick look.": 2, "Generous.": 1}
    return f"Reasoning.\nWinner: Judgement {'A' if rank[a] > rank[b] else 'B'}"


def run(tmp_path, biased=False, cfg=None):
    def fn(msgs, p, i):
        text = msgs[-1].content
        if "<judgement_a>" in text:
            return meta_verdict(text, biased)
        if "additive 5-point" in text:
            return judge_text(i)
        return ANSWERS[i]

    llm = ScriptedLLM(fn, model="m1")
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm})
    config = SelfRewardingConfig(**{"meta_judge": {"enabled": True}, **(cfg or {})})
    m = run_pipeline(SelfRewardingPipeline(config), ctx, tmp_path, items(), show_progress=False)
    return m, read_jsonl(tmp_path / "judge_preferences.jsonl"), llm


def test_meta_judge_pairs_in_the_pipeline(tmp_path):
    m, rows, llm = run(tmp_path)
    assert len(llm.calls) == 3  # candidates, judge, ONE meta-judge call
    meta_reqs, meta_params = llm.calls[2]
    assert len(meta_reqs) == 2 * 3 * 2  # 2 prompts x 3 judgement pairs x both orders
    assert meta_params[0].temperature == 0.0 and meta_params[0].regex is not None
    assert (
        len(rows) == 2 and m["outputs"]["judge_preferences"] == 2 and m["outputs"]["preferences"] == 0
    )  # all means tie
    row = rows[0]
    # every candidate got scores 2, 5, 3 (same variance): the first one, index 0, is judged
    assert row["prompt"] == [msg.model_dump() for msg in build_judge("en", items()[0].prompt, ANSWERS[0])]
    assert row["chosen"][0]["content"] == judge_text(2) and row["rejected"][0]["content"] == judge_text(1)  # full texts
    assert row["meta"]["judge_score_chosen"] == 3.0 and row["meta"]["judge_score_rejected"] == 5.0
    assert row["score_chosen"] > 1000 > row["score_rejected"] and row["method"] == "meta_judge"
    assert all(b["winner"] in ("i", "j") for b in row["meta"]["battles"])
    rep = m["self_rewarding"]["meta_judge"]
    assert rep["pairs"] == 2 and rep["chosen_has_higher_score_rate"] == 0.0
    assert rep["position_bias"]["slot_a_win_rate"] == 0.5
    assert m["self_rewarding"]["scores"] is None  # no actor pairs: every candidate has mean 10/3


def test_position_biased_meta_judge_gives_no_pairs(tmp_path):
    m, rows, _ = run(tmp_path, biased=True)
    assert rows == [] and m["dropped_parts"]["meta_pair"] == {"meta_elo_not_unique": 2}
    assert m["self_rewarding"]["meta_judge"]["position_bias"]["slot_a_win_rate"] == 1.0


def test_length_filter_and_rerun(tmp_path):
    m, rows, _ = run(tmp_path, cfg={"meta_judge": {"enabled": True, "max_chosen_chars": 10}})
    assert rows == [] and m["dropped_parts"]["meta_pair"] == {"meta_chosen_too_long": 2}
    m, rows, llm = run(tmp_path, cfg={"meta_judge": {"enabled": True, "max_chosen_chars": 10}})
    assert llm.calls == [] and m["status"] == "finished"


def test_meta_judge_over_the_loopback_server(tmp_path):
    answers = ["No.", "Stay on lit streets.", "Stay on lit streets and tell a friend.", "Run."]

    def responder(body):
        text = body["messages"][-1]["content"]
        if "<judgement_a>" in text:
            return meta_verdict(text)
        if "additive 5-point" in text:
            return [judge_text(0), judge_text(1), judge_text(2)]
        return answers

    with LoopbackServer(responder=responder) as server:
        m = run_synth(tmp_path, "self_rewarding", "pipeline.meta_judge.enabled=true", backend=loopback(server.url), n=2)
    check_outputs(tmp_path / "out", m)
    rows = read_jsonl(tmp_path / "out" / "judge_preferences.jsonl")
    assert len(rows) == 2 and all(r["chosen"][0]["content"] == judge_text(2) for r in rows)
    assert m["parse_failures"] == {}


@pytest.mark.slow
def test_end_to_end_tiny_hf_with_meta_judge(tmp_path):
    m = run_synth(
        tmp_path,
        "self_rewarding",
        "pipeline.k=2",
        "pipeline.judge_samples=3",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.judge_sampling.max_new_tokens=16",
        "pipeline.meta_judge.enabled=true",
        "pipeline.meta_judge.sampling.max_new_tokens=48",
        "pipeline.drop_truncated=false",
        "pipeline.sampling.seed=0",
        "pipeline.judge_sampling.seed=0",
        n=2,
    )
    check_outputs(tmp_path / "out", m)
    assert m["calls"]["meta_judge"] > 0  # with these seeds the tiny judge's scores disagree, so battles run
    assert "judge_preferences" in m["outputs"] and "meta_judge" in m["self_rewarding"]
    # the meta-judge's `...Winner: Judgement X` is enforced by constrained decoding, like the judge's score
    assert m["parse_failures"].get("meta_judge", 0) == 0


def test_meta_judge_needs_several_judgements():
    from synth.app import build_pipeline
    from synth.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_pipeline(
            {
                "_target_": "synth.pipelines.self_rewarding.SelfRewardingPipeline",
                "judge_samples": 1,
                "meta_judge": {"enabled": True},
            }
        )
    assert "judge_samples >= 2" in str(e.value) and "\n" not in str(e.value)


def test_chinese_constitution_meta_judge_prompts_are_chinese(tmp_path):
    from synth.constitution import load_constitution
    from synth.steps.filters import has_cjk

    def fn(msgs, p, i):
        text = msgs[-1].content
        if "<judgement_a>" in text:
            rank = {"仔细逐条核对。": 3, "粗看。": 2, "宽松。": 1}
            a = text.split("<judgement_a>")[1].split("</judgement_a>")[0]
            b = text.split("<judgement_b>")[1].split("</judgement_b>")[0]
            return "理由。\n胜者：评审 " + ("A" if rank[a] > rank[b] else "B")
        if "累加式" in text:
            return ["粗看。\n得分：2", "宽松。\n得分：5", "仔细逐条核对。\n得分：3"][i]
        return ["多浇水。", "晒太阳并浇水。", "买新的。", "春天种植。"][i]

    llm = ScriptedLLM(fn)
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm}, constitution=load_constitution("safety_zh"))
    its = [SourceItem(id="z", prompt=messages(("user", "怎样在室内养活罗勒？")))]
    m = run_pipeline(
        SelfRewardingPipeline(SelfRewardingConfig(meta_judge={"enabled": True})),
        ctx,
        tmp_path,
        its,
        show_progress=False,
    )
    meta_reqs = llm.calls[2][0]
    assert len(meta_reqs) == 6 and all(has_cjk(r[0].content[:6]) and "Winner" not in r[0].content for r in meta_reqs)
    rows = read_jsonl(tmp_path / "judge_preferences.jsonl")
    assert m["parse_failures"] == {} and len(rows) == 1 and rows[0]["chosen"][0]["content"].startswith("仔细")
