"""`python -m tests.train.online_ddp_entry <train overrides>`: the `train` command with the rollout
generator replaced by a deterministic one whose completions depend only on the prompt and on how often
it has been sampled, not on the process that samples it. One process and two processes then see the
same rollouts, so their updates can be compared exactly (tests/train/test_online_distributed.py)."""

from __future__ import annotations

import torch

import train.loops.online as online
from train.rollout import Rollout, eos_token_ids, left_pad

_seen: dict[tuple, int] = {}


def fake_generate(model, tokenizer, prompts, n, gen, *, seed, greedy=False, device=None):
    eos = eos_token_ids(getattr(model, "module", model), tokenizer)[0]
    rows = []
    for p in prompts:
        k = _seen.get(tuple(p), 0)
        _seen[tuple(p)] = k + 1
        g = torch.Generator().manual_seed(hash((tuple(p), k)) % 2**31)  # int tuples hash alike in every process
        for _j in range(n):
            length = int(torch.randint(2, gen.max_new_tokens + 1, (1,), generator=g))
            body = torch.randint(10, len(tokenizer), (length,), generator=g).tolist()
            rows.append(body[:-1] + [eos] if length < gen.max_new_tokens else body)
    width = gen.max_new_tokens
    comp = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
    truncated = torch.tensor([r[-1] != eos for r in rows])
    pid, pmask = left_pad([list(p) for p in prompts for _ in range(n)], tokenizer.pad_token_id)
    return Rollout(pid, pmask, comp, mask, truncated, torch.arange(len(prompts)).repeat_interleave(n))


if __name__ == "__main__":
    online.hf_generate = fake_generate
    from train.__main__ import main

    main()
