"""Per-step cost of llm=hf's sampler against transformers' own sampling, on [rows, vocab] logits.

    python bench/hf_sampler_step.py --rows 16 --vocab 49152 --iters 50
    PYTHONPATH=<other checkout> python bench/hf_sampler_step.py ...    # an older _RowSampler

The model forward is the same in both (transformers runs it), so what differs per generated token is
only this: our logits processor (per-row temperature/top-p, per-row seeded draw, one-hot scores) vs
transformers' TemperatureLogitsWarper + TopPLogitsWarper + softmax + multinomial. Minimum over
`--iters` calls (robust to a busy machine); prints microseconds per step and the ratio. The logits are
Zipf-like (p ~ rank^-1.2), as a language model's next-token distribution is.
"""

from __future__ import annotations

import argparse
import json
import time


def best(fn, iters: int) -> float:
    out = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from synth.llm.base import SamplingParams
    from synth.llm.hf import _RowSampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Zipf-like next-token distributions (p ~ rank^-1.2, a random token order per row), as language
    # models' are; a flat random distribution would make every nucleus thousands of tokens wide
    ranks = torch.stack([torch.randperm(args.vocab) for _ in range(args.rows)]).float() + 1
    logits = -1.2 * ranks.log() + 0.1 * torch.randn(args.rows, args.vocab)
    ids = torch.zeros(args.rows, 1, dtype=torch.long)
    res = {}
    for mode, p in (
        ("greedy", SamplingParams(temperature=0.0)),
        ("sampled", SamplingParams(temperature=0.7, top_p=0.9)),
    ):
        ours = _RowSampler([p] * args.rows, list(range(args.rows)), torch.device("cpu"), False, 0)
        if mode == "greedy":

            def theirs():
                return logits.argmax(-1)
        else:
            temp, top_p, gen = TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9), torch.Generator().manual_seed(0)

            def theirs():  # called within this iteration only
                s = top_p(ids, temp(ids, logits.clone()))  # noqa: B023
                return torch.multinomial(torch.softmax(s, -1), 1, generator=gen)  # noqa: B023

        a, b = best(lambda: ours(ids, logits.clone()), args.iters), best(theirs, args.iters)  # noqa: B023
        res[mode] = {"ours_us": round(a), "transformers_us": round(b), "ratio": round(a / b, 2)}
        print(mode, json.dumps(res[mode]), flush=True)


if __name__ == "__main__":
    main()
