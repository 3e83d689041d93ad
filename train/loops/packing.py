"""Sequence packing for the loops' forwards: right-padded rows laid end to end, so no compute is spent
on padding. The results equal the padded forward's (checked per model at start by `packing_ok`).

Candidates to move into train/logprobs.py; kept here until then so that the loops own the switch
(`optim.packing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from train.logprobs import model_token_logps
from train.loops.common import to_device


@dataclass
class Packing:
    """Right-padded rows [N, T] laid end to end into bins [nb, W] (first-fit decreasing; bin capacity = the
    `capacity` given, at least the longest row; the loops pass `bin_capacity`'s). position_ids restart at 0 for each
    row; without an attention mask, transformers' masking utilities then build a block-diagonal causal
    mask (sdpa, eager, flash), so rows do not see each other and padding is never computed."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    src: torch.Tensor  # [nb, W] flat index i*T + t of the padded position each packed token came from, -1 for none
    shape: tuple[int, int]


def first_fit_decreasing(lengths: list[int], cap: int) -> list[list[int]]:
    """Row indices per bin: longest row first, each into the first bin with room (at most `cap` tokens)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if b is None:
            bins.append([]), room.append(cap)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def bin_capacity(model, lengths: list[int]) -> int:
    """The bin width (tokens) at which first-fit-decreasing packing of rows of these lengths costs the least
    compute, among 1-4x the longest row. A forward costs per bin of width w about w·(a + b·w) FLOPs: a = 2 x
    the non-embedding parameters (the linear layers), b = 4 x the attention width x the layers (QKᵀ and AV
    against every key of the bin, since the block-diagonal mask is dense to the kernel). Bins as wide as the
    longest row leave most of their room empty when rows are long and similar (rows of 86-200 tokens fit one
    to a bin); 2x that width with 12 bins instead of 32 cut the forward+backward of a GRPO step by 1.28x on
    the 20M Llama (bench/grpo_vs_trl.py shapes). A model whose shape is unknown keeps the longest row."""
    longest = max(lengths, default=0) or 1
    coef = cost_coefficients(model)
    if coef is None or sum(lengths) <= longest:  # unknown shape, or every row fits one bin of the longest
        return longest
    a, b = coef
    best = (math.inf, longest)
    for k in CAPACITY_FACTORS:
        cap = max(longest, min(int(longest * k), sum(lengths)))
        bins = first_fit_decreasing(lengths, cap)
        width = max(sum(lengths[i] for i in rows) for rows in bins)
        cost = len(bins) * width * (a + b * width)
        if cost < best[0]:
            best = (cost, cap)
    return best[1]


def cost_coefficients(model) -> tuple[float, float] | None:
    """(a, b) of `bin_capacity` from the model's config and parameters (cached on the model); None without a
    config that names hidden size and layer count."""
    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    cached = getattr(inner, "_packing_cost", None)
    if cached is not None:
        return cached
    config = getattr(inner, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    if not layers or not hidden:
        return None
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else None)
    width = heads * head_dim if heads and head_dim else hidden
    tables = (getattr(m, "weight", None) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()))
    skip = {id(w) for w in tables if w is not None}  # (the LM head may be swapped out: train.logprobs)
    dense = sum(p.numel() for p in inner.parameters() if id(p) not in skip)
    coef = (2.0 * dense, 4.0 * width * layers)
    try:
        inner._packing_cost = coef
    except AttributeError:
        pass
    return coef


def pack_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    pad_id: int = 0,
    capacity: int | None = None,
) -> Packing:
    n, t = input_ids.shape
    lengths = attention_mask.sum(-1).tolist()
    cap = max(max(lengths), 1, capacity or 0)
    bins = first_fit_decreasing(lengths, cap)
    room = [cap - sum(lengths[i] for i in rows) for rows in bins]
    width = cap - min(room)
    src = torch.full((len(bins), width), -1, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    for b, rows in enumerate(bins):
        off = 0
        for i in rows:
            length = lengths[i]
            src[b, off : off + length] = i * t + torch.arange(length)
            pos[b, off : off + length] = torch.arange(length)
            off += length
        pos[b, off:] = torch.arange(width - off)  # the padding tail is a segment of its own
    src, pos = src.to(input_ids.device), pos.to(input_ids.device)
    valid = src >= 0
    where = src.clamp(min=0)
    ids = torch.where(valid, input_ids.reshape(-1)[where], torch.full_like(where, pad_id))
    lab = torch.where(valid & (pos > 0), labels.reshape(-1)[where], torch.full_like(where, -100))
    return Packing(ids, pos, lab, src, (n, t))


def packed_token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, capacity: int | None = None
):
    """Like `train.logprobs.token_logps(model(...).logits, labels)` -> (logps [N, T], mask [N, T]) in the
    padded layout, but the forward runs on packed rows (no compute on padding)."""

    if not bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all()):
        raise ValueError("sequence packing needs right-padded rows")
    if capacity is None:
        capacity = bin_capacity(model, attention_mask.sum(-1).tolist())
    pk = pack_rows(input_ids, attention_mask, labels, capacity=capacity)
    packed_logps, packed_mask = model_token_logps(
        model, pk.labels, input_ids=pk.input_ids, position_ids=pk.position_ids
    )
    n, t = pk.shape
    valid = pk.src >= 0
    flat_logps = packed_logps.new_zeros(n * t).index_put((pk.src[valid],), packed_logps[valid])
    flat_mask = torch.zeros(n * t, dtype=torch.bool, device=packed_mask.device).index_put(
        (pk.src[valid],), packed_mask[valid]
    )
    return flat_logps.view(n, t), flat_mask.view(n, t)


class PackedLogits(torch.nn.Module):
    """A causal LM with the same call contract for no-grad passes (`model(input_ids=, attention_mask=)
    .logits` in the padded layout; zeros on padding) that computes on packed rows. For code that takes
    a model, e.g. train.reference's precompute pass."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model

    def get_base_model(self):
        """The wrapped model: train.logprobs.model_token_logps looks through it (as through peft) for the
        LM head, swaps it for the identity and applies it chunk by chunk to the completion rows only, so a
        reference pass never holds [B, T, V] logits (the forward below then carries hidden states)."""
        return self.inner

    def forward(self, input_ids, attention_mask, **_: Any):
        from types import SimpleNamespace

        pk = pack_rows(
            input_ids, attention_mask, input_ids, capacity=bin_capacity(self.inner, attention_mask.sum(-1).tolist())
        )
        logits = self.inner(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False).logits
        n, t = pk.shape
        valid = pk.src >= 0
        out = logits.new_zeros(n * t, logits.shape[-1])
        out[pk.src[valid]] = logits[valid]
        return SimpleNamespace(logits=out.view(n, t, -1))


def packed_sequence_logps(model, input_ids, attention_mask, labels, capacity: int | None = None):
    """(sum [N], mean [N], n_tokens [N]) like `train.logprobs.forward_logps`, on packed rows."""
    logps, mask = packed_token_logps(model, input_ids, attention_mask, labels, capacity)
    total, n = logps.sum(-1), mask.sum(-1)
    return total, total / n.clamp(min=1), n


def packing_ok(model, ds, collate, cfg, accelerator) -> bool:
    """optim.packing on a model that honours packed position_ids (checked on the first rows, agreed by
    every process); otherwise a warning and the padded forward."""
    rows = ds.select(range(min(len(ds), 2))).to_list()
    ok = packing_matches(model, to_device(collate(rows), accelerator.device), cfg.optim.dtype)
    return packing_agreed(ok, accelerator)


@torch.no_grad()
def packing_matches(model, batch: dict[str, Any], dtype: str) -> bool:
    """One-time check that this model honours packed position_ids (a model whose masks ignore them
    would let rows attend to each other): per-token log-probs of the rows packed into ONE row must
    match the padded forward (float32: 1e-3 per token; half precision: 0.1 per token, 0.01 on average)."""
    from train.logprobs import model_token_logps

    was = model.training
    model.eval()
    try:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        ref, ref_mask = model_token_logps(model, labels, input_ids=ids, attention_mask=mask)
        got, got_mask = packed_token_logps(model, ids, mask, labels, capacity=int(mask.sum()))
    finally:
        model.train(was)
    if not torch.equal(ref_mask, got_mask):
        return False
    diff = (ref - got)[ref_mask].abs().float()
    if diff.numel() == 0:
        return True
    if dtype == "float32":
        return bool(diff.max() <= 1e-3)
    return bool(diff.max() <= 0.1 and diff.mean() <= 0.01)


def packing_agreed(ok: bool, accelerator) -> bool:
    """Pack only if every process's check passed; the main process says so when packing is off."""
    if accelerator.num_processes > 1:
        ok = bool(accelerator.reduce(torch.tensor([float(ok)], device=accelerator.device), "min").item())
    if not ok and accelerator.is_main_process:
        print(
            "warning: this model's attention does not separate packed rows (position_ids); "
            "training on padded rows instead (optim.packing=false silences this)",
            flush=True,
        )
    return ok
