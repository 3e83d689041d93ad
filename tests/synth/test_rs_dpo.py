"""`pipeline=rs_dpo` (RS-DPO, arXiv 2402.10038 Algorithm 1): the gap rule, exact rows, scorers, resume."""

import math

import pytest

from synth.errors import ConfigError
from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.rs_dpo import RsDpoConfig, RsDpoPipeline
from synth.records import Completion, SourceItem, messages
from synth.steps.rejection import gap_pairs, normalize, unique_texts
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth


def length_reward(prompts, completions):
    """A rule reward for the tests: the number of words; "bad" texts are unscorable."""
    assert all(p[-1]["role"] == "user" for p in prompts)
    return [None if "bad" in c else float(len(c.split())) for c in completions]


def sig(x):
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------- pure rules (worked by hand)


def test_gap_pairs_worked_example():
    # tau=1, eta=0.85: σ(2)=0.881 passes, σ(1)=0.731 does not -> only (0 over 1)
    assert [(g.chosen, g.rejected, g.gap) for g in gap_pairs([2.0, 0.0, 1.0], 1.0, 0.85)] == [(0, 1, 2.0)]
    # tau=0.5 doubles every logit: σ(4)=0.982, σ(2)=0.881 -> three pairs, largest gap first, never both orders
    got = gap_pairs([2.0, 0.0, 1.0], 0.5, 0.85)
    assert [(g.chosen, g.rejected) for g in got] == [(0, 1), (0, 2), (2, 1)]
    assert got[0].p == pytest.approx(sig(4.0)) and got[1].p == pytest.approx(sig(2.0))
    assert [(g.chosen, g.rejected) for g in gap_pairs([2.0, 0.0, 1.0], 0.5, 0.85, cap=2)] == [(0, 1), (0, 2)]
    # the test is strict (>): a gap exactly at the threshold is dropped; an unscored sample never pairs
    assert gap_pairs([math.log(0.85 / 0.15), 0.0], 1.0, 0.85) == []
    assert gap_pairs([5.0, None, 0.0], 1.0, 0.85)[0].rejected == 2 and len(gap_pairs([5.0, None, 0.0], 1.0, 0.85)) == 1
    assert gap_pairs([1.0, 1.0], 0.01, 0.5) == []  # equal rewards: σ(0) = 0.5 is not > 0.5


def test_normalize_and_unique():
    assert normalize([1.0, 3.0, None], "prompt_z") == [-1.0, 1.0, None]
    assert normalize([2.0, 2.0], "prompt_z") == [0.0, 0.0]
    assert normalize([1.0, 7.0], "none") == [1.0, 7.0]
    assert unique_texts(["a", " a ", "b", "a", "c"]) == [0, 2, 4]


def test_config_errors_are_one_line():
    from synth.app import build_pipeline

    with pytest.raises(ConfigError) as e:
        build_pipeline({"_target_": "synth.pipelines.rs_dpo.RsDpoPipeline", "scorer": {"kind": "model"}})
    assert "pipeline.scorer" in str(e.value) and "path" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_pipeline({"_target_": "synth.pipelines.rs_dpo.RsDpoPipeline", "eta": 0.3, "scorer": {"kind": "judge"}})
    assert "pipeline.eta" in str(e.value)
    with pytest.raises(ConfigError) as e:
        RsDpoPipeline(RsDpoConfig(scorer={"kind": "function", "function": "tests.nosuch:fn"}))
    assert "pipeline.scorer.function=tests.nosuch:fn" in str(e.value)


# --------------------------------------------------------------------------- the pipeline, scripted


ANSWERS = ["one", "one two three four", "one two", "one", "bad answer here", "one two three four five six"]


def policy(msgs, p, i):
    if i == 5:
        return Completion(text=ANSWERS[i], finish_reason="length")  # cut off: never scored
    return ANSWERS[i]


def items(n=2):
    return [SourceItem(id=f"q{i}", prompt=messages(("user", f"question {i}")), category="c/1") for i in range(n)]


