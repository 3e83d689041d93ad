"""llm=hf on the tiny model: batching, sampling, seeds, stops, lengths, log-probs, prefill, LoRA."""

from __future__ import annotations

import math

import pytest

from synth.llm import build_llm
from synth.llm.base import SamplingParams, sample_seed
from synth.records import messages

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=12, seed=11)

# prompts of clearly different lengths, so the batch is really left-padded
PROMPTS = [
    messages(("user", "Hi")),
    messages(("user", "How do I bake bread at home? Please explain the reasoning step by step.")),
    messages(("system", "You are kind."), ("user", "Privacy, honesty, fairness and kindness matter. Which one first?")),
    messages(("user", "用户：如何在家里烤面包？")),
    messages(("user", "Rate it")),
]


def texts(groups):
    return [[c.text for c in g] for g in groups]


def test_batch_equals_one_at_a_time_greedy(tiny_hf_llm):
    batched = tiny_hf_llm.generate(PROMPTS, GREEDY)
    alone = [tiny_hf_llm.generate([p], GREEDY)[0] for p in PROMPTS]
    assert texts(batched) == texts(alone)
    assert all(len(g) == 1 and g[0].completion_tokens > 0 for g in batched)


def test_seeded_sampling_is_batch_invariant_and_reproducible(tiny_hf_llm):
    batched = tiny_hf_llm.generate(PROMPTS, SAMPLED)
    alone = [tiny_hf_llm.generate([p], SAMPLED)[0] for p in PROMPTS]
    again = tiny_hf_llm.generate(PROMPTS, SAMPLED)
    other_seed = tiny_hf_llm.generate(PROMPTS, SAMPLED.replace(seed=12))
    assert texts(batched) == texts(alone) == texts(again)
    assert texts(other_seed) != texts(batched)


def test_n_samples_follow_the_seed_contract(tiny_hf_llm):
    p = SAMPLED.replace(n=3)
    out = tiny_hf_llm.generate(PROMPTS[:2], p)
    assert [len(g) for g in out] == [3, 3]
    assert len(set(texts(out)[1])) == 3  # distinct samples
    # sample i == an n=1 request with seed sample_seed(seed, i): what the call cache relies on
    for i in range(3):
        single = tiny_hf_llm.generate([PROMPTS[1]], p.replace(n=1, seed=sample_seed(p.seed, i)))[0][0]
        assert single.text == out[1][i].text


def test_mixed_params_in_one_call(tiny_hf_llm):
    params = [GREEDY, SAMPLED, GREEDY.replace(max_new_tokens=3), SAMPLED.replace(n=2, seed=5), GREEDY]
    together = tiny_hf_llm.generate(PROMPTS, params)
    apart = [tiny_hf_llm.generate([pr], pa)[0] for pr, pa in zip(PROMPTS, params, strict=True)]
    assert texts(together) == texts(apart)
    assert together[2][0].completion_tokens <= 3


def test_unseeded_sampling_varies(tiny_hf_llm):
    p = SamplingParams(temperature=1.0, max_new_tokens=12, n=4)
    assert len(set(texts(tiny_hf_llm.generate(PROMPTS[:1], p))[0])) > 1


def test_length_finish(tiny_hf_llm):
    out = tiny_hf_llm.generate(PROMPTS, SAMPLED.replace(max_new_tokens=4))
    for (c,) in out:
        assert c.completion_tokens <= 4
        assert (c.finish_reason == "length") == (c.completion_tokens == 4)
    assert any(c.finish_reason == "length" for (c,) in out)


def test_stop_string_truncates(tiny_hf_llm):
    long = SAMPLED.replace(max_new_tokens=24)
    (full,) = tiny_hf_llm.generate([PROMPTS[1]], long)[0]
    stop = full.text[6:8]  # a piece from the middle of the sampled text
    assert len(stop) == 2 and stop.strip()
    (cut,) = tiny_hf_llm.generate([PROMPTS[1]], long.replace(stop=(stop, "never-there")))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert 0 < cut.completion_tokens < full.completion_tokens


def test_logprobs_and_top_logprobs(tiny_hf_llm):
    (c,) = tiny_hf_llm.generate([PROMPTS[1]], GREEDY.replace(logprobs=True, top_logprobs=5))[0]
    assert c.logprobs is not None and len(c.logprobs) == c.completion_tokens
    for tok in c.logprobs:
        assert tok.logprob <= 0 and len(tok.top) >= 4  # two ids can decode to the same text
        assert tok.token in tok.top  # greedy: the chosen token is the top one
        assert tok.logprob == pytest.approx(max(tok.top.values()), abs=1e-5)
        assert sum(math.exp(v) for v in tok.top.values()) <= 1 + 1e-5
    (s,) = tiny_hf_llm.generate([PROMPTS[1]], SAMPLED.replace(logprobs=True))[0]
    assert s.logprobs is not None and all(t.top == {} and t.logprob <= 0 for t in s.logprobs)
    (none,) = tiny_hf_llm.generate([PROMPTS[1]], GREEDY)[0]
    assert none.logprobs is None


def test_sampled_logprobs_come_from_the_raw_model_distribution(tiny_hf_llm):
    """Reported log-probs are the model's (temperature-free); a sampled token is never above the top-1."""
    hot = SAMPLED.replace(temperature=5.0, top_logprobs=3, logprobs=True)
    (c,) = tiny_hf_llm.generate([PROMPTS[2]], hot)[0]
    for tok in c.logprobs:
        assert tok.logprob <= max(tok.top.values()) + 1e-6


