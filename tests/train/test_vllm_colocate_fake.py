"""loop.generation.backend=vllm on CPU through a recording fake engine (tests/train/fake_vllm.py): the call
order of a step, merged and adapter-only LoRA sync, the probe that catches a silent no-op sync, the re-push
on resume, and the train/inference mismatch correction on whole runs. The real engine is never used here
(tests/train/test_online_vllm.py, gpu + vllm, covers it where both exist)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from synth.errors import ConfigError
from tests.train import fake_vllm
from tests.train.fake_vllm import ENGINES, call_names
from tests.train.online_helpers import EVEN, metrics, train, weights
from train.app import GenerationSettings, LoraConfig
from train.rollout import token_logps
from train.vllm_colocate import VLLMColocate, merged_parameters, probe_sequence

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py
ACC = SimpleNamespace(process_index=0, local_process_index=0, num_processes=1)
STEP = ["wake_up:weights", "apply_model", "load_weights", "reset_prefix_cache", "wake_up:kv_cache", "generate:probe"]


@pytest.fixture
def fake(monkeypatch):
    """The fake `vllm` module, and the rendezvous variables VLLMColocate sets restored after the test."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)  # recorded: whatever the code sets is undone at teardown

    def install(**knobs):
        fake_vllm.install(monkeypatch, **knobs)

    install()
    return install


def gen(**kw) -> GenerationSettings:
    return GenerationSettings(**{"backend": "vllm", "max_new_tokens": 6, **kw})


def engine(path, lora_rank=None, **kw) -> VLLMColocate:
    return VLLMColocate(str(path), gen(**kw), accelerator=ACC, dtype="float32", seed=0, lora_rank=lora_rank)


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    return [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("bread flour water", "the honest fox")]


