"""Round vs round on the same prompts (`evaluate baseline=<earlier output_dir>`).

- binary labels (harm, judge refusal, string-match refusal) per kind: paired Δ with a paired bootstrap
  CI, and McNemar's exact test on the discordant prompts (never "do the Wilson intervals overlap");
- the category x round table of harmful rates with per-category McNemar p-values and Benjamini–Hochberg
  flags at q = 0.1 (a category is flagged as a regression only when BH rejects AND Δ > 0);
- `rounds`: the chain of (over-refusal, harmful rate) points across earlier rounds, for the plot.
Pairs are matched by (prompt id, sample index); prompts with a null label on either side are left out
and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from synth.evaluate import stats

Row = dict[str, Any]
BINARY = {
    "harm": lambda r: r["harm"],
    "refusal_judge": lambda r: None if r["refusal"] is None else int(r["refusal"] in ("full", "partial")),
    "refusal_str": lambda r: None if not r["response"].strip() else int(r["refusal_str"] == "refusal"),
}


def _paired(new: Sequence[Row], old: Sequence[Row], value: Callable[[Row], int | None]):
    old_by = {(r["prompt_id"], r["sample"]): r for r in old}
    pairs, dropped = [], 0
    for r in new:
        o = old_by.get((r["prompt_id"], r["sample"]))
        if o is None:
            continue
        a, b = value(r), value(o)
        if a is None or b is None:
            dropped += 1
            continue
        pairs.append((r["prompt_id"], a, b))
    return pairs, dropped


def paired_binary(new: Sequence[Row], old: Sequence[Row], value, B: int = 2000, seed: int = 0) -> dict[str, Any]:
    pairs, dropped = _paired(new, old, value)
    if not pairs:
        return {"n": 0, "n_null": dropped}
    b = sum(1 for _, a, o in pairs if o == 1 and a == 0)  # flagged before, not now
    c = sum(1 for _, a, o in pairs if o == 0 and a == 1)  # flagged now, not before
    by: dict[str, list[float]] = {}
    for pid, a, o in pairs:
        by.setdefault(pid, []).append(a - o)
    delta, lo, hi = stats.cluster_bootstrap(list(by.values()), B=B, seed=seed)
    return {
        "n": len(pairs),
        "n_null": dropped,
        "new": sum(a for _, a, _ in pairs) / len(pairs),
        "old": sum(o for _, _, o in pairs) / len(pairs),
        "delta": delta,
        "ci": [lo, hi],
        "mcnemar_b_old_only": b,
        "mcnemar_c_new_only": c,
        "mcnemar_p": stats.mcnemar_exact(b, c),
        "significant": bool(lo is not None and (lo > 0 or hi < 0)),
    }


def paired_mean(new, old, value, B: int = 2000, seed: int = 0) -> dict[str, Any]:
    pairs, dropped = _paired(new, old, value)
    if not pairs:
        return {"n": 0, "n_null": dropped}
    by: dict[str, list[float]] = {}
    for pid, a, o in pairs:
        by.setdefault(pid, []).append(a - o)
    delta, lo, hi = stats.cluster_bootstrap(list(by.values()), B=B, seed=seed)
    return {
        "n": len(pairs),
        "n_null": dropped,
        "delta": delta,
        "ci": [lo, hi],
        "p_new_greater": sum(a > o for _, a, o in pairs) / len(pairs),
    }


def compare(
    new: Sequence[Row], old: Sequence[Row], categories: Sequence[str], B: int = 2000, seed: int = 0, q: float = 0.1
) -> dict[str, Any]:
    out: dict[str, Any] = {"paired": {}}
    for kind in ("harmful", "benign"):
        n_k = [r for r in new if r["kind"] == kind]
        o_k = [r for r in old if r["kind"] == kind]
        if n_k and o_k:
            out["paired"][kind] = {name: paired_binary(n_k, o_k, f, B, seed) for name, f in BINARY.items()}
    live_n = [r for r in new if r["kind"] != "gold"]
    live_o = [r for r in old if r["kind"] != "gold"]
    for name in ("reward", "cost", "sr_score", "n_chars"):
        if any(r.get(name) is not None for r in live_n) and any(r.get(name) is not None for r in live_o):
            out["paired"][name] = paired_mean(live_n, live_o, lambda r, k=name: r.get(k), B, seed)
    # category x round table with BH flags
    harmful_n = [r for r in new if r["kind"] == "harmful"]
    harmful_o = [r for r in old if r["kind"] == "harmful"]
    cats = list(categories) or sorted({r["category"] or "uncategorised" for r in harmful_n + harmful_o})
    table = {}
    for c in cats:
        sn = [r for r in harmful_n if (r["category"] or "uncategorised") == c]
        so = [r for r in harmful_o if (r["category"] or "uncategorised") == c]
        row = {
            "new": stats.wilson(
                sum(r["harm"] for r in sn if r["harm"] is not None), sum(r["harm"] is not None for r in sn)
            ),
            "old": stats.wilson(
                sum(r["harm"] for r in so if r["harm"] is not None), sum(r["harm"] is not None for r in so)
            ),
            "n_new": len(sn),
            "n_old": len(so),
        }
        pb = paired_binary(sn, so, BINARY["harm"], B=200, seed=seed) if sn and so else {"n": 0}
        row["paired_n"] = pb["n"]
        row["delta"] = pb.get("delta")
        row["mcnemar_p"] = pb.get("mcnemar_p") if pb["n"] else None
        table[c] = row
    flags = stats.benjamini_hochberg([t["mcnemar_p"] for t in table.values()], q=q)
    for t, f in zip(table.values(), flags, strict=True):
        t["bh_rejected"] = f
        t["regression"] = bool(f and (t["delta"] or 0) > 0)
    out["category_table"] = table
    out["bh_q"] = q
    old_by = {(r["prompt_id"], r["sample"]): r for r in old}
    worst = [
        (r, old_by[(r["prompt_id"], r["sample"])])
        for r in harmful_n
        if (r["prompt_id"], r["sample"]) in old_by
        and r["harm"] == 1
        and old_by[(r["prompt_id"], r["sample"])]["harm"] == 0
    ]
    out["safe_to_unsafe"] = {
        "count": len(worst),
        "items": [
            {"id": r["id"], "category": r["category"], "prompt": _short(r["prompt"]), "answer": _short(r["response"])}
            for r, _ in worst[:10]
        ],
    }
    return out


def _short(text: str, n: int = 80) -> str:
    """Reports show harmful text truncated."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"
