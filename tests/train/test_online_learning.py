"""Toy tasks on the tiny model: every online loop learns a rule reward; the adaptive KL controller
holds KL in a band; PPO-Lagrangian ends under its cost threshold while reward rises; online DPO with a
scripted pairwise judge learns the judge's preference. Rule reward: the fraction of even token ids in
the completion (about 0.5 for the random tiny policy)."""

from __future__ import annotations

import json

import pytest

from tests.train import online_helpers
from tests.train.online_helpers import EVEN, metrics, train

TOY = ["optim.lr=2e-2", "loop.generation.max_new_tokens=12"]


def first_last(rows, key, k=3):
    vals = [r[key] for r in rows if key in r]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.mark.parametrize(
    "loop,extra,steps",
    [
        ("grpo", ["loop.prompts_per_step=8"], 12),
        ("grpo", ["loop.prompts_per_step=8", "loop.estimator=dr_grpo", "loss=dr_grpo"], 12),
        ("rloo", ["loop.prompts_per_step=8"], 20),
        ("remax", ["loop.prompts_per_step=16"], 20),
        (
            "ppo",
            [
                "loop.reward.kind=function",
                "loop.critic.init_from=policy",
                "loop.critic.lr=1e-3",
                "loop.prompts_per_step=16",
                "loop.kl.coef=0.01",
            ],
            20,
        ),
        ("online_dpo", ["loop.prompts_per_step=16"], 12),
    ],
    ids=["grpo", "dr_grpo", "rloo", "remax", "ppo", "online_dpo"],
)
def test_rule_reward_rises(prompts, tmp_path, loop, extra, steps):
    train(tmp_path, prompts, f"loop={loop}", EVEN, f"optim.max_steps={steps}", *TOY, *extra)
    start, end = first_last(metrics(tmp_path), "reward/mean")
    assert end > start + 0.15, (start, end)


def test_adaptive_kl_stays_in_a_band(prompts, tmp_path):
    target = 3.0
    train(
        tmp_path,
        prompts,
        "loop=ppo",
        "loop.reward.kind=function",
        EVEN,
        "loop.critic.init_from=policy",
        "loop.critic.lr=1e-3",
        "loop.prompts_per_step=16",
        "loop.kl.coef=0.1",
        f"loop.kl.target_per_sequence_nats={target}",
        "loop.kl.horizon=32",
        "optim.max_steps=30",
        "optim.lr=1e-2",
        "loop.generation.max_new_tokens=16",
    )
    rows = metrics(tmp_path)
    # β moves with the sign of KL − target every step (β of row t was set after measuring its KL)
    prev = 0.1
    for r in rows:
        assert (r["beta"] - prev) * (r["kl"] - target) > 0, r["step"]
        prev = r["beta"]
    late = [r["kl"] for r in rows[12:]]
    assert min(late) > target / 2 and max(late) < 2 * target, late


def test_ppo_lagrangian_meets_the_cost_threshold_while_reward_rises(prompts, tmp_path):
    # cost = fraction of ids ≡ 0 mod 4 (≈ 0.25 at start, half of the rewarded even ids): the policy must
    # move to ids ≡ 2 mod 4. Threshold 0.2.
    train(
        tmp_path,
        prompts,
        "loop=ppo_lag",
        "loop.reward.kind=function",
        EVEN,
        "loop.cost.kind=function",
        "loop.cost.function=train.scorers:quarter_token_fraction",
        "loop.lagrangian.cost_threshold=0.2",
        "loop.lagrangian.lambda_lr=1.0",
        "loop.lagrangian.window=32",
        "loop.critic.init_from=policy",
        "loop.critic.lr=1e-3",
        "loop.prompts_per_step=16",
        "optim.max_steps=25",
        "optim.lr=2e-2",
        "loop.generation.max_new_tokens=16",
    )
    rows = metrics(tmp_path)
    r0, r1 = first_last(rows, "reward/mean", 5)
    c0, c1 = first_last(rows, "cost/mean", 5)
    assert c1 < 0.2 < c0 + 0.05 and r1 > r0, (c0, c1, r0, r1)
    assert max(r["lambda"] for r in rows) > 1.0  # λ rose while the cost was over the threshold


def test_online_dpo_learns_a_scripted_judges_preference(prompts, tmp_path):
    online_helpers.CALLS.clear()
    train(
        tmp_path,
        prompts,
        "loop=online_dpo",
        "loop.reward.kind=judge",
        "+loop.reward.judge={factory: tests.train.online_helpers:scripted_pairwise}",
        "loop.prompts_per_step=16",
        "optim.max_steps=12",
        "optim.lr=2e-2",
        "loop.generation.max_new_tokens=16",
    )
    assert online_helpers.CALLS == [32] * 12  # one judge call per step: 16 pairs x both orders
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 * 12 and {p["label"] for p in pairs} <= {0, 1, None}
    taste = [
        sum(online_helpers.even_fraction_of_text(p[s]) for p in pairs if p["step"] == step for s in "ab") / 32
        for step in range(12)
    ]
    assert sum(taste[-3:]) / 3 > sum(taste[:3]) / 3 + 0.05, taste  # the policy moved towards the judge's taste
