"""Sharded synthesis against loopback servers: one process vs 4 shards in sequence (launcher=local) vs
4 shards on a local Ray cluster (launcher=ray), plus Ray's start-up overhead. CPU only.

    python bench/shards_ray.py --items 400 --latency-ms 50 --actors 2      # needs `pip install 'rlaif-forge[ray]'`

Two loopback OpenAI-compatible servers (synth/testing/loopback.py) answer after `--latency-ms`;
`pipeline=generate pipeline.n=2`. Every mode writes to a fresh folder (no cache hits) and must end with
the same sorted completions; the baseline is the single process, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cfg(urls, src, out, *extra):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return compose(
            config_name="synth",
            overrides=[
                "pipeline=generate",
                "pipeline.n=2",
                "llm=openai",
                f"llm.base_url=[{','.join(urls)}]",
                "model.name_or_path=scripted",
                "llm.max_concurrency=16",
                "source=jsonl",
                f"source.path={src}",
                f"output_dir={out}",
                "chunk_size=8",
                "progress=false",
                *extra,
            ],
        )


def main() -> None:
    from synth.app import run
    from synth.testing.loopback import LoopbackServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(args.items)))
    reply = lambda body: "answer to " + body["messages"][-1]["content"]  # noqa: E731
    servers = [LoopbackServer(responder=reply, latency_s=args.latency_ms / 1000).start() for _ in range(2)]
    urls = [s.url for s in servers]
    times, outputs = {}, {}
    modes = [
        ("one process", []),
        (f"local, {args.shards} shards", ["launcher=local", f"launcher.shards={args.shards}"]),
    ]
    try:
        import ray  # noqa: F401

        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        modes.append(
            (
                f"ray, {args.shards} shards / {args.actors} actors",
                [
                    "launcher=ray",
                    f"launcher.shards={args.shards}",
                    f"launcher.actors={args.actors}",
                    "launcher.init_num_cpus=4",
                    f"launcher.temp_dir={temp}",
                ],
            )
        )
    except ImportError:
        print("ray not installed: pip install 'rlaif-forge[ray]' to include the Ray launcher", flush=True)
    extra_info = {}
    try:
        for k, (name, overrides) in enumerate(modes):
            out = root / f"out{k}"
            t = time.perf_counter()
            m = run(cfg(urls, src, out, *overrides))
            times[name] = time.perf_counter() - t
            outputs[name] = sorted((out / "completions.jsonl").read_text().splitlines())
            if "ray" in m:
                extra_info[name] = m["ray"]["startup_s"]
    finally:
        for s in servers:
            s.stop()
    base = next(iter(times))
    print(f"\n{args.items} items x 2 samples, 2 loopback servers at {args.latency_ms:.0f} ms")
    for name, t in times.items():
        same = "same rows" if outputs[name] == outputs[base] else "ROWS DIFFER"
        note = f" (Ray cluster start-up {extra_info[name]:.1f}s of it)" if name in extra_info else ""
        print(
            f"  {name:<28} {t:6.2f}s  {args.items / t:7.1f} items/s  {t / times[base]:.2f}x the one-process "
            f"time, {same}{note}"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
