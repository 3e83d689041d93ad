"""R-Tuning's knowledge probe (Zhang et al., NAACL 2024, arXiv 2311.09677; the official repository
shizhediao/R-Tuning, `training/*/run_*.py`): does the model already know the reference answer?

- `probe_answer`: the model's greedy answer cut at the first "." (as the repository reads it);
- `matches`: the answer against the reference and its aliases. `substring` is the repository's test
  (the reference, case-sensitive, inside the answer); `normalized` compares lower-cased text without
  punctuation, articles and extra spaces (SQuAD's normalisation), still by containment; `exact` asks
  the normalised answer to equal a normalised reference. Containment inflates "certain" for very short
  references ("1" is inside "1990"), which is why the stricter modes exist.
- `certainty_target`: the training target: the reference answer, then the certainty question and
  " I am sure." or " I am unsure." (R-Tuning); or, for R-Tuning-R, a fixed refusal sentence instead of
  the answer when the model did not know it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》")


def probe_answer(text: str, cut_at: str | None = ".") -> str:
    """The text up to (not including) the first `cut_at`; the whole text when there is none."""
    if cut_at:
        idx = text.find(cut_at)
        if idx >= 0:
            text = text[:idx]
    return text.strip()


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def matches(answer: str, references: Sequence[str], mode: str) -> bool:
    """True when the probe answer contains (or, for `exact`, equals) any reference."""
    for ref in references:
        if mode == "substring":
            if ref and ref in answer:
                return True
        else:
            a, r = normalize_answer(answer), normalize_answer(ref)
            if r and ((a == r) if mode == "exact" else (r in a)):
                return True
    return False


def with_period(answer: str) -> str:
    """`{answer}.` as the repository writes it, without doubling a final full stop."""
    answer = answer.strip()
    return answer if answer.endswith((".", "!", "?", "。", "！", "？")) else answer + "."
