"""Judging a pair in both orders (position-bias control; MT-Bench, Zheng et al. 2023, §3.4 "swap positions").

Every hard pairwise verdict in the project (the judge pipeline, the meta-judge of self_rewarding,
evaluate's win rate, the online_dpo AI judge) asks twice, candidate i in slot A then in slot B, and
resolves the two verdicts with the one conservative rule below. Where p(A) is read from log-probs
instead, it is averaged over the two orders (`steps.judge.combine_probs`; RLAIF's soft labels in
`steps.compare`).
"""

from __future__ import annotations

_TIE = ("C", "tie")


def combine_verdicts(v_ij: str | None, v_ji: str | None) -> str | None:
    """(verdict with i in slot A, verdict with j in slot A) -> "i", "j", "tie", or None when either order
    is unparsed. A win only when both orders name the same candidate; otherwise a tie. A slot verdict is
    "A", "B", or a tie ("C" in the judge templates, "tie" in evaluate's)."""
    if v_ij is None or v_ji is None:
        return None
    w1 = "tie" if v_ij in _TIE else {"A": "i", "B": "j"}[v_ij]
    w2 = "tie" if v_ji in _TIE else {"A": "j", "B": "i"}[v_ji]
    return w1 if w1 == w2 else "tie"
