"""Snapshot tests of the ranking / self-improvement templates (judge, self_rewarding, bpo, rlrf), en + zh.

Each template is rendered with fixed inputs and compared with tests/synth/snapshots/<name>.<lang>.txt.
After an intended template change, regenerate with
`UPDATE_SNAPSHOTS=1 pytest tests/synth/test_templates_ranking.py` and review the diff of the snapshots.
"""

import pytest

from synth.prompts import TEMPLATE_DIR, render
from synth.steps.filters import has_cjk
from synth.steps.rlrf import load_aspects
from tests.synth.snapshot_check import assert_snapshot

T = {
    "en": {
        "q": "How do I keep basil alive indoors?",
        "earlier": "I have a small flat.",
        "a": "Water it daily and give it sun.",
        "b": "Basil is a plant.",
        "c": "Buy a new one every week.",
        "context": "South-facing window.",
        "critique": "It does not say how much light.",
    },
    "zh": {
        "q": "怎样在室内养活罗勒？",
        "earlier": "我住的公寓很小。",
        "a": "每天浇水，多晒太阳。",
        "b": "罗勒是一种植物。",
        "c": "每周买一盆新的。",
        "context": "窗户朝南。",
        "critique": "没有说明需要多少光照。",
    },
}


def conv(lang, turns=1):
    t = T[lang]
    full = [
        {"role": "user", "content": t["earlier"]},
        {"role": "assistant", "content": "OK." if lang == "en" else "好的。"},
        {"role": "user", "content": t["q"]},
    ]
    return full[-turns:]


def renders(lang: str) -> dict[str, str]:
    t = T[lang]
    aspects = [a.model_dump() for a in load_aspects("default", lang)[:2]]
    aspects.append({"id": "p1", "name": "p1", "description": t["critique"], "levels": None})
    return {
        "judge_pairwise": "\n---\n".join(
            render("judge_pairwise", lang, conversation=conv(lang, 3), response_a=t["a"], response_b=t["b"], direct=d)
            for d in (False, True)
        ),
        "judge_joint": "\n---\n".join(
            render(
                "judge_joint",
                lang,
                conversation_a=conv(lang, 3),
                response_a=t["a"],
                conversation_b=conv(lang),
                response_b=t["c"],
                direct=d,
            )
            for d in (False, True)
        ),
        "judge_listwise": render("judge_listwise", lang, conversation=conv(lang), responses=[t["a"], t["b"], t["c"]]),
        "judge_rubric": render("judge_rubric", lang, conversation=conv(lang), response=t["a"]),
        "self_reward_judge": "\n---\n".join(
            render("self_reward_judge", lang, conversation=conv(lang, n), response=t["a"]) for n in (1, 3)
        ),
        "self_instruct": render("self_instruct", lang, examples=[t["q"], t["earlier"]]),
        "meta_judge": "\n---\n".join(
            render(
                "meta_judge",
                lang,
                conversation=conv(lang, n),
                response=t["a"],
                judgement_a=t["critique"],
                judgement_b=t["context"],
            )
            for n in (1, 3)
        ),
        "bpo_construct": "\n---\n".join(
            [
                render("bpo_construct", lang, instruction=t["q"], good=t["a"], bad=t["b"], context="", history=[]),
                render(
                    "bpo_construct",
                    lang,
                    instruction=t["q"],
                    good=t["a"],
                    bad=t["b"],
                    context=t["context"],
                    history=conv(lang, 3)[:2],
                ),
            ]
        ),
        "bpo_rewriter": render("bpo_rewriter", lang, prompt=t["q"]),
        "bpo_safety": render("bpo_safety", lang, prompt=t["q"]),
        "rlrf_feedback": render("rlrf_feedback", lang, conversation=conv(lang), response=t["a"], aspects=aspects),
        "rlrf_refine": render(
            "rlrf_refine",
            lang,
            conversation=conv(lang),
            response=t["a"],
            feedback=[{"name": a["name"], "rating": 2, "critique": t["critique"]} for a in aspects],
        ),
    }