def run(tmp_path, cfg=None, fn=policy, its=None):
    llm = ScriptedLLM(fn, model="sft")
    ctx = Context(factories={"policy": lambda: llm, "judge": lambda: llm})
    base = {
        "k": 6,
        "scorer": {"kind": "function", "function": "tests.synth.test_rs_dpo:length_reward"},
        "tau": 1.0,
        "eta": 0.85,
    }
    m = run_pipeline(
        RsDpoPipeline(RsDpoConfig(**{**base, **(cfg or {})})), ctx, tmp_path, its or items(), show_progress=False
    )
    return m, read_jsonl(tmp_path / "preferences.jsonl"), llm


def test_exact_rows_with_a_function_scorer(tmp_path):
    m, rows, llm = run(tmp_path)
    assert len(llm.calls) == 1 and llm.calls[0][1][0].n == 6  # ONE sampling call; the scorer is not a backend
    # per prompt: kept "one"(1) "one two three four"(4) "one two"(2); duplicate "one", truncated #5, "bad" unscorable
    # rewards 1, 4, 2 -> σ(3)=0.95 (4 over 1), σ(2)=0.88 (4 over 2) pass; σ(1)=0.73 (2 over 1) does not
    got = [
        (r["chosen"][0]["content"], r["rejected"][0]["content"], r["score_chosen"], r["score_rejected"]) for r in rows
    ]
    assert got == [("one two three four", "one", 4.0, 1.0), ("one two three four", "one two", 4.0, 2.0)] * 2
    assert rows[0]["meta"]["sigmoid_gap"] == pytest.approx(sig(3.0)) and rows[0]["margin"] == 3.0
    assert (
        rows[0]["method"] == "rs_dpo"
        and rows[0]["category"] == "c/1"
        and rows[0]["provenance"]["generator_model"] == "sft"
    )
    assert m["dropped_parts"] == {"sample": {"truncated_sample": 2, "duplicate_sample": 2, "sample_without_reward": 2}}
    assert m["parse_failures"] == {"reward": 2} and m["calls"] == {"candidates": 2, "reward": 8}
    ranked = read_jsonl(tmp_path / "ranked.jsonl")
    assert [r["scores"] for r in ranked] == [[1.0, 4.0, 2.0]] * 2
    rep = m["rs_dpo"]
    assert rep["pairs"] == 4 and rep["prompts_with_pairs"] == 2 and rep["pairs_per_prompt_max"] == 2
    assert rep["reward_gap"]["mean"] == 2.5 and rep["length"]["chosen_longer_rate"] == 1.0
    assert len({r["id"] for r in rows}) == 4
    trace = read_jsonl(tmp_path / "trace.jsonl")
    assert sum(r["step"] == "reward" for r in trace) == 8 and {r["role"] for r in trace} == {"policy", "scorer"}


def test_cap_threshold_and_normalisation(tmp_path):
    m, rows, _ = run(tmp_path / "cap", {"max_pairs_per_prompt": 1})
    assert [r["rejected"][0]["content"] for r in rows] == ["one"] * 2  # the largest gap is kept
    assert m["dropped_parts"]["pair"] == {"over_max_pairs_per_prompt": 2}
    m, rows, _ = run(tmp_path / "hi", {"eta": 0.99})
    assert rows == [] and m["drops"] == {"no_pair_above_threshold": 2}
    # prompt_z: rewards 1, 4, 2 (mean 7/3, population sd sqrt(14/9) = 1.247) -> z = -1.069, 1.336, -0.267;
    # σ(2.405)=0.917 (4 over 1) passes, σ(1.604)=0.833 (4 over 2) and σ(0.802)=0.690 (2 over 1) do not
    m, rows, _ = run(tmp_path / "z", {"normalize": "prompt_z"})
    assert (
        len(rows) == 2
        and rows[0]["rejected"][0]["content"] == "one"
        and rows[0]["meta"]["reward_gap"] == pytest.approx((4 - 1) / math.sqrt(14 / 9))
    )
    assert rows[0]["score_chosen"] == 4.0  # the rows keep the raw rewards


def test_all_equal_or_unscored_samples_give_no_pairs(tmp_path):
    m, rows, _ = run(tmp_path / "eq", fn=lambda msgs, p, i: f"same length {i}")
    assert rows == [] and m["drops"] == {"no_pair_above_threshold": 2}
    m, rows, _ = run(tmp_path / "bad", fn=lambda msgs, p, i: f"bad {i}")
    assert rows == [] and m["drops"] == {"fewer_than_2_scored": 2} and m["outputs"]["ranked"] == 0


