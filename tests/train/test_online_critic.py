"""PPO critic option (b), `loop.critic.kind=adapter`: a second LoRA adapter + scalar head on the policy's own
frozen base. Disjoint optimizers (bit-identical weights of the other side), the adapter-disabled reference
stays the plain base, exact resume with both adapters, heads and optimizers (ppo_lag: two critics), the
refusal without LoRA, `auto`, and the even-token rule reward rising under ppo. Also the entropy bonus."""

from __future__ import annotations

import math

import pytest
import torch

from synth.errors import ConfigError
from tests.train.online_helpers import EVEN, compose, metrics, train, weights

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.0"]
# ppo_lag under LoRA with rule reward and cost (even ids rewarded, ids ≡ 0 mod 4 costly), critics from the policy
LAG_ADAPTERS = [
    "loop=ppo_lag",
    *LORA,
    "loop.reward.kind=function",
    EVEN,
    "loop.cost.kind=function",
    "loop.cost.function=train.scorers:quarter_token_fraction",
    "loop.critic.init_from=policy",
]


def _lora_policy(tiny_path):
    from train.app import LoraConfig
    from train.models import load_policy

    return load_policy(str(tiny_path), lora=LoraConfig(enabled=True, r=4, dropout=0.0))


def _rollout(tokenizer, n=4, lc=5):
    from train.rollout import Rollout, left_pad

    g = torch.Generator().manual_seed(0)
    p_ids, p_mask = left_pad([tokenizer("bread flour water")["input_ids"], tokenizer("dog")["input_ids"]] * 2, 0)
    c_ids = torch.randint(3, 200, (n, lc), generator=g)
    mask = torch.ones(n, lc, dtype=torch.bool)
    mask[1, 3:] = False
    return Rollout(p_ids, p_mask, c_ids, mask, torch.zeros(n, dtype=torch.bool), torch.arange(n))


def _cfg(*overrides):
    from omegaconf import OmegaConf

    from train.app import validate

    raw = compose("data.path=x.jsonl", "output_dir=unused", *overrides)
    return validate(OmegaConf.to_container(raw, resolve=True))


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_critic_and_policy_steps_touch_disjoint_weights(tiny_path, tiny_tokenizer, tiny_model):
    from train.loops.critics import adapter_critic
    from train.models import trainable_parameters
    from train.rollout import token_logps, token_values

    cfg = _cfg(*LORA, "loop=ppo", "loop.reward.kind=function", EVEN, "loop.critic.init_from=policy")
    policy = _lora_policy(tiny_path).eval()
    policy_params = trainable_parameters(policy)
    critic = adapter_critic(cfg, policy, "reward", None, None)
    critic_params = list(critic.parameters())
    assert {id(p) for p in policy_params}.isdisjoint(id(p) for p in critic_params)
    assert len(critic.adapter_parameters()) == len(policy_params)  # same LoRA shape: one pair per target
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    base0 = _snapshot(base)
    opt_policy = torch.optim.AdamW(policy_params, lr=1e-2)
    opt_critic = torch.optim.AdamW(critic_params, lr=1e-2)
    rollout = _rollout(tiny_tokenizer)
    mask = rollout.completion_mask

    # two critic steps (the zero head learns first, then the adapter): the policy adapter is bit-identical
    before_policy, before_critic = _snapshot(policy_params), _snapshot(critic.adapter_parameters())
    logps0 = token_logps(policy, rollout, 1.0, "cpu")[0].detach()
    for _ in range(2):
        v = token_values(critic, rollout, "cpu")
        ((v - 1.0) ** 2 * mask).sum().backward()
        opt_critic.step()
        opt_critic.zero_grad(set_to_none=True)
        opt_policy.step()  # no grads reach the policy: a step of its optimizer is a no-op
    assert _same(before_policy, policy_params)
    assert not _same(before_critic, critic.adapter_parameters())  # the critic adapter did learn
    assert torch.equal(logps0, token_logps(policy, rollout, 1.0, "cpu")[0].detach())
    assert policy.active_adapter == "default"

    # one policy step: the critic adapter and head are bit-identical
    before_critic, values0 = _snapshot(critic_params), token_values(critic, rollout, "cpu").detach()
    lp = token_logps(policy, rollout, 1.0, "cpu")[0]
    (-(lp * mask).sum()).backward()
    assert all(p.grad is None for p in critic_params)
    opt_policy.step()
    opt_critic.step()
    assert not _same(before_policy, policy_params)
    assert _same(before_critic, critic_params)
    assert torch.equal(values0, token_values(critic, rollout, "cpu").detach())
    assert _same(base0, base)  # the base is frozen throughout

    # the reference (adapters disabled) is still the plain base: neither adapter takes part
    with policy.disable_adapter():
        ref = token_logps(policy, rollout, 1.0, "cpu")[0]
    plain = token_logps(tiny_model, rollout, 1.0, "cpu")[0]
    assert torch.allclose(ref, plain, atol=1e-6)
    assert not torch.allclose(token_logps(policy, rollout, 1.0, "cpu")[0], plain, atol=1e-4)


