"""Pure data steps between a round's runs (tool=op): no backend calls; a reward model only scores.

Each op reads its inputs (paths resolved by the recipe), writes its outputs through a temporary file +
rename, and returns a manifest (outputs, drops by reason). It is deterministic in its inputs and the
round's seed, so rerunning it after a kill writes the same files.

    spin_pairs         SPIN (Chen et al. 2024, arXiv 2401.01335, §4): ground truth chosen, the previous
                       iterate's generation rejected; iteration t also trains on iteration t-1's pairs
    raft_select        RAFT (Dong et al. 2023, arXiv 2304.06767, Alg. 1): reward-rank K samples per
                       prompt, keep the best (local) or the global top fraction (top) -> SFT rows
    rso_pairs          RSO (Liu et al. 2024, arXiv 2309.06657, Alg. 1): statistical rejection sampling
                       from the K samples with the reward model, first-round-rank pairs -> DPO rows
    grow_constitution  IterAlign (Chen et al. 2024, arXiv 2403.18341): the pool of principles grows with
                       the oracle's proposals (deduplicated) -> a valid constitution file per round
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth.constitution import load_constitution
from synth.errors import ConfigError
from synth.io import read_jsonl, write_text_atomic
from synth.records import Message, PreferenceRecord, Provenance, SFTRecord, stable_id
from synth.sources import SourceConfig, iter_source
from synth.steps.filters import NearDuplicateIndex
from train.scorers import ModelScorer


@dataclass
class OpContext:
    round: int
    out: Path
    seed: int
    scorers: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    recipe: str = ""


def write_rows(path: Path, rows: list[Any]) -> None:
    write_text_atomic(
        path,
        "".join((r.to_json() if hasattr(r, "to_json") else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
    )


def manifest(name: str, inputs: int, outputs: dict[str, int], drops: Counter, **extra: Any) -> dict[str, Any]:
    return {"pipeline": name, "status": "finished", "inputs": inputs, "outputs": outputs, "drops": dict(drops), **extra}


def source_items(src: dict[str, Any] | Path) -> list:
    cfg = src if isinstance(src, dict) else {"kind": "jsonl", "path": str(src)}
    return list(iter_source(SourceConfig.model_validate(cfg)))


# ------------------------------------------------------------------------------------------ SPIN


def spin_pairs(ctx: OpContext, inputs: dict[str, Any], max_new_chars: int | None = None) -> dict[str, Any]:
    """preferences.jsonl: (prompt, chosen = the SFT data's answer, rejected = the current model's sample).
    `inputs.sft`: the SFT data (a source with prompt + chosen); `inputs.generated`: generate's
    completions.jsonl of those prompts; `inputs.previous`: last round's pairs (SPIN's data mixing)."""
    gold = {it.id: it for it in source_items(inputs["sft"]) if it.chosen}
    rows, drops = [], Counter()
    for g in read_jsonl(inputs["generated"]):
        it = gold.get(g["id"])
        comp = (g["completions"] or [None])[0]
        if it is None:
            drops["no_ground_truth"] += 1
            continue
        text = (comp or {}).get("text", "").strip()
        if not text:
            drops["empty_generation"] += 1
            continue
        if text == it.chosen[-1].content.strip():
            drops["generation_equals_ground_truth"] += 1  # no signal: log-ratio difference is 0
            continue
        rows.append(
            PreferenceRecord(
                id=stable_id(it.id, ctx.round, prefix="spin-"),
                prompt=it.prompt,
                chosen=it.chosen,
                rejected=[Message(role="assistant", content=text)],
                method="spin",
                category=it.category,
                meta={"iteration": ctx.round, "source_id": it.id, "finish_reason": comp.get("finish_reason")},
                provenance=Provenance(generator_model=g.get("model"), iteration=ctx.round),
            )
        )
    new = len(rows)
    if inputs.get("previous") is not None:  # iteration t trains on t and t-1's synthetic data [uclaml/SPIN]
        rows += [
            PreferenceRecord.model_validate(r)
            for r in read_jsonl(inputs["previous"])
            if r["meta"].get("iteration") == ctx.round - 1
        ]
    write_rows(ctx.out / "preferences.jsonl", rows)
    return manifest(
        "spin_pairs", len(gold), {"preferences": len(rows)}, drops, new_pairs=new, mixed_from_previous=len(rows) - new
    )


# ------------------------------------------------------------------------------------------ reward scoring


def score_completions(
    ctx: OpContext, groups: list[dict[str, Any]], scorer: str, batch_size: int = 16, drop_truncated: bool = True
) -> tuple[list[list[tuple[str, float]]], Counter]:
    """Per prompt, its (text, reward) candidates. Empty and truncated samples are dropped before
    scoring (RAFT's lesson: an artefact the reward model ignores spreads, so filter first)."""

    drops: Counter = Counter()
    flat, owner = [], []
    for gi, g in enumerate(groups):
        for c in g["completions"]:
            text = c["text"].strip()
            if not text:
                drops["empty"] += 1
            elif drop_truncated and c.get("finish_reason") == "length":
                drops["truncated"] += 1
            else:
                flat.append((g["prompt"], text))
                owner.append(gi)
    out: list[list[tuple[str, float]]] = [[] for _ in groups]
    if flat:
        model = ModelScorer(scorer, batch_size, "cpu", f"reward model {scorer}")
        scores = model([p for p, _ in flat], [t for _, t in flat], [[] for _ in flat])
        for gi, (_, text), s in zip(owner, flat, scores.tolist(), strict=True):
            if math.isnan(s):
                drops["unscorable"] += 1
            else:
                out[gi].append((text, float(s)))
    return out, drops


def _scorer(ctx: OpContext, name: str) -> str:
    if name not in ctx.scorers:
        raise ConfigError(
            f"op: no reward model from a stage named {name!r} yet (have: {', '.join(ctx.scorers) or 'none'}); "
            "train it in an earlier stage (loop=reward) or set args.reward"
        )
    return ctx.scorers[name]


def raft_select(
    ctx: OpContext,
    inputs: dict[str, Any],
    reward: str = "reward",
    strategy: str = "local",
    top_fraction: float = 0.125,
    drop_truncated: bool = True,
) -> dict[str, Any]:
    """sft.jsonl: local = each prompt's best sample; top = the best `top_fraction` of all samples."""
    if strategy not in ("local", "top"):
        raise ConfigError(f"raft_select: strategy={strategy!r} (valid: local, top)")
    groups = read_jsonl(inputs["samples"])
    scored, drops = score_completions(
        ctx, groups, inputs.get("reward") or _scorer(ctx, reward), drop_truncated=drop_truncated
    )
    picks: list[tuple[dict, str, float]] = []
    if strategy == "local":
        for g, cands in zip(groups, scored, strict=True):
            if not cands:
                drops["prompt_without_scored_sample"] += 1
                continue
            text, s = max(cands, key=lambda c: c[1])
            picks.append((g, text, s))
    else:
        every = [(g, t, s) for g, cands in zip(groups, scored, strict=True) for t, s in cands]
        keep = max(1, math.floor(len(every) * top_fraction)) if every else 0
        picks = sorted(every, key=lambda x: -x[2])[:keep]
    rows = [
        SFTRecord(
            id=stable_id(g["id"], text, prefix="raft-"),
            messages=[Message.model_validate(m) for m in g["prompt"]] + [Message(role="assistant", content=text)],
            method="raft",
            category=g.get("category"),
            meta={"reward": s, "iteration": ctx.round, "strategy": strategy},
            provenance=Provenance(generator_model=g.get("model"), iteration=ctx.round),
        )
        for g, text, s in picks
    ]
    write_rows(ctx.out / "sft.jsonl", rows)
    rewards = [s for _, _, s in picks]
    return manifest(
        "raft_select",
        len(groups),
        {"sft": len(rows)},
        drops,
        mean_reward_selected=sum(rewards) / len(rewards) if rewards else None,
        mean_reward_all=_mean([s for c in scored for _, s in c]),
    )


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------ RSO


def rejection_sample(rewards: list[float], accept: int, beta: float, rng: random.Random) -> list[int]:
    """RSO Algorithm 1: repeat over the remaining candidates, accepting each with probability
    exp((r - M) / beta), M the highest remaining reward, until `accept` distinct ones are kept.
    beta -> 0 is top-k selection; beta -> inf uniform sampling. Returns indices in acceptance order."""
    remaining = list(range(len(rewards)))
    kept: list[int] = []
    while remaining and len(kept) < accept:
        M = max(rewards[i] for i in remaining)
        now = []
        for i in remaining:
            if len(kept) + len(now) >= accept:
                break
            if rng.random() < math.exp((rewards[i] - M) / beta):
                now.append(i)
        kept += now
        remaining = [i for i in remaining if i not in now]
    return kept


def rso_pairs(
    ctx: OpContext,
    inputs: dict[str, Any],
    reward: str = "reward",
    accept: int = 8,
    beta: float = 0.5,
    drop_truncated: bool = True,
) -> dict[str, Any]:
    """preferences.jsonl: per prompt, rejection-sample `accept` candidates, pair them first-round-rank
    ((1,2), (3,4), ...) in acceptance order and label each pair by the reward (ties dropped)."""
    if beta <= 0 or accept < 2:
        raise ConfigError(f"rso_pairs: needs beta > 0 and accept >= 2 (got beta={beta}, accept={accept})")
    groups = read_jsonl(inputs["samples"])
    scored, drops = score_completions(
        ctx, groups, inputs.get("reward") or _scorer(ctx, reward), drop_truncated=drop_truncated
    )
    rows = []
    for g, cands in zip(groups, scored, strict=True):
        rng = random.Random(f"{ctx.seed}|{g['id']}")
        kept = rejection_sample([s for _, s in cands], accept, beta, rng)
        if len(kept) < 2:
            drops["fewer_than_two_accepted"] += 1
            continue
        for a, b in zip(kept[0::2], kept[1::2], strict=False):
            (ta, sa), (tb, sb) = cands[a], cands[b]
            if sa == sb or ta == tb:
                drops["tied_pair"] += 1
                continue
            (tc, sc), (tr, sr) = ((ta, sa), (tb, sb)) if sa > sb else ((tb, sb), (ta, sa))
            rows.append(
                PreferenceRecord(
                    id=stable_id(g["id"], tc, tr, prefix="rso-"),
                    prompt=[Message.model_validate(m) for m in g["prompt"]],
                    chosen=[Message(role="assistant", content=tc)],
                    rejected=[Message(role="assistant", content=tr)],
                    method="rso",
                    score_chosen=sc,
                    score_rejected=sr,
                    margin=sc - sr,
                    category=g.get("category"),
                    meta={"iteration": ctx.round, "beta": beta, "accepted": len(kept)},
                    provenance=Provenance(generator_model=g.get("model"), iteration=ctx.round),
                )
            )
    write_rows(ctx.out / "preferences.jsonl", rows)
    return manifest("rso_pairs", len(groups), {"preferences": len(rows)}, drops)


# ------------------------------------------------------------------------------------------ IterAlign


def grow_constitution(
    ctx: OpContext,
    inputs: dict[str, Any],
    initial: str = "hhh_en",
    max_new: int = 8,
    near_duplicate: float = 0.6,
    name: str | None = None,
) -> dict[str, Any]:
    """constitution.yaml: the previous round's pool (or `initial`) plus up to `max_new` of this round's
    proposed principles, each new one kept only when its critique is no near-duplicate (character
    3-gram Jaccard >= `near_duplicate`) of a principle already in the pool. The file is validated by
    the constitution loader before it is written; new_principles.jsonl lists what was added."""
    import yaml

    base = load_constitution(str(inputs["previous"]) if inputs.get("previous") is not None else initial)
    pool = base.model_dump(exclude_defaults=False)
    index = NearDuplicateIndex(near_duplicate)
    for p in base.principles:
        index.add(p.id, p.critique)
    taxonomy = {f"{a}/{b}" for a, b in base.categories()}
    added, drops = [], Counter()
    proposals = [r for r in read_jsonl(inputs["proposals"]) if r.get("violation")]
    for r in proposals:
        if len(added) >= max_new:
            drops["over_max_new"] += 1
            continue
        if index.check(r["critique"]) is not None:
            drops["near_duplicate"] += 1
            continue
        category = r.get("category") or "harmlessness"
        if taxonomy and category not in taxonomy:
            drops["category_not_in_taxonomy"] += 1
            continue
        index.add(f"new-{len(added)}", r["critique"])
        added.append(
            {
                "id": f"iteralign-r{ctx.round}-{len(added) + 1}",
                "category": category,
                "critique": r["critique"],
                "revision": r["revision"],
            }
        )
    pool["principles"] = pool["principles"] + added
    pool["name"] = name or f"{base.name.split('-iteralign')[0]}-iteralign-r{ctx.round}"
    pool["description"] = (
        f"{base.description.split(' [IterAlign')[0]} [IterAlign round {ctx.round}: "
        f"{len(pool['principles'])} principles, {len(added)} discovered this round]"
    )
    text = yaml.safe_dump(_strip_none(pool), allow_unicode=True, sort_keys=False)
    tmp = ctx.out / "constitution.check.yaml"
    tmp.write_text(text, encoding="utf-8")
    load_constitution(str(tmp))  # never write a pool the loader would reject
    tmp.unlink()
    write_text_atomic(ctx.out / "constitution.yaml", text)
    write_rows(ctx.out / "new_principles.jsonl", added)
    if not added and not proposals:
        drops["no_violation_found"] += 1
    return manifest(
        "grow_constitution",
        len(proposals),
        {"new_principles": len(added)},
        drops,
        principles=len(pool["principles"]),
        constitution=str(ctx.out / "constitution.yaml"),
    )


def _strip_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_strip_none(v) for v in obj]
    return obj


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "spin_pairs": spin_pairs,
    "raft_select": raft_select,
    "rso_pairs": rso_pairs,
    "grow_constitution": grow_constitution,
}

# C-DPO's relabel and dual steps live in their own module (synth/align/c_dpo.py)
from synth.align.c_dpo import c_dpo_dual, c_dpo_relabel  # noqa: E402

OPS.update(c_dpo_relabel=c_dpo_relabel, c_dpo_dual=c_dpo_dual)
