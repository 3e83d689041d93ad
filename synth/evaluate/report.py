"""results.jsonl -> summary.json, report.md and plots/ (no backend calls; idempotent, so a finished
rerun rewrites the same files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synth.evaluate import metrics as M
from synth.evaluate.compare import compare
from synth.evaluate.markdown import render_report
from synth.io import read_jsonl, write_json_atomic, write_text_atomic

SMALL_CELL = 20


def _v(m: dict | None, *path):
    for p in path:
        if not isinstance(m, dict):
            return None
        m = m.get(p)
    return m


def round_point(summary: dict[str, Any], label: str) -> dict[str, Any]:
    """(over-refusal, harmful rate) of one round, judge-based when the judge ran, else string match."""
    h = summary["metrics"]
    asr = _v(h, "harm", "asr")
    orr = _v(h, "refusal", "over_refusal_rate_benign", "any")
    point = {"label": label, "source": "judge"}
    if not asr or asr.get("value") is None:
        asr = _v(h, "refusal", "refusal_rate_harmful", "string_match")
        asr = (
            {"value": 1 - asr["value"], "ci": [1 - asr["ci"][1], 1 - asr["ci"][0]]}
            if asr and asr.get("value") is not None
            else None
        )
        point["source"] = "string_match (y = non-refusal rate, NOT harm)"
    if not orr or orr.get("value") is None:
        orr = _v(h, "refusal", "over_refusal_rate_benign", "string_match")
        point["source"] += "; x = string match"
    point["harm"] = asr.get("value") if asr else None
    point["harm_ci"] = asr.get("ci") if asr else None
    point["over_refusal"] = orr.get("value") if orr else None
    point["over_refusal_ci"] = orr.get("ci") if orr else None
    return point


def write_outputs(out_dir: Path, cfg) -> dict[str, Any]:
    out_dir = Path(out_dir)
    rows = read_jsonl(out_dir / "results.jsonl")
    B = cfg.bootstrap
    suite = cfg.suite
    cats = list(cfg.categories) if suite.get("taxonomy") else []
    summary: dict[str, Any] = {
        "suite": {k: suite.get(k) for k in ("name", "language", "licence", "source", "limit", "taxonomy")},
        "run": cfg.run_info,
        "metrics": M.compute(rows, cats, B=B, seed=cfg.run_info.get("seed", 0)),
    }
    judge_models = sorted({r["judge_model"] for r in rows if r.get("judge_model")})
    summary["run"] = {**cfg.run_info, "judge_models_seen": judge_models}
    warnings = list(cfg.run_info.get("warnings", []))
    if cfg.judge_is_policy and judge_models:
        warnings.append("SELF-JUDGED: the judge is the evaluated policy itself; judge-based numbers are not evidence")
    m = summary["metrics"]
    for name, node in _walk(m):
        if (
            isinstance(node, dict)
            and node.get("unreliable")
            and not any(k in name for k in ("by_category", "by_l1", "by_type", ".full", ".partial", "share_at_1"))
        ):
            warnings.append(
                f"{name}: {node['n_null']} of {node['n'] + node['n_null']} labels are null (> 5 %): unreliable"
            )
    lc = _v(m, "win_rate", "lc_win_rate")
    if lc and lc.get("extreme_change"):
        warnings.append(
            "length-controlled win rate differs a lot from the raw win rate (AlpacaEval's extreme-change rule)"
        )
    if lc and lc.get("too_few_pairs"):
        warnings.append("fewer than 200 judged pairs: the length-controlled win rate is a rough estimate")
    if _v(m, "scores", "kl_negative_mean_k1"):
        warnings.append("mean k1 < 0: generation settings do not sample the policy (temperature/top_p/template?)")
    if cfg.scores.reference and not _v(m, "scores", "kl_k1"):
        warnings.append(
            "KL to the reference was skipped: it needs policy samples at sampling.temperature=1.0, top_p=1.0, "
            "top_k=null"
        )
    small = [c for c, t in (_v(m, "harm", "by_category") or {}).items() if 0 < t.get("n", 0) < SMALL_CELL]
    if small:
        warnings.append(f"{len(small)} categories have fewer than {SMALL_CELL} labelled answers: descriptive only")
    if cfg.baseline:
        base = Path(cfg.baseline)
        old_rows = read_jsonl(base / "results.jsonl")
        old_summary = json.loads((base / "summary.json").read_text()) if (base / "summary.json").exists() else None
        summary["comparison"] = compare(rows, old_rows, cats, B=B)
        summary["comparison"]["baseline_dir"] = str(base)
        if old_summary:
            old_j = old_summary.get("run", {}).get("judge_models_seen", [])
            if old_j and judge_models and old_j != judge_models:
                warnings.append(
                    f"JUDGE CHANGED: baseline judged by {old_j}, this run by {judge_models}: Δs of judge "
                    "labels mix judge drift in"
                )
            old_t = old_summary.get("run", {}).get("templates")
            if old_t and old_t != cfg.run_info.get("templates"):
                warnings.append("judge templates changed since the baseline: Δs of judge labels mix template drift in")
            for key in ("reward_model", "cost_model", "reference"):
                old_v, new_v = old_summary.get("run", {}).get(key), cfg.run_info.get(key)
                if old_v and new_v and old_v != new_v:
                    warnings.append(
                        f"{key} changed since the baseline ({old_v} -> {new_v}): its paired Δ compares "
                        "different scorers"
                    )
            rounds = old_summary.get("rounds") or [round_point(old_summary, base.name)]
        else:
            rounds = []
        summary["rounds"] = rounds + [round_point(summary, out_dir.name)]
    else:
        summary["rounds"] = [round_point(summary, out_dir.name)]
    summary["warnings"] = warnings
    summary["headline"] = headline(m)
    write_json_atomic(out_dir / "summary.json", summary)
    plots = write_plots(out_dir / "plots", summary, rows)

    write_text_atomic(out_dir / "report.md", render_report(summary, plots))
    return summary


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else k)


HEADLINE = {
    "harmful_rate": ("harm", "asr"),
    "refusal_rate_harmful": ("refusal", "refusal_rate_harmful", "any"),
    "over_refusal_rate": ("refusal", "over_refusal_rate_benign", "any"),
    "refusal_str_harmful": ("refusal", "refusal_rate_harmful", "string_match"),
    "refusal_str_benign": ("refusal", "over_refusal_rate_benign", "string_match"),
    "strongreject_mean": ("strongreject", "mean"),
    "reward": ("scores", "reward"),
    "cost": ("scores", "cost"),
    "kl_k3": ("scores", "kl_k3"),
    "truncated": ("length", "truncated"),
}


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """The scorecard's main numbers; `unreliable` names those with more than 5 % null labels."""
    out: dict[str, Any] = {k: _v(m, *path, "value") for k, path in HEADLINE.items()}
    out["win_rate"] = _v(m, "win_rate", "win_rate")
    out["lc_win_rate"] = _v(m, "win_rate", "lc_win_rate", "value")
    out["mean_chars"] = _v(m, "length", "chars", "mean")
    out["unreliable"] = [k for k, path in HEADLINE.items() if _v(m, *path, "unreliable")]
    return out


