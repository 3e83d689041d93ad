"""Online loops (train/loops/online.py): start-up refusals, scorers, NaN handling, LoRA, reward-model
scorer + critic, exact resume. The learning toys are in test_online_learning.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from synth.errors import ConfigError
from tests.train import online_helpers
from tests.train.online_helpers import EVEN, WORDS, compose, metrics, train, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


# ---------------------------------------------------------------------------------------------- start-up refusals


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loop=grpo", EVEN, "loop.samples_per_prompt=1"], "needs a group"),
        (["loop=grpo", EVEN, "loop.kl.coef=0.1", "loop.kl.estimator=k1"], "zero gradient"),
        (["loop=rloo", EVEN, "loop.kl.estimator=k3_ratio"], "loss-side estimator"),
        (["loop=grpo", EVEN, "loop.kl.coef=0.1", "loop.kl.adaptive=true"], "placement=reward"),
        (["loop=grpo", EVEN, "loop.prompts_per_step=3", "loop.mini_batches=5"], "equal mini-batches"),
        (["loop=online_dpo", EVEN, "loop.samples_per_prompt=3"], "two responses"),
        (["loop=online_dpo", EVEN, "loss=simpo"], "fixed SFT reference"),
        (["loop=ppo_lag", "loop.reward.path=x", "loop.cost=null"], "needs a cost scorer"),
        (
            [
                "loop=ppo_lag",
                "loop.reward.path=x",
                "loop.cost.path=y",
                "loop.kl.placement=loss",
                "loop.kl.estimator=k2",
            ],
            "placement=reward",
        ),
        (["loop=grpo", EVEN, "loss=dpo"], "pairwise objective"),
        (["loop=grpo"], "needs `function`"),
        (["loop=rloo", EVEN, "loop.kl.placement=loss", "loop.kl.estimator=k2"], "no per-token KL term"),
        (["loop=remax", EVEN, "loop.epochs_per_rollout=2"], "on-policy"),
        (["loop=grpo", EVEN, "loop.estimator=gae"], "does not fit"),
        (["loop=grpo", EVEN, "+loop.cost={kind: function, function: m.f}"], "ppo_lag only"),
        (["loop=grpo", EVEN, "optim.grad_accum=2"], "grad_accum=1"),
    ],
)
def test_invalid_combinations_are_refused_in_one_line(overrides, message):
    from omegaconf import OmegaConf

    from train.app import validate

    cfg = compose("data.path=x", "output_dir=y", *overrides)
    with pytest.raises(ConfigError) as e:
        validate(OmegaConf.to_container(cfg, resolve=True))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shapes_that_split_a_group_are_refused():
    from train.app import OnlineLoop
    from train.loops.online import check_shapes

    loop = OnlineLoop(
        name="grpo", estimator="grpo", prompts_per_step=3, samples_per_prompt=4, reward={"function": "m:f"}
    )
    with pytest.raises(ConfigError, match="a group must stay on one process"):
        check_shapes(loop, world=2, micro=4)
    with pytest.raises(ConfigError, match="micro-batches"):
        check_shapes(loop, world=1, micro=5)
    check_shapes(loop, world=3, micro=4)


# ---------------------------------------------------------------------------------------------- scorers


def test_function_scorer_nan_and_signature():
    from train.scorers import FunctionScorer

    s = FunctionScorer("tests.train.online_helpers:nan_for_odd_rows", "loop.reward.function")
    out = s([[{"role": "user", "content": "x"}]] * 3, ["a", "b", "c"], [[2, 4], [1], [1, 2]])
    assert out[0].item() == 1.0 and math.isnan(out[1].item()) and out[2].item() == 0.5
    with pytest.raises(ConfigError, match="cannot import"):
        FunctionScorer("tests.train.online_helpers:nope", "loop.reward.function")


def test_rubric_judge_one_call_and_parse_failures_are_nan():
    from train.app import JudgeSettings
    from train.scorers import RubricJudge

    judge = RubricJudge(JudgeSettings(factory="tests.train.online_helpers:scripted_rubric"))
    online_helpers.CALLS.clear()
    out = judge([[{"role": "user", "content": "hi"}]] * 6, ["one two", "a", "b c d", "x", "y", "z"], [[]] * 6)
    assert online_helpers.CALLS == [6]
    assert torch.isnan(out).tolist() == [False, False, True, False, False, True]
    assert not torch.isnan(out[:2]).any() and (out[~torch.isnan(out)] >= 1).all()


def test_unscorable_samples_get_zero_advantage_not_a_score(prompts, tmp_path):
    # every sample NaN -> all advantages 0 -> no gradient: the weights do not move
    train(
        tmp_path / "nan",
        prompts,
        "loop=grpo",
        "loop.reward.function=tests.train.online_helpers:all_nan",
        "optim.max_steps=2",
        "loop.prompts_per_step=4",
    )
    from synth.tiny import tiny_model_path

    before, after = weights(Path(tiny_model_path())), weights(tmp_path / "nan" / "final")
    assert all(torch.equal(before[k], after[k]) for k in after)
    m = metrics(tmp_path / "nan")
    assert m[0]["reward/frac_unscorable"] == 1.0 and "reward/mean" not in m[0]
    # half unscorable: training proceeds on the rest
    train(
        tmp_path / "half",
        prompts,
        "loop=grpo",
        "loop.reward.function=tests.train.online_helpers:nan_for_odd_rows",
        "optim.max_steps=2",
        "loop.prompts_per_step=4",
    )
    m = metrics(tmp_path / "half")
    assert m[0]["reward/frac_unscorable"] == 0.5 and m[0]["grad_norm"] > 0 and math.isfinite(m[0]["grad_norm"])


# ---------------------------------------------------------------------------------------------- models


def test_reward_model_scorer_and_critic_from_a_trained_reward_model(prompts, tmp_path):
    """`train loop=reward` output scores the rollout and initialises the PPO critic."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": w}],
                    "chosen": [{"role": "assistant", "content": "yes"}],
                    "rejected": [{"role": "assistant", "content": "no"}],
                }
            )
            + "\n"
            for w in WORDS[:8]
        )
    )
    rm = train(
        tmp_path / "rm",
        pairs,
        "loop=reward",
        "optim.max_steps=2",
        "optim.batch_size=4",
        "data.max_length=48",
        online=False,
    )
    out = tmp_path / "ppo"
    s = train(
        out,
        prompts,
        "loop=ppo",
        f"loop.reward.path={rm['final_dir']}",
        "optim.max_steps=2",
        "loop.prompts_per_step=4",
        "loop.kl.coef=0.05",
        "checkpoint.every_steps=1",
        "log.plot=true",
        "log.tensorboard=true",
    )
    assert (out / "curves.png").exists() and any((out / "tensorboard").iterdir())
    m = metrics(out)
    assert s["steps"] == 2 and all(math.isfinite(r["reward/mean"]) and "value_loss/reward" in r for r in m)
    assert 0 < m[-1]["beta"] != 0.05  # the adaptive controller moved β
    ckpt = out / "checkpoints" / "step-00000002"
    assert (ckpt / "critic_reward" / "model.safetensors").exists()
    assert "critic_reward_optimizer" in torch.load(ckpt / "tensors.pt", weights_only=False)


