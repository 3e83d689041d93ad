"""Generation-backend throughput (a script, not a test):

1. llm=openai against the loopback server (synth/testing/loopback.py) in a SUBPROCESS with a fixed
   latency, so the CPU figure is the client's alone. For each concurrency c, one `generate` call with
   R requests; prints requests/s, the ideal c / latency, their ratio and the client's CPU time per
   request (process CPU time / R). Both transports: `lean` (what transport=auto picks for a plain-http
   server) and `openai` (the AsyncOpenAI SDK).
2. llm=hf on the tiny model: the same prompts generated in micro-batches of 16 vs one at a time
   (greedy, alternated --repeats times, best and median; 1 torch thread unless --torch-threads).

    python bench/synth_throughput.py                       # full run (a few minutes on 2 cores)
    python bench/synth_throughput.py --requests 500 --skip-hf
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synth.llm import build_llm  # noqa: E402
from synth.llm.base import SamplingParams  # noqa: E402
from synth.records import messages  # noqa: E402


def start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "synth.testing.loopback",
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split()  # "READY <url>"
    if len(line) != 2 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"loopback server did not start: {line}")
    return proc, line[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of another process (Linux /proc), for the server's share."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_openai(url: str, transport: str, concurrency: int, n_requests: int, latency_s: float, server_pid: int) -> dict:
    llm = build_llm(
        {"kind": "openai", "base_url": url, "max_concurrency": concurrency, "transport": transport, "progress": False},
        {"name_or_path": "bench-model"},
    )
    reqs = [messages(("user", f"Summarise the principle of kindness, request {i}.")) for i in range(n_requests)]
    params = SamplingParams(temperature=0.7, max_new_tokens=64)
    llm.generate(reqs[: min(concurrency, 32)], params)  # warm-up: imports, first connections
    wall, cpu, server_cpu = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)
    out = llm.generate(reqs, params)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server_cpu = cpu_seconds(server_pid) - server_cpu
    assert len(out) == n_requests and llm.stats.retries == 0
    rps, ideal = n_requests / wall, concurrency / latency_s
    return {
        "c": concurrency,
        "n": n_requests,
        "rps": rps,
        "ideal": ideal,
        "ratio": rps / ideal,
        "cpu_ms": 1000 * cpu / n_requests,
        "server_ms": 1000 * server_cpu / n_requests,
        "load": os.getloadavg()[0],
    }


def bench_openai(args: argparse.Namespace) -> None:
    latency_s = args.latency_ms / 1000
    proc, url = start_server(args.latency_ms)
    try:
        print(f"llm=openai vs loopback server (subprocess, {args.latency_ms:g} ms latency) at {url}")
        print(
            f"{'transport':>9} {'conc':>5} {'requests':>8} {'req/s':>8} {'ideal':>7} {'ratio':>6} "
            f"{'client CPU ms/req':>18} {'server CPU ms/req':>18} {'load avg':>8}"
        )
        for transport in args.transports.split(","):
            for c in (1, 16, 64, 256):
                n = args.requests_c1 if c == 1 else args.requests
                r = run_openai(url, transport, c, n, latency_s, proc.pid)
                print(
                    f"{transport:>9} {c:>5} {n:>8} {r['rps']:>8.1f} {r['ideal']:>7.0f} {r['ratio']:>6.2f} "
                    f"{r['cpu_ms']:>18.3f} {r['server_ms']:>18.3f} {r['load']:>8.2f}",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(10)


def bench_hf(args: argparse.Namespace) -> None:
    """Batched vs one at a time, alternated `--repeats` times; best and median of each. On a shared
    2-core box another process's burst can make torch's OpenMP threads spin and one timing 10x slower,
    so a single pair of timings is not a measurement."""
    import statistics

    os.environ.setdefault("RLAIF_FORGE_HOME", tempfile.mkdtemp(prefix="rlaif-forge-bench-"))
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    llm = build_llm({"kind": "hf", "device": "cpu", "batch_size": 16}, {"name_or_path": "builtin:tiny"})
    reqs = [
        messages(("user", f"How do I bake bread at home, variant {i}? Explain step by step."))
        for i in range(args.hf_prompts)
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.hf_tokens)
    llm.generate(reqs[:2], params)  # warm-up
    times: dict[str, list[float]] = {"batched": [], "single": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        batched = llm.generate(reqs, params)
        times["batched"].append(time.perf_counter() - t)
        t = time.perf_counter()
        single = [llm.generate([r], params)[0] for r in reqs]
        times["single"].append(time.perf_counter() - t)
    same = [g[0].text for g in batched] == [g[0].text for g in single]
    tokens = sum(g[0].completion_tokens for g in batched)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nllm=hf tiny model, {len(reqs)} prompts x {args.hf_tokens} new tokens (greedy), CPU, "
        f"{args.repeats} alternating repeats, {__import__('torch').get_num_threads()} torch threads, load avg "
        f"{os.getloadavg()[0]:.2f}:"
    )
    for k, label in (("batched", "batched (batch_size 16)"), ("single", "one at a time")):
        print(f"  {label:<24} best {best[k]:6.2f} s ({tokens / best[k]:6.0f} tokens/s)   median {med[k]:6.2f} s")
    print(
        f"  speed-up: best {best['single'] / best['batched']:.1f}x, median {med['single'] / med['batched']:.1f}x"
        f"   identical outputs: {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--requests", type=int, default=2000, help="requests per run at concurrency 16/64/256")
    ap.add_argument("--requests-c1", type=int, default=50, help="requests at concurrency 1 (50 x 0.2 s = 10 s)")
    ap.add_argument("--transports", default="lean,openai")
    ap.add_argument("--hf-prompts", type=int, default=64)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="hf: torch intra-op threads for both sides (0 = torch's default). 1 by default: the tiny "
        "model gains nothing from a second thread, and two OpenMP threads on a shared 2-core box "
        "spin when another process runs, which makes single timings swing 10x",
    )
    ap.add_argument("--repeats", type=int, default=3, help="hf: alternating repeats (best and median shown)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-openai", action="store_true")
    args = ap.parse_args()
    if not args.skip_openai:
        bench_openai(args)
    if not args.skip_hf:
        bench_hf(args)


if __name__ == "__main__":
    main()
