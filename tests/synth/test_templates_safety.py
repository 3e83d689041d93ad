"""Snapshot tests of the safety pipelines' templates (critique_revision, ai_feedback, red_team), en + zh.

Each template is rendered with fixed inputs and compared with tests/synth/snapshots/<name>.<lang>.txt.
After an intended template change, regenerate with `UPDATE_SNAPSHOTS=1 pytest tests/synth/test_templates_safety.py`
and review the diff of the snapshot files.
"""

import pytest

from synth.prompts import render
from synth.steps.attack import FAMILIES
from synth.steps.filters import has_cjk
from tests.synth.snapshot_check import assert_snapshot

CONVERSATION = {
    "en": [{"role": "user", "content": "How do I pick a lock?"}],
    "zh": [{"role": "user", "content": "怎么撬锁？"}],
}
TEXT = {
    "en": {
        "critique": "Identify harmful content.",
        "revision": "Rewrite it safely.",
        "question": "Which reply is less harmful?",
        "a": "Use a tension wrench.",
        "b": "I can't help with that.",
        "reasoning": "Reply (B) declines.",
        "l1": "Harm",
        "l2": "Weapons",
        "description": "Weapons and violence.",
        "guidance": "Ask for weapon details.",
        "prompt": "Tell me how to pick a lock.",
        "answer": "Sure: first...",
    },
    "zh": {
        "critique": "指出回复中的有害内容。",
        "revision": "请安全地改写回复。",
        "question": "哪条回复更无害？",
        "a": "用张力扳手。",
        "b": "这个我不能帮忙。",
        "reasoning": "回复 (B) 拒绝了请求。",
        "l1": "侵犯他人",
        "l2": "隐私权",
        "description": "刺探他人隐私。",
        "guidance": "试探是否协助偷看聊天记录。",
        "prompt": "教我偷看别人的聊天记录。",
        "answer": "好的，首先……",
    },
}


def renders(lang: str) -> dict[str, str]:
    t = TEXT[lang]
    out = {
        "cai_critique_request": render("cai_critique_request", lang, critique=t["critique"]),
        "cai_revision_request": render("cai_revision_request", lang, revision=t["revision"]),
        "mc_compare": render(
            "mc_compare",
            lang,
            conversation=CONVERSATION[lang],
            question=t["question"],
            response_a=t["a"],
            response_b=t["b"],
        ),
        "mc_answer_stem": "\n---\n".join(
            render("mc_answer_stem", lang, stage=s, reasoning=t["reasoning"])
            for s in ("answer", "reason", "cot_answer")
        ),
        "red_team_attack": "\n---\n".join(
            render(
                "red_team_attack",
                lang,
                l1=t["l1"],
                l2=t["l2"],
                description=t["description"],
                guidance=t["guidance"],
                family=f,
            )
            for f in FAMILIES
        ),
        "red_team_verdict": render(
            "red_team_verdict",
            lang,
            prompt=t["prompt"],
            answer=t["answer"],
            category=f"{t['l1']}/{t['l2']}",
            categories=[f"{t['l1']}/{t['l2']}", "歧视/地域"],
        ),
    }
    return out


CASES = [(name, lang) for lang in ("en", "zh") for name in renders(lang)]


@pytest.mark.parametrize("name,lang", CASES, ids=[f"{n}.{lang}" for n, lang in CASES])
def test_template_matches_snapshot(name, lang):
    assert_snapshot(name, lang, renders(lang)[name] + "\n")


@pytest.mark.parametrize("name", sorted({n for n, _ in CASES}))
def test_zh_templates_are_chinese_and_differ_from_en(name):
    zh, en = renders("zh")[name], renders("en")[name]
    for part in zh.split("\n---\n"):
        assert has_cjk(part), part
    assert zh != en


def test_every_attack_family_has_its_own_block():
    for lang in ("en", "zh"):
        texts = {
            f: render("red_team_attack", lang, l1="x", l2="y", description="d", guidance="g", family=f)
            for f in FAMILIES
        }
        assert len(set(texts.values())) == len(FAMILIES)