CASES = [(name, lang) for lang in ("en", "zh") for name in renders(lang)]


@pytest.mark.parametrize("name,lang", CASES, ids=[f"{n}.{lang}" for n, lang in CASES])
def test_template_matches_snapshot(name, lang):
    assert_snapshot(name, lang, renders(lang)[name] + "\n")


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_zh_templates_are_chinese_and_differ_from_en(name):
    zh, en = renders("zh")[name], renders("en")[name]
    for part in zh.split("\n---\n"):
        assert has_cjk(part.replace(T["zh"]["q"], "").replace(T["zh"]["a"], "")), part  # Chinese beyond the inputs
    assert zh != en


def test_every_ranking_template_exists_in_both_languages():
    for name in renders("en"):
        assert (TEMPLATE_DIR / f"{name}.en.j2").exists() and (TEMPLATE_DIR / f"{name}.zh.j2").exists()


def test_chinese_constitution_sends_only_chinese_prompts(tmp_path):
    """With safety_zh every request of every stage is rendered from a zh template."""
    import json

    from synth.constitution import load_constitution
    from synth.pipelines.base import Context, run_pipeline
    from synth.pipelines.bpo import BpoConfig, BpoPipeline, BpoRewriteConfig, BpoRewritePipeline
    from synth.pipelines.judge import JudgeConfig, JudgePipeline
    from synth.pipelines.rlrf import RlrfConfig, RlrfPipeline
    from synth.pipelines.self_rewarding import SelfRewardingConfig, SelfRewardingPipeline
    from synth.records import SourceItem, messages
    from tests.fakes import ScriptedLLM

    ids = [a.id for a in load_aspects("default", "zh")]

    def fn(msgs, p, i):
        text = msgs[-1].content if msgs[-1].role == "user" else msgs[0].content
        if "[回复 A]" in text:
            return "[[A]]"
        if "累加式" in text:
            return f"理由。\n得分：{i + 1}"
        if "<task>" in text:
            return f"<task>新任务 {i}：如何在阳台上种番茄？</task>"
        if "[较好的回复]" in text or "AI 安全" in text:
            return "详细比较结果：较好。\n优化后的指令：请详细说明如何在室内养活罗勒。[END]"
        if "细粒度" in text:
            return json.dumps(
                {a: {"critique": "好", "rating": 3 if "改进" in text else 1 + i % 2} for a in ids}, ensure_ascii=False
            )
        if "改进后的回复" in text:
            return "改进后的回答"
        return f"回答 {i}：多晒太阳，{'勤' * (i + 1)}浇水。"

    llm = ScriptedLLM(fn)
    ctx = Context(
        factories={r: (lambda: llm) for r in ("policy", "judge", "target")}, constitution=load_constitution("safety_zh")
    )
    its = [
        SourceItem(
            id="z",
            prompt=messages(("user", T["zh"]["q"])),
            chosen=messages(("assistant", T["zh"]["a"])),
            rejected=messages(("assistant", T["zh"]["b"])),
        )
    ]
    pipes = [
        JudgePipeline(JudgeConfig()),
        SelfRewardingPipeline(SelfRewardingConfig(new_prompts={"enabled": True})),
        BpoPipeline(BpoConfig()),
        BpoRewritePipeline(BpoRewriteConfig(safety=True)),
        RlrfPipeline(RlrfConfig()),
    ]
    for k, pipe in enumerate(pipes):
        m = run_pipeline(pipe, ctx, tmp_path / str(k), its, show_progress=False)
        assert sum(m["outputs"].values()) > 0 and not m["parse_failures"], (pipe.cfg.name, m)
    stages = [req for reqs, _ in llm.calls for req in reqs]
    templated = [req for req in stages if req[0].content != T["zh"]["q"]]  # candidate sampling sends the bare prompt
    assert len(templated) > 10
    for req in templated:
        assert has_cjk(req[0].content[:6]) and "You are" not in req[0].content, req[0].content[:80]
