"""DPO throughput and peak memory: our `train loop=preference loss=dpo` against TRL's DPOTrainer.

Same ~20M-parameter random Llama (6 layers, hidden 512; built here with the tiny model's tokenizer and
ChatML template), the same 256 preference pairs (hh-rlhf harmless-base test: the first 256 pairs whose
prompt + longer response fit max_length, so neither side truncates; `--data synthetic` without the
file), batch size, max_length, dtype (float32), optimizer (AdamW, same lr, constant schedule, no
warm-up, clipping 1.0), steps (one epoch) and torch threads; each side in its own fresh subprocess,
alternating when repeated.

TRL runs at its best reasonable CPU settings (a fair baseline): bf16=False, gradient_checkpointing=False,
precompute_ref_log_probs=True (one model in memory, like ours) with the same precompute batch size as
ours, no logging/saving/eval during training, no dataloader workers. (TRL 1.16's padding_free is
disabled in its code, "temporarily unavailable after a refactor", so it computes on padded rows.)
Ours runs the shipped loop with its defaults: precomputed reference log-probs, one concatenated
chosen+rejected forward, rows packed end to end (optim.packing=true; `--no-packing` for padded rows).

Reported per side (medians over --repeats):
  end-to-end  samples/s from the data file to the trained model: tokenisation, reference pass, training
              (ours also saves final/ and a resumable checkpoint; TRL saves its final model); CPU s is
              the process CPU time over the same span (steadier than wall time on a busy machine)
  steps       samples/s of the training steps alone (end of step 1 to end of the last step)
  peak RSS    the process's resident-set high-water mark (ru_maxrss), and above its post-import baseline

    python bench/dpo_vs_trl.py --repeats 2             # 256 pairs, batch 8, 32 steps (one epoch)
    python bench/dpo_vs_trl.py --quick --steps 4       # smoke run (2-layer model)
    python bench/dpo_vs_trl.py --device cuda --size 135m --pairs 512 --batch-size 16 --repeats 3

On `--device cuda` both sides train with bf16 autocast over float32 weights (ours
optim.mixed_precision=bf16, TRL bf16=True), and the memory column is torch.cuda.max_memory_allocated;
`--size 135m` is SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads) with random weights.

The last line prints ours/TRL ratios (throughput > 1 and memory < 1 favour ours).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL_20M = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)
MODEL_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
)  # SmolLM2-135M's shape


def peak_mb(device: str) -> float:
    """The side's peak memory: resident set on CPU, allocated device memory on CUDA."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mb()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def cpu_s() -> float:
    """CPU seconds of this process (all threads): less sensitive than wall time to a busy machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------ shared inputs


HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def random_llama(spec: dict, seed: int, folder: Path):
    """A randomly initialised Llama of shape `spec` (MODEL_20M, MODEL_135M) with the tiny model's tokenizer
    and ChatML template (synth/tiny.py), saved with the tokenizer to `folder` -> (model, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from synth.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def build_inputs(
    work: Path, n_pairs: int, seed: int, model_spec: dict, max_length: int, data: str
) -> tuple[Path, Path]:
    """A random ~20M-parameter Llama with the tiny model's tokenizer + chat template, and n pairs.

    data=hh: the first n hh-rlhf (harmless-base test) pairs whose prompt + longer response fit max_length
    tokens, so neither side truncates (real, long-tailed lengths); data=synthetic: random corpus words."""
    from synth.records import PreferenceRecord, messages
    from synth.tiny import _CORPUS_EN

    model, tok = random_llama(model_spec, seed, work / "model")
    n_params = sum(p.numel() for p in model.parameters())

    rows = []
    if data == "hh":
        from train.data import TokenizeConfig, load_records, tokenize_dataset

        canon = load_records(HH_RLHF, limit=8 * n_pairs)
        ids, _ = tokenize_dataset(canon, tok, TokenizeConfig(max_length=None, max_prompt_length=None))
        fits = [
            len(p) + max(len(c), len(r)) <= max_length
            for p, c, r in zip(ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], strict=True)
        ]
        for row, ok in zip(canon, fits, strict=True):
            if ok and len(rows) < n_pairs:
                rows.append(
                    {
                        "id": f"hh{row['id']}",
                        "prompt": row["prompt"],
                        "chosen": row["chosen"],
                        "rejected": row["rejected"],
                    }
                )
        if len(rows) < n_pairs:
            sys.exit(f"only {len(rows)} hh-rlhf pairs fit max_length={max_length}")
        lines = [json.dumps(r) for r in rows]
        source = f"hh-rlhf harmless-base test, first {n_pairs} pairs that fit {max_length} tokens"
    else:
        words = _CORPUS_EN.split()
        rng = random.Random(seed)
        lines = []
        for i in range(n_pairs):
            prompt = " ".join(rng.choices(words, k=rng.randint(20, 40)))
            lines.append(
                PreferenceRecord(
                    id=f"b{i}",
                    method="bench",
                    prompt=messages(("user", prompt)),
                    chosen=messages(("assistant", " ".join(rng.choices(words, k=rng.randint(15, 35))))),
                    rejected=messages(("assistant", " ".join(rng.choices(words, k=rng.randint(15, 35))))),
                ).to_json()
            )
        source = "synthetic corpus words"
    path = work / "preferences.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    print(f"model: {n_params / 1e6:.1f}M parameters, vocab {len(tok)}; data: {n_pairs} pairs ({source})", flush=True)
    return work / "model", path


