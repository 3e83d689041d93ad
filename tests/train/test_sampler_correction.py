"""Train/inference mismatch correction (train.advantages.sampler_is_weights) and its use in the policy
losses: golden values worked by hand.

    old     = [[-1.0, -2.0, -0.5], [-0.3, -0.2, -9.0]]   trainer log-probs (π_old)
    sampler = [[-1.1, -1.5, -0.5], [-1.5, -0.4,  0.0]]   vLLM log-probs; row 2's last token is padding
    Δ = old − sampler: row 1 [0.1, −0.5, 0.0] (Σ −0.4), row 2 [1.2, 0.2] (Σ 1.4)
    seq_mask (cap 3): row 1 exp(−0.4) = 0.670320; row 2 exp(1.4) = 4.055200 > 3 → 0
    tis (cap 3):      row 1 [1.105171, 0.606531, 1.0]; row 2 [min(3.320117, 3) = 3.0, 1.221403]
    mean |Δ| = (0.1 + 0.5 + 0 + 1.2 + 0.2) / 5 = 0.4
    the other two of TRL's modes, and the lower bound (ρ_t = exp Δ_t: row 1 [1.105171, 0.606531, 1], row 2
    [3.320117, 1.221403]; ρ_i: 0.670320, 4.055200):
    token_mask (cap 3):            row 1 [1.105171, 0.606531, 1.0]; row 2 [0 (3.32 > 3), 1.221403]
    token_mask (floor 0.7, cap 3): row 1 [1.105171, 0 (0.61 < 0.7), 1.0]; row 2 as above
    tis (floor 0.7, cap 3):        row 1 [1.105171, 0.7, 1.0]; row 2 [3.0, 1.221403]
    seq_truncate (cap 3):          row 1 0.670320 on each token; row 2 min(4.055200, 3) = 3.0
    seq_truncate (floor 0.8):      row 1 max(0.670320, 0.8) = 0.8; row 2 3.0
    seq_mask (floor 0.8, cap 5):   row 1 0 (0.67 < 0.8); row 2 4.055200
"""

from __future__ import annotations

import math

import pytest
import torch

