"""The online loops' `hf_generate` samples exactly what TRL 1.16's GRPOTrainer generates (its HF `generate`
path, `_generate_single_turn`) for the same seed: same rows (G copies of each prompt, left-padded), same
sampling settings, token for token. This pins the claim of bench/rollout_generate_vs_trl.py that the two
sides do the same generation work, and guards `hf_generate` against a change of sampling semantics."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

PROMPTS = [
    [{"role": "user", "content": "bread flour water"}],
    [{"role": "user", "content": "tea"}],  # shorter: left padding is exercised
    [{"role": "user", "content": "the river runs to the sea at night"}],
]
G = 3


@pytest.fixture(scope="module")
def trainer_and_ids(tiny_path, tmp_path_factory):
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data.prompts import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    ids, _, _ = encode_prompts(PROMPTS, tok, None, None, False)
    assert len({len(p) for p in ids}) > 1
    ds = Dataset.from_list([{"prompt": p} for p in PROMPTS])

    def make(temperature: float, top_p: float, top_k: int):
        config = trl.GRPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")),
            per_device_train_batch_size=len(PROMPTS) * G,
            num_generations=G,
            max_completion_length=12,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to="none",
            disable_tqdm=True,
        )
        reward = lambda completion_ids, **_: [0.0] * len(completion_ids)  # noqa: E731
        return trl.GRPOTrainer(model=model, reward_funcs=[reward], args=config, processing_class=tok, train_dataset=ds)

    return make, tok, ids


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_hf_generate_samples_what_trl_generates(trainer_and_ids, temperature, top_p, top_k):
    from train.app import GenerationSettings
    from train.rollout import hf_generate

    make, tok, ids = trainer_and_ids
    trainer = make(temperature, top_p, top_k)
    gen = GenerationSettings(max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k)
    batch_sizes = []
    hook = trainer.model.register_forward_pre_hook(
        lambda _m, _a, kw: batch_sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    r = hf_generate(trainer.model, tok, ids, G, gen, seed=0)
    hook.remove()
    assert batch_sizes[0] == len(PROMPTS) and set(batch_sizes[1:]) == {len(PROMPTS) * G}  # prompts prefilled once
    for seed in (0, 1):
        r = hf_generate(trainer.model, tok, ids, G, gen, seed=seed)
        ours = [c[m].tolist() for c, m in zip(r.completion_ids, r.completion_mask, strict=True)]
        torch.manual_seed(seed)
        trainer.model.eval()
        theirs = trainer._generate_single_turn([list(p) for p in ids for _ in range(G)], None, {}, G)[0]
        assert ours == theirs
        assert len({tuple(c) for c in ours}) > 1  # really sampled
    other = hf_generate(trainer.model, tok, ids, G, gen, seed=2)
    assert not torch.equal(other.completion_ids, r.completion_ids)  # the seed matters


@pytest.mark.parametrize("greedy", [False, True])
def test_prefilling_each_prompt_once_draws_the_same_tokens(trainer_and_ids, monkeypatch, greedy):
    """hf_generate's shared prompt cache (one prefill per prompt, repeated G times) against `generate`
    prefilling every row: the same completions for the same seed."""
    import train.rollout as rollout
    from train.app import GenerationSettings

    make, tok, ids = trainer_and_ids
    model = make(1.0, 1.0, 0).model
    gen = GenerationSettings(max_new_tokens=16, temperature=0.8, top_p=0.95, top_k=0)
    shared = [rollout.hf_generate(model, tok, ids, G, gen, seed=s, greedy=greedy) for s in (3, 4)]
    monkeypatch.setattr(rollout, "_shared_prompt_cache", lambda *a, **k: None)
    every_row = [rollout.hf_generate(model, tok, ids, G, gen, seed=s, greedy=greedy) for s in (3, 4)]
    for a, b in zip(shared, every_row, strict=True):
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.prompt_ids, b.prompt_ids)
        assert torch.equal(a.completion_mask, b.completion_mask)
    if not greedy:
        assert not torch.equal(shared[0].completion_ids, shared[1].completion_ids)


def test_top_k_zero_overrides_a_checkpoint_top_k(trainer_and_ids, monkeypatch):
    """top_k=0 samples the full distribution even when the checkpoint's generation_config sets a top_k (as
    many chat checkpoints do): the same tokens as with no top_k there at all."""
    from train.app import GenerationSettings
    from train.rollout import hf_generate

    make, tok, ids = trainer_and_ids
    model = make(1.0, 1.0, 0).model
    gen = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0)
    plain = hf_generate(model, tok, ids, G, gen, seed=5)
    monkeypatch.setattr(model.generation_config, "top_k", 1)  # would make sampling greedy
    assert torch.equal(hf_generate(model, tok, ids, G, gen, seed=5).completion_ids, plain.completion_ids)
    greedy = hf_generate(model, tok, ids, G, gen.model_copy(update={"top_k": 1}), seed=5)
    assert not torch.equal(greedy.completion_ids, plain.completion_ids)


@pytest.mark.parametrize("n", [1, G])
def test_in_place_cache_draws_what_dynamic_cache_draws(trainer_and_ids, monkeypatch, n):
    """hf_generate's KV cache written in place (synth/llm/kv_cache.py) against transformers' DynamicCache:
    the same completions for the same seed, with the shared prompt cache (n > 1) and without (n = 1)."""
    import synth.llm.kv_cache as kv
    import train.rollout as rollout
    from train.app import GenerationSettings

    make, tok, ids = trainer_and_ids
    model = make(1.0, 1.0, 0).model
    gen = GenerationSettings(max_new_tokens=16, temperature=0.9, top_p=1.0, top_k=0)
    in_place = rollout.hf_generate(model, tok, ids, n, gen, seed=9)
    layers = []
    real = kv.InPlaceLayer.update

    def record(self, *a, **k):
        layers.append(id(self))
        return real(self, *a, **k)

    monkeypatch.setattr(kv.InPlaceLayer, "update", record)
    rollout.hf_generate(model, tok, ids, n, gen, seed=9)
    assert layers  # the in-place layers were in use
    monkeypatch.setattr(rollout, "in_place", lambda cache, room: cache)
    monkeypatch.setattr(rollout, "in_place_cache", lambda model, room: {})
    dynamic = rollout.hf_generate(model, tok, ids, n, gen, seed=9)
    assert torch.equal(in_place.completion_ids, dynamic.completion_ids)
