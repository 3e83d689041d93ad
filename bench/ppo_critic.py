"""PPO critic options side by side: `loop.critic.kind=separate` (its own model: a second copy of the base
with a LoRA critic adapter and a score head) against `adapter` (a second LoRA adapter + scalar head on the
policy's own frozen base), both under a LoRA policy, everything else equal.

Same random Llama as bench/grpo_vs_trl.py (`MODEL_20M`: 6 layers, hidden 512; `--quick`: 2 layers) with the
tiny tokenizer, synthetic prompts, the even-token rule reward, 8 prompts x 1 sample, GAE, KL 0.05 in the
reward (the reference is the base with the adapters disabled), critic from the policy's weights, float32,
one thread unless --threads. Each side runs in its own fresh subprocess; sides alternate; medians over
--repeats. Reported per side: CPU seconds of the whole run and per rollout step, wall seconds per step
(from the loop's own clocks, first step excluded), peak RSS and its rise over the process's resident set
before the run. The ratio column is adapter / separate (below 1: the adapter critic costs less).

    python bench/ppo_critic.py --quick --steps 6 --repeats 2
    python bench/ppo_critic.py --steps 6 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dpo_vs_trl import cpu_s, rss_mb  # noqa: E402
from bench.grpo_vs_trl import build_inputs  # noqa: E402


def run_side(args, work: Path) -> dict:
    import torch
    import transformers  # noqa: F401 - imported before the clock
    from hydra import compose, initialize_config_module

    import train.app
    import train.loops.online  # noqa: F401

    torch.set_num_threads(args.threads)
    baseline = rss_mb()
    out = work / f"out-{args.side}-{time.time_ns()}"  # a fresh folder per repeat
    overrides = [
        "loop=ppo",
        f"loop.critic.kind={args.side}",
        "loop.critic.init_from=policy",
        "lora.enabled=true",
        f"lora.r={args.lora_r}",
        "lora.dropout=0.0",
        f"model.name_or_path={work / 'model'}",
        f"data.path={work / 'prompts.jsonl'}",
        f"output_dir={out}",
        "loop.reward.kind=function",
        "loop.reward.function=bench.grpo_vs_trl:even_reward",
        f"loop.prompts_per_step={args.prompts_per_step}",
        "loop.samples_per_prompt=1",
        f"loop.generation.max_new_tokens={args.max_new_tokens}",
        "loop.kl.coef=0.05",
        "loop.kl.adaptive=false",
        f"optim.batch_size={args.prompts_per_step}",
        f"optim.max_steps={args.steps}",
        "optim.lr=1e-4",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0",
        f"seed={args.seed}",
        "progress=false",
        "log.plot=false",
        "log.tensorboard=false",
        "checkpoint.every_steps=0",
    ]
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    t0, c0 = time.perf_counter(), cpu_s()
    train.app.run(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["time/generate_s"] + r["time/score_s"] + r["time/update_s"] for r in rows][1:]
    return {
        "side": args.side,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_step": cpu / len(rows),
        "step_s": statistics.median(step_s) if step_s else float("nan"),
        "update_s": statistics.median(r["time/update_s"] for r in rows[1:]) if len(rows) > 1 else float("nan"),
        "peak_rss_mb": rss_mb(),
        "rise_rss_mb": rss_mb() - baseline,
        "reward": [round(r["reward/mean"], 4) for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2-layer model")
    ap.add_argument("--size", default="20m", choices=["20m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompts-per-step", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "hh"])
    ap.add_argument("--side", choices=["separate", "adapter"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # one side in this (fresh) process
        print(json.dumps(run_side(args, Path(args.work))), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="ppo-critic-"))
    build_inputs(work, args)
    results: dict[str, list[dict]] = {"separate": [], "adapter": []}
    for i in range(args.repeats):
        for side in ("separate", "adapter") if i % 2 == 0 else ("adapter", "separate"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--work", str(work)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {side}: {results[side][-1]['cpu_s']:.1f} CPU-s, {results[side][-1]['peak_rss_mb']:.0f} MB")
    keys = ["cpu_s", "cpu_s_per_step", "step_s", "update_s", "wall_s", "peak_rss_mb", "rise_rss_mb"]
    print(f"\n{'median of ' + str(args.repeats):<18}{'separate':>12}{'adapter':>12}{'adapter/sep':>14}")
    for k in keys:
        a = statistics.median(r[k] for r in results["separate"])
        b = statistics.median(r[k] for r in results["adapter"])
        print(f"{k:<18}{a:>12.2f}{b:>12.2f}{b / a:>14.3f}")
    for side in results:
        print(f"reward per step ({side}, run 1): {results[side][0]['reward']}")


if __name__ == "__main__":
    main()
