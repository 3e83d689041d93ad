"""Multi-stage pipelines against a server with latency jitter: requests/s as a share of the ideal
C / mean latency, one chunk at a time (`chunks_in_flight=1`, the old runner) against chunks in flight
(`chunks_in_flight=0`, auto), side by side in one run. With `--distilabel PYTHON` it also runs the
same generation -> critique -> revision chain as three distilabel TextGeneration steps against the same
server (distilabel lives in its own virtual environment; give its python).

    python bench/streaming_throughput.py --rows 256 --latency-ms 200 --jitter-ms 400
    python bench/streaming_throughput.py --pipelines critique_revision --distilabel /tmp/dlv/bin/python
    python bench/streaming_throughput.py --rows 2048 --concurrency 256 --no-baseline --ceiling

`--ceiling` also measures a bare asyncio client (keep-alive connections, nothing but the HTTP exchange)
with the same number of requests right after each run: on a shared machine the server's answers come
later than its scripted latency, and "ours / bare" separates what the runner loses from what the load
takes. Each row records the 1-minute load average at the start of its runs.

The server runs in its own process (synth/testing/loopback.py with a scripted responder from the
other benches), so the client's CPU is measured apart: CPU seconds of the `synth` process per request
(Python start-up and imports included, the same in both modes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SAFETY = "bench.safety_pipelines_loopback:responder"
RANKING = "bench.ranking_pipelines_loopback:responder"
PIPELINES: dict[str, tuple[str, list[str]]] = {
    "critique_revision": (SAFETY, ["pipeline=critique_revision", "pipeline.rounds=1"]),
    "ai_feedback": (SAFETY, ["pipeline=ai_feedback"]),
    "judge": (RANKING, ["pipeline=judge", "source.turns=all"]),
    "self_rewarding": (RANKING, ["pipeline=self_rewarding"]),
    "rlrf": (RANKING, ["pipeline=rlrf"]),
    "red_team": ("scripts.demo_server:respond", ["pipeline=red_team", "constitution=safety_zh"]),
    # seeds mode: the attack prompts are hh-rlhf prompts (as many as --rows), answered and judged
    "red_team_seeds": (
        "scripts.demo_server:respond",
        ["pipeline=red_team", "constitution=safety_zh", "pipeline.seeds=true"],
    ),
}


def plain(body: dict) -> str:
    """A content-agnostic answer for the distilabel comparison (both sides get the same server)."""
    last = body["messages"][-1]["content"]
    return f"A careful, safe reply of {len(last)} characters about: {last[-60:]}"


class Server:
    """synth/testing/loopback.py in a subprocess, answering with a bench's scripted responder."""

    def __init__(self, responder: str, latency_ms: float, jitter_ms: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synth.testing.loopback",
                "--latency-ms",
                str(latency_ms),
                "--jitter-ms",
                str(jitter_ms),
                "--responder",
                responder,
                "--model",
                "loopback",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"server did not start: {line}")
        self.url = line[1]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_synth(url: str, out: Path, overrides: list[str], rows: int, conc: int, in_flight: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "synth",
        *overrides,
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=loopback",
        f"llm.max_concurrency={conc}",
        "llm.progress=false",
        f"chunks_in_flight={in_flight}",
        "cache=false",
        "progress=false",
        f"output_dir={out}",
    ]
    if "pipeline=red_team" not in overrides or "pipeline.seeds=true" in overrides:
        cmd += ["source=hh_rlhf", f"source.path={DATA}", f"source.limit={rows}"]
    load = os.getloadavg()[0]  # the machine is shared: a figure means little without it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"synth failed ({res.returncode}): {res.stderr[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    requests = sum(m["calls"].values())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "requests": requests,
        "wall": m["wall_time_s_this_run"],
        "cpu_ms_per_request": 1000 * cpu / max(requests, 1),
        "load": load,
    }


def bare_client(url: str, requests: int, conc: int) -> float:
    """req/s of the thinnest possible client: `conc` keep-alive connections, each sending a small body
    as soon as its last answer is read, `requests` in all, nothing else (no prompts, parsing, cache or
    commits). On a shared machine this is the ceiling the server and the load allow right now."""
    import asyncio
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body = json.dumps({"model": "loopback", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    head = f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(body)}\r\n\r\n"
    left = [requests]

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(head.encode() + body)
            size = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    size = int(line.split(b":")[1])
            await reader.readexactly(size)
        writer.close()

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(connection() for _ in range(conc)))
        return requests / (time.perf_counter() - t)

    return asyncio.run(main())