# ------------------------------------------------------------------------------------ the two sides


def run_ours(args, model_dir: Path, data: Path, out: Path) -> dict:
    # import what the run uses before the clock and the memory baseline start, as TRL's side does
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import train.app
    import train.loops.preference  # noqa: F401
    import train.reference  # noqa: F401

    baseline = peak_mb(args.device)
    overrides = [
        "loop=preference",
        "loss=dpo",
        f"model.name_or_path={model_dir}",
        f"data.path={data}",
        f"output_dir={out}",
        f"optim.batch_size={args.batch_size}",
        f"optim.max_steps={args.steps}",
        f"optim.lr={args.lr}",
        "optim.warmup_ratio=0",
        "optim.scheduler=constant",
        "optim.max_grad_norm=1.0",
        "optim.dtype=float32",
        f"optim.mixed_precision={'bf16' if args.device == 'cuda' else 'no'}",
        f"data.max_length={args.max_length}",
        f"loop.reference.batch_size={2 * args.batch_size}",
        f"seed={args.seed}",
        "progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "checkpoint.every_steps=0",
        f"optim.packing={str(not args.no_packing).lower()}",
    ]
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    t0, c0 = time.perf_counter(), cpu_s()
    if args.profile:  # where our side's time goes: torch.profiler's op table, written to --profile
        import torch

        kinds = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else []
        )
        with torch.profiler.profile(activities=kinds) as prof:
            summary = train.app.run(cfg)
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        Path(args.profile).write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            + "\n\n"
            + prof.key_averages().table(sort_by=sort, row_limit=25)
        )
    else:
        summary = train.app.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time_s"] for r in rows if "time_s" in r]
    return {
        "side": "ours",
        "steps": summary["steps"],
        "samples": summary["samples"],
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_s": times[-1] - times[0],
        "final_loss": rows[-1]["loss"],
        "peak_rss_mb": peak_mb(args.device),
        "baseline_rss_mb": baseline,
    }


def run_trl(args, model_dir: Path, data: Path, out: Path) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    baseline = peak_mb(args.device)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter())

    clock = StepClock()
    t0, c0 = time.perf_counter(), cpu_s()
    ds = load_dataset("json", data_files=str(data), split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = trl.DPOConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        bf16=args.device == "cuda",
        fp16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=2 * args.batch_size,
        max_length=args.max_length,
        beta=0.1,
        loss_type=["sigmoid"],
        report_to=[],
        logging_steps=args.steps,
        save_strategy="no",
        eval_strategy="no",
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[clock])
    result = trainer.train()
    trainer.save_model(str(out / "final"))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "side": "trl",
        "steps": result.global_step,
        "samples": result.global_step * args.batch_size,
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_s": clock.times[-1] - clock.times[0],
        "final_loss": losses[-1] if losses else None,
        "peak_rss_mb": peak_mb(args.device),
        "baseline_rss_mb": baseline,
        "trl": trl.__version__,
    }


# ------------------------------------------------------------------------------------ driver


def child(args) -> None:
    if args.no_cudnn_sdp:  # both sides: leave cuDNN out of torch's attention dispatch
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    work = Path(args.work)
    fn = run_ours if args.side == "ours" else run_trl
    result = fn(args, work / "model", work / "preferences.jsonl", work / f"out-{args.side}")
    print("RESULT " + json.dumps(result), flush=True)