def test_lora_policy_with_adapter_disabled_reference(prompts, tmp_path):
    s = train(
        tmp_path / "lora",
        prompts,
        "loop=grpo",
        EVEN,
        "lora.enabled=true",
        "lora.r=4",
        "loop.kl.coef=0.04",
        "optim.max_steps=2",
        "loop.prompts_per_step=4",
    )
    assert (Path(s["final_dir"]) / "adapter_config.json").exists()
    m = metrics(tmp_path / "lora")
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is the reference
    assert m[-1]["kl"] != 0.0 and "kl_loss" in m[-1]
    # one optimizer step per rollout: π_old == π_θ exactly (no dropout, same float32 forward)
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in m)


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "loop,extra",
    [
        ("grpo", [EVEN, "loop.kl.coef=0.04", "loop.mini_batches=2", "loop.epochs_per_rollout=2", "optim.batch_size=4"]),
        (
            "ppo_lag",
            [
                "loop.reward.kind=function",
                EVEN,
                "loop.cost.kind=function",
                "loop.cost.function=train.scorers:quarter_token_fraction",
                "loop.critic.init_from=policy",
                "loop.lagrangian.window=8",
            ],
        ),
        (
            "rloo",
            [EVEN, "loop.normalize_reward=affine", "loop.mask_truncated_completions=true"],
        ),  # running moments restored
    ],
)
def test_exact_resume(prompts, tmp_path, loop, extra):
    common = [f"loop={loop}", "optim.max_steps=4", "loop.prompts_per_step=4", *extra]
    train(tmp_path / "straight", prompts, *common)
    stopped = train(tmp_path / "resumed", prompts, *common, "checkpoint.stop_after_steps=2")
    assert stopped["stopped"] and stopped["steps"] == 2
    train(tmp_path / "resumed", prompts, *common, "resume=true")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["reward/mean", "completions/mean_length", "loss", "kl", "beta", "lambda", "cost/mean", "reward/running_std"]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1e-6), (ra["step"], k)
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


