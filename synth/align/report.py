"""The round report: one table and plots across rounds, read from each round's evaluate summary.json,
and the stop rule's verdict (report.md, report.json, plots/ in align's output_dir)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from synth.io import write_json_atomic, write_text_atomic

COLUMNS = [  # (label, summary path to the metric dict or value)
    ("harmful rate", ("metrics", "harm", "asr")),
    ("over-refusal", ("metrics", "refusal", "over_refusal_rate_benign", "any")),
    # the string matcher (synth/evaluate/refusal.py): the only refusal numbers when the LLM judges are off
    ("refusal rate, harmful (string match)", ("metrics", "refusal", "refusal_rate_harmful", "string_match")),
    ("over-refusal (string match)", ("metrics", "refusal", "over_refusal_rate_benign", "string_match")),
    ("win rate vs prev", ("metrics", "win_rate")),
    ("KL to initial (k3)", ("metrics", "scores", "kl_k3")),
    ("reward", ("metrics", "scores", "reward")),
    ("cost", ("metrics", "scores", "cost")),
    ("mean chars", ("metrics", "length", "chars")),
]


def _get(node: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return node


def point(m: Any) -> dict[str, Any]:
    """{value, ci} of a metric dict (win_rate keeps its value under `win_rate`), or Nones."""
    if not isinstance(m, dict):
        return {"value": m if isinstance(m, (int, float)) else None, "ci": None}
    v = m.get("value", m.get("win_rate", m.get("mean")))
    return {"value": v if isinstance(v, (int, float)) else None, "ci": m.get("ci")}


def rounds_table(out: Path, ledger) -> list[dict[str, Any]]:
    rows = []
    evals = sorted(
        ((int(k.split("/")[0]), e) for k, e in ledger.data["stages"].items() if e["tool"] == "evaluate"),
        key=lambda x: x[0],
    )
    for k, e in evals:
        p = Path(e["dir"]) / "summary.json"
        if not p.exists():
            continue
        s = json.loads(p.read_text())
        row = {"round": k, "dir": e["dir"], **{label: point(_get(s, path)) for label, path in COLUMNS}}
        if k == 0 or not (_get(s, ("metrics", "win_rate")) or {}).get("n"):
            row["win rate vs prev"] = {"value": None, "ci": None}
        train = [st for key, st in ledger.data["stages"].items() if key.startswith(f"{k}/") and st["tool"] == "train"]
        row["train steps"] = sum(st.get("steps") or 0 for st in train)
        row["model"] = next(
            (
                st["model"]["adapter"] or st["model"]["base"]["name_or_path"]
                for st in reversed(train)
                if st.get("model")
            ),
            None,
        )
        rows.append(row)
    return rows


def stop_verdict(rows: list[dict[str, Any]], rule, rounds_asked: int) -> tuple[dict[str, Any] | None, str]:
    """(stop record or None, one sentence). The win-rate rule stops when the last round's win rate
    against the previous round is not above 0.5 by its interval (lower bound <= 0.5)."""
    done = [r for r in rows if r["round"] >= 1]
    if not done:
        return None, "no round evaluated yet"
    last = done[-1]
    k = last["round"]
    wr = last["win rate vs prev"]
    reason = None
    if rule.rule == "win_rate" and k >= rule.min_rounds and k < rounds_asked:
        if wr["value"] is None or wr["ci"] is None:
            reason = f"the win rate of round {k} against round {k - 1} could not be measured (no pairwise judge result)"
        elif wr["ci"][0] <= 0.5:
            reason = (
                f"the win rate of round {k} against round {k - 1} is {wr['value']:.3f} "
                f"[{wr['ci'][0]:.3f}, {wr['ci'][1]:.3f}]: not above 0.5 by its interval"
            )
    if reason is None and rule.max_harmful_increase is not None and k < rounds_asked and len(rows) >= 2:
        a, b = rows[-2]["harmful rate"]["value"], last["harmful rate"]["value"]
        if a is not None and b is not None and b - a > rule.max_harmful_increase:
            reason = (
                f"the harmful rate rose from {a:.3f} to {b:.3f} in round {k} (more than {rule.max_harmful_increase})"
            )
    if reason is not None:
        return {"round": k, "reason": reason}, f"stopped after round {k}: {reason}"
    if k >= rounds_asked:
        return None, f"finished the {rounds_asked} round(s) asked" + (
            f"; round {k} vs round {k - 1}: win rate {wr['value']:.3f}" if wr["value"] is not None else ""
        )
    return None, f"continuing after round {k} (stop rule {rule.rule}: not met)"


def _fmt(p: dict[str, Any]) -> str:
    if p["value"] is None:
        return "–"
    ci = f" [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]" if p.get("ci") else ""
    return f"{p['value']:.3f}{ci}"


def build(out: Path, ledger, rule, rounds_asked: int) -> dict[str, Any]:
    rows = rounds_table(out, ledger)
    stop, verdict = stop_verdict(rows, rule, rounds_asked)
    if ledger.data.get("stopped"):
        s = ledger.data["stopped"]
        stop, verdict = s, f"stopped after round {s['round']}: {s['reason']}"
    rounds_done = max([int(k.split("/")[0]) for k in ledger.data["stages"]] or [0])
    plots = write_plots(out / "plots", rows)
    labels = [c for c, _ in COLUMNS]
    lines = [
        f"# align {ledger.data['recipe']}: round report",
        "",
        f"**{verdict}.** Stop rule: `{rule.rule}` (min_rounds={rule.min_rounds}"
        + (f", max_harmful_increase={rule.max_harmful_increase}" if rule.max_harmful_increase is not None else "")
        + ").",
        "",
        "Each round's numbers come from its own `evaluate` output (95% intervals in brackets); round 0 is the "
        "initial model. The win rate is against the previous round, judged in both orders.",
        "",
        "| round | " + " | ".join(labels) + " | train steps | model |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | "
            + " | ".join(_fmt(r[c]) for c in labels)
            + f" | {r['train steps']} | {r['model'] or 'initial'} |"
        )
    lines += ["", *[f"![{p}](plots/{p})" for p in plots], ""]
    lines += clock_table(ledger)
    write_text_atomic(out / "report.md", "\n".join(lines))
    rep = {
        "recipe": ledger.data["recipe"],
        "rounds": rows,
        "stop": stop,
        "verdict": verdict,
        "rounds_done": rounds_done,
        "plots": plots,
    }
    write_json_atomic(out / "report.json", rep)
    return rep


def clock_table(ledger) -> list[str]:
    """Wall and CPU seconds of every stage that ran (recorded by the run that ran it)."""
    timed = [(k, e["clock"]) for k, e in ledger.data["stages"].items() if e.get("clock")]
    if not timed:
        return []
    lines = [
        "Time per stage (the run that ran it; CPU = all threads of the align process; peak RSS = the process's "
        "peak so far):",
        "",
        "| round/stage | wall s | CPU s | peak RSS MB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {c['wall_s']} | {c['cpu_s']} | {c['peak_rss_mb']} |" for k, c in timed]
    wall, cpu = sum(c["wall_s"] for _, c in timed), sum(c["cpu_s"] for _, c in timed)
    lines += [f"| total | {wall:.0f} | {cpu:.0f} | {max(c['peak_rss_mb'] for _, c in timed)} |", ""]
    return lines


def write_plots(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    xs = [r["round"] for r in rows]

    def series(label):
        return [r[label]["value"] for r in rows], [r[label]["ci"] for r in rows]

    fig, ax = plt.subplots(figsize=(5, 4))
    h, _ = series("harmful rate")
    o, _ = series("over-refusal")
    ylabel, title = "harmful rate", "harm vs over-refusal, one point per round"
    if all(v is None for v in h):  # no harm judge: the string matcher's refusal rates (higher y = safer)
        h, _ = series("refusal rate, harmful (string match)")
        o, _ = series("over-refusal (string match)")
        ylabel, title = "refusal rate, harmful prompts (string match)", "refusal vs over-refusal, one point per round"
    pts = [(x, a, b) for x, a, b in zip(xs, h, o, strict=True) if a is not None and b is not None]
    if pts:
        ax.plot([p[2] for p in pts], [p[1] for p in pts], "-o")
        for x, a, b in pts:
            ax.annotate(f"round {x}", (b, a), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("over-refusal rate (benign prompts)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(folder / "harm_vs_overrefusal.png")
    plt.close(fig)
    made.append("harm_vs_overrefusal.png")
    for label, fname in (
        ("win rate vs prev", "win_rate.png"),
        ("KL to initial (k3)", "kl.png"),
        ("reward", "reward.png"),
        ("cost", "cost.png"),
    ):
        v, ci = series(label)
        pts = [(x, a, c) for x, a, c in zip(xs, v, ci, strict=True) if a is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        lo = [a - c[0] if c else 0 for _, a, c in pts]
        hi = [c[1] - a if c else 0 for _, a, c in pts]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[lo, hi], fmt="-o", capsize=3)
        if label == "win rate vs prev":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_xticks(xs)
        fig.tight_layout()
        fig.savefig(folder / fname)
        plt.close(fig)
        made.append(fname)
    return made
