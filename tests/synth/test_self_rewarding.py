"""`pipeline=self_rewarding` (Yuan et al. 2024, arXiv 2401.10020): score parsing, pair selection, exact rows."""

import pytest

from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.self_rewarding import SelfRewardingConfig, SelfRewardingPipeline
from synth.records import Completion, SourceItem, messages
from synth.steps.self_reward import Scored, parse_score, parse_task, select_pair
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth


def items(n=2, category=None):
    return [
        SourceItem(
            id=f"s{i}", prompt=messages(("user", f"seed question number {i} about gardening")), category=category
        )
        for i in range(n)
    ]


def response_of(judge_prompt: str) -> str:
    return judge_prompt.split("<response>")[1].split("</response>")[0]


FILLER = [
    "water it daily",
    "use compost and mulch generously",
    "ask a local nursery",
    "plant in spring after the frost",
]


def cand_index(judge_prompt: str) -> int:
    return int(response_of(judge_prompt).split()[1].rstrip(":"))


def policy_answer(msgs, p, i):
    return f"answer {i}: {FILLER[i]} ({msgs[-1].content[:30]})"


def run(tmp_path, judge_fn, cfg=None, its=None, policy_fn=policy_answer):
    llm = ScriptedLLM(
        lambda msgs, p, i: judge_fn(msgs, p, i) if "additive 5-point" in msgs[-1].content else policy_fn(msgs, p, i),
        model="m-t",
    )
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm})
    m = run_pipeline(
        SelfRewardingPipeline(SelfRewardingConfig(**(cfg or {}))), ctx, tmp_path, its or items(), show_progress=False
    )
    return m, read_jsonl(tmp_path / "preferences.jsonl"), llm


def test_parse_score():
    assert parse_score("Good.\nScore: 4").parsed == 4.0
    assert parse_score("Score: 2\nOn reflection...\nScore: 3.5").parsed == 3.5  # the last match
    assert parse_score("得分：5").parsed == 5.0
    for bad in ("Score: 6", "Score: 4/5", "score four", "Score: 10", ""):
        j = parse_score(bad)
        assert not j.ok and j.parsed is None, bad


def test_select_pair_ties_and_rho():
    c = [Scored(0, "aaaa", [], 4.0), Scored(1, "bb", [], 4.0), Scored(2, "cccccc", [], 1.0), Scored(3, "d", [], 1.0)]
    chosen, rejected = select_pair(c)
    assert (chosen.index, rejected.index) == (1, 2)  # shortest of the best, longest of the worst
    assert select_pair([Scored(i, "x", [], 3.0) for i in range(4)]) is None
    assert select_pair([Scored(0, "x", [], 3.0), Scored(1, "y", [], None)]) is None
    lc = [
        Scored(0, "long" * 50, [], 5.0),
        Scored(1, "short", [], 4.5),
        Scored(2, "mid" * 10, [], 1.0),
        Scored(3, "l" * 300, [], 1.5),
    ]
    chosen, rejected = select_pair(lc, rho=0.2)  # band: >= 5 - 0.2*4 = 4.2 ; <= 1 + 0.2*4 = 1.8
    assert (chosen.index, rejected.index) == (1, 3)


def test_exact_rows_one_call_per_stage_and_failed_judgements_never_scored(tmp_path):
    def judge(msgs, p, i):
        k = cand_index(msgs[-1].content)  # the candidate's sample index
        if k == 3:
            return "I refuse to score"  # every judgement of candidate 3 fails
        if k == 1 and i == 0:
            return "Score: 9"  # out of range: that one judgement is dropped
        return f"Reasoning.\nScore: {[2, 4, 3][k] + (i == 2)}"

    m, rows, llm = run(tmp_path, judge, {"iteration": 2}, items(2, category="L1/L2"))
    assert len(llm.calls) == 2  # candidates, then ONE judge call
    cand_reqs, cand_params = llm.calls[0]
    assert (
        len(cand_reqs) == 2
        and cand_params[0].n == 4
        and (cand_params[0].temperature, cand_params[0].top_p) == (0.7, 0.9)
    )
    judge_reqs, judge_params = llm.calls[1]
    assert len(judge_reqs) == 8 and all(p.n == 3 for p in judge_params)
    row = rows[0]
    assert row["chosen"][0]["content"] == "answer 1: use compost and mulch generously (seed question number 0 about g)"
    assert row["rejected"][0]["content"] == "answer 0: water it daily (seed question number 0 about g)"
    assert row["score_chosen"] == pytest.approx(4.5)  # (4 + 5) / 2: the out-of-range judgement is left out
    assert row["score_rejected"] == pytest.approx(7 / 3)
    cands = row["meta"]["candidates"]
    assert [c["scores"] for c in cands] == [[2.0, 2.0, 3.0], [None, 4.0, 5.0], [3.0, 3.0, 4.0], [None, None, None]]
    assert cands[3]["mean"] is None
    assert row["meta"]["iteration"] == 2 and row["provenance"]["iteration"] == 2 and row["category"] == "L1/L2"
    assert row["method"] == "self_rewarding" and row["meta"]["self_judged"] is True
    assert m["parse_failures"] == {"self_reward_judge": 2 * 4}  # per item: 3 (candidate 3) + 1 (score 9)
    assert m["drops"] == {} and m["dropped_parts"] == {"candidate": {"candidate_without_valid_judgement": 2}}
    assert m["per_category"] == {"L1/L2": 2}
    stats = m["self_rewarding"]["length"]
    assert stats["chosen_mean_chars"] == len(row["chosen"][0]["content"]) and stats["chosen_longer_rate"] == 1.0


def test_constant_scores_give_no_pairs(tmp_path):
    m, rows, _ = run(tmp_path, lambda msgs, p, i: "Fine.\nScore: 4")
    assert rows == [] and m["drops"] == {"tie": 2}