# ---------------------------------------------------------------------------------------------- AI judge over HTTP


def test_ai_judge_through_a_synth_openai_backend(prompts, tmp_path):
    """online_dpo labelled by a judge behind an OpenAI-compatible server (the loopback test server):
    both orders asked, a tie or an unparsable answer drops the pair; grpo scored by a rubric judge."""
    from synth.testing.loopback import LoopbackServer

    def responder(body):
        text = body["messages"][-1]["content"]
        if "[Reply A]" in text:  # pairwise: the reply with more even ids wins; equal: tie
            a, b = (online_helpers.even_fraction_of_text(x) for x in online_helpers._REPLY.search(text).groups())
            return "No verdict here." if abs(a - b) < 0.05 else f"[[{'A' if a > b else 'B'}]]"
        return "Rating: [[7]]" if len(text) % 2 else "I will not rate."  # rubric; half unparsable

    with LoopbackServer(responder=responder) as server:
        judge = (
            f"{{llm: {{kind: openai, base_url: '{server.url}', api_key_env: NO_KEY_NEEDED, max_retries: 0}}, "
            f"model: {{name_or_path: judge}}, max_new_tokens: 32}}"
        )
        train(
            tmp_path / "dpo",
            prompts,
            "loop=online_dpo",
            "loop.reward.kind=judge",
            f"+loop.reward.judge={judge}",
            "loop.prompts_per_step=4",
            "optim.max_steps=2",
        )
        assert len(server.chat_requests()) == 2 * 4 * 2  # 4 pairs x both orders x 2 steps
        pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
        for p in pairs:
            a, b = online_helpers.even_fraction_of_text(p["a"]), online_helpers.even_fraction_of_text(p["b"])
            assert p["label"] == (None if abs(a - b) < 0.05 else int(a > b))
        server.reset()
        train(
            tmp_path / "grpo",
            prompts,
            "loop=grpo",
            "loop.reward.kind=judge",
            f"+loop.reward.judge={judge}",
            "loop.prompts_per_step=2",
            "optim.max_steps=1",
        )
        assert len(server.chat_requests()) == 8
    m = metrics(tmp_path / "grpo")[0]
    assert 0 < m["reward/frac_unscorable"] < 1 and m["reward/mean"] == 7.0


def test_dapo_overlong_penalty_lowers_long_completions(prompts, tmp_path):
    # every completion is truncated at 8 tokens: with a 4-token buffer the full penalty (−1) applies
    train(tmp_path / "plain", prompts, "loop=grpo", EVEN, "optim.max_steps=1", "loop.prompts_per_step=4")
    train(
        tmp_path / "dapo",
        prompts,
        "loop=grpo",
        EVEN,
        "optim.max_steps=1",
        "loop.prompts_per_step=4",
        "loop.overlong_buffer=4",
        "loop.overlong_factor=1.0",
    )
    plain, dapo = metrics(tmp_path / "plain")[0], metrics(tmp_path / "dapo")[0]
    assert plain["completions/truncated_frac"] == 1.0 and plain["completions/mean_length"] == 8.0
    assert dapo["reward/mean"] == pytest.approx(plain["reward/mean"], abs=1e-6)  # the scorer's own scores, logged raw
    assert (
        dapo["reward/adjusted_mean"] == pytest.approx(plain["reward/mean"] - 1.0, abs=1e-6)
        and "reward/adjusted_mean" not in plain
    )


