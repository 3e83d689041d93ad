"""`pipeline=rlrf` (Lee et al. 2024, arXiv 2403.14238): aspects, feedback parsing, refinement, what is paired
with what."""

import json

import pytest

from synth.constitution import load_constitution
from synth.io import read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.rlrf import RlrfConfig, RlrfPipeline
from synth.records import SourceItem, messages
from synth.steps.rlrf import Aspect, aspect_score, load_aspects, parse_feedback, select_aspects
from synth.testing.loopback import LoopbackServer
from tests.synth.ranking_helpers import check_outputs, loopback, run_synth

ASPECTS = ["factuality", "logical_correctness", "completeness", "insightfulness", "readability", "harmlessness"]


def feedback(rating, aspects=ASPECTS, fence=False):
    blob = json.dumps({a: {"critique": f"critique of {a}", "rating": rating} for a in aspects})
    return f"```json\n{blob}\n```" if fence else blob


def items(n=2, category=None):
    return [SourceItem(id=f"q{i}", prompt=messages(("user", f"question {i}")), category=category) for i in range(n)]


def response_of(prompt):
    return prompt.split("[Response]\n")[1].split("\n[End of response]")[0]


class Scripted:
    """Policy and judge in one fake: candidates 'draft <i> ...', refinements 'better: <draft>'."""

    def __init__(
        self, rate, drafts=("short draft", "a longer draft answer", "draft three here", "draft four, the last")
    ):
        from tests.fakes import ScriptedLLM

        self.rate, self.drafts = rate, drafts
        self.llm = ScriptedLLM(self.respond, model="pol")

    def respond(self, msgs, p, i):
        text = msgs[-1].content
        if "fine-grained feedback" in text:
            return self.rate(response_of(text))
        if "Write only the improved response." in text:
            return "better: " + response_of(text)
        return self.drafts[i]


def run(tmp_path, scripted, cfg=None, its=None, constitution=None):
    ctx = Context(factories={"policy": lambda: scripted.llm, "judge": lambda: scripted.llm}, constitution=constitution)
    m = run_pipeline(RlrfPipeline(RlrfConfig(**(cfg or {}))), ctx, tmp_path, its or items(), show_progress=False)
    return m, read_jsonl(tmp_path / "preferences.jsonl")


def test_parse_feedback():
    assert parse_feedback(feedback(2, ["a"], fence=True)).parsed == {"a": {"critique": "critique of a", "rating": 2}}
    assert parse_feedback("Here you go: " + feedback(3, ["a", "b"]) + " done").parsed["b"]["rating"] == 3
    bad_outputs = (
        '{"a": {"critique": "x", "rating": 4}}',
        '{"a": {"rating": 2}}',
        "not json",
        "{}",
        '{"a": {"critique": "x", "rating": true}}',
    )
    for bad in bad_outputs:
        j = parse_feedback(bad)
        assert not j.ok and j.parsed is None, bad


def test_aspect_score_needs_every_selected_aspect():
    asp = [Aspect(id="a", name="A", description="d"), Aspect(id="b", name="B", description="d")]
    assert aspect_score({"a": {"rating": 3}, "b": {"rating": 2}}, asp) == 2.5
    assert aspect_score({"a": {"rating": 3}}, asp) is None and aspect_score(None, asp) is None


def test_load_aspects_default_constitution_and_file(tmp_path):
    assert [a.id for a in load_aspects("default", "en")] == ASPECTS
    zh = load_aspects("default", "zh")
    assert [a.id for a in zh] == ASPECTS and zh[0].name == "事实性" and zh[0].levels[3]
    const = load_constitution("hhh_en")
    assert [a.id for a in load_aspects("constitution", "en", const)] == [p.id for p in const.principles]
    bad = tmp_path / "r.yaml"
    bad.write_text("aspects:\n  - id: x\n    name: X\n")
    with pytest.raises(ValueError, match="description"):
        load_aspects(str(bad), "en")
    with pytest.raises(FileNotFoundError, match="criteria"):
        load_aspects(str(tmp_path / "none.yaml"), "en")


def test_select_aspects_prefers_category_and_is_deterministic():
    const = load_constitution("hhh_en")
    aspects = load_aspects("constitution", "en", const)
    cat = {p.id: p.category for p in const.principles}
    ctx = Context(factories={})
    it = SourceItem(id="x", prompt=messages(("user", "q")), category="honesty")
    picked = select_aspects(ctx, it, aspects, 3, cat)
    assert picked == select_aspects(ctx, it, aspects, 3, cat) and len(picked) == 3
    assert all(cat[a.id] == "honesty" for a in picked)


