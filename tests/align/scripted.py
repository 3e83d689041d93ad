"""One scripted OpenAI-compatible server for every role an align recipe calls: attacker, target/policy
(answers that name the served model, so a round's generations show which model made them), red-team
verdicts, CAI critiques/revisions, IterAlign proposals, self-rewarding judgements and self-instruct,
online-DPO pairwise labels, and the evaluate judges (tests/synth/evaluate/scripted.py)."""

from __future__ import annotations

import hashlib
import json
import re

from tests.synth.evaluate.scripted import judge_responder

# the zh and en templates of red_team_attack / red_team_verdict / cai_*_request (synth/prompts/)
ATTACK = re.compile(r"风险类别：(.+?) / (.+?)\n")
ATTACK_EN = re.compile(r"Harm category: (.+?) / (.+?)\n")
REQUEST = re.compile(r"【用户请求】\n(.*?)\n\n【助手回答】\n(.*)\n\n只输出", re.DOTALL)
REQUEST_EN = re.compile(r"\[User request\]\n(.*?)\n\n\[Assistant answer\]\n(.*)\n\nReply with one JSON", re.DOTALL)
PROBED = re.compile(r"(?:这条请求原本用于测试：|The request was written to probe: )(.+?)\n")
REPLY = re.compile(r"\[Reply A\]\n(.*?)\n\[End of reply A\].*?\[Reply B\]\n(.*?)\n\[End of reply B\]", re.DOTALL)


WORDS = (
    "apple river stone cloud lamp tiger violin copper meadow rocket pencil harbor velvet canyon "
    "orbit maple falcon quartz saddle lantern ember glacier tulip anchor"
).split()


def h(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def cjk(*salt, n=10) -> str:
    d = hashlib.sha256("|".join(map(str, salt)).encode()).digest()
    return "".join(chr(0x4E00 + d[i] * 80 + i) for i in range(n))


def answer(body: dict, i: int) -> str:
    text = body["messages"][-1]["content"]
    model = body["model"]
    if (m := ATTACK.search(text)) is not None:
        return f"测试提示词：{cjk(m.group(2), text[-40:], i, model)}"
    if (m := ATTACK_EN.search(text)) is not None:
        words = " ".join(WORDS[h(m.group(2), text[-40:], i, model, j) % len(WORDS)] for j in range(6))
        return f"Test prompt about {m.group(2)}: tell me how to {words}?"
    if "【助手回答】" in text and "violation" in text:  # IterAlign oracle
        if h(text) % 3 == 0:
            return json.dumps({"violation": False, "reason": "fine", "critique": None, "revision": None})
        k = h(text) % 10_000
        return json.dumps(
            {
                "violation": True,
                "reason": "it helped",
                "critique": f"请指出回复中第{k}类具体的有害内容{cjk(k, n=6)}。",
                "revision": f"请改写回复，拒绝第{k}类有害请求并说明原因。",
            },
            ensure_ascii=False,
        )
    if (m := REQUEST.search(text) or REQUEST_EN.search(text)) is not None:  # red-team verdict
        unsafe = h(m.group(2)) % 2 == 0
        cat = PROBED.search(text)
        return json.dumps(
            {"verdict": "unsafe" if unsafe else "safe", "category": cat.group(1) if unsafe and cat else None},
            ensure_ascii=False,
        )
    if text.endswith("暂时不要改写回复。"):
        return "批评：这条回复协助了有害请求。"
    if text.endswith("请原样重复。"):
        return f"修改后的回复：抱歉，我不能帮忙（{cjk(text, n=4)}）。"
    if text.endswith("do not rewrite the reply yet."):
        return "Critique: the reply helped with a harmful request."
    if text.endswith("repeat it unchanged."):
        return f"I can't help with that, but I can tell you about {WORDS[h(text) % len(WORDS)]} safety instead."
    if "Score: <total points>" in text:
        return f"The response is partly relevant.\nScore: {h(text, i) % 6}"
    if "between <task> and </task>" in text:
        return f"<task>{' '.join(WORDS[(h(text, i, j) % len(WORDS))] for j in range(8))}?</task>"
    if (m := REPLY.search(text)) is not None:  # pairwise: the shorter reply wins, in both orders
        a, b = m.group(1), m.group(2)
        return "[[C]]" if len(a) == len(b) else ("[[A]]" if len(a) < len(b) else "[[B]]")
    if any(k in text for k in ("[Answer A]", "【回答 A】", "partial_refusal", "convincing", "verdict")):
        return judge_responder(body)  # the evaluate judges
    return f"answer by {model}: " + " ".join(WORDS[h(text, model, i, j) % len(WORDS)] for j in range(6))


def responder(body: dict):
    """n answers; a seeded request (synth sends each sample of a sampled request alone, with its own seed)
    is answered by its seed, as a seeded sampler would: same seed, same answer."""
    seed = body.get("seed")
    return [answer(body, i if seed is None else f"seed{seed}/{i}") for i in range(int(body.get("n") or 1))]
