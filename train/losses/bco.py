"""BCO: binary classifier optimisation on unpaired feedback, and its running reward mean δ (Jung et al. 2024,
arXiv 2404.04656)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, Reduce, as_float, batch_mean


class RunningMean:
    """Cumulative running mean of a scalar stream: BCO's reward shift δ (arXiv 2404.04656; as in TRL's
    BCO trainer, updated before use; TRL's `bco_pair` loss has no δ).

        The same estimator as TRL's ``RunningMoments`` mean (count from 0; TRL's 1e-24 start is the same
        to float precision): a cumulative mean, not an exponential moving average. It holds plain Python
        floats (no tensors, no module), is updated *before* δ is read so the current batch counts, and
        must be checkpointed with ``state_dict()`` / ``load_state_dict()`` by the loop.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0.0

    def update(self, values: Tensor | float) -> None:
        """Fold in ``values`` (any shape; each element weighs 1)."""
        v = torch.as_tensor(values).detach().cpu().to(torch.float64)  # cpu: MPS has no float64
        if v.numel() == 0:
            return
        total = self.count + v.numel()
        self.mean += (float(v.mean()) - self.mean) * v.numel() / total
        self.count = total

    def update_and_read(self, batch_value: Tensor, reduce: Reduce | None = None) -> Tensor:
        """All-reduce (optional) one 0-dim batch statistic, fold it in, return δ as a detached tensor."""
        x = batch_value.detach()
        if reduce is not None:
            x = reduce(x)
        self.update(x)
        return torch.tensor(self.mean, dtype=x.dtype, device=x.device)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def bco_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    running_mean: RunningMean | None = None,
    fixed_delta: float | Tensor | None = None,
    reduce: Reduce | None = None,
    density_ratio: Tensor | None = None,
    beta: float = 0.1,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
) -> LossOutput:
    """BCO, Jung et al. 2024 (arXiv 2404.04656), with r = β(ℓθ(y) − ℓref(y)):

    desirable:   −log σ(r − δ)          undesirable:   −log σ(−(r − δ))

    Shapes: policy_logps, reference_logps, labels (bool, True = desirable) [B]; summed log-probs.
    δ: either ``running_mean`` (the loop's :class:`RunningMean`; updated with this batch's mean
    reward, all-reduced by ``reduce`` if given, *then* read, as TRL does) or a fixed ``fixed_delta``.
    ``density_ratio`` [B] (optional UDM weights p/(1−p) from a prompt classifier) multiplies the
    undesirable losses, clamped to [min_density_ratio, max_density_ratio] and detached.
    """
    labels = labels.bool()
    rewards = beta * (as_float(policy_logps) - as_float(reference_logps).detach())
    if running_mean is not None and fixed_delta is not None:
        raise ValueError("BCO takes either running_mean or fixed_delta, not both")
    if running_mean is not None:
        delta_t = running_mean.update_and_read(rewards.detach().mean(), reduce)
    elif fixed_delta is not None:
        delta_t = torch.as_tensor(fixed_delta, dtype=rewards.dtype, device=rewards.device).detach()
    else:
        raise ValueError("BCO needs running_mean (YAML stateful: running_mean) or fixed_delta")
    shifted = rewards - delta_t
    losses = torch.where(labels, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    if density_ratio is not None:
        weight = as_float(density_ratio).detach().clamp(min_density_ratio, max_density_ratio)
        losses = torch.where(labels, losses, losses * weight)
    metrics = {"delta": delta_t.detach(), "rewards": batch_mean(rewards)}
    return LossOutput(losses, rewards[labels].detach(), rewards[~labels].detach(), metrics)
