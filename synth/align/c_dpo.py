"""C-DPO's two data steps for `align recipe=c_dpo` (Liu, Sun & Zheng 2024, "Enhancing LLM Safety via
Constrained Direct Preference Optimization", arXiv 2403.02475): the problem

    max_π E[r(x, y)] − β KL(π ‖ π_ref)   subject to   E[c(x, y)] ≤ C_limit

is solved by dual gradient descent on λ ≥ 0 over the Lagrangian reward r_λ = r − λc. Each round:

    c_dpo_relabel   every pair is labelled by the Bradley–Terry model of r_λ for this round's λ:
                    p*_λ = σ(r_λ(y_1) − r_λ(y_2)) as a soft label (p_chosen), or the hard label argmax r_λ
                    (chosen and rejected swapped where r_λ prefers the rejected side; exact ties dropped).
                    DPO on these rows (loss=dpo reads p_chosen) is the C-DPO primal step for this λ:
                    the same objective as train.losses.constrained.c_dpo_loss with loss.fn.lam = λ.
    c_dpo_dual      Ĵ_c = the mean cost of the new policy's own samples (never the dataset's responses),
                    then λ ← max(0, λ + η (Ĵ_c − C_limit)) (train.losses.constrained.dual_ascent_step).

λ is recipe state: `relabel/lambda.json` holds the λ a round trained with and `dual/lambda.json` the next
round's; the next round's relabel step reads `prev:dual/lambda.json`, and both ops copy λ into their
ledger entry (`state`). A resumed recipe skips finished stages, so it continues with the same λ.

Units (r and c come from different models): with `normalize: true` the relabel step divides r and c by
their standard deviation over the pairs' responses (shifts cancel in a difference), so λ weighs costs
against rewards in comparable units; the dual step then measures the violation in the same units,
(Ĵ_c − C_limit) / σ_c, which keeps it the gradient of the same dual function. C_limit stays in the cost
model's own units (Safe-RLHF convention: cost > 0 = unsafe, so C_limit = 0 asks for mostly safe answers).

Scorers (`reward`, `cost` args): the name of an earlier train stage (a model `train loop=reward` made,
e.g. `loss=cost` for the cost model), a `final/` folder, or a Python `module:function(prompts,
completions)` returning one float per completion. Pairs that carry all four precomputed columns
reward_chosen / reward_rejected / cost_chosen / cost_rejected are used as they are (`columns: auto`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from synth.errors import ConfigError, DataError
from synth.io import read_jsonl, write_json_atomic
from synth.records import PreferenceRecord, Provenance, stable_id
from train.losses.constrained import dual_ascent_step, lagrangian_preference
from train.scorers import FunctionScorer, ModelScorer

if TYPE_CHECKING:  # synth.align.ops registers these ops, so it is imported lazily here
    from synth.align.ops import OpContext

COLUMNS = ("reward_chosen", "reward_rejected", "cost_chosen", "cost_rejected")
Scorer = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


def build_scorer(ctx: OpContext, spec: str, role: str, batch_size: int) -> Scorer:
    """A stage name (a model trained earlier in the recipe), a model folder, or `module:function`."""

    where = f"op {ctx.recipe}: args.{role}"
    if spec in ctx.scorers or Path(spec).exists():
        model = ModelScorer(ctx.scorers.get(spec, spec), batch_size, "cpu", where)
        return lambda prompts, texts: model(prompts, texts, [[] for _ in texts]).tolist()
    if ":" in spec:
        fn = FunctionScorer(spec, where)
        if "completion_ids" in fn.names:
            raise ConfigError(f"{where}={spec}: an align op scores texts; use a function of (prompts, completions)")
        return lambda prompts, texts: fn(prompts, texts, [[] for _ in texts]).tolist()
    raise ConfigError(
        f"{where}={spec!r}: no earlier stage trained a model by that name (have: {', '.join(ctx.scorers) or 'none'}) "
        "and it is no folder or module:function; train it in an earlier stage (loop=reward) or name a function"
    )


def read_lambda(path: Any, default: float, where: str) -> float:
    if path is None:
        return float(default)
    value = json.loads(Path(path).read_text())["lambda"]
    if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise DataError(f"{path}: {where} needs a dual variable lambda >= 0, found {value!r}")
    return float(value)


def _side(p: float) -> int:
    """+1: the data's chosen side is preferred, -1: its rejected side, 0: a tie."""
    return (p > 0.5) - (p < 0.5)


def _std(values: list[float]) -> float:
    s = statistics.pstdev(values) if len(values) > 1 else 0.0
    return s if s > 0 else 1.0  # a constant score carries no scale to normalise away


# ------------------------------------------------------------------------------------------ relabel


