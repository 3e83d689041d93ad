"""train/reference.py: cached reference log-probs, TR-DPO updates, sDPO stages, Curry-DPO ordering."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from train.data import (
    add_kl_completions,
    make_collator,
    normalise_rows,
    tokenize_dataset,
)
from train.logprobs import concatenated_forward, sequence_logps, unpaired_forward
from train.reference import (
    TRDPOSchedule,
    add_reference_adapter,
    curry_iterations,
    curry_order,
    curry_pairs,
    data_fingerprint,
    hard_update,
    hard_update_adapter,
    precompute_reference_logps,
    reference_adapter,
    sdpo_stages,
    soft_update,
    soft_update_adapter,
    weights_fingerprint,
)

TOL = dict(atol=1e-5, rtol=1e-6)
PAIRS = [
    {
        "prompt": f"Question {i}: how do I bake bread?",
        "chosen": "Mix flour and water. " * (i % 3 + 1),
        "rejected": "No." if i % 2 else "I cannot help with that request.",
    }
    for i in range(5)
]


@pytest.fixture(scope="module")
def pair_ds(tiny_tokenizer):
    return tokenize_dataset(normalise_rows(PAIRS), tiny_tokenizer)[0]


def precompute(model, ds, tmp_path, **kw):
    kw = {"kind": "pairwise", "batch_size": 2, **kw}
    return precompute_reference_logps(model, ds, pad_token_id=0, cache_dir=tmp_path, show_progress=False, **kw)


# ------------------------------------------------------------------------------- precomputed reference


def test_precomputed_values_equal_a_direct_forward_and_attach(tiny_model, pair_ds, tmp_path):
    ref = precompute(tiny_model, pair_ds, tmp_path, settings={"max_length": 1024})
    assert not ref.from_cache and ref.path.exists() and ref.path.with_suffix(".json").exists()
    with torch.no_grad():
        direct = concatenated_forward(tiny_model, make_collator("pairwise", 0)(list(pair_ds)))
    torch.testing.assert_close(ref.tensors["ref_chosen_logps"], direct["chosen_logps"], **TOL)
    torch.testing.assert_close(ref.tensors["ref_rejected_logps_mean"], direct["rejected_logps_mean"], **TOL)
    attached = ref.attach(pair_ds)
    batch = make_collator("pairwise", 0)(list(attached.select([3, 4])))
    torch.testing.assert_close(batch["ref_rejected_logps"], direct["rejected_logps"][3:5], **TOL)
    assert ref.attach(attached).column_names == attached.column_names  # re-attaching replaces


def test_cache_is_reused_when_nothing_changes(tiny_model, pair_ds, tmp_path):
    first = precompute(tiny_model, pair_ds, tmp_path)
    second = precompute(tiny_model, pair_ds.select(range(len(pair_ds))), tmp_path)  # same content, new object
    assert second.from_cache and second.key == first.key
    for name, value in first.tensors.items():
        torch.testing.assert_close(second.tensors[name], value, atol=0, rtol=0)


def test_cache_is_recomputed_when_anything_changes(
    tiny_model, fresh_tiny_model, tiny_path, pair_ds, tiny_tokenizer, tmp_path
):
    from transformers import AutoModelForCausalLM

    base = precompute(tiny_model, pair_ds, tmp_path, settings={"max_length": 1024})
    keys = {base.key}
    changed = [
        precompute(tiny_model, pair_ds, tmp_path, settings={"max_length": 512}),  # tokenisation settings
        precompute(tiny_model, pair_ds.select([1, 0, 2, 3, 4]), tmp_path, settings={"max_length": 1024}),  # order
        precompute(
            tiny_model,
            tokenize_dataset(normalise_rows(PAIRS[:4] + [dict(PAIRS[4], rejected="Nope.")]), tiny_tokenizer)[0],
            tmp_path,
            settings={"max_length": 1024},
        ),  # data
    ]
    with torch.no_grad():
        fresh_tiny_model.model.layers[0].mlp.up_proj.weight.add_(1e-3)  # the weights
    changed.append(precompute(fresh_tiny_model, pair_ds, tmp_path, settings={"max_length": 1024}))
    double = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float64)
    changed.append(precompute(double, pair_ds, tmp_path, settings={"max_length": 1024}))  # dtype
    for ref in changed:
        assert not ref.from_cache and ref.key not in keys
        keys.add(ref.key)
    assert precompute(tiny_model, pair_ds, tmp_path, settings={"max_length": 1024}).from_cache


def test_fingerprints_are_stable_and_content_based(tiny_model, fresh_tiny_model, pair_ds):
    assert weights_fingerprint(tiny_model) == weights_fingerprint(fresh_tiny_model)
    assert data_fingerprint(pair_ds) == data_fingerprint(Dataset.from_list(list(pair_ds)))
    assert data_fingerprint(pair_ds) != data_fingerprint(pair_ds.select([0, 1, 2, 3]))


def test_ranked_reference_logps_are_per_response(tiny_model, tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "q", "responses": ["a", "bb", "ccc"], "scores": [1, 2, 3]},
        {"prompt": "r", "responses": ["d", "ee"], "scores": [2, 1]},
        {"prompt": "s", "responses": ["f", "gg", "h", "ii"], "scores": [4, 3, 2, 1]},
    ]
    ds = tokenize_dataset(normalise_rows(rows), tiny_tokenizer)[0]
    ref = precompute(tiny_model, ds, tmp_path, kind="ranked")  # batch_size 2: batches with Kmax 3 and 4
    attached = ref.attach(ds)
    assert [len(x) for x in attached["ref_logps"]] == [3, 2, 4]
    batch = make_collator("ranked", 0)(list(attached))
    assert batch["ref_logps"].shape == (3, 4) and batch["ref_logps"][1, 2] == 0
    with torch.no_grad():
        single = make_collator("ranked", 0)([ds[1]])
        logits = tiny_model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits
    torch.testing.assert_close(
        torch.tensor(attached[1]["ref_logps"]), sequence_logps(logits, single["labels"])[0], **TOL
    )


def test_unpaired_reference_logps_include_fixed_kl_pairs(tiny_model, tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": "answer " * (i + 1), "label": i % 2 == 0} for i in range(4)]
    ds = add_kl_completions(tokenize_dataset(normalise_rows(rows), tiny_tokenizer)[0], batch_size=2)
    ref = precompute(tiny_model, ds, tmp_path, kind="unpaired", batch_size=3)  # batches unlike the KL chunks
    with torch.no_grad():
        direct = unpaired_forward(tiny_model, make_collator("unpaired", 0)(list(ds)))
    torch.testing.assert_close(ref.tensors["ref_logps"], direct["logps"], **TOL)
    torch.testing.assert_close(ref.tensors["ref_kl_logps"], direct["kl_logps"], **TOL)
    without_kl = precompute(tiny_model, ds.remove_columns("kl_completion_ids"), tmp_path, kind="unpaired")
    assert "ref_kl_logps" not in without_kl.tensors


def test_precompute_restores_train_mode_and_rejects_sft(fresh_tiny_model, pair_ds, tmp_path):
    fresh_tiny_model.train()
    precompute(fresh_tiny_model, pair_ds, tmp_path)
    assert fresh_tiny_model.training
    with pytest.raises(ValueError, match="preference data"):
        precompute(
            fresh_tiny_model, Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]]}), tmp_path, kind="sft"
        )


# ---------------------------------------------------------------------------------------------- TR-DPO


def scalar_module(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(m.weight, value)
    return m


def test_soft_and_hard_updates_exact_values():
    ref, policy = scalar_module(1.0), scalar_module(2.0)
    soft_update(ref, policy, alpha=0.6)  # TR-DPO soft update (arXiv 2404.09656), alpha = 0.6
    assert ref.weight.item() == pytest.approx(1.6, abs=1e-7)
    soft_update(ref, policy, alpha=0.6)
    assert ref.weight.item() == pytest.approx(0.6 * 2.0 + 0.4 * 1.6, abs=1e-7)
    assert policy.weight.item() == 2.0
    hard_update(ref, policy)
    assert ref.weight.item() == 2.0
    with pytest.raises(ValueError, match="alpha"):
        soft_update(ref, policy, alpha=1.5)
    with pytest.raises(ValueError, match="differ"):
        soft_update(ref, torch.nn.Linear(1, 1), alpha=0.5)


def test_updates_mix_every_parameter_of_a_model(tiny_model, fresh_tiny_model):
    ref = fresh_tiny_model
    with torch.no_grad():
        for p in ref.parameters():
            p.zero_()
    soft_update(ref, tiny_model, alpha=0.25)
    for (_, r), (_, p) in zip(ref.named_parameters(), tiny_model.named_parameters(), strict=True):
        torch.testing.assert_close(r, 0.25 * p, **TOL)


def test_trdpo_schedule_fires_at_the_right_steps():
    hard = TRDPOSchedule(mode="hard", tau=512)
    assert [s for s in range(1, 2000) if hard.action(s)] == [512, 1024, 1536]
    assert hard.action(512) == "hard" and hard.action(0) is None
    soft = TRDPOSchedule(mode="soft", alpha=0.6)
    assert all(soft.action(s) == "soft" for s in range(1, 10))
    fused = TRDPOSchedule(mode="soft", alpha=0.6, tau=4, soft_every=4)  # TRL's cadence
    assert [s for s in range(1, 13) if fused.action(s)] == [4, 8, 12]
    ref, policy = scalar_module(1.0), scalar_module(2.0)
    assert TRDPOSchedule(mode="hard", tau=2).apply(1, ref, policy) is None and ref.weight.item() == 1.0
    assert TRDPOSchedule(mode="hard", tau=2).apply(2, ref, policy) == "hard" and ref.weight.item() == 2.0
    with pytest.raises(ValueError):
        TRDPOSchedule(mode="fused")


def test_lora_reference_adapter(tiny_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype="float32")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    add_reference_adapter(model)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    policy_b = next(p for n, p in lora_b.items() if ".default." in n)
    ref_b = lora_b[next(n for n, p in lora_b.items() if p is policy_b).replace(".default.", ".reference.")]
    assert policy_b.requires_grad and not ref_b.requires_grad
    with torch.no_grad():
        policy_b.fill_(1.0)  # the policy has trained; the reference (a copy of the initial B = 0) has not
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        policy_logits = model(input_ids=ids).logits
        with reference_adapter(model):
            ref_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, base_logits)  # reference = the initial adapter (B = 0)
    assert not torch.allclose(policy_logits, ref_logits)
    assert model.active_adapter == "default" and policy_b.requires_grad and not ref_b.requires_grad

    soft_update_adapter(model, alpha=0.6)
    assert torch.allclose(ref_b, torch.full_like(ref_b, 0.6))
    hard_update_adapter(model)
    assert torch.equal(ref_b, policy_b)
    with pytest.raises(ValueError, match="add_reference_adapter"):
        soft_update_adapter(model, alpha=0.5, ref_adapter="missing")


# ---------------------------------------------------------------------------------------- sDPO, Curry


def test_sdpo_stages_split_in_order():
    ds = Dataset.from_dict({"id": [str(i) for i in range(7)], "hardness": [6, 5, 4, 3, 2, 1, 0]})
    stages = sdpo_stages(ds, 2)
    assert [s["id"] for s in stages] == [["0", "1", "2", "3"], ["4", "5", "6"]]
    by_difficulty = sdpo_stages(ds, 3, difficulty="hardness")
    assert [s["id"] for s in by_difficulty] == [["6", "5"], ["4", "3", "2"], ["1", "0"]]
    with pytest.raises(ValueError):
        sdpo_stages(ds, 0)


def test_curry_pairs_worked_example():
    assert curry_pairs([5, 4, 3, 2]) == [(0, 3, 3.0), (0, 2, 2.0), (0, 1, 1.0)]  # Curry-DPO (arXiv 2403.07230)
    assert curry_pairs([1, 3, 3, 2]) == [(1, 0, 2.0), (1, 3, 1.0)]  # ties with the best are dropped
    assert curry_order([0.5, 3.0, 1.0, 3.0]) == [1, 3, 2, 0]


def test_curry_iterations_from_ranked_rows():
    ranked = normalise_rows(
        [
            {"id": "a", "prompt": "q", "responses": ["r1", "r2", "r3"], "scores": [5, 4, 1]},
            {"id": "b", "prompt": "p", "responses": ["s1", "s2"], "scores": [0, 2]},
        ]
    )
    iterations = curry_iterations(ranked)
    assert [len(it) for it in iterations] == [2, 1]
    first = iterations[0]
    assert first["id"] == ["a:0-2", "b:1-0"]
    assert first[0]["chosen"] == [{"role": "assistant", "content": "r1"}]
    assert first[0]["rejected"] == [{"role": "assistant", "content": "r3"}]
    assert (first[0]["score_chosen"], first[0]["score_rejected"]) == (5.0, 1.0)
    assert iterations[1][0]["rejected"][0]["content"] == "r2"
