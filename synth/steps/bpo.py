"""BPO steps (Cheng et al. 2023, arXiv 2311.04155; thu-coai/BPO).

- `build_construct` / `parse_optimized`: an LLM compares a good and a bad response and writes an
  optimised instruction; ONLY the text after `Optimized Instruction:` up to `[END]` is kept, with a safe
  quote stripper (the repo `eval()`s model output; never do that).
- `ratio_filter`: the repo's length-ratio filters (orig/opt > 2, opt/orig > 6) and the `[protected` check.
- `rewriter_messages`: THE rewriter input format, shared by the training rows (`pipeline=bpo`) and
  inference (`pipeline=bpo_rewrite`), so they always match.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from synth.prompts import render
from synth.records import Message, ParseResult
from synth.steps.base import user
from synth.steps.judge import conversation

END = "[END]"
# The English marker is BPO's; the Chinese ones are what the zh templates ask for.
_MARKERS = ("Optimized Instruction:", "优化后的指令：", "优化后的指令:")
_COMPARISON = re.compile(r"^\s*(?:Detailed Comparison Result|详细比较结果)\s*[:：]\s*")
_QUOTES = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("「", "」"), ("『", "』"))
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def rewriter_messages(language: str, prompt: str) -> list[Message]:
    """The rewriter's request for one user prompt (training input and inference input alike)."""
    return [user(render("bpo_rewriter", language, prompt=prompt))]


def build_construct(
    language: str,
    instruction: str,
    good: str,
    bad: str,
    context: str = "",
    history: Sequence[Message] = (),
) -> list[Message]:
    return [
        user(
            render(
                "bpo_construct",
                language,
                instruction=instruction,
                good=good,
                bad=bad,
                context=context,
                history=conversation(history),
            )
        )
    ]


def build_safety(language: str, prompt: str) -> list[Message]:
    return [user(render("bpo_safety", language, prompt=prompt))]


def strip_quotes(text: str) -> str:
    """Remove matching quotes around the whole text (what the repo used eval() for)."""
    text = text.strip()
    for left, right in _QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            return text[len(left) : -len(right)].strip()
    return text


def parse_optimized(text: str, require_end: bool = True) -> ParseResult:
    """{"comparison", "optimized"} from `...Optimized Instruction: <x> [END]`: the text is cut at the
    first [END]; the optimised instruction follows the LAST marker before it."""
    head, found_end, _ = text.partition(END)
    if require_end and not found_end:
        return ParseResult(raw=text, error="no [END] marker")
    cut = max(((head.rfind(m), m) for m in _MARKERS), key=lambda t: t[0])
    if cut[0] < 0:
        return ParseResult(raw=text, error="no 'Optimized Instruction:' marker")
    optimized = strip_quotes(head[cut[0] + len(cut[1]) :])
    if not optimized:
        return ParseResult(raw=text, error="empty optimized instruction")
    comparison = _COMPARISON.sub("", head[: cut[0]]).strip()
    return ParseResult(raw=text, parsed={"comparison": comparison, "optimized": optimized}, parse_status="ok")


def parse_rewrite(text: str) -> ParseResult:
    """A trained rewriter's output is the optimised prompt itself (its training target)."""
    rewritten = strip_quotes(text.partition(END)[0])
    if not rewritten:
        return ParseResult(raw=text, error="empty rewrite")
    return ParseResult(raw=text, parsed=rewritten, parse_status="ok")


def count_words(text: str) -> int:
    """Words for the ratio filters; each CJK character counts as one word (Chinese has no spaces)."""
    return len(_WORD.findall(text))


def ratio_filter(original: str, optimized: str, max_shrink: float = 2.0, max_growth: float = 6.0) -> str | None:
    """The reason to drop an optimised prompt, or None (the filters of thu-coai/BPO's
    data construction, src/data_construction/process_optimized_prompts.py)."""
    if "[protected" in optimized:
        return "protected_marker"
    n_orig, n_opt = count_words(original), count_words(optimized)
    if n_opt == 0 or n_orig / n_opt > max_shrink:
        return "ratio_shrunk"  # the optimised prompt lost too much of the original
    if n_orig and n_opt / n_orig > max_growth:
        return "ratio_ballooned"
    return None


def attach_context(instruction: str, context: str, rng: random.Random) -> str:
    """Re-attach an Alpaca-style context in a randomised layout (as thu-coai/BPO's data
    construction does: newline-separated half of the
    time, otherwise space-separated (1/4) or quoted (3/4)); a text that already holds it is kept."""
    if not context or context in instruction:
        return instruction
    if rng.random() < 0.5:
        parts = [instruction, context] if rng.random() < 0.5 else [context, instruction]
        return "\n".join(parts)
    return f"{instruction} {context}" if rng.random() < 0.25 else f'{instruction} "{context}"'