def test_all_judgements_failing_give_no_pairs(tmp_path):
    m, rows, _ = run(tmp_path, lambda msgs, p, i: "no score here")
    assert rows == [] and m["drops"] == {"fewer_than_2_scored": 2}
    assert m["dropped_parts"] == {"candidate": {"candidate_without_valid_judgement": 8}}


def test_truncated_candidates_are_not_judged(tmp_path):
    def policy(msgs, p, i):
        text = policy_answer(msgs, p, i)
        return Completion(text=text, finish_reason="length" if i == 0 else "stop")

    judge = lambda msgs, p, i: f"Score: {cand_index(msgs[-1].content)}"  # noqa: E731
    m, rows, llm = run(tmp_path, judge, policy_fn=policy)
    assert len(llm.calls[1][0]) == 6  # 3 candidates per prompt judged
    assert rows[0]["meta"]["candidates"][0]["text"].startswith("answer 1")
    assert m["drops"] == {} and m["dropped_parts"] == {"candidate": {"truncated_candidate": 2}}


def test_new_prompts_self_instruct_with_dedup(tmp_path):
    def policy(msgs, p, i):
        content = msgs[-1].content
        if "<task>" in content:
            assert content.count("\n<task>") == 3  # shots capped by the 3 seeds
            if p.n == 2 and i == 1:
                return "<task>Seed question number 0 about gardening!</task>"  # an exact duplicate of a seed
            return f"<task>Explain volcano type {len(content) % 97} for {i}</task> extra"
        return policy_answer(msgs, p, i)

    judge = lambda msgs, p, i: f"Score: {cand_index(msgs[-1].content)}"  # noqa: E731
    cfg = {"new_prompts": {"enabled": True, "per_seed": 2, "shots": 8}}
    m, rows, llm = run(tmp_path, judge, cfg, items(3), policy_fn=policy)
    prompts = read_jsonl(tmp_path / "prompts.jsonl")
    dups = m["dropped_parts"]["new_prompt"]
    assert len(prompts) + dups.get("new_prompt_exact_duplicate", 0) + dups.get("new_prompt_near_duplicate", 0) == 6
    assert dups["new_prompt_exact_duplicate"] >= 3
    assert all(r["prompt"][0]["content"].startswith("Explain volcano") for r in rows)  # pairs for new prompts only
    assert {r["meta"]["source_meta"]["generated_from"] for r in rows} <= {"s0", "s1", "s2"}
    assert m["outputs"]["prompts"] == len(prompts) and m["parse_failures"] == {}
    assert parse_task("<task> a </task>").parsed == "a" and not parse_task("<task></task>").ok


def test_rerun_makes_no_calls(tmp_path):
    judge = lambda msgs, p, i: f"Score: {cand_index(msgs[-1].content)}"  # noqa: E731
    run(tmp_path, judge)
    m, rows, llm = run(tmp_path, judge)
    assert llm.calls == [] and len(rows) == 2 and m["self_rewarding"]["scores"]["chosen_mean"] == 3.0


# --------------------------------------------------------------------------- real backends


def test_over_the_loopback_server(tmp_path):
    answers = [
        "No.",
        "Stay on lit streets.",
        "Stay on lit streets, tell a friend your route and keep your phone charged.",
        "Run.",
    ]

    def responder(body):
        text = body["messages"][-1]["content"]
        if "additive 5-point" in text:
            reply = response_of(text)
            return f"Justified.\nScore: {answers.index(reply) + 1}" if reply != "Run." else "no score"
        assert body["n"] == 4 and body["temperature"] == 0.7 and body["top_p"] == 0.9
        return answers

    with LoopbackServer(responder=responder) as server:
        m = run_synth(tmp_path, "self_rewarding", "pipeline.iteration=3", backend=loopback(server.url), n=2)
        judge_bodies = [r.body for r in server.chat_requests() if "additive" in r.body["messages"][-1]["content"]]
    assert len(judge_bodies) == 8 and all(b["n"] == 3 for b in judge_bodies)
    rows = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    assert [
        (r["chosen"][0]["content"], r["rejected"][0]["content"], r["score_chosen"], r["score_rejected"]) for r in rows
    ] == [(answers[2], answers[0], 3.0, 1.0)] * 2
    assert rows[0]["meta"]["iteration"] == 3 and rows[0]["meta"]["candidates"][3]["mean"] is None
    assert m["parse_failures"] == {"self_reward_judge": 6}
    check_outputs(tmp_path / "out", m)

    with LoopbackServer(
        responder=lambda b: "Score: 4" if "additive" in b["messages"][-1]["content"] else answers
    ) as server:
        m = run_synth(tmp_path / "c", "self_rewarding", backend=loopback(server.url), n=2)
    assert m["outputs"]["preferences"] == 0 and m["drops"]["tie"] == 2  # constant scores: no pairs


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = run_synth(
        tmp_path,
        "self_rewarding",
        "pipeline.k=2",
        "pipeline.judge_samples=2",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.judge_sampling.max_new_tokens=16",
        "pipeline.new_prompts.enabled=true",
        "pipeline.new_prompts.keep_seed_prompts=true",
        "pipeline.new_prompts.sampling.max_new_tokens=8",
        "pipeline.drop_truncated=false",
    )  # the tiny model never stops
    check_outputs(tmp_path / "out", m)
    # the judge's `...Score: n` is enforced by the hf backend (xgrammar); 16 tokens fit even "得分：n" in
    # byte-level pieces of the tiny tokenizer. Self-instruct stays free text.
    assert m["parse_failures"].get("self_reward_judge", 0) == 0 and m["parse_failures"]["self_instruct"] > 0
