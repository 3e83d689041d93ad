"""Per-token and per-sequence log-probs, in float32, and the forwards every preference loop makes.

    selective_log_softmax(logits, index, mask=None) -> [...] float32     log softmax(logits)[index]
    shift_labels(labels) -> target_ids [B, T]                          target_ids[:, t] = labels[:, t+1]
    token_logps(logits, labels) -> (logps [B, T], mask [B, T])            aligned with target_ids; -100 masked
    sequence_logps(logits, labels) -> (sum [B], mean [B], n_tokens [B])   n_tokens is int64
    model_token_logps(model, labels, **inputs) -> (logps [B, T], mask [B, T]), no [B, T, V] logits
    forward_logps(model, input_ids, attention_mask, labels) -> same triple, one forward
    concatenated_forward(model, batch) -> dict                          batch from data.PairCollator:
        chosen_logps, rejected_logps                 [B] sums over completion tokens (DPO, ...)
        chosen_logps_mean, rejected_logps_mean       [B] sums / token counts (SimPO, ORPO, IPO-TRL)
        chosen_n_tokens, rejected_n_tokens           [B] int64
        chosen_nll                                   [B] per-sequence mean NLL of chosen (CPO/RPO/ORPO papers)
        chosen_nll_token_mean                        []  batch token-mean NLL of chosen (TRL's flavour)
    listwise_forward(model, batch) -> dict                              batch from data.RankedCollator:
        logps, logps_mean [B, Kmax] float32 (0 where masked), n_tokens [B, Kmax] int64, mask [B, Kmax] bool
    unpaired_forward(model, batch, kl=True) -> dict                     batch from data.UnpairedCollator:
        logps, logps_mean [B], n_tokens [B], label [B] bool, and kl_logps [B] (no grad) when kl

Naming: the reference value of an output key X is X prefixed with "ref_" (`train.reference` stores
ref_chosen_logps, ref_logps, ref_kl_logps, ...), so a loop maps X -> policy_X and ref_X -> reference_X.

Memory: `model_token_logps` never materialises the [B, T, V] logits at all. The model runs with its LM
head swapped for the identity (through its own forward, so peft, gradient checkpointing and DDP still
apply) and returns hidden states [B, T, H]; `_ChunkedHeadLogSoftmax` then multiplies chunks of the
completion rows by the head weight, takes log-softmax in float32 and keeps one value per row, and its
backward recomputes each chunk's logits instead of storing them, as Liger-Kernel's fused linear
cross-entropy and Apple's Cut Cross-Entropy do (arXiv 2411.09009). Models whose head is not a plain
Linear (soft-capped or scaled logits, a LoRA'd or sharded head) take the ordinary forward.

`selective_log_softmax` (for callers that have logits) never holds a float32 copy of the whole [B, T, V] logits.
It is a custom autograd function that works on chunks of rows in float32, forward and backward (the backward recomputes
the softmax per chunk instead of keeping it), and skips masked rows (prompt and padding) altogether.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
_CHUNK_ELEMENTS = 1 << 24  # float32 elements per chunk (64 MiB): bounds the temporaries, not the speed


class _SelectiveLogSoftmax(torch.autograd.Function):
    """out[r] = logits[r, index[r]] - logsumexp(logits[r]) over rows r of a [N, V] view, in float32."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, chunk: int) -> torch.Tensor:
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.zeros(index.shape[0], dtype=out_dtype, device=logits.device)
        for sel in rows.split(chunk):
            lg = logits[sel].to(out_dtype)
            out[sel] = lg.gather(1, index[sel, None]).squeeze(1) - lg.logsumexp(-1)
        ctx.save_for_backward(logits, index, rows)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        logits, index, rows = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for sel in rows.split(ctx.chunk):
            g = grad[sel, None]
            probs = logits[sel].to(grad.dtype).softmax(-1)
            # d/dx (x_i - logsumexp x) = onehot_i - softmax(x)
            grad_logits[sel] = (-probs * g).scatter_add_(1, index[sel, None], g).to(logits.dtype)
        return grad_logits, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None, chunk_rows: int | None = None
) -> torch.Tensor:
    """log_softmax(logits.float(), -1).gather(-1, index) without the full float32 copy.

    logits [..., V] (any float dtype); index [...] (long); mask [...] bool: False positions are skipped and
    return 0. Returns float32 (float64 for float64 logits), shape [...], differentiable w.r.t. logits.
    """
    vocab = logits.shape[-1]
    flat, idx = logits.reshape(-1, vocab), index.reshape(-1)  # views for contiguous logits
    if mask is None:
        rows = torch.arange(idx.shape[0], device=logits.device)
    else:
        rows = mask.reshape(-1).nonzero().squeeze(1)
    chunk = chunk_rows or max(1, _CHUNK_ELEMENTS // vocab)
    out = _SelectiveLogSoftmax.apply(flat, idx.clamp(min=0), rows, chunk)
    return out.view(index.shape)


class _ChunkedHeadLogSoftmax(torch.autograd.Function):
    """out[r] = z[r, t_r] - logsumexp(z[r]) with z = h @ W^T (+ b), in float32, chunk by chunk.

    h [N, H] (the rows that have a target), W [V, H], b [V] or None, t [N]. Backward, per chunk,
    with p = softmax(z) and g the incoming grad [n]: dz = g (onehot(t) - p); dh = dz W; dW += dz^T h;
    db += sum_rows dz. Peak extra memory: one chunk of [n, V] float32 (`chunk` rows)."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        out = torch.empty(h.shape[0], dtype=out_dtype, device=h.device)
        for start in range(0, h.shape[0], chunk):
            z = _head_chunk(h[start : start + chunk], weight, bias, out_dtype)
            t = target[start : start + chunk, None]
            out[start : start + chunk] = z.gather(1, t).squeeze(1) - z.logsumexp(-1)
        ctx.save_for_backward(h, weight, bias, target)
        ctx.chunk, ctx.out_dtype = chunk, out_dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        h, weight, bias, target = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = ctx.out_dtype
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        for start in range(0, h.shape[0], ctx.chunk):
            hc = h[start : start + ctx.chunk]
            g = grad[start : start + ctx.chunk, None].to(acc)
            dz = _head_chunk(hc, weight, bias, acc).softmax(-1).mul_(-g)
            dz.scatter_add_(1, target[start : start + ctx.chunk, None], g)
            if grad_h is not None:
                grad_h[start : start + ctx.chunk] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w.addmm_(dz.t(), hc.to(acc))
            if grad_b is not None:
                grad_b += dz.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


def _head_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Logits of a chunk of rows in the weights' dtype (as the model computes them), then `dtype`."""
    z = h.to(weight.dtype) @ weight.t()
    if bias is not None:
        z = z + bias
    return z.to(dtype)


def _plain_head(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.Linear] | None:
    """(the causal LM, its head's attribute name, the head) when the head is a plain Linear whose
    logits are used as they are; None otherwise (the caller takes the ordinary forward)."""
    inner = model
    for _ in range(4):  # peft and DDP wrappers
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif type(inner).__name__ == "DistributedDataParallel":
            inner = inner.module
        else:
            break
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear:  # a LoRA / modules_to_save wrapper, or none
        return None
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if head.weight.dim() != 2 or head.weight.shape[1] != getattr(text, "hidden_size", -1):  # sharded (ZeRO-3 / FSDP)
        return None
    name = next((n for n, c in inner.named_children() if c is head), None)
    return None if name is None else (inner, name, head)


def model_token_logps(
    model: torch.nn.Module, labels: torch.Tensor, chunk_rows: int | None = None, **inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps(model(**inputs).logits, labels)` -> (logps [B, T], mask [B, T]) without the logits:
    hidden states from the model with its head swapped out, then the chunked head on the completion
    rows only (prompt and padding rows are never multiplied by the head)."""
    found = _plain_head(model)
    if found is None:
        return token_logps(model(**inputs, use_cache=False).logits, labels)
    inner, name, head = found
    setattr(inner, name, torch.nn.Identity())
    try:
        hidden = model(**inputs, use_cache=False).logits  # [B, T, H]: the head is the identity
    finally:
        setattr(inner, name, head)
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    rows = mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    chunk = chunk_rows or max(1, _CHUNK_ELEMENTS // head.weight.shape[0])
    vals = _ChunkedHeadLogSoftmax.apply(h, head.weight, head.bias, target.reshape(-1).index_select(0, rows), chunk)
    flat = vals.new_zeros(mask.numel()).index_put((rows,), vals)
    return flat.view(mask.shape), mask


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """target_ids [B, T]: target_ids[:, t] = labels[:, t + 1] (the token logits[:, t] predicts); the last
    position is -100. Shifting the labels instead of slicing the logits never copies the logits."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the next token -> (logps [B, T], mask [B, T]) aligned with
    `shift_labels(labels)`: position t holds log p(labels[:, t+1]); masked positions hold 0."""
    target = shift_labels(labels)
    mask = target != IGNORE_INDEX
    return selective_log_softmax(logits, target, mask), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum [B], mean [B], n_tokens [B]) of the completion-token log-probs, float32 (n_tokens int64).

    A row without labelled tokens gets sum 0 and mean 0."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    n_tokens = mask.sum(-1)
    return total, total / n_tokens.clamp(min=1), n_tokens


def forward_logps(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward, then `sequence_logps`. Right padding needs no position ids: real tokens never attend
    to the pads after them, and their positions count from 0 as without padding."""
    logps, mask = model_token_logps(model, labels, input_ids=input_ids, attention_mask=attention_mask)
    total = logps.sum(-1)
    n_tokens = mask.sum(-1)
    return total, total / n_tokens.clamp(min=1), n_tokens


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ONE forward over the 2B rows of a PairCollator batch (first B chosen, then B rejected)."""
    return pair_outputs(*forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))


def pair_outputs(total: torch.Tensor, mean: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row (sum, mean, n_tokens) of a PairCollator batch (first B chosen, then B rejected) -> the
    chosen/rejected outputs the pairwise losses read."""
    b = total.shape[0] // 2
    return {
        "chosen_logps": total[:b],
        "rejected_logps": total[b:],
        "chosen_logps_mean": mean[:b],
        "rejected_logps_mean": mean[b:],
        "chosen_n_tokens": n[:b],
        "rejected_n_tokens": n[b:],
        "chosen_nll": -mean[:b],
        "chosen_nll_token_mean": -total[:b].sum() / n[:b].sum().clamp(min=1),
    }


def listwise_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward over the sum(k) flat rows of a RankedCollator batch, regrouped to [B, Kmax]."""
    return list_outputs(*forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]), batch)


def list_outputs(total: torch.Tensor, mean: torch.Tensor, n: torch.Tensor, batch) -> dict[str, torch.Tensor]:
    """Per-row (sum, mean, n_tokens) of a RankedCollator batch regrouped to [B, Kmax] (0 off the lists)."""
    index, mask = batch["list_index"], batch["list_mask"]
    return {"logps": total[index] * mask, "logps_mean": mean[index] * mask, "n_tokens": n[index] * mask, "mask": mask}


def unpaired_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], kl: bool = True
) -> dict[str, torch.Tensor]:
    """KTO/BCO forward. The KL forward over the mismatched pairs runs without grad: the KL estimate z0
    is a detached constant (KTO, Ethayarajh et al. 2024, arXiv 2402.01306, does not backpropagate through
    z0), so keeping its graph would only cost memory."""
    total, mean, n = forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = {"logps": total, "logps_mean": mean, "n_tokens": n, "label": batch["label"]}
    if kl:
        with torch.no_grad():
            out["kl_logps"] = forward_logps(
                model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
            )[0]
    return out
