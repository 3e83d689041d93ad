"""Generic text filters shared by pipelines (dedup before pairing: identical or
near-identical chosen/rejected texts carry no preference signal): normalisation, exact and
near-duplicate detection, CJK detection.

Near-duplicates are found by Jaccard similarity of character n-gram shingles of the normalised text.
Character shingles work the same way for English and Chinese (no word segmenter is needed for
Chinese), which is why they are used instead of word n-grams.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import defaultdict

_PUNCT_OR_SPACE = re.compile(r"[\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize_text(text: str) -> str:
    """Case-folded, NFKC-normalised (full-width -> half-width), punctuation and spacing collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _PUNCT_OR_SPACE.sub(" ", text).strip()


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Character n-grams of the normalised text (the whole text when it is shorter than n)."""
    norm = normalize_text(text)
    if len(norm) <= n:
        return frozenset([norm]) if norm else frozenset()
    return frozenset(norm[i : i + n] for i in range(len(norm) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def similarity(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of character n-gram shingles, in [0, 1]; 1.0 for equal normalised texts."""
    if normalize_text(a) == normalize_text(b):
        return 1.0
    return jaccard(shingles(a, n), shingles(b, n))


def near_identical(a: str, b: str, threshold: float = 0.9, n: int = 3) -> bool:
    """True when two texts are equal after normalisation or their shingle Jaccard >= threshold."""
    return similarity(a, b, n) >= threshold


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


class NearDuplicateIndex:
    """Exact + near-duplicate index over a growing set of texts.

    `check(text)` returns ("exact" | "near", key of the earlier text) or None; `add(key, text)` inserts;
    `add_unless_duplicate(key, text)` does both as one step, safe when chunks run in several threads.
    Candidates come from an inverted index over shingles, so a lookup only scores texts that share at
    least one shingle instead of every text seen so far.
    """

    def __init__(self, threshold: float = 0.8, n: int = 3):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.n = n
        self._exact: dict[str, str] = {}
        self._shingles: dict[str, frozenset[str]] = {}
        self._postings: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._shingles)

    def check(self, text: str) -> tuple[str, str] | None:
        norm = normalize_text(text)
        if norm in self._exact:
            return "exact", self._exact[norm]
        mine = shingles(text, self.n)
        overlap: dict[str, int] = defaultdict(int)
        for s in mine:
            for key in self._postings.get(s, ()):
                overlap[key] += 1
        for key, inter in overlap.items():
            other = self._shingles[key]
            if inter / (len(mine) + len(other) - inter) >= self.threshold:
                return "near", key
        return None

    def add(self, key: str, text: str) -> None:
        norm = normalize_text(text)
        self._exact.setdefault(norm, key)
        sh = shingles(text, self.n)
        self._shingles[key] = sh
        for s in sh:
            self._postings[s].append(key)

    def add_unless_duplicate(self, key: str, text: str) -> tuple[str, str] | None:
        """`check`, then `add` when new, atomically: the duplicate found, or None when `text` was added."""
        with self._lock:
            dup = self.check(text)
            if dup is None:
                self.add(key, text)
            return dup
