"""Generation only: our online loops' `hf_generate` (train/rollout.py) against TRL 1.16's GRPOTrainer
`_generate_single_turn` (HF `generate` path, `cache_implementation="static"`: its faster option on a CPU;
`--trl-cache dynamic` for the default), same model, prompts, rows and seeds, in one process.

    python bench/rollout_generate_vs_trl.py --model smollm2 --prompts-per-step 4 --group 4 --max-new-tokens 32
    python bench/rollout_generate_vs_trl.py --profile        # + the top cProfile entries of one call each

Both get the same prompt token ids (chat template, generation prompt), G copies of each prompt (TRL's
sampler repeats prompts and `generate` prefills every row; ours prefills each prompt once and repeats
its KV cache G times), T=1, top_p 1, top_k off, and the global torch seed set to the same value before
each call, so with the same sampling process the completions are token-for-token equal (checked and
printed). Sides alternate per round; CPU seconds per call (the figure to trust on a
shared box), medians over --rounds. Also prints what each side passes to `generate` (the logits
processors and the generation config fields that differ).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dpo_vs_trl import cpu_s  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--size", choices=["20m", "135m"], default="20m")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--trl-cache", choices=["static", "dynamic"], default="static", help="TRL's cache_implementation")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from bench.grpo_vs_trl import build_inputs

    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        work = Path(tmp)
        build_inputs(work, argparse.Namespace(**vars(args), prompts=args.prompts_per_step, data="hh"))
        run(args, work)


def run(args, work: Path) -> None:
    import json

    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.app import GenerationSettings
    from train.data.prompts import encode_prompts, load_prompts
    from train.rollout import hf_generate

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts = load_prompts(str(work / "prompts.jsonl"))
    prompt_ids, _, _ = encode_prompts(prompts, tok, None, None, False)
    gen = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)

    ds = load_dataset("json", data_files=str(work / "prompts.jsonl"), split="train")
    config = trl.GRPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.prompts_per_step * args.group,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        cache_implementation=None if args.trl_cache == "dynamic" else args.trl_cache,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[lambda completion_ids, **_: [0.0] * len(completion_ids)], args=config,
        processing_class=tok, train_dataset=ds,
    )  # fmt: skip
    rows = [list(ids) for ids in prompt_ids for _ in range(args.group)]

    def ours(seed: int) -> list[list[int]]:
        r = hf_generate(trainer.model, tok, prompt_ids, args.group, gen, seed=seed)
        return [c[m].tolist() for c, m in zip(r.completion_ids, r.completion_mask, strict=True)]

    def theirs(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        trainer.model.eval()
        return trainer._generate_single_turn(rows, None, {}, args.group)[0]

    print(f"TRL generation_config (non-default): {json.dumps(trainer.generation_config.to_diff_dict())}")
    print(f"model generation_config: {json.dumps(model.generation_config.to_diff_dict())}")
    for name, fn in (("ours", ours), ("trl", theirs)):
        got = _processors(model, fn)
        print(f"{name}: logits processors {got}")
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        seed = 1000 + r
        outs = {}
        for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
            c0 = cpu_s()
            outs[side] = (ours if side == "ours" else theirs)(seed)
            times[side].append(cpu_s() - c0)
        same = outs["ours"] == outs["trl"]
        longest = max(len(c) for c in outs["ours"])
        print(
            f"round {r + 1}: ours {times['ours'][-1]:.2f} CPU-s, TRL {times['trl'][-1]:.2f} CPU-s; "
            f"completions identical: {same}; longest {longest} tokens",
            flush=True,
        )
    o, t = statistics.median(times["ours"]), statistics.median(times["trl"])
    print(
        f"{len(rows)} rows x {args.max_new_tokens} new tokens, {args.model} model, {args.threads} thread(s): "
        f"ours {o:.2f} vs TRL {t:.2f} CPU-s per generate (median of {args.rounds}) -> {t / o:.2f}x"
    )
    if args.profile:
        for name, fn in (("ours", ours), ("trl", theirs)):
            prof = cProfile.Profile()
            prof.enable()
            fn(7)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            print(f"--- cProfile {name} (tottime)\n" + "\n".join(buf.getvalue().splitlines()[:40]))


def _processors(model, fn) -> list[str]:
    """The logits-processor classes `generate` builds for this side's call (one short call)."""
    seen: list[str] = []
    inner = model._get_logits_processor

    def spy(*a, **k):
        out = inner(*a, **k)
        seen.extend(type(x).__name__ for x in out)
        return out

    model._get_logits_processor = spy
    try:
        fn(0)
    finally:
        del model._get_logits_processor
    return seen


if __name__ == "__main__":
    main()
