"""D2O: distributional dispreference optimisation, K self-generated samples against one human negative."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float


def d2o_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    scores: Tensor,
    mask: Tensor,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> LossOutput:
    """D2O, Duan et al. 2024 (arXiv 2403.03419, EMNLP Findings 2024):

    L = −log σ( (β/K) Σ_{i=1}^{K} log[πθ(y_i|x) / π_r⁻(y_i|x)] − α log[πθ(y_l|x) / π_r⁺(y_l|x)] )

    y_1..y_K are responses sampled once, offline, from the initial model (the anchors); y_l is the
    human-annotated negative. It averages log-ratios, not the log of averaged probabilities. Both
    reference policies are the one reference the loop supplies (the initial model).

    Data, listwise shape: policy_logps, reference_logps (summed), scores, mask are [B, K+1]; in each
    list the negative is the **unique lowest-scored** real slot and every other real slot is a
    sample (``train.data`` turns a row ``{prompt, samples: [...], rejected}`` into exactly that:
    scores 1 for samples, 0 for the negative). K may differ per row. β weights the samples, α the
    negative, each on its own (α is not multiplied by β); with K = 1 and α = β this is DPO.
    """
    mask = mask.bool()
    s = torch.where(mask, as_float(scores).detach(), float("inf"))
    neg = s.argmin(dim=-1, keepdim=True)
    lowest = s.gather(-1, neg)
    is_neg = torch.zeros_like(mask).scatter_(-1, neg, True)
    samples = mask & ~is_neg
    if bool(((s == lowest) & mask).sum(dim=-1).ne(1).any()) or not bool(samples.any(dim=-1).all()):
        raise ValueError("D2O needs, per list, one negative (the unique lowest score) and at least one sample")
    ratios = torch.where(mask, as_float(policy_logps) - as_float(reference_logps).detach(), 0.0)
    k = samples.sum(dim=-1).to(ratios.dtype)
    sample_term = torch.where(samples, ratios, 0.0).sum(dim=-1) / k
    neg_term = ratios.gather(-1, neg).squeeze(-1)
    losses = -F.logsigmoid(beta * sample_term - alpha * neg_term)
    chosen, rejected = (beta * sample_term).detach(), (alpha * neg_term).detach()
    metrics = {
        "reward_margin": (chosen - rejected).mean(),
        "reward_accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        "samples_log_ratio": sample_term.detach().mean(),
        "negative_log_ratio": neg_term.detach().mean(),
    }
    return LossOutput(losses, chosen, rejected, metrics)
