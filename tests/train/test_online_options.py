"""loop.mask_truncated_completions (DAPO) and the running score normaliser, on the loop's own code path
(policy_update / normalize) with the tiny model: no full training run."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from train.loops import online, online_update
from train.losses.policy import grpo_loss, rloo_loss
from train.rollout import hf_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def settings(mask: bool, name: str = "grpo"):
    return SimpleNamespace(
        name=name,
        mask_truncated_completions=mask,
        epochs_per_rollout=1,
        entropy_coef=0.0,
        mini_batches=1,
        critic=SimpleNamespace(warmup_steps=0),
        kl=SimpleNamespace(placement="loss"),
        generation=SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6),
    )


@pytest.fixture(scope="module")
def rollout(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there friend", "bread flour water")]
    r = hf_generate(model, tok, ids, 2, settings(False).generation, seed=3)
    assert r.completion_ids.shape[1] == 6
    r.completion_mask[:] = True  # rows 0 and 2 end (EOS) at position 3; rows 1 and 3 hit the limit
    r.completion_mask[[0, 2], 4:] = False
    r.truncated = torch.tensor([False, True, False, True])
    return r


GRPO_TOKEN_MEAN = partial(grpo_loss, aggregation="token_mean")


def updated(tiny_path, rollout, advantages, mask: bool, loss=GRPO_TOKEN_MEAN, name="grpo"):
    """One optimizer step (SGD, lr 1) of the loop's policy_update; the weights after it."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = SimpleNamespace(optim=SimpleNamespace(batch_size=2, max_grad_norm=None), seed=0)
    state = online.OnlineState()
    metrics = online_update.policy_update(
        model,
        {},
        {},
        opt,
        sched,
        {"advantages": torch.tensor(advantages)},
        rollout,
        loss,
        state,
        settings(mask, name),
        cfg,
        Accelerator(cpu=True),
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()]), metrics


@pytest.mark.parametrize(
    "loss,name", [(partial(grpo_loss, aggregation="token_mean"), "grpo"), (partial(rloo_loss), "rloo")]
)
def test_mask_truncated_completions_gives_truncated_rows_no_loss(tiny_path, rollout, loss, name):
    base = [1.0, -2.0, 0.5, 3.0]
    other = [1.0, 100.0, 0.5, -50.0]  # only the truncated rows' advantages differ
    a, ma = updated(tiny_path, rollout, base, True, loss, name)
    b, _ = updated(tiny_path, rollout, other, True, loss, name)
    assert torch.equal(a, b) and math.isfinite(ma["loss"])
    c, _ = updated(tiny_path, rollout, base, False, loss, name)  # off: the truncated rows do move the weights
    d, _ = updated(tiny_path, rollout, other, False, loss, name)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)
    # the kept rows alone, as a rollout of their own, give the same step (token_mean over their tokens only)
    if name == "grpo":
        e, _ = updated(tiny_path, rollout.select([0, 2]), [1.0, 0.5], False, loss, name)
        assert torch.allclose(a, e, atol=1e-6)


def test_mask_truncated_completions_with_every_row_truncated_leaves_the_weights(tiny_path, rollout):
    r = rollout.select([1, 3])
    before, _ = updated(tiny_path, r, [0.0, 0.0], False)  # zero advantages: the untouched weights
    after, m = updated(tiny_path, r, [5.0, -5.0], True)
    assert torch.equal(before, after) and m["loss"] == 0.0


def test_no_grad_passes_record_no_graph(tiny_path, rollout):
    """The π_old / value passes run without autograd: a recorded graph would keep their activations
    alive through the update (the RLOO beta > 0 peak-memory regression)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    L = settings(False)
    L.epochs_per_rollout = 2  # π_old is needed
    out = online_update.no_grad_passes(model, model, {}, rollout, L, 2, "cpu")
    assert {"old_logps", "ref_logps", "entropy"} <= set(out)
    assert not any(t.requires_grad for t in out.values())
    assert torch.allclose(out["old_logps"], out["ref_logps"])


def test_running_normaliser_in_the_loop_state_and_remax_baseline():
    from accelerate import Accelerator

    state = online.OnlineState()
    acc = Accelerator(cpu=True)
    s1, _ = online_update.normalize(state, "reward_moments", torch.tensor([1.0, 2.0, 3.0]), None, "affine", 1e-8, acc)
    assert state.reward_moments == [3, pytest.approx(2.0), pytest.approx(1.0)]
    assert s1.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    s2, base = online_update.normalize(
        state,
        "reward_moments",
        torch.tensor([4.0, float("nan"), 5.0]),
        torch.tensor([3.0, 3.0, 3.0]),
        "affine",
        1e-8,
        acc,
    )
    sd = math.sqrt(2.3)
    assert s2[0].item() == pytest.approx(1 / sd, abs=1e-6) and math.isnan(s2[1].item())
    assert base.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)  # the baseline uses, never updates, the stats
    assert state.reward_moments[0] == 5 and "reward_moments" in online.OnlineState.SAVED


def test_settings_and_refusals():
    from synth.errors import ConfigError
    from tests.train.online_helpers import compose
    from train.app import validate

    def check(*o):
        from omegaconf import OmegaConf

        return validate(OmegaConf.to_container(compose(*o, "data.path=x", "output_dir=y"), resolve=True))

    cfg = check(
        "loop=grpo", "loop.reward.function=m:f", "loop.mask_truncated_completions=true", "loop.normalize_reward=scale"
    )
    assert (
        cfg.loop.mask_truncated_completions and cfg.loop.normalize_reward == "scale" and cfg.loop.normalize_eps == 1e-8
    )
    for bad in ("loop.normalize_eps=0", "loop.normalize_eps=2", "loop.normalize_reward=whiten"):
        with pytest.raises(ConfigError, match="normalize_"):
            check("loop=grpo", "loop.reward.function=m:f", bad)
    with pytest.raises(ConfigError, match="policy-gradient loops"):
        check("loop=online_dpo", "loop.reward.function=m:f", "loop.mask_truncated_completions=true")
    with pytest.raises(ConfigError, match="normalize_cost"):
        check("loop=grpo", "loop.reward.function=m:f", "loop.normalize_cost=affine")
