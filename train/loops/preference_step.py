"""The preference loop's step: the loss of one micro-batch (policy forward, reference log-probs, the loss
call with what the objective reads) and the held-out evaluation. The loop itself, its data and its
reference set-up are in train.loops.preference.
"""

from __future__ import annotations

from typing import Any

import torch

from train.data import DataError
from train.logprobs import concatenated_forward, list_outputs, listwise_forward, pair_outputs, unpaired_forward
from train.loops.common import call_loss, to_device
from train.loops.metrics import StepMetrics, loss_metrics
from train.loops.packing import packed_sequence_logps


class LossContext:
    """What a forward needs besides the batch: the loss, the reference, the loss state, the reducer."""

    def __init__(self, spec, fn, ref_mode, ref_model, running_mean, reduce, seed, packed=False):
        self.spec, self.fn, self.ref_mode, self.ref_model = spec, fn, ref_mode, ref_model
        self.running_mean, self.reduce, self.seed, self.packed = running_mean, reduce, seed, packed


def policy_forward(kind: str, kl: bool, packed: bool):
    """The forward of a row kind (train.logprobs), or the same outputs computed on packed rows."""

    if not packed:
        return {
            "pairwise": concatenated_forward,
            "ranked": listwise_forward,
            "unpaired": lambda m, b: unpaired_forward(m, b, kl=kl),
        }[kind]
    return lambda m, b: packed_forward(m, b, kind, kl)


def packed_forward(model, batch, kind: str, kl: bool) -> dict[str, torch.Tensor]:
    """train.logprobs' concatenated / listwise / unpaired outputs, with the forward on packed rows."""
    total, mean, n = packed_sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    if kind == "pairwise":
        return pair_outputs(total, mean, n)
    if kind == "ranked":
        return list_outputs(total, mean, n, batch)
    out = {"logps": total, "logps_mean": mean, "n_tokens": n, "label": batch["label"]}
    if kl:  # the KL estimate is a detached constant: no graph (as train.logprobs.unpaired_forward)
        with torch.no_grad():
            out["kl_logps"] = packed_sequence_logps(
                model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
            )[0]
    return out


def forward_loss(model, unwrapped, batch: dict[str, Any], ctx: LossContext, kind: str, step: int, train: bool = True):
    """(LossOutput, extra metrics) for one micro-batch: policy forward(s), reference, the loss call."""
    if ctx.spec.needs_logits:
        return _cringe(model, batch, ctx, step)
    forward = policy_forward(kind, ctx.spec.needs_kl_pairs, ctx.packed)
    pol = forward(model, batch)
    ref = reference_outputs(model, unwrapped, batch, ctx, kind, forward)
    mean = ctx.spec.length_normalised
    if kind == "pairwise":
        avail = {
            "policy_chosen_logps": pol["chosen_logps_mean" if mean else "chosen_logps"],
            "policy_rejected_logps": pol["rejected_logps_mean" if mean else "rejected_logps"],
            "chosen_nll": pol["chosen_nll"],
            "chosen_lengths": pol["chosen_n_tokens"],
            "rejected_lengths": pol["rejected_n_tokens"],
            "score_chosen": _scores(batch, "score_chosen", ctx),
            "score_rejected": _scores(batch, "score_rejected", ctx),
            "p_chosen": _soft_labels(batch),
            "prompt_embeddings": batch.get("prompt_embeddings"),
            **{k: _reward_cost(batch, k, ctx) for k in REWARD_COST},
        }
        if ref is not None:
            avail["reference_chosen_logps"] = ref["chosen_mean" if mean else "chosen"]
            avail["reference_rejected_logps"] = ref["rejected_mean" if mean else "rejected"]
        extra = {
            "logps/chosen": pol["chosen_logps"].detach().mean(),
            "logps/rejected": pol["rejected_logps"].detach().mean(),
        }
    elif kind == "ranked":
        avail = {
            "policy_logps": pol["logps_mean" if mean else "logps"],
            "lengths": pol["n_tokens"],
            "scores": batch["scores"],
            "mask": pol["mask"],
        }
        if ref is not None:
            avail["reference_logps"] = ref["mean" if mean else "sum"]
        extra = {}
    else:
        avail = {
            "policy_logps": pol["logps_mean" if mean else "logps"],
            "labels": pol["label"],
            "prompt_embeddings": batch.get("prompt_embeddings"),
        }
        if ctx.spec.needs_kl_pairs:
            avail["policy_kl_logps"] = pol["kl_logps"]
        if ref is not None:
            avail["reference_logps"] = ref["mean" if mean else "sum"]
            if ctx.spec.needs_kl_pairs:
                avail["reference_kl_logps"] = ref["kl"]
        extra = {}
    avail["reduce"] = ctx.reduce
    if ctx.running_mean is not None:
        if train:
            avail["running_mean"] = ctx.running_mean
        else:  # evaluation reads δ without folding the eval rewards into it
            avail["fixed_delta"] = ctx.running_mean.mean
    return call_loss(ctx.fn, avail), extra


