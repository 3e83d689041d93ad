"""train/loops/packing.py `bin_capacity`: the packing bin width that minimises the estimated forward cost
(linear layers per token + dense attention per token per key of its bin)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.loops.packing import bin_capacity, cost_coefficients, first_fit_decreasing, pack_rows


def llama(hidden=64, layers=2, intermediate=256, vocab=100):
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def test_cost_coefficients_count_the_dense_weights_and_the_attention_width():
    model = llama()
    a, b = cost_coefficients(model)
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert a == 2 * dense
    assert b == 4 * 64 * 2  # QKᵀ and AV: 2 FLOPs x attention width per key, per layer


def test_rows_that_cannot_share_a_bin_of_the_longest_width_get_wider_bins():
    """Rows of 60 and 100 tokens: bins of 100 hold one row each (32 bins, 3,200 tokens for 2,560 real ones).
    With attention cheap next to the linear layers, wider bins that pair rows up win."""
    lengths = [60, 100] * 16
    cap = bin_capacity(llama(hidden=64, intermediate=1024), lengths)
    assert cap > 100
    bins = first_fit_decreasing(lengths, cap)
    width = max(sum(lengths[i] for i in b) for b in bins)
    assert sum(len(b) for b in bins) == 32 and len(bins) * width < 0.95 * 32 * 100


def test_equal_rows_keep_the_longest_width():
    """Equal rows fill bins of their own length exactly; wider bins would only add attention."""
    assert bin_capacity(llama(), [100] * 32) == 100


def test_attention_heavy_shapes_keep_narrow_bins():
    """When attention dominates (a wide model with tiny MLPs and long rows), wider bins cost more than the
    padding they save."""
    lengths = [900, 1000] * 4
    assert bin_capacity(llama(hidden=256, intermediate=8, layers=1), lengths) == 1000


def test_a_model_of_unknown_shape_keeps_the_longest_row():
    assert bin_capacity(torch.nn.Linear(2, 2), [5, 9, 3]) == 9


def test_packing_at_the_chosen_capacity_keeps_every_token_once():
    lengths = [60, 100] * 4
    ids = torch.zeros(8, 100, dtype=torch.long)
    mask = torch.zeros(8, 100, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 1000 * i
        mask[i, :n] = 1
    pk = pack_rows(ids, mask, ids, capacity=bin_capacity(llama(intermediate=1024), lengths))
    assert pk.input_ids.shape[0] < 8
    got = sorted(pk.input_ids[pk.src >= 0].tolist())
    assert got == sorted(ids[mask.bool()].tolist())


def test_an_empty_batch_or_a_single_row_keeps_the_longest_width():
    model = llama()
    assert bin_capacity(model, []) == 1 and bin_capacity(model, [0, 0]) == 1 and bin_capacity(model, [7]) == 7
