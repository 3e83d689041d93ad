"""Multi-stage pipelines against a server with latency jitter: requests/s as a share of the ideal
C / mean latency, one chunk at a time (`chunks_in_flight=1`, the old runner) against chunks in flight
(`chunks_in_flight=0`, auto), side by side in one run. With `--distilabel PYTHON` it also runs the
same generation -> critique -> revision chain as three distilabel TextGeneration steps against the same
server (distilabel lives in its own virtual environment; give its python).

    python bench/streaming_throughput.py --rows 256 --latency-ms 200 --jitter-ms 400
    python bench/streaming_throughput.py --pipelines critique_revision --distilabel /tmp/dlv/bin/python

The server runs in its own process (tests/synth/openai_server.py with a scripted responder from the
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
}


def plain(body: dict) -> str:
    """A content-agnostic answer for the distilabel comparison (both sides get the same server)."""
    last = body["messages"][-1]["content"]
    return f"A careful, safe reply of {len(last)} characters about: {last[-60:]}"


class Server:
    """tests/synth/openai_server.py in a subprocess, answering with a bench's scripted responder."""

    def __init__(self, responder: str, latency_ms: float, jitter_ms: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "synth" / "openai_server.py"),
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
    if not any(o == "pipeline=red_team" for o in overrides):
        cmd += ["source=hh_rlhf", f"source.path={DATA}", f"source.limit={rows}"]
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
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--jitter-ms", type=float, default=400.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--distilabel", default=None, help="python of a venv with distilabel[openai] installed")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-chunk-at-a-time runs (long inputs)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    mean_latency = (args.latency_ms + args.jitter_ms / 2) / 1000
    out = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
    print(
        f"{args.rows} hh-rlhf rows (red_team: 33 x 5 taxonomy items); server latency {args.latency_ms:g} ms + "
        f"U(0, {args.jitter_ms:g}) ms; ideal = C / {mean_latency:.2f} s\n"
    )
    print(
        "| pipeline | C | requests | one chunk at a time: req/s (of ideal) | chunks in flight: req/s (of "
        "ideal) | speed-up | client CPU ms/req before / after |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.pipelines:
        responder, overrides = PIPELINES[name]
        with Server(responder, args.latency_ms, args.jitter_ms) as server:
            for conc in args.concurrency:
                ideal = conc / mean_latency
                par = run_synth(server.url, out / f"{name}-{conc}-par", overrides, args.rows, conc, 0)
                rp = par["requests"] / par["wall"]
                if args.no_baseline:
                    print(
                        f"| {name} | {conc} | {par['requests']} | - | {rp:.0f} ({rp / ideal:.2f}) | - | "
                        f"- / {par['cpu_ms_per_request']:.2f} |",
                        flush=True,
                    )
                    continue
                seq = run_synth(server.url, out / f"{name}-{conc}-seq", overrides, args.rows, conc, 1)
                rs = seq["requests"] / seq["wall"]
                print(
                    f"| {name} | {conc} | {par['requests']} | {rs:.0f} ({rs / ideal:.2f}) | {rp:.0f} "
                    f"({rp / ideal:.2f}) | "
                    f"{rp / rs:.2f}x | {seq['cpu_ms_per_request']:.2f} / {par['cpu_ms_per_request']:.2f} |",
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