def test_exact_rows_refined_best_vs_lowest_and_one_call_per_stage(tmp_path):
    def rate(resp):  # refinements score 3, the long drafts 2, the short one 1
        return feedback(3 if resp.startswith("better:") else 2 if len(resp) > 12 else 1)

    s = Scripted(rate)
    m, rows = run(tmp_path, s, its=items(2, category="general"))
    assert m["calls"] == {"candidates": 2, "rlrf_feedback": 8, "rlrf_refine": 4, "rlrf_rejudge": 4}
    assert len(s.llm.calls) == 4  # sample, feedback, refine, re-judge: one batched call each
    feedback_params = s.llm.calls[1][1][0]
    assert feedback_params.json_schema["required"] == ASPECTS and feedback_params.temperature == 0.0
    row = rows[0]
    assert row["chosen"][0]["content"] == "better: a longer draft answer"  # the top draft (index 1), refined
    assert row["rejected"][0]["content"] == "short draft"
    assert (row["score_chosen"], row["score_rejected"], row["margin"]) == (3.0, 1.0, 2.0)
    meta = row["meta"]
    assert meta["chosen"]["source"] == "refined" and meta["chosen"]["refined_from"] == 1
    assert meta["rejected"]["source"] == "sample" and meta["rejected"]["aspect_scores"] == dict.fromkeys(ASPECTS, 1)
    assert meta["chosen"]["feedback"]["readability"] == {"critique": "critique of readability", "rating": 3}
    assert meta["refinements"] == [{"from": 1, "before": 2.0, "after": 3.0}, {"from": 2, "before": 2.0, "after": 3.0}]
    assert row["method"] == "rlrf" and row["category"] == "general" and m["per_category"] == {"general": 2}
    refine_prompt = s.llm.calls[2][0][0][0].content
    assert "- Factuality (rated 2 of 3): critique of factuality" in refine_prompt
    assert m["rlrf"]["chosen_is_refined_rate"] == 1.0 and m["rlrf"]["refinements_improved_rate"] == 1.0


def test_refined_vs_original_pairs_only_improvements(tmp_path):
    def rate(resp):  # the refinement of draft 1 improves it; the refinement of draft 2 does not
        if resp.startswith("better:"):
            return feedback(3 if "longer" in resp else 1)
        return feedback(2 if len(resp) > 12 else 1)

    m, rows = run(tmp_path, Scripted(rate), {"pairing": "refined_vs_original"}, items(1))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("better: a longer draft answer", "a longer draft answer")
    ]
    assert m["rlrf"]["refinements_improved_rate"] == 0.5


def test_feedback_failures_are_never_scored(tmp_path):
    def rate(resp):
        if resp == "short draft":
            return "I think it is fine."  # unparseable
        if resp == "draft three here":
            return feedback(1, ASPECTS[:3])  # parsed, but aspects missing
        return feedback(2 if not resp.startswith("better:") else 3)

    m, rows = run(tmp_path, Scripted(rate), its=items(1))
    assert m["parse_failures"] == {"rlrf_feedback": 1}
    assert m["drops"] == {} and m["dropped_parts"] == {"candidate": {"feedback_missing_aspects": 1}}
    # only drafts 1 and 3 were scored (2.0): they are refined; the lowest is an unrefined scored draft
    assert rows[0]["rejected"][0]["content"] in {"a longer draft answer", "draft four, the last"}
    assert "short draft" not in {rows[0]["rejected"][0]["content"], rows[0]["chosen"][0]["content"]}


def test_constant_scores_give_no_pairs(tmp_path):
    m, rows = run(tmp_path, Scripted(lambda resp: feedback(2)))
    assert rows == [] and m["drops"] == {"tie": 2}


def test_constitution_criteria_set_principle_ids(tmp_path):
    const = load_constitution("hhh_en")
    ids = {p.id for p in const.principles}

    def rate(resp):
        return json.dumps(
            {i: {"critique": "c", "rating": 3 if resp.startswith("better") else 1 + len(resp) % 2} for i in ids}
        )

    m, rows = run(
        tmp_path, Scripted(rate), {"criteria": "constitution", "max_aspects": 3}, items(1), constitution=const
    )
    assert len(rows[0]["principle_ids"]) == 3 and set(rows[0]["principle_ids"]) <= ids
    assert rows[0]["meta"]["aspects"] == rows[0]["principle_ids"]


# --------------------------------------------------------------------------- real backends


def test_over_the_loopback_server(tmp_path):
    def responder(body):
        text = body["messages"][-1]["content"]
        if "fine-grained feedback" in text:
            return feedback(3 if response_of(text).startswith("better:") else 2 if len(response_of(text)) > 12 else 1)
        if "Write only the improved response." in text:
            return "better: " + response_of(text)
        return ["short draft", "a longer draft answer", "draft three here", "draft four, the last"]

    with LoopbackServer(responder=responder) as server:
        m = run_synth(tmp_path, "rlrf", backend=loopback(server.url), n=2)
    rows = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"]) for r in rows] == [
        ("better: a longer draft answer", "short draft", 2.0)
    ] * 2
    assert m["calls"] == {"candidates": 2, "rlrf_feedback": 8, "rlrf_refine": 4, "rlrf_rejudge": 4}
    check_outputs(tmp_path / "out", m)


@pytest.mark.slow
def test_end_to_end_tiny_hf(tmp_path):
    m = run_synth(
        tmp_path,
        "rlrf",
        "pipeline.n=2",
        "pipeline.sampling.max_new_tokens=8",
        "pipeline.feedback_sampling.max_new_tokens=8",
        "pipeline.refine_sampling.max_new_tokens=8",
        "pipeline.drop_truncated=false",
    )  # the tiny model never stops
    check_outputs(tmp_path / "out", m)
    assert m["parse_failures"]["rlrf_feedback"] + m["truncated"].get("rlrf_feedback", 0) > 0