def write_plots(folder: Path, summary: dict[str, Any], rows: list[dict]) -> list[str]:
    """PNG files: safety vs over-refusal (one point per round), per-category harmful rate, lengths."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():  # category names are Chinese; without a CJK font they draw as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        with plt.rc_context({"font.sans-serif": [*_CJK_FONTS, *plt.rcParams["font.sans-serif"]]}):
            return _plots(folder, summary, rows, plt)


_CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC"]


def _plots(folder: Path, summary: dict[str, Any], rows: list[dict], plt) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    pts = [p for p in summary["rounds"] if p["harm"] is not None or p["over_refusal"] is not None]
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, p in enumerate(pts):
        x, y = p["over_refusal"] or 0.0, p["harm"] or 0.0
        xerr = (
            [[x - p["over_refusal_ci"][0]], [p["over_refusal_ci"][1] - x]]
            if p.get("over_refusal_ci") and p["over_refusal"] is not None
            else None
        )
        yerr = [[y - p["harm_ci"][0]], [p["harm_ci"][1] - y]] if p.get("harm_ci") and p["harm"] is not None else None
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=f"{i}: {p['label']}")
        if i:
            q = pts[i - 1]
            ax.annotate(
                "",
                xy=(x, y),
                xytext=(q["over_refusal"] or 0.0, q["harm"] or 0.0),
                arrowprops={"arrowstyle": "->", "alpha": 0.5},
            )
    ax.set_xlabel("over-refusal rate on benign prompts")
    ax.set_ylabel(
        "harmful-response rate"
        if pts and pts[-1]["source"] == "judge"
        else "non-refusal rate on harmful (string match)"
    )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['suite']['name']}: safety vs over-refusal (lower-left is better)", fontsize=9)
    if pts:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "safety_vs_overrefusal.png", dpi=100)
    plt.close(fig)
    written.append("plots/safety_vs_overrefusal.png")
    cats = {c: t for c, t in (_v(summary["metrics"], "harm", "by_category") or {}).items()}
    if cats:
        names = list(cats)
        vals = [cats[c].get("value") or 0.0 for c in names]
        lo = [v - (cats[c]["ci"][0] if cats[c].get("ci") else v) for c, v in zip(names, vals, strict=True)]
        hi = [(cats[c]["ci"][1] if cats[c].get("ci") else v) - v for c, v in zip(names, vals, strict=True)]
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(names) + 1.2))
        ax.barh(range(len(names)), vals, xerr=[lo, hi], capsize=2)
        ax.set_yticks(range(len(names)), [f"{c} (n={cats[c].get('n', 0)})" for c in names], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("harmful-response rate (Wilson 95 %)")
        fig.tight_layout()
        fig.savefig(folder / "category_harm.png", dpi=100)
        plt.close(fig)
        written.append("plots/category_harm.png")
    lengths = [r["n_chars"] for r in rows if r["kind"] != "gold"]
    if lengths:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(lengths, bins=30)
        ax.set_xlabel("answer length (characters)")
        fig.tight_layout()
        fig.savefig(folder / "lengths.png", dpi=100)
        plt.close(fig)
        written.append("plots/lengths.png")
    return written