def test_prefill_continues_the_assistant_message(tiny_hf_llm):
    convo = messages(("user", "Rate the answer."), ("assistant", "Score:"))
    ids = tiny_hf_llm._encode(convo)
    rendered = tiny_hf_llm.tokenizer.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\nScore:")  # no end-of-turn, no new turn
    plain = tiny_hf_llm.tokenizer.decode(tiny_hf_llm._encode(convo[:1]))
    assert plain.endswith("<|im_start|>assistant\n")
    (c,) = tiny_hf_llm.generate([convo], GREEDY)[0]
    assert c.prompt_tokens == len(ids) and c.completion_tokens > 0


def test_max_input_tokens_marks_prompt_too_long():
    llm = build_llm({"kind": "hf", "device": "cpu", "max_input_tokens": 16}, {"name_or_path": "builtin:tiny"})
    out = llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY.replace(n=2))
    assert [c.finish_reason for c in out[1]] == ["prompt_too_long"] * 2 and out[1][0].text == ""
    assert out[0][0].finish_reason in ("stop", "length")


def _adapter(tmp_path, tiny_model_dir, targets, name="adapter"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_lora_adapter_is_merged_for_inference_with_the_same_outputs(tmp_path, tiny_hf_llm, tiny_model_dir, monkeypatch):
    import torch

    from synth.llm import hf

    adapter = _adapter(tmp_path, tiny_model_dir, ["q_proj", "v_proj", "down_proj"])
    merged = build_llm({"kind": "hf", "device": "cpu", "adapter": adapter}, {"name_or_path": "builtin:tiny"})
    assert type(merged.net).__name__ == "LlamaForCausalLM"  # merged: plain layers, no LoRA matmuls left
    assert not any("lora" in name for name, _ in merged.net.named_parameters())
    monkeypatch.setattr(hf, "_mergeable", lambda net: False)
    unmerged = build_llm({"kind": "hf", "device": "cpu", "adapter": adapter}, {"name_or_path": "builtin:tiny"})
    assert type(unmerged.net).__name__ == "PeftModelForCausalLM"
    assert merged.identity == unmerged.identity and merged.identity["adapter"] and not tiny_hf_llm.identity["adapter"]
    ids = torch.tensor([merged._encode(p) for p in PROMPTS[:1]])
    with torch.no_grad():  # exact up to float rounding
        torch.testing.assert_close(merged.net(ids).logits, unmerged.net(ids).logits, rtol=1e-4, atol=1e-4)
    greedy = texts(merged.generate(PROMPTS, GREEDY.replace(n=2)))
    assert greedy == texts(unmerged.generate(PROMPTS, GREEDY.replace(n=2)))
    assert texts(merged.generate(PROMPTS, SAMPLED)) != texts(tiny_hf_llm.generate(PROMPTS, SAMPLED))  # it matters


def test_lora_on_a_tied_weight_is_left_unmerged(tmp_path, tiny_model_dir):
    # the tiny model ties lm_head to embed_tokens: merging a delta into lm_head would change the embeddings too
    adapter = _adapter(tmp_path, tiny_model_dir, ["lm_head", "q_proj"])
    llm = build_llm({"kind": "hf", "device": "cpu", "adapter": adapter}, {"name_or_path": "builtin:tiny"})
    assert type(llm.net).__name__ == "PeftModelForCausalLM"


def test_stats_count_tokens(tiny_hf_llm):
    before = tiny_hf_llm.stats.completions
    out = tiny_hf_llm.generate(PROMPTS[:2], GREEDY.replace(n=2))
    assert tiny_hf_llm.stats.completions - before == 4
    assert tiny_hf_llm.stats.completion_tokens >= sum(c.completion_tokens for g in out for c in g)


@pytest.mark.gpu
def test_cuda_matches_cpu_greedy(tiny_hf_llm):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    gpu = build_llm({"kind": "hf", "device": "cuda", "dtype": "float32"}, {"name_or_path": "builtin:tiny"})
    assert str(gpu.device).startswith("cuda")
    out = gpu.generate(PROMPTS, SAMPLED.replace(n=2))
    assert [len(g) for g in out] == [2] * len(PROMPTS)
    assert texts(gpu.generate(PROMPTS, GREEDY)) == texts(tiny_hf_llm.generate(PROMPTS, GREEDY))


def test_in_place_kv_cache_changes_no_token_or_logprob(tiny_hf_llm, monkeypatch):
    """The backend hands `generate` a KV cache written in place (synth/llm/kv_cache.py); with transformers'
    own DynamicCache instead, every text and log-prob is the same."""
    import synth.llm.kv_cache as kv

    params = [GREEDY.replace(logprobs=True), SAMPLED.replace(logprobs=True), SAMPLED.replace(n=2, seed=5)]
    prompts = PROMPTS[:3]
    allocated = []
    real = kv.InPlaceLayer._allocate
    monkeypatch.setattr(kv.InPlaceLayer, "_allocate", lambda self, *a: allocated.append(1) or real(self, *a))
    in_place = tiny_hf_llm.generate(prompts, params)
    assert allocated  # the in-place cache was in use
    monkeypatch.setattr(kv, "in_place_cache", lambda model, room: {})
    dynamic = tiny_hf_llm.generate(prompts, params)
    assert texts(in_place) == texts(dynamic)
    assert in_place[0][0].logprobs and in_place[1][0].logprobs
    for a, b in zip(in_place, dynamic, strict=True):
        for x, y in zip(a, b, strict=True):
            assert [t.logprob for t in x.logprobs or []] == [t.logprob for t in y.logprobs or []]
