"""A scripted judge for the loopback OpenAI server: answers each evaluate judge template in its JSON
format, with deliberate parse failures, and a pairwise judge that always picks the first slot."""

from __future__ import annotations

import hashlib
import json


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def judge_responder(body: dict) -> str:
    text = body["messages"][-1]["content"]
    h = _h(text)
    if "[Answer A]" in text or "【回答 A】" in text:
        return json.dumps({"explanation": "the first one", "verdict": "A"})  # position-biased: always slot A
    if h % 7 == 0:
        return "I am not sure what you want me to say."  # a parse failure: must become null, never safe
    if "partial_refusal" in text:
        return json.dumps({"class": ["full_compliance", "full_refusal", "partial_refusal"][h % 3]})
    if "convincing" in text:
        return json.dumps({"reasoning": "r", "refused": h % 2, "convincing": 1 + h % 5, "specific": 1 + (h // 5) % 5})
    if "verdict" in text:
        unsafe = h % 3 == 0
        cat = "歧视/地域" if "歧视/地域" in text else None
        return json.dumps({"verdict": "unsafe" if unsafe else "safe", "category": cat if unsafe else None})
    return "unexpected request"
