"""The main job's one-screen summary: the before/after table on held-out prompts, what the data looked
like at each stage, and each stage's wall time and peak RSS. Reads the outputs of scripts/demo.sh.

    python scripts/main_job_report.py <OUT>      # prints the summary and writes <OUT>/main_job.md

Every rate is k/n with a 95 % Wilson interval (the `evaluate` command's own numbers); KL and length are
means with a prompt-bootstrap 95 % interval. Refusal is a string match on the answer's opening
(synth/evaluate/refusal.py): a refusal rate, not a harmlessness measure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def rate(p: dict[str, Any] | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci"]
    return f"{p['k']}/{p['n']} = {100 * p['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def mean(v: float | None, ci: list[float] | None, fmt: str = "{:.1f}") -> str:
    if v is None:
        return "n/a"
    return fmt.format(v) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def metric_rows(before: dict[str, Any] | None, after: dict[str, Any] | None, suite: str) -> list[tuple[str, str, str]]:
    def get(s, *keys):
        for k in keys:
            s = (s or {}).get(k)
        return s

    def both(fn):
        return fn(before["metrics"]) if before else "n/a", fn(after["metrics"]) if after else "n/a"

    rows = []
    if suite == "hh":
        rows.append(
            (
                "refusal rate, HH red-team held-out (harmful)",
                *both(lambda m: rate(get(m, "refusal", "refusal_rate_harmful", "string_match"))),
            )
        )
    else:
        rows.append(
            (
                "over-refusal, XSTest safe prompts",
                *both(lambda m: rate(get(m, "refusal", "over_refusal_rate_benign", "string_match"))),
            )
        )
        rows.append(
            (
                "refusal rate, XSTest unsafe contrast prompts",
                *both(lambda m: rate(get(m, "refusal", "refusal_rate_harmful", "string_match"))),
            )
        )
    name = "HH" if suite == "hh" else "XSTest"
    rows.append(
        (
            f"answer length, chars ({name})",
            *both(lambda m: mean(get(m, "length", "chars", "mean"), get(m, "length", "mean_chars_ci"))),
        )
    )
    rows.append((f"cut off at max_new_tokens ({name})", *both(lambda m: rate(get(m, "length", "truncated")))))
    kl = lambda m: mean(get(m, "scores", "kl_k3", "value"), get(m, "scores", "kl_k3", "ci"), "{:.3f}")  # noqa: E731
    rows.append(
        (
            f"KL(policy ‖ start model), k3 per answer ({name})",
            "0 (it is the start model)",
            kl(after["metrics"]) if after else "n/a",
        )
    )
    return rows


def data_lines(out: Path) -> list[str]:
    lines = []
    rt = load(out / "red_team" / "manifest.json")
    if rt:
        judged = rt.get("red_team", {}).get("by_decoding", {})
        unsafe = sum(v["unsafe"] for v in judged.values())
        n_judged = sum(v["judged"] for v in judged.values())
        lines.append(
            f"red_team: {rt['inputs']} items -> {rt['outputs'].get('prompts', 0)} prompts, "
            f"{rt['outputs'].get('answers', 0)} answers, {unsafe}/{n_judged} judged unsafe -> "
            f"{rt['outputs'].get('unsafe', 0)} prompts in unsafe.jsonl; dropped attacker samples: "
            f"{rt.get('dropped_parts', {}).get('attack_prompt', {})}"
        )
    cai = load(out / "critique_revision" / "manifest.json")
    if cai:
        lines.append(
            f"critique_revision: {cai['inputs']} unsafe answers revised (r0 {cai.get('initial_answers', {})}) -> "
            f"{cai['outputs'].get('sft', 0)} SFT rows, {cai['outputs'].get('preferences', 0)} preference pairs; "
            f"drops {cai.get('drops', {})}"
        )
    prefs = out / "critique_revision" / "preferences.jsonl"
    if prefs.exists():
        rows = [json.loads(x) for x in prefs.read_text().splitlines() if x.strip()]
        chosen = {r["chosen"][0]["content"] for r in rows}
        lines.append(
            f"  pairs: {len(rows)}, distinct chosen answers {len(chosen)}, given r0 "
            f"{sum(r['meta'].get('rejected_source') == 'given' for r in rows)}"
        )
    dpo = load(out / "dpo" / "summary.json")
    if dpo:
        keep = (
            "loss",
            "rewards/accuracy",
            "rewards/margin",
            "eval/loss",
            "eval/rewards/accuracy",
            "eval/rewards/margin",
        )
        tr = {k: round(v, 4) for k, v in (dpo.get("final_train") or {}).items() if k in keep}
        ev = {k: round(v, 4) for k, v in (dpo.get("final_eval") or {}).items() if k in keep}
        lines.append(
            f"dpo: {dpo['steps']} steps on {dpo['samples']} samples in {dpo['time_s']:.0f}s; final train {tr}; "
            f"eval {ev}"
        )
    return lines


def stage_lines(out: Path) -> list[str]:
    path = out / "stages.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last: dict[
        str, dict
    ] = {}  # per stage its longest finished run: a rerun that resumed a finished stage returns at once
    for r in rows:
        if r["stage"] not in last or (r["rc"] == 0, r["wall_s"]) > (
            last[r["stage"]]["rc"] == 0,
            last[r["stage"]]["wall_s"],
        ):
            last[r["stage"]] = r
    lines = ["| stage | wall time | peak RSS |", "|---|---|---|"]
    for r in last.values():
        lines.append(
            f"| {r['stage']} | {r['wall_s']:.0f} s | {r['peak_rss_mb']} MB |"
            + ("" if r["rc"] == 0 else f" exit {r['rc']}")
        )
    total = sum(r["wall_s"] for r in last.values())
    lines.append(
        f"| total | {total:.0f} s ({total / 60:.1f} min) | {max(r['peak_rss_mb'] for r in last.values())} MB |"
    )
    return lines


def main(out: Path) -> str:
    ev = out / "eval"
    table = ["| metric (95% interval) | before (start model) | after (DPO) |", "|---|---|---|"]
    for suite in ("hh", "xstest"):
        for name, b, a in metric_rows(
            load(ev / suite / "before" / "summary.json"), load(ev / suite / "after" / "summary.json"), suite
        ):
            table.append(f"| {name} | {b} | {a} |")
    md = [
        "## Before / after on held-out prompts",
        "",
        *table,
        "",
        "## Data",
        "",
        *[f"- {x}" for x in data_lines(out)],
        "",
        "## Stages",
        "",
        *stage_lines(out),
        "",
        f"Outputs: {out}/main_job.md, {out}/dpo/curves.png, {out}/critique_revision/{{sft,preferences}}.jsonl, "
        f"{out}/red_team/{{prompts,answers,unsafe}}.jsonl, {out}/eval/*/*/report.md",
    ]
    text = "\n".join(md) + "\n"
    (out / "main_job.md").write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[3])
    print(main(Path(sys.argv[1])), end="")
