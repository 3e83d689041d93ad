"""Properties every objective must have: finite at extreme logits, the paper's gradient signs,
constants detached, padding inert (stable logsigmoid / log1mexp / logsumexp, fp32 log-ratios)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from train.losses import LossOutput, RunningMean
from train.losses._core import log1mexp
from train.losses.apo import apo_down_loss, apo_zero_loss
from train.losses.bco import bco_loss
from train.losses.calibration import hinge_loss, ipo_loss, slic_hf_loss
from train.losses.dpo import (
    bco_pair_loss,
    cdpo_loss,
    dpo_loss,
    dpop_loss,
    exo_pair_loss,
    odpo_loss,
    robust_dpo_loss,
    rpo_loss,
)
from train.losses.kto import kto_loss
from train.losses.listwise import lipo_lambda_loss, pro_loss, rrhf_loss
from train.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from train.losses.reward import bradley_terry_loss, cost_model_loss
from train.losses.sft import sft_loss
from train.losses.unlikelihood import cringe_loss, npo_loss

F64 = torch.float64


def leaf(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).requires_grad_(True)


def backward(out: LossOutput) -> None:
    assert out.losses.dim() == 1
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()


# ------------------------------------------------------------------------------------ pairwise
# name -> (fn, gain, reference?, length-normalised?, extra tensors, chosen gradient is the paper's "< 0")
# gain maps h (ρ_w − ρ_l, or ℓ_w − ℓ_l without reference) to the link's logit.
PAIRWISE: dict[str, tuple[Callable[..., LossOutput], float, bool, bool, dict, bool]] = {
    "dpo": (dpo_loss, 0.1, True, False, {"p_chosen": 0.8}, True),
    "cdpo": (cdpo_loss, 0.1, True, False, {}, True),
    "robust_dpo": (robust_dpo_loss, 0.1, True, False, {}, True),
    "hinge": (hinge_loss, 0.1, True, False, {}, True),
    "ipo": (ipo_loss, 1.0, True, False, {}, True),
    "ipo_trl": (
        functools.partial(ipo_loss, length_normalise=True),
        0.2,
        True,
        False,
        {"chosen_lengths": 5.0, "rejected_lengths": 6.0},
        True,
    ),
    "exo": (exo_pair_loss, 0.1, True, False, {}, True),
    "dpop": (dpop_loss, 0.1, True, False, {}, True),
    "odpo": (odpo_loss, 0.1, True, False, {"score_chosen": 5.0, "score_rejected": 2.0}, True),
    "rpo": (rpo_loss, 0.1, True, False, {"chosen_nll": 2.0}, True),
    "apo_zero": (apo_zero_loss, 0.1, True, False, {}, True),
    "apo_down": (apo_down_loss, 0.1, True, False, {}, False),  # APO-down lowers y_w by design
    "bco_pair": (bco_pair_loss, 0.1, True, False, {}, True),
    "slic_hf": (slic_hf_loss, 1.0, False, False, {}, True),
    "cpo": (cpo_loss, 0.1, False, False, {}, True),
    "orpo": (orpo_loss, 1.0, False, True, {"chosen_nll": 1.0}, True),
    "simpo": (simpo_loss, 2.0, False, True, {}, True),
}
CONSTANT_EXTRAS = {"p_chosen", "score_chosen", "score_rejected", "chosen_lengths", "rejected_lengths"}


def pairwise_batch(name: str, logits: list[float]) -> dict[str, torch.Tensor]:
    """Leaves (requires_grad, even the constants) with gain·h equal to each requested logit."""
    _, gain, ref, mean, extra, _ = PAIRWISE[name]
    h = torch.tensor(logits, dtype=F64) / gain
    if ref:
        base = torch.full_like(h, -2000.0)
        batch = {
            "policy_chosen_logps": base + h / 2,
            "policy_rejected_logps": base - h / 2,
            "reference_chosen_logps": base.clone(),
            "reference_rejected_logps": base.clone(),
        }
    else:
        base = -0.5 if mean else -10.0  # means stay < 0 (ORPO's log(1 − p))
        batch = {"policy_chosen_logps": base - torch.relu(-h), "policy_rejected_logps": base - torch.relu(h)}
    batch.update({k: torch.full_like(h, v) for k, v in extra.items()})
    return {k: v.detach().requires_grad_(True) for k, v in batch.items()}


def call_pairwise(name: str, batch: dict[str, torch.Tensor]) -> LossOutput:
    return PAIRWISE[name][0](**batch)


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_finite_at_extreme_logits(name: str) -> None:
    batch = pairwise_batch(name, [150.0, -150.0, 0.0])
    backward(call_pairwise(name, batch))
    for tensor in batch.values():
        assert tensor.grad is None or torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_gradient_signs(name: str) -> None:
    batch = pairwise_batch(name, [0.2, -0.3])
    backward(call_pairwise(name, batch))
    if PAIRWISE[name][5]:
        assert (batch["policy_chosen_logps"].grad < 0).all(), "raising ℓθ(y_w) must lower the loss"
    assert (batch["policy_rejected_logps"].grad > 0).all(), "raising ℓθ(y_l) must raise the loss"


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_constants_detached(name: str) -> None:
    batch = pairwise_batch(name, [0.2, -0.3])
    out = call_pairwise(name, batch)
    backward(out)
    for key, tensor in batch.items():
        if key.startswith("reference_") or key in CONSTANT_EXTRAS:
            assert tensor.grad is None, f"{key} must be detached"
    for rewards in (out.chosen_rewards, out.rejected_rewards):
        assert rewards is not None and not rewards.requires_grad
    assert all(not m.requires_grad for m in out.metrics.values())


def test_dpo_float32_extreme_and_bf16_upcast() -> None:
    z = torch.tensor([-1500.0], dtype=torch.float32)
    zeros = torch.zeros(1, dtype=torch.float32)
    out = dpo_loss(
        policy_chosen_logps=z, policy_rejected_logps=zeros, reference_chosen_logps=zeros, reference_rejected_logps=zeros
    )
    assert out.losses.item() == pytest.approx(150.0, abs=1e-4)
    half = dpo_loss(
        policy_chosen_logps=torch.tensor([-10.0], dtype=torch.bfloat16),
        policy_rejected_logps=torch.tensor([-12.0], dtype=torch.bfloat16),
        reference_chosen_logps=torch.tensor([-11.0], dtype=torch.bfloat16),
        reference_rejected_logps=torch.tensor([-11.0], dtype=torch.bfloat16),
    )
    assert half.losses.dtype == torch.float32


def test_robust_dpo_goes_negative_unclamped() -> None:
    batch = pairwise_batch("robust_dpo", [20.0])
    assert robust_dpo_loss(**batch).losses.item() < 0


@pytest.mark.parametrize("fn, eps", [(robust_dpo_loss, 0.5), (exo_pair_loss, 0.0), (cdpo_loss, 1.5)])
def test_invalid_epsilon_rejected(fn: Callable[..., LossOutput], eps: float) -> None:
    with pytest.raises(ValueError):
        fn(**pairwise_batch("cdpo", [0.2]), epsilon=eps)


def test_ipo_length_normalise_needs_lengths() -> None:
    with pytest.raises(ValueError):
        ipo_loss(**pairwise_batch("ipo", [0.2]), length_normalise=True)


def test_cpo_sequence_mean_needs_nll() -> None:
    with pytest.raises(ValueError):
        cpo_loss(**pairwise_batch("cpo", [0.2]), nll_form="sequence_mean")


def test_orpo_near_certain_logps_float32() -> None:
    w = torch.tensor([-1e-8, 0.0, -30.0], dtype=torch.float32, requires_grad=True)
    lo = torch.tensor([-30.0, -1e-8, 0.0], dtype=torch.float32, requires_grad=True)
    out = orpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, chosen_nll=torch.ones(3))
    backward(out)
    assert torch.isfinite(w.grad).all() and torch.isfinite(lo.grad).all()


def test_log1mexp_gradient_finite_on_both_branches() -> None:
    x = torch.tensor([-1e-8, -0.5, -0.7, -30.0, -200.0], dtype=torch.float32, requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------ unpaired
LABELS = [True, False, True, False]


def unpaired_batch(beta_rho: list[float], beta: float = 0.1) -> dict[str, torch.Tensor]:
    ref = torch.full((len(beta_rho),), -500.0, dtype=F64)
    return {
        "policy_logps": (ref + torch.tensor(beta_rho, dtype=F64) / beta).requires_grad_(True),
        "reference_logps": ref.clone().requires_grad_(True),
        "labels": torch.tensor(LABELS[: len(beta_rho)]),
    }


def kto_kl() -> dict[str, torch.Tensor]:
    return {
        "policy_kl_logps": leaf([-11.5, -12.2, -10.0, -9.0]),
        "reference_kl_logps": leaf([-11.8, -12.0, -10.0, -9.0]),
    }


UNPAIRED: dict[str, Callable[[dict], LossOutput]] = {
    "kto": lambda b: kto_loss(**b, **kto_kl()),
    "bco": lambda b: bco_loss(**b, running_mean=RunningMean()),
    "npo": lambda b: npo_loss(**{k: v for k, v in b.items() if k != "labels"}),
    "npo_rt": lambda b: npo_loss(**b, retain_weight=1.0),
}


@pytest.mark.parametrize("name", UNPAIRED)
def test_unpaired_finite_extreme_and_signs(name: str) -> None:
    extreme = unpaired_batch([150.0, 150.0, -150.0, -150.0])
    backward(UNPAIRED[name](extreme))
    assert torch.isfinite(extreme["policy_logps"].grad).all()
    batch = unpaired_batch([0.2, 0.2, -0.3, -0.1])
    out = UNPAIRED[name](batch)
    backward(out)
    grad = batch["policy_logps"].grad
    desirable = torch.tensor(LABELS) & (name != "npo")  # plain NPO: every example is forgotten
    assert (grad[desirable] < 0).all() and (grad[~desirable] > 0).all()
    assert batch["reference_logps"].grad is None
    assert all(not m.requires_grad for m in out.metrics.values())


def test_kto_kl_pairs_detached_and_reduce_hook() -> None:
    kl = kto_kl()
    seen = []

    def reduce(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x * 2  # stands in for the cross-process mean

    out = kto_loss(**unpaired_batch([0.1, -0.1]), **kl, reduce=reduce)
    backward(out)
    assert kl["policy_kl_logps"].grad is None and kl["reference_kl_logps"].grad is None
    assert len(seen) == 1 and seen[0].item() == pytest.approx(0.025)
    assert out.metrics["kl"].item() == pytest.approx(0.05)
    precomputed = kto_loss(**unpaired_batch([0.1, -0.1]), kl=torch.tensor(0.05))
    assert torch.allclose(precomputed.losses, out.losses)


def test_kto_rejects_missing_or_single_kl_pair() -> None:
    with pytest.raises(ValueError):
        kto_loss(**unpaired_batch([0.1]))
    with pytest.raises(ValueError):
        kto_loss(**unpaired_batch([0.1]), policy_kl_logps=leaf([-1.0]), reference_kl_logps=leaf([-1.0]))


def test_kto_one_sided_batch() -> None:
    batch = unpaired_batch([0.1, 0.3])
    batch["labels"] = torch.tensor([True, True])
    out = kto_loss(**batch, **kto_kl())
    assert out.rejected_rewards.numel() == 0 and out.chosen_rewards.numel() == 2


def test_bco_running_mean_updated_before_use_and_checkpointable() -> None:
    running = RunningMean()
    first = bco_loss(**unpaired_batch([0.3, 0.1]), running_mean=running)  # batch mean reward 0.2
    assert first.metrics["delta"].item() == pytest.approx(0.2)
    second = bco_loss(**unpaired_batch([-0.2, 0.0]), running_mean=running)  # mean −0.1 → cumulative 0.05
    assert second.metrics["delta"].item() == pytest.approx(0.05)
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    assert restored.state_dict() == running.state_dict() == {"mean": pytest.approx(0.05), "count": 2.0}
    halved = bco_loss(**unpaired_batch([0.4, 0.0]), running_mean=restored, reduce=lambda x: x / 2)
    assert halved.metrics["delta"].item() == pytest.approx((0.05 * 2 + 0.1) / 3)


def test_bco_delta_sources_and_density_ratio() -> None:
    with pytest.raises(ValueError):
        bco_loss(**unpaired_batch([0.1, 0.1]))
    with pytest.raises(ValueError):
        bco_loss(**unpaired_batch([0.1, 0.1]), running_mean=RunningMean(), fixed_delta=0.0)
    plain = bco_loss(**unpaired_batch([0.1, 0.1]), fixed_delta=0.0)
    weighted = bco_loss(**unpaired_batch([0.1, 0.1]), fixed_delta=0.0, density_ratio=torch.tensor([100.0, 100.0]))
    assert weighted.losses[0].item() == pytest.approx(plain.losses[0].item())  # desirable: unweighted
    assert weighted.losses[1].item() == pytest.approx(10.0 * plain.losses[1].item())  # clamped at 10


def test_bco_pair_running_mean_is_trl_le_028() -> None:
    running = RunningMean()
    out = bco_pair_loss(**pairwise_batch("bco_pair", [0.4]), running_mean=running)
    # rewards βρ_w = 0.02, βρ_l = −0.02 → batch mean 0 here; shift the reference to make it non-zero
    assert out.metrics["delta"].item() == pytest.approx(0.0)
    batch = pairwise_batch("bco_pair", [0.4])
    batch["reference_rejected_logps"] = (batch["reference_rejected_logps"] - 1.0).detach()
    shifted = bco_pair_loss(**batch, running_mean=running)
    assert shifted.metrics["delta"].item() == pytest.approx((0.0 + 0.05) / 2)


# ------------------------------------------------------------------------------------ listwise
def listwise_batch(spread: float) -> dict[str, torch.Tensor]:
    """Row 0: 4 real slots; row 1: 3 real slots + one padding slot full of NaN. Best slot = index 0."""
    nan = float("nan")
    policy = [
        [-10.0, -10.0 - spread, -10.0 - 2 * spread, -10.0 - 3 * spread],
        [-12.0 - spread, -12.0, -12.0 - 2 * spread, nan],
    ]
    return {
        "policy_logps": leaf(policy),
        "reference_logps": leaf([[-11.0] * 4, [-11.0, -11.0, -11.0, nan]]),
        "lengths": leaf([[5.0, 6.0, 7.0, 8.0], [4.0, 5.0, 6.0, nan]]),
        "scores": leaf([[3.0, 2.0, 1.0, 0.0], [2.0, 1.0, 0.0, nan]]),
        "mask": torch.tensor([[True] * 4, [True, True, True, False]]),
    }


LISTWISE: dict[str, Callable[..., LossOutput]] = {
    "lipo_lambda": functools.partial(lipo_lambda_loss, beta=0.1),
    "pro": pro_loss,
    "rrhf": rrhf_loss,
}


def call_listwise(name: str, batch: dict[str, torch.Tensor]) -> LossOutput:
    fn = LISTWISE[name]
    params = {"lipo_lambda": ("policy_logps", "reference_logps", "scores", "mask")}.get(
        name, ("policy_logps", "lengths", "scores", "mask")
    )
    return fn(**{k: batch[k] for k in params})


@pytest.mark.parametrize("name", LISTWISE)
def test_listwise_padding_inert(name: str) -> None:
    batch = listwise_batch(1.0)
    out = call_listwise(name, batch)
    backward(out)
    for key in ("policy_logps", "reference_logps", "lengths", "scores"):
        grad = batch[key].grad
        assert grad is None or (torch.isfinite(grad).all() and grad[1, 3] == 0)
    unpadded = {k: v[1:, :3].detach() for k, v in listwise_batch(1.0).items()}
    assert out.losses[1].item() == pytest.approx(call_listwise(name, unpadded).losses[0].item(), abs=1e-9)


@pytest.mark.parametrize("name", LISTWISE)
def test_listwise_extreme_finite_and_signs(name: str) -> None:
    extreme = listwise_batch(1500.0 if name == "lipo_lambda" else 500.0)
    backward(call_listwise(name, extreme))
    assert torch.isfinite(extreme["policy_logps"].grad).all()
    # reversed order (worst slot most likely) so that every pairwise term is active (RRHF's hinge)
    batch = listwise_batch(-1.0)
    backward(call_listwise(name, batch))
    grad = batch["policy_logps"].grad
    assert grad[0, 0] < 0 and grad[1, 0] < 0, "raising the best response must lower the loss"
    assert grad[0, 3] > 0 and grad[1, 2] > 0, "raising the worst response must raise the loss"
    for key in ("reference_logps", "lengths", "scores"):
        assert batch[key].grad is None, f"{key} must be detached"


def test_lipo_ties_contribute_nothing() -> None:
    batch = listwise_batch(1.0)
    batch["scores"] = torch.ones(2, 4, dtype=F64)
    assert call_listwise("lipo_lambda", batch).losses.abs().max().item() == 0.0


# ------------------------------------------------------------------------------------ reward, sft, cringe
def test_reward_losses_extreme_signs_detached() -> None:
    for gap in (150.0, -150.0, 0.5):
        chosen, rejected, margin = leaf([gap]), leaf([0.0]), leaf([1.0])
        backward(bradley_terry_loss(rewards_chosen=chosen, rewards_rejected=rejected, margin=margin, center_coef=0.01))
        assert margin.grad is None
        if gap == 0.5:
            assert chosen.grad.item() < 0 and rejected.grad.item() > 0
        safer, harmful = leaf([-gap]), leaf([gap])
        backward(
            cost_model_loss(
                costs_chosen=safer,
                costs_rejected=harmful,
                safe_chosen=torch.tensor([True]),
                safe_rejected=torch.tensor([False]),
            )
        )
        if gap == 0.5:
            assert harmful.grad.item() < 0 and safer.grad.item() > 0  # harmful cost up, safe cost down


@pytest.mark.parametrize("normalisation", ["sequence_mean", "sum", "batch_token_mean"])
def test_sft_padding_and_signs(normalisation: str) -> None:
    token_logps = leaf([[-0.5, -150.0, float("nan")], [-3.0, float("nan"), float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    backward(sft_loss(token_logps=token_logps, token_mask=mask, normalisation=normalisation))
    assert (token_logps.grad[mask] < 0).all() and (token_logps.grad[~mask] == 0).all()


def test_cringe_padding_extremes_and_signs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, dtype=F64) * 3
    logits[0, 1, 2], logits[1, 0, 7] = 150.0, -150.0
    logits[:, 3] = float("nan")  # padding position
    logits.requires_grad_(True)
    targets = torch.tensor([[2, 2, 2, -100], [7, 1, 1, -100]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    out = cringe_loss(
        logits=logits,
        target_ids=targets,
        token_mask=mask,
        labels=torch.tensor([True, False]),
        generator=torch.Generator().manual_seed(0),
    )
    backward(out)
    grad = logits.grad
    assert torch.isfinite(grad).all() and (grad[:, 3] == 0).all()
    target_grad = grad[:, :3].gather(-1, targets[:, :3].unsqueeze(-1)).squeeze(-1)
    assert (target_grad[0] <= 0).all() and (target_grad[1] >= 0).all()
    assert (target_grad[0, 0] < 0) and (target_grad[1, 1] > 0)