def median_run(runs: list[dict]) -> dict:
    """Per-field median over repeats (peak memory: the largest)."""
    import statistics

    out = dict(runs[0])
    for key in ("wall_s", "steps_s", "cpu_s"):
        out[key] = statistics.median(r[key] for r in runs)
    for key in ("peak_rss_mb", "baseline_rss_mb"):
        out[key] = max(r[key] for r in runs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="default: one epoch (pairs / batch size)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--data", choices=["hh", "synthetic"], default="hh" if HH_RLHF.exists() else "synthetic")
    p.add_argument("--no-packing", action="store_true", help="ours without sequence packing (padded forward)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; medians reported")
    p.add_argument("--quick", action="store_true", help="a 2-layer model instead of the ~20M one (smoke run)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--no-cudnn-sdp",
        action="store_true",
        help="both sides: torch.backends.cuda.enable_cudnn_sdp(False) (our train loops do it on CUDA anyway)",
    )
    p.add_argument("--profile", help="write torch.profiler's op tables of our side to this file (slows it down)")
    p.add_argument("--size", choices=["20m", "135m"], default="20m", help="the random model's shape")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or args.pairs // args.batch_size
    if args.side:
        return child(args)

    import torch

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(tmp)
        spec = MODEL_135M if args.size == "135m" else MODEL_20M
        spec = dict(spec, num_hidden_layers=2) if args.quick else spec
        build_inputs(work, args.pairs, args.seed, spec, args.max_length, args.data)
        env = {
            **os.environ,
            "RLAIF_FORGE_HOME": str(work / "home"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.repeats):  # alternate the sides so that machine noise hits both alike
            for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--work",
                    str(work),
                    "--pairs",
                    str(args.pairs),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                    "--max-length",
                    str(args.max_length),
                    "--lr",
                    str(args.lr),
                    "--seed",
                    str(args.seed),
                    "--device",
                    args.device,
                ]
                cmd += ["--profile", str(Path(args.profile).resolve())] if args.profile and side == "ours" else []
                cmd += ["--no-cudnn-sdp"] if args.no_cudnn_sdp else []
                cmd += ["--no-packing"] if args.no_packing else []
                # a cold start for both: TRL caches tokenised data and reference log-probs in the datasets cache,
                # ours in <output_dir>/reference_cache; neither may reuse an earlier run's
                run_env = {**env, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{side}-{r}")}
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{side} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
                runs[side].append(json.loads(line[len("RESULT ") :]))
                print(f"run {r + 1} {side}: {runs[side][-1]['wall_s']:.1f}s", flush=True)
                for p in [*work.glob(f"out-{side}"), *work.glob("hf-datasets-*")]:
                    shutil.rmtree(p)
        results = {side: median_run(rs) for side, rs in runs.items()}

    print(
        f"\n{args.pairs} pairs ({args.data}), batch {args.batch_size}, {args.steps} steps, max_length "
        f"{args.max_length}, "
        f"{'bf16 autocast on cuda' if args.device == 'cuda' else 'float32'}, {args.size} model, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, TRL {results['trl'].get('trl')}, "
        f"ours {'padded' if args.no_packing else 'packed rows'}"
    )
    print(
        f"{'side':<6}{'end-to-end s':>14}{'samples/s':>11}{'CPU s':>9}{'steps s':>10}{'samples/s':>11}"
        f"{'peak MB':>13}{'above import':>14}{'final loss':>12}"
    )
    for side, r in results.items():
        r["e2e_sps"] = r["samples"] / r["wall_s"]
        r["steps_sps"] = (r["steps"] - 1) * args.batch_size / r["steps_s"]
        r["above_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
        print(
            f"{side:<6}{r['wall_s']:>14.1f}{r['e2e_sps']:>11.2f}{r['cpu_s']:>9.1f}{r['steps_s']:>10.1f}"
            f"{r['steps_sps']:>11.2f}{r['peak_rss_mb']:>13.0f}{r['above_mb']:>14.0f}{r['final_loss']:>12.4f}"
        )
    o, t = results["ours"], results["trl"]
    print(
        f"ours/TRL: throughput {o['e2e_sps'] / t['e2e_sps']:.2f}x end-to-end (CPU time "
        f"{t['cpu_s'] / o['cpu_s']:.2f}x), "
        f"{o['steps_sps'] / t['steps_sps']:.2f}x training steps; peak memory "
        f"{o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x "
        f"({o['above_mb'] / t['above_mb']:.2f}x above imports)"
    )


if __name__ == "__main__":
    main()