from train import advantages as A
from train.losses.policy import grpo_loss, rloo_loss

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -9.0]])
SAMPLER = torch.tensor([[-1.1, -1.5, -0.5], [-1.5, -0.4, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -1.0])


def test_sequence_mask_golden():
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_mask", 3.0)
    expected = torch.tensor([[0.670320] * 3, [0.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    # a larger cap keeps row 2, with its own weight
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_mask", 5.0)
    assert w[1, :2].tolist() == pytest.approx([4.055200, 4.055200], abs=1e-5) and w[1, 2] == 0


def test_token_truncation_golden():
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "tis", 3.0)
    expected = torch.tensor([[1.105171, 0.606531, 1.0], [3.0, 1.221403, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)


def test_none_and_nan_and_the_monitor():
    assert torch.equal(A.sampler_is_weights(OLD, SAMPLER, MASK, "none", 3.0), MASK.float())
    total, count = A.abs_logp_diff(OLD, SAMPLER, MASK)
    assert float(total / count) == pytest.approx(0.4, abs=1e-6) and int(count) == 5
    sampler = SAMPLER.clone()
    sampler[0, 1] = math.nan  # vLLM gave no log-prob: that token is left alone (w = 1, Δ = 0), as TRL
    w = A.sampler_is_weights(OLD, sampler, MASK, "tis", 3.0)
    assert w[0].tolist() == pytest.approx([1.105171, 1.0, 1.0], abs=1e-6)
    total, count = A.abs_logp_diff(OLD, sampler, MASK)
    assert float(total / count) == pytest.approx(1.5 / 4, abs=1e-6)
    with pytest.raises(ValueError, match="is_correction"):
        A.sampler_is_weights(OLD, SAMPLER, MASK, "icepop", 3.0)


def test_token_weights_scale_the_token_loss_and_its_gradient():
    """ratio 1 (logps = old): per-token loss −A·w; token-mean over the 5 tokens:
    (−(1.105171 + 0.606531 + 1.0) + (3.0 + 1.221403)) / 5 = 0.301940; ∂/∂logp = −A·w / 5."""
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "tis", 3.0)
    logps = OLD.clone().requires_grad_(True)
    out = grpo_loss(
        logps=logps, old_logps=OLD, advantages=ADV, mask=MASK, aggregation="token_mean", is_weights=w, kl_coef=0.0
    )
    loss = out.losses.sum() / 2
    assert float(loss.detach()) == pytest.approx(0.301940, abs=1e-6)
    loss.backward()
    assert torch.allclose(logps.grad, -ADV[:, None] * w / 5, atol=1e-7)
    # without weights: (−3 + 2) / 5
    plain = grpo_loss(logps=OLD, old_logps=OLD, advantages=ADV, mask=MASK, aggregation="token_mean")
    assert float(plain.losses.sum() / 2) == pytest.approx(-0.2, abs=1e-7)


def test_kl_term_is_not_weighted():
    """β·k3 on top: with ref = logps the KL is 0 either way, with ref shifted it adds the same amount with
    and without weights (the weights multiply the surrogate only, as TRL)."""
    ref = OLD - 0.1
    kw = {"old_logps": OLD, "advantages": torch.zeros(2), "mask": MASK, "aggregation": "token_mean"}
    zero_w = torch.zeros(2, 3)
    a = grpo_loss(logps=OLD, ref_logps=ref, kl_coef=0.5, kl_estimator="k3", is_weights=zero_w, **kw)
    b = grpo_loss(logps=OLD, ref_logps=ref, kl_coef=0.5, kl_estimator="k3", **kw)
    k3 = math.exp(-0.1) - 1 + 0.1
    assert float(a.losses.sum() / 2) == pytest.approx(0.5 * k3, abs=1e-7)
    assert float(a.losses.sum()) == pytest.approx(float(b.losses.sum()), abs=1e-7)


def test_sequence_ratio_loss_takes_sequence_weights():
    """TRL RLOO's sequence ratio (1 at logps = old): losses −A_i·w_i = [−0.670320, 0]; mean −0.335160."""
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_mask", 3.0)
    out = rloo_loss(logps=OLD, old_logps=OLD, advantages=ADV, mask=MASK, is_weights=w)
    assert out.losses.tolist() == pytest.approx([-0.670320, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="one importance weight per sequence"):
        rloo_loss(
            logps=OLD,
            old_logps=OLD,
            advantages=ADV,
            mask=MASK,
            is_weights=A.sampler_is_weights(OLD, SAMPLER, MASK, "tis", 3.0),
        )


def test_token_mask_and_lower_bounds_golden():
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "token_mask", 3.0)
    assert torch.allclose(w, torch.tensor([[1.105171, 0.606531, 1.0], [0.0, 1.221403, 0.0]]), atol=1e-6)
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "token_mask", 3.0, floor=0.7)
    assert torch.allclose(w, torch.tensor([[1.105171, 0.0, 1.0], [0.0, 1.221403, 0.0]]), atol=1e-6)
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "tis", 3.0, floor=0.7)
    assert torch.allclose(w, torch.tensor([[1.105171, 0.7, 1.0], [3.0, 1.221403, 0.0]]), atol=1e-6)


def test_sequence_truncation_golden():
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_truncate", 3.0)
    assert torch.allclose(w, torch.tensor([[0.670320] * 3, [3.0, 3.0, 0.0]]), atol=1e-6)
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_truncate", 3.0, floor=0.8)
    assert torch.allclose(w, torch.tensor([[0.8] * 3, [3.0, 3.0, 0.0]]), atol=1e-6)
    w = A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_mask", 5.0, floor=0.8)
    assert torch.allclose(w, torch.tensor([[0.0] * 3, [4.055200, 4.055200, 0.0]]), atol=1e-5)
    # one weight per sequence, so a sequence-ratio loss takes it: losses −A_i·w_i = [−0.670320, 3.0]
    out = rloo_loss(
        logps=OLD,
        old_logps=OLD,
        advantages=ADV,
        mask=MASK,
        is_weights=A.sampler_is_weights(OLD, SAMPLER, MASK, "seq_truncate", 3.0),
    )
    assert out.losses.tolist() == pytest.approx([-0.670320, 3.0], abs=1e-6)


def test_bounds_settings():
    from train.app import GenerationSettings

    assert GenerationSettings(is_correction="token_mask", is_min=0.5).is_min == 0.5
    with pytest.raises(ValueError, match="is_min=3 must be below is_cap=3"):
        GenerationSettings(is_min=3.0)