@pytest.mark.parametrize(
    "loop,extra",
    [
        ("ppo", ["loop.reward.kind=function", "loop.critic.init_from=policy", "loop.kl.coef=0.05"]),
        ("grpo", ["loop.estimator=reinforce_pp"]),
    ],
)
def test_unscorable_samples_get_zero_advantage_with_token_level_estimators(prompts, tmp_path, loop, extra, monkeypatch):
    """GAE and REINFORCE++ turn a NaN score into 0 reward: the loop must still zero that sample's advantage."""
    import train.loops.online as online

    seen = {}
    update = online.policy_update

    def spy(model, critics, critic_opts, optimizer, scheduler, batch, rollout, *args, **kwargs):
        seen["adv"] = batch["advantages"].clone() if batch["advantages"] is not None else None
        return update(model, critics, critic_opts, optimizer, scheduler, batch, rollout, *args, **kwargs)

    monkeypatch.setattr(online, "policy_update", spy)
    train(
        tmp_path,
        prompts,
        f"loop={loop}",
        "loop.reward.function=tests.train.online_helpers:nan_for_odd_rows",
        "optim.max_steps=1",
        "loop.prompts_per_step=4",
        *extra,
    )
    adv = seen["adv"]
    assert adv[1::2].abs().max() == 0 and adv[0::2].abs().max() > 0


def test_packed_forward_equals_the_padded_one(prompts, tmp_path, tiny_path):
    """optim.packing: the trainer's log-probs on rows packed end to end equal the padded forward's."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.rollout import hf_generate, token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hello there friend", "a", "bread flour water salt")]
    r = hf_generate(model, tok, ids, 3, SimpleNamespace(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=12), seed=1)
    for i, k in enumerate([3, 12, 1, 7, 5, 12, 2, 9, 4]):  # completions of different lengths
        r.completion_mask[i, k:] = False
    a, ea = token_logps(model, r, 0.7, "cpu", with_entropy=True)
    b, eb = token_logps(model, r, 0.7, "cpu", with_entropy=True, packed=True)
    assert (a - b).abs().max() < 1e-5 and (ea - eb).abs().max() < 1e-4 and (b[~r.completion_mask] == 0).all()
    # the LM head on completion positions only: same log-probs, entropies and gradients
    from train.rollout import Packed, head_only_matches

    assert head_only_matches(model, r, "cpu")
    grads = []
    for packed in (True, Packed(head_only=True)):
        model.zero_grad()
        lp, ent = token_logps(model, r, 0.7, "cpu", with_entropy=True, packed=packed)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert (lp.detach() - a).abs().max() < 1e-5 and (ent - ea).abs().max() < 1e-4
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    common = ["loop=grpo", EVEN, "optim.max_steps=2", "loop.prompts_per_step=4", "loop.kl.coef=0.04"]
    train(tmp_path / "packed", prompts, *common)
    train(tmp_path / "padded", prompts, *common, "optim.packing=false")
    for x, y in zip(metrics(tmp_path / "packed"), metrics(tmp_path / "padded"), strict=True):
        for k in ("loss", "grad_norm", "kl", "reward/mean"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


def test_fused_old_pass_equals_a_separate_one(prompts, tmp_path):
    """RLOO with the KL in the reward: the update's own forward as π_old (one micro-batch) gives the same
    run as a separate no-grad π_old pass (two micro-batches)."""
    from train.loops.online_update import fused_old_pass

    common = ["loop=rloo", EVEN, "optim.max_steps=2", "loop.prompts_per_step=4", "loop.kl.coef=0.05"]
    train(tmp_path / "fused", prompts, *common, "optim.batch_size=16")
    train(tmp_path / "separate", prompts, *common, "optim.batch_size=8")
    L = compose(*common).loop
    assert fused_old_pass(L, "ref", {}, 16, 16) and not fused_old_pass(L, "ref", {}, 16, 8)
    for x, y in zip(metrics(tmp_path / "fused"), metrics(tmp_path / "separate"), strict=True):
        for k in ("loss", "grad_norm", "kl", "entropy", "reward/mean"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
