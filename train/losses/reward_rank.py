"""Listwise reward-model losses over K ranked responses per prompt (InstructGPT all-pairs, Plackett–Luce).

Inputs are [B, K]: ``rewards`` (the reward model's scalar output per response), ``scores`` (labels from
the data, higher is better, detached) and ``mask`` (bool, False = padding slot for ragged K). A padding
slot contributes nothing to the loss or the gradient whatever values it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, as_float(x), 0.0)


def _best_worst(rewards: Tensor, scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    best = scores.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)
    worst = scores.masked_fill(~mask, float("inf")).argmin(dim=-1, keepdim=True)
    return rewards.detach().gather(-1, best).squeeze(-1), rewards.detach().gather(-1, worst).squeeze(-1)


def _output(losses: Tensor, r: Tensor, s: Tensor, mask: Tensor, **metrics: Tensor) -> LossOutput:
    best, worst = _best_worst(r, s, mask)
    base = {"reward_margin": (best - worst).mean(), "reward_accuracy": (best > worst).to(best.dtype).mean()}
    return LossOutput(losses, best, worst, {**base, **{k: v.detach().mean() for k, v in metrics.items()}})


def listwise_bradley_terry_loss(*, rewards: Tensor, scores: Tensor, mask: Tensor) -> LossOutput:
    """All K-choose-2 comparisons of one ranked list in one batch element, InstructGPT (Ouyang et al.
    2022, arXiv 2203.02155, §3.5 Eq. 1):

    loss_b = −1/N_b · Σ_{s_i > s_j} log σ(r(x, y_i) − r(x, y_j)),   N_b = #{(i, j): s_i > s_j}.

    N_b = C(K, 2) when the list has no ties (the paper's normaliser); tied responses are not a
    comparison and are left out of both sum and count. A list whose scores all tie has loss 0.
    Shapes: rewards, scores, mask [B, K]. Treating each prompt's comparisons as ONE element (rather
    than shuffling the pairs into the data set) is the paper's remedy for over-fitting: every
    completion is forwarded once per list, not K − 1 times.
    """
    mask = mask.bool()
    r, s = _clean(rewards, mask), _clean(scores, mask).detach()
    pairs = mask.unsqueeze(-1) & mask.unsqueeze(-2) & (s.unsqueeze(-1) > s.unsqueeze(-2))  # [b, i, j]
    pair_losses = -F.logsigmoid(r.unsqueeze(-1) - r.unsqueeze(-2))
    count = pairs.sum(dim=(-2, -1))
    losses = torch.where(pairs, pair_losses, 0.0).sum(dim=(-2, -1)) / count.clamp(min=1).to(r.dtype)
    return _output(losses, r, s, mask, pairs=count.to(r.dtype))


def plackett_luce_loss(*, rewards: Tensor, scores: Tensor, mask: Tensor) -> LossOutput:
    """Plackett–Luce negative log-likelihood of the ranking (Plackett 1975; K-wise reward-model MLE in
    Zhu, Jiao & Jordan 2023, arXiv 2301.11270, §4; the DPO paper's Appendix A.3 uses the same model):

    loss_b = −Σ_{k=1}^{n−1} [ r_{τ(k)} − log Σ_{j=k}^{n} exp(r_{τ(j)}) ],   τ = responses sorted best first.

    Shapes: rewards, scores, mask [B, K]; n = real slots of the list. PL needs a strict order: tied
    scores keep the data's order (stable sort), so put a tie's responses in the order you mean or
    prefer :func:`listwise_bradley_terry_loss`, which skips ties. With n = 2 this is exactly the
    Bradley–Terry loss. The loss is the full-list log-likelihood (a sum over n − 1 choices).
    """
    mask = mask.bool()
    key = scores.detach().masked_fill(~mask, float("-inf"))
    order = key.argsort(dim=-1, descending=True, stable=True)  # padding slots sort last
    r = _clean(rewards, mask).gather(-1, order)
    valid = mask.gather(-1, order)
    K = r.shape[-1]
    later = torch.ones(K, K, dtype=torch.bool, device=r.device).triu()  # [k, j]: j >= k
    use = later & valid.unsqueeze(-2)  # [b, k, j]
    # a padding row k keeps its own (finite) slot so logsumexp and its backward stay NaN-free
    use = use | (torch.eye(K, dtype=torch.bool, device=r.device) & ~valid.unsqueeze(-1))
    lse = torch.logsumexp(r.unsqueeze(-2).expand(*r.shape[:-1], K, K).masked_fill(~use, float("-inf")), dim=-1)
    terms = torch.where(valid, lse - r, 0.0)  # the last real slot's term is log e^{r}/e^{r} = 0
    return _output(terms.sum(dim=-1), _clean(rewards, mask), _clean(scores, mask).detach(), mask)
