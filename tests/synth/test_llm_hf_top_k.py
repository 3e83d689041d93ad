"""llm=hf's `top_k` means what SamplingParams says on every transformers version pyproject allows:
None = the whole distribution, k = the k likeliest tokens. Our row sampler applies it; HF's own
warpers never run (do_sample=False), so neither the model's generation_config nor HF's fallback for an
unset top_k (transformers 5 fills GenerationConfig(top_k=None) from the model's config, else 50; 4.x
leaves it off) can truncate the distribution."""

from __future__ import annotations

import pytest

from synth.llm.base import SamplingParams
from synth.records import messages

PROMPTS = [messages(("user", "Hi")), messages(("user", "How do I bake bread at home?"))]


def chosen_outside_top(llm, params) -> tuple[int, int]:
    """(tokens drawn, tokens not among the `top_logprobs` likeliest of the raw distribution)."""
    out = llm.generate(PROMPTS, params)
    drawn = [t for g in out for c in g for t in c.logprobs]
    return len(drawn), sum(t.token not in t.top for t in drawn)


def test_top_k_none_samples_the_whole_distribution_and_k_the_k_likeliest(tiny_hf_llm):
    base = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=3, logprobs=True)
    n, outside_50 = chosen_outside_top(tiny_hf_llm, base.replace(top_logprobs=50))
    assert n == 2 * 4 * 16 and outside_50 > 0  # no top-50 cut (HF's old default) when top_k is None
    n, outside_5 = chosen_outside_top(tiny_hf_llm, base.replace(top_k=5, top_logprobs=5))
    assert n > 0 and outside_5 == 0


def test_the_models_generation_config_does_not_reach_sampling(tiny_hf_llm, monkeypatch):
    import transformers.generation.utils as gen_utils

    built = []
    real = gen_utils.TopKLogitsWarper

    class Recording(real):  # the warper generate() would build for a top_k of its own
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("top_k", args[0] if args else None))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gen_utils, "TopKLogitsWarper", Recording)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=7)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    clean = [tiny_hf_llm.generate(PROMPTS, p) for p in (sampled, greedy)]
    gc = tiny_hf_llm.net.generation_config
    saved = gc.to_dict()
    try:  # a hub model's sampling defaults (Qwen2.5 ships do_sample, temperature, top_p, top_k, repetition_penalty)
        for key, value in {"do_sample": True, "top_k": 1, "temperature": 0.05, "top_p": 0.1}.items():
            setattr(gc, key, value)
        gc.repetition_penalty = 3.0
        poisoned = [tiny_hf_llm.generate(PROMPTS, p) for p in (sampled, greedy)]
    finally:
        for key in ("do_sample", "top_k", "temperature", "top_p", "repetition_penalty"):
            setattr(gc, key, saved.get(key))
    assert [[[c.text for c in g] for g in out] for out in poisoned] == [
        [[c.text for c in g] for g in out] for out in clean
    ]
    assert built == []  # HF built no top-k warper of its own, with or without the model's top_k


@pytest.mark.parametrize("top_k", [None, 0])
def test_generate_kwarg_top_k_none_or_0_is_off_on_the_installed_transformers(top_k, monkeypatch):
    """What train's hf rollout relies on (it passes `top_k=gen.top_k`, 0 = off, to generate): a top_k
    given to generate() as a keyword, None or 0, builds no top-k warper, whatever the model's config."""
    import torch
    import transformers.generation.utils as gen_utils
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    built = []
    real = gen_utils.TopKLogitsWarper

    class Recording(real):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("top_k", args[0] if args else None))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gen_utils, "TopKLogitsWarper", Recording)
    cfg = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    net = LlamaForCausalLM(cfg).eval()
    net.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, top_k=20)
    net.generate(torch.tensor([[2, 3]]), max_new_tokens=1, do_sample=True, top_k=top_k)
    assert built == []
    net.generate(torch.tensor([[2, 3]]), max_new_tokens=1, do_sample=True)  # unset: the model's own 20
    assert built == [20]
