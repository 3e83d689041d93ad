"""CUDA checks (marker `gpu`, skipped without a CUDA device): the chunked LM-head log-probs in bf16 and
fp32 against the full logits, and one online step of each loop kind on the GPU. The CPU suite covers the
same code paths; these catch what only a GPU changes (device placement, bf16 reductions, TF32)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.online_helpers import EVEN, metrics, train
from tests.train.test_logprobs import _naive_and_chunked

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_chunked_head_on_cuda_equals_the_full_logits(fresh_tiny_model, dtype, atol):
    model = fresh_tiny_model.to("cuda", dtype)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (4, 33), device="cuda")
    labels = ids.clone()
    labels[:, :10] = -100
    (naive, naive_mask, naive_grads), (got, mask, grads) = _naive_and_chunked(model, ids, labels, 5)
    assert got.device.type == "cuda" and torch.equal(mask, naive_mask)
    torch.testing.assert_close(got.float(), naive.float(), rtol=0, atol=atol)
    for g, n in zip(grads, naive_grads, strict=True):  # bf16 rounds elementwise: compare each gradient as a whole
        assert torch.isfinite(g).all()
        rel = (g.float() - n.float()).norm() / n.float().norm().clamp_min(1e-12)
        assert rel < (0.02 if dtype == torch.bfloat16 else 1e-4), rel


@pytest.mark.parametrize(
    "loop,extra",
    [
        ("grpo", ["loop.kl.coef=0.04"]),
        ("rloo", []),
        ("ppo", ["loop.reward.kind=function", "loop.critic.init_from=policy"]),
        ("remax", []),
    ],
)
def test_online_step_on_cuda_in_bf16(prompts, tmp_path, loop, extra):
    summary = train(tmp_path, prompts, f"loop={loop}", EVEN, "optim.max_steps=2", "optim.dtype=bfloat16", *extra)
    assert summary["steps"] == 2
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
