"""Training memory: the fused AdamW (no full-size temporary, same update as the default) and the
reference pass on packed rows that never builds [B, T, V] logits."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from train.loops.common import build_optimizer

OPTIM = SimpleNamespace(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(7, 5), (5,), (3, 7)]]


def test_fused_adamw_is_used_on_cpu_and_matches_the_default_update():
    fused_params, plain_params = _params(0), _params(0)
    fused = build_optimizer(fused_params, OPTIM)
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.AdamW(
        [
            {"params": [p for p in plain_params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in plain_params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        foreach=True,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in fused_params]
        for ps, opt in ((fused_params, fused), (plain_params, plain)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    state = fused.state_dict()  # resumable like the default one
    again = build_optimizer(_params(0), OPTIM)
    again.load_state_dict(state)
    assert again.state_dict()["state"].keys() == state["state"].keys()


def test_fused_adamw_is_skipped_where_the_kernel_does_not_apply():
    mixed = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    assert all(g["fused"] for g in build_optimizer(mixed, OPTIM).param_groups)  # dtypes may differ per tensor
    meta = [torch.nn.Parameter(torch.zeros(2, 2, device="meta"))]
    assert not any(g["fused"] for g in build_optimizer(meta, OPTIM).param_groups)


def test_reference_pass_on_packed_rows_never_calls_the_full_head(tiny_path):
    """PackedLogits goes through the chunked head: the LM head module is never run on [rows, T] (it is
    swapped out), and the log-probs equal the full-logits ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.train.loop_helpers import varied_batch
    from train.logprobs import concatenated_forward, token_logps
    from train.loops.packing import PackedLogits

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    b = varied_batch(tok)
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    with torch.no_grad():
        got = concatenated_forward(PackedLogits(model), b)
    hook.remove()
    assert calls == []
    with torch.no_grad():
        logps, mask = token_logps(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
        )
    total = logps.sum(-1)
    n = total.shape[0] // 2
    torch.testing.assert_close(got["chosen_logps"], total[:n], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["rejected_logps"], total[n:], rtol=1e-5, atol=1e-4)


def test_packing_check_still_passes_with_the_chunked_head(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.train.loop_helpers import varied_batch
    from train.loops.packing import packing_matches

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).train()
    assert packing_matches(model, varied_batch(tok), "float32")
    assert model.training  # restored


def test_freed_blocks_leave_the_resident_set(monkeypatch):
    import sys

    import psutil

    from train.loops.common import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not return_freed_memory()  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    applied = return_freed_memory()
    if not sys.platform.startswith("linux") or not applied:
        return  # another C library: nothing to check
    proc = psutil.Process()
    before = proc.memory_info().rss
    # 300 x 2 MiB, touched; blocks the heap already has free are reused (resident before, so not counted),
    # the rest is mmapped and must leave the resident set when freed (glibc's default keeps it all)
    blocks = [torch.ones(512 * 1024) for _ in range(300)]
    grown = proc.memory_info().rss - before
    del blocks
    kept = proc.memory_info().rss - before
    assert kept < 30 * 2**20, (grown, kept)