def test_adapter_critic_head_starts_from_the_reward_model(tiny_path, tmp_path):
    """init_from=reward: the head is the reward model's score head (a `train loop=reward` folder, full
    weights); a head of another width is refused in one line."""
    from transformers import AutoModelForSequenceClassification

    from train.loops.critics import adapter_critic

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    torch.nn.init.normal_(rm.score.weight)
    rm.save_pretrained(tmp_path / "rm")
    cfg = _cfg(*LORA, "loop=ppo", f"loop.reward.path={tmp_path / 'rm'}")
    critic = adapter_critic(cfg, _lora_policy(tiny_path), "reward", None, str(tmp_path / "rm"))
    assert torch.equal(critic.head.weight, rm.score.weight) and float(critic.head.bias) == 0.0
    small = torch.nn.Linear(3, 1)
    from train.loops.critics import score_head

    with pytest.raises(ConfigError, match=r"no score head of shape \(1, 3\).*init_from=policy"):
        score_head(str(tmp_path / "rm"), small)


def test_auto_and_the_refusal():
    from train.loops.critics import critic_kind

    def cfg(*overrides):
        return _cfg("loop=ppo", "loop.reward.kind=function", EVEN, *overrides)

    assert critic_kind(cfg(*LORA)) == "adapter"
    assert critic_kind(cfg()) == "separate"
    assert critic_kind(cfg(*LORA, "loop.critic.kind=separate")) == "separate"
    with pytest.raises(ConfigError, match=r"critic.kind=adapter .* lora.enabled=true"):
        cfg("loop.critic.kind=adapter")
    from train.loops.online import check_critic_processes

    check_critic_processes(cfg(*LORA), 1)
    check_critic_processes(cfg(*LORA, "loop.critic.kind=separate"), 2)
    with pytest.raises(ConfigError, match="critic.kind=adapter runs in one process.*kind=separate"):
        check_critic_processes(cfg(*LORA), 2)
    with pytest.raises(ConfigError, match="entropy_coef"):
        _cfg("loop=online_dpo", "loop.reward.kind=function", EVEN, "+loop.entropy_coef=0.01")


def test_exact_resume_with_two_adapter_critics(prompts, tmp_path):
    """ppo_lag under LoRA: reward and cost critics are adapters critic_reward / critic_cost (+ 2 heads); a run
    stopped after 2 rollouts and resumed equals the straight run (metrics, policy, both critics)."""
    common = [
        *LAG_ADAPTERS,
        "loop.critic.lr=1e-2",
        "loop.lagrangian.window=8",
        "optim.max_steps=4",
        "loop.prompts_per_step=4",
        "loop.mini_batches=2",
        "optim.batch_size=2",
    ]
    train(tmp_path / "straight", prompts, *common)
    stopped = train(tmp_path / "resumed", prompts, *common, "checkpoint.stop_after_steps=2")
    assert stopped["stopped"]
    ckpt = next((tmp_path / "resumed" / "checkpoints").iterdir())
    assert (ckpt / "critic_reward" / "adapter_config.json").exists() and (ckpt / "critic_cost").is_dir()
    assert {"critic_reward_head", "critic_cost_head", "critic_cost_optimizer"} <= set(torch.load(ckpt / "tensors.pt"))
    train(tmp_path / "resumed", prompts, *common, "resume=true")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["reward/mean", "loss", "kl", "lambda", "value_loss/reward", "value_loss/cost", "value_error/cost"]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    assert a[-1]["value_loss/reward"] != a[0]["value_loss/reward"]
    for k in ("reward", "cost"):  # the critic adapters learnt (LoRA B starts at zero), not only their heads
        assert (
            max(
                float(v.abs().max())
                for n, v in weights(tmp_path / "straight" / "final" / f"critic_{k}").items()
                if "lora_B" in n
            )
            > 1e-4
        )
    for sub in ("", "critic_reward", "critic_cost"):
        wa, wb = weights(tmp_path / "straight" / "final" / sub), weights(tmp_path / "resumed" / "final" / sub)
        assert wa.keys() == wb.keys() and wa
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), sub
    for k in ("reward", "cost"):
        ha = torch.load(tmp_path / "straight" / "final" / f"critic_{k}" / "value_head.pt")
        hb = torch.load(tmp_path / "resumed" / "final" / f"critic_{k}" / "value_head.pt")
        assert torch.allclose(ha["weight"], hb["weight"], atol=1e-6) and ha["weight"].abs().sum() > 0


