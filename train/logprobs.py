"""Per-token and per-sequence log-probs, in float32, and the forwards every preference loop makes.

    selective_log_softmax(logits, index, mask=None) -> [...] float32     log softmax(logits)[index]
    shift_labels(labels) -> target_ids [B, T]                          target_ids[:, t] = labels[:, t+1]
    token_logps(logits, labels) -> (logps [B, T], mask [B, T])            aligned with target_ids; -100 masked
    sequence_logps(logits, labels) -> (sum [B], mean [B], n_tokens [B])   n_tokens is int64
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

Memory: `selective_log_softmax` never holds a float32 copy of the whole [B, T, V] logits. It is a custom
autograd function that works on chunks of rows in float32, forward and backward (the backward recomputes
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


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None,
                          chunk_rows: int | None = None) -> torch.Tensor:
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


def forward_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward, then `sequence_logps`. Right padding needs no position ids: real tokens never attend
    to the pads after them, and their positions count from 0 as without padding."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sequence_logps(out.logits, labels)


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ONE forward over the 2B rows of a PairCollator batch (first B chosen, then B rejected)."""
    total, mean, n = forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = total.shape[0] // 2
    return {
        "chosen_logps": total[:b], "rejected_logps": total[b:],
        "chosen_logps_mean": mean[:b], "rejected_logps_mean": mean[b:],
        "chosen_n_tokens": n[:b], "rejected_n_tokens": n[b:],
        "chosen_nll": -mean[:b],
        "chosen_nll_token_mean": -total[:b].sum() / n[:b].sum().clamp(min=1),
    }


def listwise_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One forward over the sum(k) flat rows of a RankedCollator batch, regrouped to [B, Kmax]."""
    total, mean, n = forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    index, mask = batch["list_index"], batch["list_mask"]
    return {"logps": total[index] * mask, "logps_mean": mean[index] * mask, "n_tokens": n[index] * mask,
            "mask": mask}


def unpaired_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], kl: bool = True) -> dict[str, torch.Tensor]:
    """KTO/BCO forward. The KL forward over the mismatched pairs runs without grad: the KL estimate z0
    is a detached constant (losses.md, numerics rule 5), so keeping its graph would only cost memory."""
    total, mean, n = forward_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = {"logps": total, "logps_mean": mean, "n_tokens": n, "label": batch["label"]}
    if kl:
        with torch.no_grad():
            out["kl_logps"] = forward_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"],
                                            batch["kl_labels"])[0]
    return out