def reference_outputs(model, unwrapped, batch, ctx: LossContext, kind: str, forward) -> dict[str, Any] | None:
    """Reference log-probs of this batch: from the precomputed columns, the adapter-disabled base model,
    or the frozen reference model; None for reference-free objectives."""
    if ctx.ref_mode == "none":
        return None
    if ctx.ref_mode == "precomputed":
        return _reference_view(batch, kind, "ref_")
    with torch.no_grad():
        if ctx.ref_mode == "adapter_disabled":
            with unwrapped.disable_adapter():
                out = forward(model, batch)
        else:
            out = forward(ctx.ref_model, batch)
    return _reference_view(out, kind, "")


def _reference_view(values, kind: str, prefix: str) -> dict[str, Any]:
    """The reference log-probs the losses read, from a forward's outputs (prefix "") or the precomputed
    columns (prefix "ref_"): pairwise chosen / rejected sums and means, else sum, mean and the KL pairs'."""
    if kind == "pairwise":
        return {
            f"{side}{m}": values[f"{prefix}{side}_logps{m}"] for side in ("chosen", "rejected") for m in ("", "_mean")
        }
    return {
        "sum": values[f"{prefix}logps"],
        "mean": values[f"{prefix}logps_mean"],
        "kl": values.get(f"{prefix}kl_logps"),
    }


def _cringe(model, batch, ctx: LossContext, step: int):
    """Token-level objectives (Cringe) see the shifted logits of the matched rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    gen = torch.Generator(device=logits.device).manual_seed(ctx.seed * 1_000_003 + step)
    avail = {
        "logits": logits[:, :-1],
        "target_ids": targets,
        "token_mask": targets != -100,
        "labels": batch["label"],
        "generator": gen,
    }
    return call_loss(ctx.fn, avail), {}


def _scores(batch, key: str, ctx: LossContext):
    value = batch.get(key)
    if value is not None and torch.isnan(value).any():
        if ctx.spec.needs_scores:
            raise DataError(f"loss={ctx.spec.name} needs {key} on every row; some rows lack it")
        return None
    if value is None and ctx.spec.needs_scores:
        raise DataError(f"loss={ctx.spec.name} needs score_chosen and score_rejected columns in the data")
    return value


REWARD_COST = ("reward_chosen", "reward_rejected", "cost_chosen", "cost_rejected")


def _reward_cost(batch, key: str, ctx: LossContext):
    """Precomputed reward / cost scores (C-DPO): required on every row when the loss needs them."""
    value = batch.get(key)
    if not ctx.spec.needs_reward_cost:
        return None
    if value is None or torch.isnan(value).any():
        raise DataError(
            f"loss={ctx.spec.name} needs {', '.join(REWARD_COST)} (precomputed reward- and cost-model "
            f"scores) on every pair; {key} is missing on some rows"
        )
    return value


def _soft_labels(batch):
    """p_chosen where the data has it; rows without one count as hard labels (p = 1)."""
    p = batch.get("p_chosen")
    if p is None or torch.isnan(p).all():
        return None
    return torch.nan_to_num(p, nan=1.0)


@torch.no_grad()
def evaluate(model, unwrapped, eval_ds, collate, ctx, kind, cfg, accelerator, fixed_kl) -> dict[str, float]:
    """Loss metrics on the held-out rows, averaged over rows and processes (prefix eval/)."""
    model.eval()
    B = cfg.eval.batch_size or cfg.optim.batch_size
    order = list(range(len(eval_ds)))
    if fixed_kl:  # KL pairs were fixed in chunks of optim.batch_size: keep the chunks
        B = cfg.optim.batch_size
    mine = (
        order[accelerator.process_index :: accelerator.num_processes]
        if not fixed_kl
        else [
            j
            for c, start in enumerate(range(0, len(order), B))
            if c % accelerator.num_processes == accelerator.process_index
            for j in order[start : start + B]
        ]
    )
    metrics = StepMetrics()
    for start in range(0, len(mine), B):
        idx = mine[start : start + B]
        if ctx.spec.needs_kl_pairs and len(idx) < 2:
            continue
        batch = to_device(collate(eval_ds.select(idx).to_list()), accelerator.device)
        out, extra = forward_loss(model, unwrapped, batch, ctx, kind, step=0, train=False)
        metrics.add(
            {**loss_metrics(out, "eval/", paired=kind != "unpaired"), **{f"eval/{k}": v for k, v in extra.items()}},
            weight=len(idx),
        )
    model.train()
    return metrics.reduce(accelerator)