def test_rule_reward_rises_under_ppo_with_the_adapter_critic(prompts, tmp_path):
    """The tiny model's LM head maps hidden states to near-uniform logits, so LoRA on the hidden layers alone
    barely moves them in 20 steps (the same for grpo or a separate critic); the policy adapter also trains a
    copy of the head (modules_to_save), which the critic adapter does not use."""
    train(
        tmp_path,
        prompts,
        "loop=ppo",
        *LORA,
        "lora.r=8",
        "lora.modules_to_save=[lm_head]",
        "loop.reward.kind=function",
        EVEN,
        "loop.critic.init_from=policy",
        "loop.critic.lr=1e-2",
        "loop.prompts_per_step=16",
        "loop.kl.coef=0.01",
        "optim.max_steps=20",
        "optim.lr=2e-2",
        "loop.generation.max_new_tokens=12",
    )
    rows = metrics(tmp_path)
    start = sum(r["reward/mean"] for r in rows[:3]) / 3
    end = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert end > start + 0.15, (start, end)
    assert (tmp_path / "final" / "critic_reward" / "adapter_config.json").exists()


def test_start_up_line_counts_the_policy_and_each_adapter_critic_apart(prompts, tmp_path, tiny_path, capsys):
    """The critic adapters live in the policy's PeftModel; the start-up line's policy count leaves them out
    and each critic reports its own (its LoRA adapter + scalar head)."""
    from train.models import count_parameters

    train(
        tmp_path,
        prompts,
        *LAG_ADAPTERS,
        "loop.critic.lora_r=2",
        "optim.max_steps=1",
        "loop.prompts_per_step=4",
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("loop=ppo_lag:"))
    policy = _lora_policy(tiny_path)
    lora, total = count_parameters(policy)
    hidden = policy.get_base_model().config.hidden_size
    critic = lora // 2 + hidden + 1  # r=2 instead of 4 on the same targets, plus the head
    assert f"policy {lora:,} trainable of {total:,} parameters" in line, line
    assert f"critic: adapter (reward {critic:,} trainable, cost {critic:,} trainable)" in line, line


# ---------------------------------------------------------------------------------------------- entropy bonus