DISTILABEL_CHAIN = r"""
import json, sys, time
from distilabel.models import OpenAILLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration

url, rows, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
CRITIQUE = ("{{ instruction }}\n\n{{ answer }}\n\n"
            "Identify specific ways in which the reply is harmful; do not rewrite the reply yet.")
REVISION = "{{ instruction }}\n\n{{ critique }}\n\nRewrite the reply; if it is already fine, repeat it unchanged."
def llm():
    return OpenAILLM(model="loopback", base_url=url, api_key="EMPTY", max_retries=0, timeout=120,
                     generation_kwargs={"max_new_tokens": 256})
with Pipeline(name="bench-cai") as pipe:
    load = LoadDataFromDicts(data=[{"instruction": r} for r in rows], batch_size=batch)
    answer = TextGeneration(llm=llm(), input_batch_size=batch, output_mappings={"generation": "answer"})
    critique = TextGeneration(llm=llm(), input_batch_size=batch, template=CRITIQUE,
                              columns=["instruction", "answer"], output_mappings={"generation": "critique"})
    revision = TextGeneration(llm=llm(), input_batch_size=batch, template=REVISION,
                              columns=["instruction", "critique"], output_mappings={"generation": "revision"})
    load >> answer >> critique >> revision
t = time.time()
ds = pipe.run(use_cache=False)
print(json.dumps({"wall": time.time() - t, "rows": len(ds["default"]["train"])}))
"""


def run_distilabel(python: str, url: str, rows: int, batch: int) -> dict:
    from synth.sources import SourceConfig, iter_source

    prompts = [it.prompt_text for it in iter_source(SourceConfig(kind="hh_rlhf", path=str(DATA), limit=rows))]
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [python, "-c", DISTILABEL_CHAIN, url, json.dumps(prompts), str(batch)],
            capture_output=True,
            text=True,
            cwd=tmp,
            env={**os.environ, "DISTILABEL_CACHE_DIR": tmp},
        )
    if res.returncode != 0:
        raise RuntimeError(f"distilabel failed: {res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {"requests": 3 * out["rows"], "wall": out["wall"]}


def run_row(args, url: str, out: Path, name: str, overrides: list[str], conc: int) -> dict:
    """One table row: chunks in flight (auto); optionally the bare-client ceiling, measured right after
    with the same number of requests (the load changes by the minute), and one chunk at a time."""
    par = run_synth(url, out / f"{name}-{conc}-par", overrides, args.rows, conc, 0)
    bare = None
    if args.ceiling:
        with Server("bench.streaming_throughput:plain", args.latency_ms, args.jitter_ms) as plain_server:
            bare = bare_client(plain_server.url, par["requests"], conc)
    seq = None if args.no_baseline else run_synth(url, out / f"{name}-{conc}-seq", overrides, args.rows, conc, 1)
    return {"par": par, "seq": seq, "bare": bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--jitter-ms", type=float, default=400.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--distilabel", default=None, help="python of a venv with distilabel[openai] installed")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-chunk-at-a-time runs (long inputs)")
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="before each run, measure a bare client's req/s with the same requests and C (the machine's ceiling now)",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    mean_latency = (args.latency_ms + args.jitter_ms / 2) / 1000
    out = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
    print(
        f"{args.rows} hh-rlhf rows (red_team: 33 x 5 taxonomy items); server latency {args.latency_ms:g} ms + "
        f"U(0, {args.jitter_ms:g}) ms; ideal = C / {mean_latency:.2f} s\n"
    )
    print(
        "| pipeline | C | requests | one chunk at a time: req/s (of ideal) | chunks in flight: req/s (of ideal) | "
        "speed-up | client CPU ms/req before / after | bare client: req/s (of ideal); ours / bare | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.pipelines:
        responder, overrides = PIPELINES[name]
        with Server(responder, args.latency_ms, args.jitter_ms) as server:
            for conc in args.concurrency:
                ideal = conc / mean_latency
                row = run_row(args, server.url, out, name, overrides, conc)
                par, seq, bare = row["par"], row["seq"], row["bare"]
                rp = par["requests"] / par["wall"]
                rs = seq["requests"] / seq["wall"] if seq else None
                before = f"{rs:.0f} ({rs / ideal:.2f})" if rs else "-"
                speedup = f"{rp / rs:.2f}x" if rs else "-"
                cpu = f"{seq['cpu_ms_per_request']:.2f}" if seq else "-"
                ceiling = f"{bare:.0f} ({bare / ideal:.2f}); {rp / bare:.2f}" if bare else "-"
                loads = "/".join(f"{r['load']:.1f}" for r in (seq, par) if r)
                print(
                    f"| {name} | {conc} | {par['requests']} | {before} | {rp:.0f} ({rp / ideal:.2f}) | {speedup} | "
                    f"{cpu} / {par['cpu_ms_per_request']:.2f} | {ceiling} | {loads} |",
                    flush=True,
                )
    if args.distilabel:
        with Server("bench.streaming_throughput:plain", args.latency_ms, args.jitter_ms) as server:
            conc = args.concurrency[0]
            dl = run_distilabel(args.distilabel, server.url, args.rows, conc)
            ours = run_synth(
                server.url, out / "cai-vs-distilabel", PIPELINES["critique_revision"][1], args.rows, conc, 0
            )
        ideal = conc / mean_latency
        rd, ro = dl["requests"] / dl["wall"], ours["requests"] / ours["wall"]
        print(
            f"\ngeneration -> critique -> revision, {args.rows} rows, C = batch = {conc}: distilabel {rd:.0f} req/s "
            f"({rd / ideal:.2f} of ideal), ours {ro:.0f} req/s ({ro / ideal:.2f}); ours / distilabel = {ro / rd:.2f}x"
        )


if __name__ == "__main__":
    main()