def c_dpo_relabel(
    ctx: OpContext,
    inputs: dict[str, Any],
    reward: str = "reward",
    cost: str = "cost",
    lambda_init: float = 1.0,
    soft: bool = True,
    normalize: bool = True,
    columns: str = "auto",
    batch_size: int = 16,
) -> dict[str, Any]:
    """preferences.jsonl: the pairs of `inputs.pairs` labelled by r_λ = r − λc for this round's λ
    (`inputs.dual`: the previous round's dual/lambda.json; round 1: `lambda_init`). lambda.json: that λ
    and the cost scale the dual step must use."""
    from synth.align.ops import manifest, write_rows  # lazy: synth.align.ops imports this module (cycle)

    if lambda_init < 0:
        raise ConfigError(f"op c_dpo_relabel: args.lambda_init must be >= 0 (got {lambda_init})")
    if columns not in ("auto", "always", "never"):
        raise ConfigError(f"op c_dpo_relabel: args.columns={columns!r} (valid: auto, always, never)")
    lam = read_lambda(inputs.get("dual"), lambda_init, "c_dpo_relabel")
    items, raw, drops, source = scored_pairs(ctx, inputs["pairs"], reward, cost, columns, batch_size)
    n_in = len(items) + sum(drops.values())
    scale_r = _std(raw["reward_chosen"] + raw["reward_rejected"]) if normalize else 1.0
    scale_c = _std(raw["cost_chosen"] + raw["cost_rejected"]) if normalize else 1.0
    used = {k: torch.tensor(raw[k], dtype=torch.float64) / (scale_r if k[0] == "r" else scale_c) for k in COLUMNS}
    p = lagrangian_preference(*(used[k] for k in COLUMNS), lam=lam, soft=soft).tolist()
    p_rm = lagrangian_preference(*(used[k] for k in COLUMNS), lam=0.0, soft=soft).tolist()
    rows, flipped = [], 0
    for i, it in enumerate(items):
        vals = {k: float(used[k][i]) for k in COLUMNS}
        chosen, rejected, label = it.chosen, it.rejected, p[i]
        flipped += _side(p[i]) != _side(p_rm[i])  # r_λ and r alone rank this pair differently
        if not soft:
            if p[i] == 0.5:
                drops["tied_under_r_lambda"] += 1
                continue
            if p[i] == 0.0:  # argmax r_λ is the data's rejected side: swap (columns follow)
                chosen, rejected = rejected, chosen
                vals = {
                    "reward_chosen": vals["reward_rejected"],
                    "reward_rejected": vals["reward_chosen"],
                    "cost_chosen": vals["cost_rejected"],
                    "cost_rejected": vals["cost_chosen"],
                }
            label = None
        rec = PreferenceRecord(
            id=stable_id(it.id, ctx.round, prefix="cdpo-"),
            prompt=it.prompt,
            chosen=chosen,
            rejected=rejected,
            method="c_dpo",
            score_chosen=vals["reward_chosen"] - lam * vals["cost_chosen"],
            score_rejected=vals["reward_rejected"] - lam * vals["cost_rejected"],
            p_chosen=label,
            category=it.category,
            meta={
                "iteration": ctx.round,
                "lambda": lam,
                "swapped": not soft and chosen is not it.chosen,
                "raw": {k: raw[k][i] for k in COLUMNS},
                "source_id": it.id,
            },
            provenance=Provenance(iteration=ctx.round),
        )
        rows.append({**json.loads(rec.to_json()), **vals})  # train reads the four columns at the top level
    write_rows(ctx.out / "preferences.jsonl", rows)
    state = {"lambda": lam, "cost_scale": scale_c, "reward_scale": scale_r, "round": ctx.round}
    write_json_atomic(ctx.out / "lambda.json", state)
    print(
        f"   c_dpo_relabel round {ctx.round}: lambda={lam:.4g}, {len(rows)} pairs, "
        f"{flipped} ranked differently by r - lambda*c than by r alone",
        flush=True,
    )
    return manifest(
        "c_dpo_relabel",
        n_in,
        {"preferences": len(rows)},
        drops,
        state=state,
        scores_from=source,
        soft=soft,
        flipped_vs_reward=flipped,
        flipped_frac=flipped / len(items),
        mean_p_chosen=sum(p) / len(p),
    )