def test_entropy_bonus_golden():
    """Two-token vocabulary: logits (0, 0) -> H = ln 2 = 0.693147; (ln 3, 0) -> p = (3/4, 1/4),
    H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335. Rows: [ln2, 0.562335] and [0.562335, pad]."""
    from train.loops.online_update import entropy_bonus, loss_aggregation
    from train.losses.policy import grpo_loss, ppo_loss, remax_loss, rloo_loss

    h2, h3 = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert h3 == pytest.approx(0.562335, abs=1e-6)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]], [[math.log(3), 0.0], [5.0, -5.0]]])
    lf = logits.float()
    ent = lf.logsumexp(-1) - (lf.softmax(-1) * lf).sum(-1)
    mask = torch.tensor([[True, True], [True, False]])
    assert ent[0].tolist() == pytest.approx([h2, h3], abs=1e-6)
    # token_mean: (ln2 + 2·0.562335) / 3 = 0.605939
    assert float(entropy_bonus(ent, mask, "token_mean")) == pytest.approx(0.605939, abs=1e-6)
    # step-level counts (this micro-batch is half the step: 6 tokens, 4 sequences): 1.817817 / 6
    assert float(entropy_bonus(ent, mask, "token_mean", 6.0, 4.0)) == pytest.approx(0.302970, abs=1e-6)
    # seq_mean_token_mean: ((ln2 + 0.562335)/2 + 0.562335) / 2 = (0.627741 + 0.562335) / 2 = 0.595038
    assert float(entropy_bonus(ent, mask, "seq_mean_token_mean")) == pytest.approx(0.595038, abs=1e-6)
    assert float(entropy_bonus(ent, mask, "seq_mean")) == pytest.approx(0.595038, abs=1e-6)
    # seq_sum: (1.255482 + 0.562335) / 2 = 0.908909; seq_sum_norm: / L_max 2 = 0.454454
    assert float(entropy_bonus(ent, mask, "seq_sum")) == pytest.approx(0.908909, abs=1e-6)
    assert float(entropy_bonus(ent, mask, "seq_sum_norm")) == pytest.approx(0.454454, abs=1e-6)
    from functools import partial

    assert loss_aggregation(partial(ppo_loss, aggregation="token_mean")) == "token_mean"
    assert loss_aggregation(partial(grpo_loss)) == "seq_mean_token_mean"
    assert loss_aggregation(partial(rloo_loss)) == "seq_mean"
    assert loss_aggregation(partial(remax_loss)) == "seq_sum"


def test_entropy_bonus_in_the_policy_update(prompts, tmp_path):
    """The loop's step with entropy_coef c: loss = policy loss − c · (aggregated entropy), the logged loss
    moves by exactly c · entropy_bonus, and the gradient moves with it (different weights after a step)."""
    common = ["loop=grpo", EVEN, "optim.max_steps=1", "loop.prompts_per_step=4", "optim.batch_size=8"]
    common.append("loss.fn.aggregation=token_mean")
    train(tmp_path / "off", prompts, *common)
    train(tmp_path / "on", prompts, *common, "loop.entropy_coef=0.5")
    off, on = metrics(tmp_path / "off")[0], metrics(tmp_path / "on")[0]
    assert on["reward/mean"] == off["reward/mean"]  # same rollout
    # token_mean aggregation: the bonus is the step's token-mean entropy, the logged `entropy`
    assert on["entropy_bonus"] == pytest.approx(on["entropy"], abs=1e-5)
    assert on["loss"] == pytest.approx(off["loss"] - 0.5 * on["entropy_bonus"], abs=1e-5)
    assert on["entropy_bonus"] > 0
    wa, wb = weights(tmp_path / "off" / "final"), weights(tmp_path / "on" / "final")
    assert any(not torch.allclose(wa[k], wb[k]) for k in wa)


def test_the_loop_steps_each_adapter_with_its_own_optimizer(prompts, tmp_path):
    """In the loop: with critic.lr ~ 0 the critic adapter stays where it started, while the policy adapter
    moves. AdamW's decoupled weight decay (optim.weight_decay=0.5, lr 1e-2) would shrink the critic's LoRA A
    by 0.5% a step if the policy optimizer held the critic's parameters too."""
    common = [
        "loop=ppo",
        *LORA,
        "loop.reward.kind=function",
        EVEN,
        "loop.critic.init_from=policy",
        "loop.critic.lr=1e-12",
        "optim.weight_decay=0.5",
        "loop.prompts_per_step=4",
    ]
    train(tmp_path / "one", prompts, *common, "optim.max_steps=1")
    train(tmp_path / "three", prompts, *common, "optim.max_steps=3")
    c1, c3 = (weights(tmp_path / run / "final" / "critic_reward") for run in ("one", "three"))
    p1, p3 = (weights(tmp_path / run / "final") for run in ("one", "three"))
    assert c1.keys() == c3.keys() and any("lora_A" in k for k in c1)
    assert all(torch.allclose(c1[k], c3[k], rtol=0, atol=1e-8) for k in c1)
    assert any(not torch.allclose(p1[k], p3[k], atol=1e-4) for k in p1 if "lora_" in k)