def test_rerun_makes_no_calls_and_resumes(tmp_path):
    run(tmp_path, its=items(1))
    m, rows, llm = run(tmp_path, its=items(3))  # one done, two new
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 2 and m["resumed_from_previous_runs"] == 1 and len(rows) == 6
    m, rows, llm = run(tmp_path, its=items(3))
    assert llm.calls == [] and len(rows) == 6 and m["rs_dpo"]["pairs"] == 6


# --------------------------------------------------------------------------- real backends


def test_judge_scorer_over_the_loopback_server(tmp_path):
    answers = ["Short.", "A longer, careful answer.", "Short.", "Medium answer."]

    def responder(body):
        text = body["messages"][-1]["content"]
        if "[[rating]]" in text or "Rating:" in text or "rate the response" in text.lower():
            for reply, score in ((answers[1], 9), (answers[3], 5), (answers[0], 2)):
                if reply in text:
                    return f"Reasoned.\n[[{score}]]"
        assert body["n"] == 4 and body["temperature"] == 1.0
        return answers

    with LoopbackServer(responder=responder) as server:
        m = run_synth(
            tmp_path,
            "rs_dpo",
            "pipeline.k=4",
            "pipeline.scorer.kind=judge",
            "pipeline.tau=2.0",
            backend=loopback(server.url),
            n=2,
        )
        judge_bodies = [r.body for r in server.chat_requests() if r.body.get("n", 1) == 1]
    check_outputs(tmp_path / "out", m)
    assert len(judge_bodies) == 6  # 3 unique samples per prompt, one rating each, in one batched stage
    rows = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    # ratings 2, 9, 5 and tau=2: σ(3.5)=0.97 (9 over 2), σ(2)=0.88 (9 over 5), σ(1.5)=0.82 (5 over 2: dropped)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        (answers[1], answers[0]),
        (answers[1], answers[3]),
    ] * 2
    assert rows[0]["meta"]["scorer"] == "judge:scripted" and m["dropped_parts"]["sample"] == {"duplicate_sample": 2}


@pytest.mark.slow
def test_end_to_end_tiny_hf_with_a_reward_model(tmp_path, tiny_score_model):
    m = run_synth(
        tmp_path,
        "rs_dpo",
        "pipeline.k=4",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.sampling.seed=0",
        f"pipeline.scorer.path={tiny_score_model}",
        "pipeline.scorer.device=cpu",
        "pipeline.eta=0.5",
        "pipeline.tau=0.001",
        "pipeline.drop_truncated=false",
    )  # the tiny model never stops
    check_outputs(tmp_path / "out", m)
    ranked = read_jsonl(tmp_path / "out" / "ranked.jsonl")
    assert ranked and all(len(r["scores"]) >= 2 for r in ranked)
    rows = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    # a tiny τ makes every strictly ordered pair pass: n(n-1)/2 per prompt with distinct rewards
    expected = sum(sum(a > b for a in r["scores"] for b in r["scores"]) for r in ranked)
    assert len(rows) + sum(m["dropped_parts"].get("pair", {}).values()) == expected > 0
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    again = run_synth(
        tmp_path,
        "rs_dpo",
        "pipeline.k=4",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.sampling.seed=0",
        f"pipeline.scorer.path={tiny_score_model}",
        "pipeline.scorer.device=cpu",
        "pipeline.eta=0.5",
        "pipeline.tau=0.001",
        "pipeline.drop_truncated=false",
    )
    assert again["processed"] == m["processed"] and again["resumed_from_previous_runs"] == m["inputs"]


def test_missing_reward_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        run_synth(
            tmp_path,
            "rs_dpo",
            f"pipeline.scorer.path={tmp_path / 'nope'}",
            "pipeline.scorer.device=cpu",
            "pipeline.k=2",
            "pipeline.sampling.max_new_tokens=2",
            "pipeline.drop_truncated=false",
            n=1,
        )
    assert "pipeline.scorer.path=" in str(e.value) and "\n" not in str(e.value)