def nudge(model, scale: float = 0.05, seed: int = 0) -> None:
    """Stand-in for an optimizer step: every trainable tensor moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def lora_policy(path, r: int = 4):
    from train.models import load_policy

    policy = load_policy(str(path), lora=LoraConfig(enabled=True, r=r, alpha=2 * r, dropout=0.0)).eval()
    nudge(policy, 0.2)  # lora_B starts at 0 (adapter = identity): make the merge matter
    return policy


# ---------------------------------------------------------------------------------------------- one engine


def test_call_order_probe_and_sampler_logps(fake, tiny_path, fresh_tiny_model, tiny_tokenizer, prompt_ids):
    eng = engine(tiny_path, sleep_level=2)
    probe = probe_sequence(prompt_ids)
    for step in range(2):
        m = eng.sync(fresh_tiny_model, probe, "cpu")
        assert m["vllm/probe_mean_abs_diff"] < 1e-4 and m["vllm/probe_abs_diff"] < 1e-3
        r = eng.generate(fresh_tiny_model, tiny_tokenizer, prompt_ids, 3, gen(), seed=11 * step)
        eng.sleep()
        # the engine's sampled-token log-probs line up with the trainer's on the same tokens
        ours = token_logps(fresh_tiny_model, r, 1.0, "cpu")[0]
        assert r.sampler_logps.shape == ours.shape
        assert torch.allclose(r.sampler_logps[r.completion_mask], ours[r.completion_mask], atol=1e-5)
        assert not torch.equal(r.completion_ids[0], r.completion_ids[1])  # children of one prompt: own seeds
        nudge(fresh_tiny_model, seed=step)
    fake_engine = ENGINES[0]
    # trap 10: the KV cache wakes only after the push and the prefix-cache reset; sleep closes the step
    assert call_names(fake_engine) == ["init", "sleep:2"] + 2 * [*STEP, "generate:sample", "sleep:2"]
    pushed = [c[1] for c in fake_engine.calls if c[0] == "load_weights"]
    names = [n for n, _ in fresh_tiny_model.named_parameters()]
    assert pushed == names + names  # every parameter, every step (level 2 discarded them)
    # one seeded request per prompt, seed + i·n (its n children get + k): no two rows share a stream
    seeds = [c[3] for c in fake_engine.calls if c[:2] == ("generate", "sample")]
    assert seeds == [(0, 3), (11, 14)]
    assert fake_engine.kwargs["logprobs_mode"] == "processed_logprobs"
    assert fake_engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert fake_engine.kwargs["enforce_eager"] is False  # torch.compile + CUDA graphs unless asked


def test_merged_lora_sync_clean_names_and_unmerged_policy(fake, tiny_path, prompt_ids):
    policy = lora_policy(tiny_path)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    eng = engine(tiny_path, lora_rank=4, lora_sync="merged", sleep_level=2)
    m = eng.sync(policy, probe_sequence(prompt_ids), "cpu")
    assert m["vllm/probe_mean_abs_diff"] < 1e-4
    fake_engine = ENGINES[0]
    pushed = [c[1] for c in fake_engine.calls if c[0] == "load_weights"]
    assert not any("base_model.model." in n or ".base_layer" in n or "lora_" in n for n in pushed)
    assert set(pushed) == {n for n, _ in fake_engine.net.named_parameters()}
    # the engine holds the merged weights W + s·B·A, not the base
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    held = fake_engine.net.state_dict()
    q = next(k for k in held if k.endswith("q_proj.weight"))
    assert torch.allclose(held[q], merged[q], atol=1e-6)
    assert not torch.allclose(held[q], before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    # and the policy is unmerged afterwards, bit for bit
    after = policy.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_an_adapter_critic_on_the_policy_is_never_pushed(fake, tiny_path, prompt_ids):
    """loop.critic.kind=adapter puts a second LoRA adapter (with its own modules_to_save copy) on the policy's
    PeftModel: the merged push is the policy adapter's alone, and the adapter sync saves only that adapter."""
    from peft import LoraConfig as PeftLoraConfig

    policy = lora_policy(tiny_path)
    solo = {n: t.clone() for n, t in merged_parameters(policy)}
    policy.add_adapter(
        "critic_reward",
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".critic_reward." in n:
                p.add_(0.5)  # a critic that has learnt something: it must not leak into the push
    assert policy.active_adapter == "default"
    both = dict(merged_parameters(policy))
    assert both.keys() == solo.keys() and all(torch.equal(both[k], solo[k]) for k in solo)
    eng = engine(tiny_path, lora_rank=4, lora_sync="adapter", sleep_level=1)
    eng.sync(policy, probe_sequence(prompt_ids), "cpu")
    saved = sorted(p.name for p in (eng.lora_dir / "policy-v1").rglob("*") if p.is_dir())
    assert not any("critic" in name for name in saved)


def test_merged_parameters_of_a_full_model_are_its_own(fresh_tiny_model):
    got = dict(merged_parameters(fresh_tiny_model))
    assert list(got) == [n for n, _ in fresh_tiny_model.named_parameters()]


def test_adapter_sync_versions_ids_and_cleanup(fake, tiny_path, tiny_tokenizer, prompt_ids):
    policy = lora_policy(tiny_path)
    eng = engine(tiny_path, lora_rank=4, lora_sync="adapter", sleep_level=1)
    fake_engine = ENGINES[0]
    assert fake_engine.kwargs["max_lora_rank"] == 8  # rounded up to a rank vLLM accepts
    probe = probe_sequence(prompt_ids)
    for step in range(3):
        m = eng.sync(policy, probe, "cpu")  # passes only if the engine serves this step's adapter
        assert m["vllm/probe_mean_abs_diff"] < 1e-4
        eng.generate(policy, tiny_tokenizer, prompt_ids, 2, gen(), seed=step)
        eng.sleep()
        assert sorted(p.name for p in eng.lora_dir.iterdir()) == [f"policy-v{step + 1}"]  # old versions gone
        nudge(policy, 0.2, seed=step + 1)
    assert [(name, i) for name, i, _ in fake_engine.loaded_loras] == [(f"policy-v{k}", k) for k in (1, 2, 3)]
    assert fake_engine.removed_loras == [1, 2]
    assert not any(c[0] == "load_weights" for c in fake_engine.calls)  # base weights never re-pushed
    lora_ids = [c[2] for c in fake_engine.calls if c[0] == "generate"]
    assert lora_ids == [1, 1, 2, 2, 3, 3]


def test_adapter_sync_refuses_sleep_level_2(fake, tiny_path):
    with pytest.raises(ConfigError, match="sleep_level=1"):
        engine(tiny_path, lora_rank=8, lora_sync="adapter", sleep_level=2)


def test_a_silent_no_op_sync_is_caught(fake, tiny_path, fresh_tiny_model, prompt_ids):
    probe = probe_sequence(prompt_ids)
    fake(drop_weights=True)
    eng = engine(tiny_path, sleep_level=0)
    eng.sync(fresh_tiny_model, probe, "cpu")  # same weights on both sides yet: nothing to see
    nudge(fresh_tiny_model)
    with pytest.raises(RuntimeError, match="probe") as err:
        eng.sync(fresh_tiny_model, probe, "cpu")
    assert "\n" not in str(err.value)
    # a tolerance too loose to see the gap: the "did vLLM move at all" check still fires
    fake(drop_weights=True)
    eng = engine(tiny_path, sleep_level=0, probe_tol=50.0)
    eng.sync(fresh_tiny_model, probe, "cpu")
    nudge(fresh_tiny_model, seed=1)
    with pytest.raises(RuntimeError, match="no-op"):
        eng.sync(fresh_tiny_model, probe, "cpu")
    # sleep level 2 discarded the weights and the push was dropped: caught at the first step
    fake(drop_weights=True)
    with pytest.raises(RuntimeError, match="probe"):
        engine(tiny_path, sleep_level=2).sync(fresh_tiny_model, probe, "cpu")


def test_a_parameter_the_engine_never_received_is_caught(fake, tiny_path, fresh_tiny_model, prompt_ids):
    """vLLM's load_weights skips a name it maps nowhere without a word; the sync compares the names it
    reports loaded with the engine model's parameters (the check vLLM's own loader makes at start-up)."""
    fake(unmapped="model.norm.weight")
    eng = engine(tiny_path, sleep_level=1)
    with pytest.raises(RuntimeError, match=r"1 parameter\(s\) of the engine's model unwritten") as err:
        eng.sync(fresh_tiny_model, probe_sequence(prompt_ids), "cpu")
    assert "model.norm.weight" in str(err.value) and "\n" not in str(err.value)


def test_older_vllm_without_apply_model(fake, tiny_path, fresh_tiny_model, prompt_ids):
    """No LLM.apply_model: the same load_weights through the in-process driver worker's model."""
    fake(no_apply_model=True)
    eng = engine(tiny_path, sleep_level=2)
    nudge(fresh_tiny_model)
    m = eng.sync(fresh_tiny_model, probe_sequence(prompt_ids), "cpu")
    assert m["vllm/probe_mean_abs_diff"] < 1e-4
    assert call_names(ENGINES[0])[:4] == ["init", "sleep:2", "wake_up:weights", "load_weights"]


def test_the_fake_refuses_what_vllm_refuses(fake, tiny_path):
    """The fake mirrors vLLM's signatures, so a wrong call in train/vllm_colocate.py fails here too."""
    from vllm import LLM, SamplingParams  # the fake

    with pytest.raises(TypeError, match="unexpected keyword"):
        LLM(model=str(tiny_path), enable_sleep=True)
    with pytest.raises(ValueError, match="logprobs_mode"):
        LLM(model=str(tiny_path), logprobs_mode="processed")
    with pytest.raises(TypeError):
        SamplingParams(1)  # keyword-only, as vLLM's msgspec struct in practice
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    llm = LLM(model=str(tiny_path), enable_sleep_mode=True)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(tags=["weight"])
    with pytest.raises(ValueError, match="same"):
        llm.generate([{"prompt_token_ids": [1, 2]}], [SamplingParams(), SamplingParams()])


# ---------------------------------------------------------------------------------------------- whole runs

VLLM = ["loop.generation.backend=vllm", "loop.prompts_per_step=4", "loop.samples_per_prompt=2", EVEN]


def test_grpo_run_through_the_fake_and_resume_repushes(fake, prompts, tmp_path):
    out = tmp_path / "run"
    common = ["loop=grpo", "optim.max_steps=2", *VLLM]
    stopped = train(out, prompts, *common, "checkpoint.stop_after_steps=1")
    assert stopped["stopped"]
    first = ENGINES[-1]
    assert call_names(first) == ["init", "sleep:2", *STEP, "generate:sample", "sleep:2"]
    assert first.kwargs["max_model_len"] >= 65  # prompts + max_new_tokens, at least the probe's 64 + 1
    saved = [p for p in out.rglob("model.safetensors") if "final" not in p.parts]
    assert len(saved) == 1
    train(out, prompts, *common, "resume=true")
    resumed = ENGINES[-1]
    assert resumed is not first
    ckpt = weights(saved[0].parent)
    assert all(torch.equal(resumed.first_push[k], ckpt[k]) for k in ckpt)  # the checkpoint, re-pushed
    initial = first.first_push
    assert any(not torch.equal(initial[k], ckpt[k]) for k in ckpt)  # (and it differs from the start)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["vllm/probe_mean_abs_diff"] < 1e-4
        assert r["rollout/abs_logp_diff"] < 1e-5  # same fp32 model on both sides
        assert r["rollout/is_masked_frac"] == 0.0


def test_remax_greedy_baseline_runs_before_the_engine_sleeps(fake, prompts, tmp_path):
    train(tmp_path / "remax", prompts, "loop=remax", "optim.max_steps=1", *VLLM)
    assert call_names(ENGINES[-1]) == ["init", "sleep:2", *STEP, "generate:sample", "generate:sample", "sleep:2"]


def test_sequence_mask_drops_mismatched_rollouts(fake, prompts, tmp_path, tiny_path):
    """vLLM reports every sampled token 2 nats less likely than the trainer: w = exp(2·|y|) > 3 for every
    sequence, so TRL's sequence mask drops all of them and the step leaves the weights unchanged; without
    the correction the same step moves them."""
    from safetensors.torch import load_file

    initial = load_file(str(tiny_path / "model.safetensors"))
    fake(logp_offset=-2.0)
    train(tmp_path / "mask", prompts, "loop=grpo", "optim.max_steps=1", *VLLM)
    row = metrics(tmp_path / "mask")[0]
    assert row["rollout/abs_logp_diff"] == pytest.approx(2.0, abs=1e-5)
    assert row["rollout/is_masked_frac"] == 1.0 and row["rollout/is_weight_mean"] == 0.0
    got = weights(tmp_path / "mask" / "final")
    assert all(torch.equal(got[k], initial[k]) for k in got)
    fake(logp_offset=-2.0)
    train(tmp_path / "none", prompts, "loop=grpo", "optim.max_steps=1", *VLLM, "loop.generation.is_correction=none")
    got = weights(tmp_path / "none" / "final")
    assert any(not torch.equal(got[k], initial[k]) for k in got)
    assert "rollout/is_weight_mean" not in metrics(tmp_path / "none")[0]


def test_token_truncation_weights_through_the_fake(fake, prompts, tmp_path):
    """A known offset of +0.05 nats per token: every token gets w = exp(−0.05), below the cap."""
    fake(logp_offset=0.05)
    train(tmp_path / "tis", prompts, "loop=grpo", "optim.max_steps=1", *VLLM, "loop.generation.is_correction=tis")
    row = metrics(tmp_path / "tis")[0]
    assert row["rollout/abs_logp_diff"] == pytest.approx(0.05, abs=1e-5)
    assert row["rollout/is_weight_mean"] == pytest.approx(math.exp(-0.05), abs=1e-5)


@pytest.mark.parametrize(
    "extra,match",
    [
        (["loop=rloo", "loop.generation.is_correction=tis"], "one ratio per sequence"),
        (["loop=rloo", "loop.generation.is_correction=token_mask"], "one ratio per sequence"),
        (["loop=grpo", "loop.generation.is_min=4.0"], "must be below is_cap"),
        (
            ["loop=grpo", "lora.enabled=true", "loop.generation.lora_sync=adapter", "loop.generation.sleep_level=2"],
            "sleep_level=1",
        ),
    ],
)
def test_vllm_settings_refused_at_start_up(fake, prompts, tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        train(tmp_path / "x", prompts, *extra, "loop.generation.backend=vllm", EVEN)
    assert not ENGINES  # refused before any engine was built


@pytest.mark.parametrize(("offset", "masked"), [(-2.0, 1.0), (-0.5, 0.0)])
def test_token_mask_reports_the_share_of_masked_tokens(fake, prompts, tmp_path, offset, masked):
    """token_mask: every token's ratio is exp(−offset); above the cap 3 (offset −2: 7.4) every real token
    is masked, below it (offset −0.5: 1.65) none is; rollout/is_masked_token_frac says so."""
    fake(logp_offset=offset)
    out = tmp_path / "tm"
    train(out, prompts, "loop=grpo", "optim.max_steps=1", *VLLM, "loop.generation.is_correction=token_mask")
    row = metrics(out)[0]
    assert row["rollout/is_masked_token_frac"] == pytest.approx(masked)
    assert "rollout/is_masked_frac" not in row  # the sequence-level share belongs to seq_mask