def scored_pairs(
    ctx: OpContext, pairs: Any, reward: str, cost: str, columns: str, batch_size: int
) -> tuple[list, dict[str, list[float]], Counter, str]:
    """The usable pairs of a source and their four score columns (precomputed, or from the scorers);
    pairs without both sides, with identical sides or with a NaN score are dropped and counted."""
    from synth.align.ops import source_items  # lazy: synth.align.ops imports this module (cycle)

    drops: Counter = Counter()
    items = []
    for it in source_items(pairs):
        if not it.chosen or not it.rejected:
            drops["not_a_pair"] += 1
        elif it.chosen[-1].content.strip() == it.rejected[-1].content.strip():
            drops["identical_responses"] += 1
        else:
            items.append(it)
    if not items:
        where = pairs.get("path") if isinstance(pairs, dict) else pairs
        raise DataError(f"op c_dpo_relabel: {where} holds no usable pair ({dict(drops)})")
    precomputed = all(all(isinstance(it.meta.get(k), (int, float)) for k in COLUMNS) for it in items)
    if columns == "always" and not precomputed:
        raise DataError(
            f"op c_dpo_relabel: args.columns=always but some pairs lack {', '.join(COLUMNS)}; "
            "add them or set columns=auto"
        )
    if precomputed and columns != "never":
        raw = {k: [float(it.meta[k]) for it in items] for k in COLUMNS}
        source = "columns"
    else:
        raw = score_pairs(ctx, items, reward, cost, batch_size)
        source = "models"
    bad = [i for i in range(len(items)) if any(math.isnan(raw[k][i]) for k in COLUMNS)]
    for i in reversed(bad):
        drops["unscorable"] += 1
        del items[i]
        for k in COLUMNS:
            del raw[k][i]
    if not items:
        raise DataError(f"op c_dpo_relabel: no pair could be scored ({dict(drops)})")
    return items, raw, drops, source


def score_pairs(ctx: OpContext, items: list, reward: str, cost: str, batch_size: int) -> dict[str, list[float]]:
    """The four score columns of every pair, one batched call per model (chosen then rejected)."""
    prompts = [[m.model_dump() for m in it.prompt] for it in items] * 2
    texts = [it.chosen[-1].content for it in items] + [it.rejected[-1].content for it in items]
    n = len(items)
    out: dict[str, list[float]] = {}
    for role, spec in (("reward", reward), ("cost", cost)):
        scores = [float(s) for s in build_scorer(ctx, spec, role, batch_size)(prompts, texts)]
        out[f"{role}_chosen"], out[f"{role}_rejected"] = scores[:n], scores[n:]
    return out


# ------------------------------------------------------------------------------------------ dual step


def c_dpo_dual(
    ctx: OpContext,
    inputs: dict[str, Any],
    cost: str = "cost",
    cost_limit: float = 0.0,
    lr: float = 0.1,
    batch_size: int = 16,
) -> dict[str, Any]:
    """lambda.json: the next round's λ from the mean cost of this round's policy samples
    (`inputs.samples`: generate's completions.jsonl; `inputs.relabel`: this round's relabel/lambda.json)."""
    from synth.align.ops import manifest  # lazy: synth.align.ops imports this module (cycle)

    if lr <= 0:
        raise ConfigError(f"op c_dpo_dual: args.lr (the dual step size) must be > 0 (got {lr})")
    if inputs.get("relabel") is None:
        raise ConfigError("op c_dpo_dual: inputs.relabel must name this round's relabel/lambda.json")
    used = json.loads(Path(inputs["relabel"]).read_text())
    lam = read_lambda(inputs["relabel"], 0.0, "c_dpo_dual")
    scale = float(used.get("cost_scale", 1.0))
    drops: Counter = Counter()
    prompts, texts, truncated = [], [], 0
    groups = read_jsonl(inputs["samples"])
    for g in groups:
        for c in g["completions"]:
            if not c["text"].strip():
                drops["empty"] += 1  # no answer to score; an empty answer is refused, not unsafe
                continue
            truncated += c.get("finish_reason") == "length"  # still the policy's output: kept
            prompts.append(g["prompt"])
            texts.append(c["text"])
    costs = [float(s) for s in build_scorer(ctx, cost, "cost", batch_size)(prompts, texts)] if texts else []
    scored = [s for s in costs if not math.isnan(s)]
    drops["unscorable"] += len(costs) - len(scored)
    if not scored:
        raise DataError(
            f"op c_dpo_dual: no policy sample could be scored for cost in {inputs['samples']} ({dict(drops)}); "
            "the dual step needs the policy's own samples"
        )
    j_c = sum(scored) / len(scored)
    new = dual_ascent_step(lam, j_c / scale, cost_limit / scale, lr)
    state = {
        "lambda": new,
        "lambda_used": lam,
        "cost_estimate": j_c,
        "cost_limit": cost_limit,
        "violation": j_c - cost_limit,
        "cost_scale": scale,
        "lr": lr,
        "round": ctx.round,
    }
    write_json_atomic(ctx.out / "lambda.json", state)
    print(
        f"   c_dpo_dual round {ctx.round}: J_c={j_c:.4g} vs C_limit={cost_limit:.4g} -> lambda {lam:.4g} -> {new:.4g}",
        flush=True,
    )
    return manifest(
        "c_dpo_dual",
        len(groups),
        {"samples_scored": len(scored)},
        drops,
        state=state,
        truncated_samples=truncated,
        unsafe_frac=sum(s > 0 for s in scored) / len(scored),
    )
