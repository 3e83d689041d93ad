"""train/logprobs.py: float32 log-probs against a naive full softmax; the concatenated forward."""

from __future__ import annotations

import pytest
import torch

from train.data import TokenizeConfig, make_collator, normalise_rows, tokenize_dataset
from train.logprobs import (
    concatenated_forward,
    listwise_forward,
    selective_log_softmax,
    sequence_logps,
    shift_labels,
    token_logps,
    unpaired_forward,
)

TOL = dict(atol=1e-5, rtol=1e-6)


def naive(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor):
    logps = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    per_token = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return per_token.sum(-1), per_token.sum(-1) / mask.sum(-1), mask.sum(-1)


def test_selective_log_softmax_matches_naive_in_float32_and_bfloat16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    index = torch.randint(0, 50, (3, 7), generator=g)
    for chunk in (None, 1, 5):  # one chunk, one row per chunk, chunks that straddle batch rows
        torch.testing.assert_close(selective_log_softmax(logits, index, chunk_rows=chunk), naive(logits, index), **TOL)
    half = logits.bfloat16()
    out = selective_log_softmax(half, index, chunk_rows=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive(half, index), **TOL)


def test_selective_log_softmax_mask_and_gradient():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 6, 40, generator=g) * 3).requires_grad_()
    index = torch.randint(0, 40, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.4
    weights = torch.randn(2, 6, generator=g)
    out = selective_log_softmax(logits, index, mask, chunk_rows=3)
    assert (out[~mask] == 0).all()
    (out * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (naive(logits, index) * mask * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, **TOL)


def test_bfloat16_gradient_keeps_the_logits_dtype():
    logits = torch.randn(2, 4, 30).bfloat16().requires_grad_()
    index = torch.randint(0, 30, (2, 4))
    selective_log_softmax(logits, index, chunk_rows=2).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_()
    naive(ref, index).sum().backward()
    torch.testing.assert_close(logits.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_shift_labels_and_token_logps_alignment():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, -100]]
    logits = torch.randn(1, 4, 10)
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(logps[0, :2], naive(logits[:, :2], torch.tensor([[5, 6]]))[0], **TOL)


@pytest.fixture(scope="module")
def pair_batch(tiny_tokenizer):
    rows = [
        {
            "prompt": "How do I bake bread at home?",
            "chosen": "Mix flour, water, salt and yeast, knead the dough.",
            "rejected": "No.",
            "score_chosen": 4.0,
            "score_rejected": 1.0,
        },
        {
            "prompt": "Hi",
            "chosen": "Hello there, how can I help?",
            "rejected": "Please explain your question, step by step.",
        },
        {"prompt": "Is the fox quick?", "chosen": "Yes.", "rejected": "The quick brown fox jumps over the lazy dog."},
    ]
    ds, _ = tokenize_dataset(normalise_rows(rows), tiny_tokenizer, TokenizeConfig())
    return ds, make_collator("pairwise", tiny_tokenizer.pad_token_id)(list(ds))


def test_sequence_logps_match_a_naive_full_softmax_on_the_tiny_model(tiny_model, pair_batch):
    _, batch = pair_batch
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = sequence_logps(logits, batch["labels"])
    for a, b in zip(ours, naive_sequence_logps(logits, batch["labels"]), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.int64


def test_concatenated_forward_equals_two_separate_forwards(tiny_model, pair_batch):
    ds, batch = pair_batch
    with torch.no_grad():
        out = concatenated_forward(tiny_model, batch)
        singles = {}
        for side in ("chosen", "rejected"):  # each side alone: different padding widths
            rows = [
                {"prompt_ids": r["prompt_ids"], "chosen_ids": r[f"{side}_ids"], "rejected_ids": r[f"{side}_ids"]}
                for r in ds
            ]
            sep = make_collator("pairwise", 0)(rows)
            b = len(rows)
            logits = tiny_model(input_ids=sep["input_ids"][:b], attention_mask=sep["attention_mask"][:b]).logits
            singles[side] = sequence_logps(logits, sep["labels"][:b])
    for side in ("chosen", "rejected"):
        total, mean, n = singles[side]
        torch.testing.assert_close(out[f"{side}_logps"], total, **TOL)
        torch.testing.assert_close(out[f"{side}_logps_mean"], mean, **TOL)
        assert out[f"{side}_n_tokens"].tolist() == n.tolist()
    torch.testing.assert_close(out["chosen_nll"], -out["chosen_logps_mean"])
    expected_token_mean = -out["chosen_logps"].sum() / out["chosen_n_tokens"].sum()
    torch.testing.assert_close(out["chosen_nll_token_mean"], expected_token_mean)


def test_each_row_equals_its_unpadded_forward(tiny_model, pair_batch):
    ds, batch = pair_batch
    with torch.no_grad():
        out = concatenated_forward(tiny_model, batch)
        for i, row in enumerate(ds):
            ids = torch.tensor([row["prompt_ids"] + row["rejected_ids"]])
            labels = torch.tensor([[-100] * len(row["prompt_ids"]) + row["rejected_ids"]])
            total = sequence_logps(tiny_model(input_ids=ids).logits, labels)[0]
            torch.testing.assert_close(out["rejected_logps"][i], total[0], **TOL)


def test_padding_token_ids_do_not_change_the_result(tiny_model, pair_batch):
    _, batch = pair_batch
    pads = batch["attention_mask"] == 0
    assert pads.any()
    noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(pads, 77))
    with torch.no_grad():
        a, b = concatenated_forward(tiny_model, batch), concatenated_forward(tiny_model, noisy)
    for key in ("chosen_logps", "rejected_logps", "chosen_logps_mean"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_concatenated_forward_backpropagates(fresh_tiny_model, pair_batch):
    _, batch = pair_batch
    out = concatenated_forward(fresh_tiny_model, batch)
    (out["chosen_logps"] - out["rejected_logps"]).sum().backward()
    grads = [p.grad for p in fresh_tiny_model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_listwise_forward_regroups_ragged_lists(tiny_model, tiny_tokenizer):
    rows = [
        {"prompt": "q", "responses": ["a", "bb"], "scores": [1, 2]},
        {"prompt": "Hi there", "responses": ["x", "yy yy", "The quick brown fox."], "scores": [3, 2, 1]},
    ]
    ds, _ = tokenize_dataset(normalise_rows(rows), tiny_tokenizer)
    batch = make_collator("ranked", tiny_tokenizer.pad_token_id)(list(ds))
    with torch.no_grad():
        out = listwise_forward(tiny_model, batch)
        flat = sequence_logps(
            tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )[0]
    assert out["logps"].shape == (2, 3) and out["mask"].tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(out["logps"][1], flat[2:5], **TOL)
    assert out["logps"][0, 2] == 0 and out["n_tokens"][0, 2] == 0


def test_unpaired_forward_kl_pairs_have_no_grad(fresh_tiny_model, tiny_tokenizer):
    rows = [
        {"prompt": "q", "completion": "good answer", "label": True},
        {"prompt": "Hi", "completion": "bad", "label": False},
    ]
    ds, _ = tokenize_dataset(normalise_rows(rows), tiny_tokenizer)
    batch = make_collator("unpaired", tiny_tokenizer.pad_token_id)(list(ds))
    out = unpaired_forward(fresh_tiny_model, batch)
    assert out["logps"].requires_grad and not out["kl_logps"].requires_grad
    assert out["label"].tolist() == [True, False]
    with torch.no_grad():  # row 0's KL pair is prompt 0 with completion 1
        ids = torch.tensor([ds[0]["prompt_ids"] + ds[1]["completion_ids"]])
        labels = torch.tensor([[-100] * len(ds[0]["prompt_ids"]) + ds[1]["completion_ids"]])
        expected = sequence_logps(fresh_tiny_model(input_ids=ids).logits, labels)[0]
    torch.testing.assert_close(out["kl_logps"][0], expected[0], **TOL)


# ------------------------------------------------------------------ chunked LM head (no [B, T, V] logits)


def _naive_and_chunked(model, ids, labels, chunk_rows):
    from train.logprobs import model_token_logps, token_logps

    naive, naive_mask = token_logps(model(input_ids=ids, use_cache=False).logits, labels)
    naive_grads = torch.autograd.grad(naive.sum(), [p for p in model.parameters() if p.requires_grad])
    got, mask = model_token_logps(model, labels, chunk_rows=chunk_rows, input_ids=ids)
    grads = torch.autograd.grad(got.sum(), [p for p in model.parameters() if p.requires_grad])
    return (naive, naive_mask, naive_grads), (got, mask, grads)


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_chunked_head_equals_the_full_logits_values_and_gradients(fresh_tiny_model, chunk_rows):
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    (naive, naive_mask, naive_grads), (got, mask, grads) = _naive_and_chunked(fresh_tiny_model, ids, labels, chunk_rows)
    assert torch.equal(mask, naive_mask) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-5)
    for g, n in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(g, n, rtol=1e-4, atol=1e-6)


def test_chunked_head_with_a_bias_and_with_lora(fresh_tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    ids = torch.randint(3, 200, (2, 7))
    head = fresh_tiny_model.lm_head
    head.bias = torch.nn.Parameter(torch.randn(head.out_features) * 0.1)
    (naive, _, naive_grads), (got, _, grads) = _naive_and_chunked(fresh_tiny_model, ids, ids.clone(), 4)
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-5)
    for g, n in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(g, n, rtol=1e-4, atol=1e-6)
    peft = get_peft_model(fresh_tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    (naive, _, naive_grads), (got, _, grads) = _naive_and_chunked(peft, ids, ids.clone(), 4)
    torch.testing.assert_close(got, naive, rtol=0, atol=1e-5)
    for g, n in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(g, n, rtol=1e-4, atol=1e-6)
    assert isinstance(fresh_tiny_model.lm_head, torch.nn.Linear)  # the head is put back


def test_a_lora_head_takes_the_ordinary_forward(fresh_tiny_model):
    from peft import LoraConfig, get_peft_model

    from train.logprobs import _plain_head

    assert _plain_head(fresh_tiny_model) is not None
    peft = get_peft_model(fresh_tiny_model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert _plain_head(peft) is None
