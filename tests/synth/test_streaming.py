"""Chunks in flight and answers kept as they arrive: one concurrency bound across threads, a failed
request loses only itself, outputs identical to one chunk at a time, exact-once under kill -9 with a
3-stage pipeline whose chunks overlap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from synth.errors import BackendError
from synth.io import LEDGER, read_jsonl
from synth.llm import build_llm
from synth.llm.base import SamplingParams
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.generate import GenerateConfig, GeneratePipeline
from synth.records import SourceItem, messages
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM


def openai_llm(url: str, cache=None, **settings):
    cfg = {
        "kind": "openai",
        "base_url": url,
        "progress": False,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
        **settings,
    }
    return build_llm(cfg, {"name_or_path": "test-model"}, cache_path=cache)


def reqs(prefix: str, n: int):
    return [messages(("user", f"{prefix} {i}")) for i in range(n)]


def test_one_concurrency_bound_across_calls_from_several_threads():
    with LoopbackServer(latency_s=0.05) as server:
        llm = openai_llm(server.url, max_concurrency=4)
        outs: dict[int, list] = {}
        threads = [
            threading.Thread(target=lambda k=k: outs.update({k: llm.generate(reqs(f"t{k}", 12), SamplingParams())}))
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        llm.close()
        assert server.max_in_flight == 4  # reached, never exceeded, with 4 threads x 12 requests waiting
    assert all(len(outs[k]) == 12 and outs[k][3][0].text == f"echo: t{k} 3" for k in range(4))


def test_answers_are_cached_as_they_arrive_so_a_rerun_pays_only_for_the_failed_request(tmp_path):
    def fail_one(seq, body):
        return "500" if body and body["messages"][-1]["content"] == "q 7" else None

    with LoopbackServer(fault_fn=fail_one, latency_s=0.01) as server:
        llm = openai_llm(server.url, cache=tmp_path / "cache.sqlite", max_retries=0, max_concurrency=4)
        with pytest.raises(BackendError):
            llm.generate(reqs("q", 40), SamplingParams(max_new_tokens=8))
        llm.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "cache.sqlite") as conn:  # what the client received before the failure
        kept = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert 1 <= kept <= 39
    with LoopbackServer(latency_s=0.0) as healthy:
        llm = openai_llm(healthy.url, cache=tmp_path / "cache.sqlite")
        out = llm.generate(reqs("q", 40), SamplingParams(max_new_tokens=8))
        asked_again = {r.body["messages"][-1]["content"] for r in healthy.requests}
        llm.close()
    assert [o[0].text for o in out] == [f"echo: q {i}" for i in range(40)]
    assert "q 7" in asked_again and len(asked_again) == 40 - kept  # no answer received is paid for twice
    assert llm.stats.cache_hits == kept


def items(n):
    return [SourceItem(id=f"id{i:03d}", prompt=messages(("user", f"question {i}"))) for i in range(n)]


def test_chunks_in_flight_write_the_same_files_as_one_chunk_at_a_time(tmp_path):
    def slow_for_some(msgs, p, i):
        k = int(msgs[-1].content.split()[-1])
        time.sleep(0.02 if k % 7 == 0 else 0.0)  # early chunks finish last
        return f"answer {k}"

    for workers in (1, 4):
        ctx = Context(factories={"policy": lambda: ScriptedLLM(slow_for_some)})
        m = run_pipeline(
            GeneratePipeline(GenerateConfig(n=2)),
            ctx,
            tmp_path / str(workers),
            items(50),
            chunk_size=3,
            show_progress=False,
            chunks_in_flight=workers,
        )
        assert m["status"] == "finished" and m["processed"] == 50 and m["calls"] == {"generate": 50}
    for name in ("completions.jsonl", "trace.jsonl"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "4" / name).read_bytes()
    ledger = [json.loads(line)["ids"] for line in (tmp_path / "4" / LEDGER).read_text().splitlines()]
    assert [i for ids in ledger for i in ids] == [f"id{i:03d}" for i in range(50)]  # committed in input order


def test_a_failing_chunk_keeps_every_earlier_chunk_and_stops_the_run(tmp_path):
    def flaky(msgs, p, i):
        if msgs[-1].content == "question 10":
            raise ConnectionError("server gone")
        return "ok"

    ctx = Context(factories={"policy": lambda: ScriptedLLM(flaky)})
    with pytest.raises(ConnectionError):
        run_pipeline(
            GeneratePipeline(GenerateConfig()),
            ctx,
            tmp_path,
            items(40),
            chunk_size=2,
            show_progress=False,
            chunks_in_flight=4,
        )
    ids = [r["id"] for r in read_jsonl(tmp_path / "completions.jsonl")]
    assert ids == [f"id{i:03d}" for i in range(10)]  # chunks after the failed one are never committed
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()),
        Context(factories={"policy": lambda: ScriptedLLM(lambda *a: "ok")}),
        tmp_path,
        items(40),
        chunk_size=2,
        show_progress=False,
        chunks_in_flight=4,
    )
    assert m["processed"] == 40 and len({r["id"] for r in read_jsonl(tmp_path / "completions.jsonl")}) == 40


def test_auto_chunks_in_flight_follows_the_server_concurrency():
    from synth.app import chunks_in_flight, validate

    base = {"model": {"name_or_path": "m"}, "pipeline": {"name": "generate"}, "output_dir": "o", "chunk_size": 32}
    assert chunks_in_flight(validate({**base, "llm": {"kind": "hf"}})) == 1
    assert chunks_in_flight(validate({**base, "llm": {"kind": "openai", "max_concurrency": 64}})) == 4
    assert chunks_in_flight(validate({**base, "llm": {"kind": "openai", "max_concurrency": 256}})) == 16
    judge = {"llm": {"kind": "openai", "max_concurrency": 128}, "model": {"name_or_path": "j"}}
    assert chunks_in_flight(validate({**base, "llm": {"kind": "openai", "max_concurrency": 64}, "judge": judge})) == 8
    assert chunks_in_flight(validate({**base, "llm": {"kind": "hf"}, "judge": judge})) == 1  # hf is never shared
    assert chunks_in_flight(validate({**base, "llm": {"kind": "hf"}, "chunks_in_flight": 3})) == 3
    # vllm: enough chunks for 1,024 items, whose stage calls are merged into one engine call
    assert chunks_in_flight(validate({**base, "llm": {"kind": "vllm"}})) == 32
    assert chunks_in_flight(validate({**base, "llm": {"kind": "vllm"}, "chunk_size": 8})) == 64  # at most 64
    assert chunks_in_flight(validate({**base, "llm": {"kind": "vllm"}, "judge": judge})) == 32
    assert chunks_in_flight(validate({**base, "llm": {"kind": "vllm"}, "judge": local_judge_hf()})) == 1
    # only the roles the pipeline calls count: generate never calls an in-process judge
    local_judge = {"llm": {"kind": "hf"}, "model": {"name_or_path": "j"}}
    served = {**base, "llm": {"kind": "openai", "max_concurrency": 64}, "judge": local_judge}
    assert chunks_in_flight(validate(served), roles=("policy",)) == 4
    assert chunks_in_flight(validate(served), roles=("policy", "judge")) == 1


def local_judge_hf():
    return {"llm": {"kind": "hf"}, "model": {"name_or_path": "j"}}


def critique_responder(body):
    last = body["messages"][-1]["content"]
    return f"reply {len(last) % 97}: a careful and safe answer about {last[-40:]}"


@pytest.mark.slow
def test_kill_9_with_overlapping_chunks_of_a_three_stage_pipeline_is_exact_once(tmp_path):
    n = 48
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"how do I do thing number {i}?"}) + "\n" for i in range(n)))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "synth",
        "pipeline=critique_revision",
        "pipeline.rounds=1",
        "llm=openai",
        "model.name_or_path=scripted",
        "source=jsonl",
        f"source.path={src}",
        f"output_dir={out}",
        "chunk_size=4",
        "chunks_in_flight=4",
        "progress=false",
        "llm.max_retries=1",
    ]
    with LoopbackServer(responder=critique_responder, latency_s=0.05, jitter_s=0.1) as server:
        kills = 0
        for wait_chunks in (2, 5, 8):
            proc = subprocess.Popen(
                [*cmd, f"llm.base_url={server.url}"],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            deadline = time.time() + 120
            while (
                (not (out / LEDGER).exists() or (out / LEDGER).read_text().count("\n") < wait_chunks)
                and proc.poll() is None
                and time.time() < deadline
            ):
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        assert kills >= 2
        res = subprocess.run(
            [*cmd, f"llm.base_url={server.url}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
    assert res.returncode == 0, res.stderr
    ledger_ids = [i for line in (out / LEDGER).read_text().splitlines() for i in json.loads(line)["ids"]]
    assert len(ledger_ids) == len(set(ledger_ids)) == n
    for name in ("sft.jsonl", "preferences.jsonl"):
        ids = [r["id"] for r in read_jsonl(out / name)]
        assert len(ids) == len(set(ids))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["processed"] == n
    assert m["outputs"]["sft"] + sum(m["drops"].values()) == n


def test_inputs_are_read_lazily_a_few_chunks_ahead_of_the_workers(tmp_path):
    class CountingSource:
        """Re-iterable; records how many items the current pass has yielded."""

        def __init__(self, n):
            self.n, self.passes, self.read = n, 0, 0

        def __iter__(self):
            self.passes += 1
            self.read = 0
            for i in range(self.n):
                self.read += 1
                yield SourceItem(id=f"id{i}", prompt=messages(("user", f"question {i}")))

    src = CountingSource(2_000)
    read_at_first_chunk = []

    def respond(msgs, p, i):
        if not read_at_first_chunk:
            read_at_first_chunk.append(src.read)
        return "ok"

    ctx = Context(factories={"policy": lambda: ScriptedLLM(respond)})
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx, tmp_path, src, chunk_size=10, show_progress=False, chunks_in_flight=2
    )
    assert m["processed"] == 2_000 and src.passes == 2  # one validating pass, one lazy pass
    assert read_at_first_chunk[0] <= 10 * (2 * 2 + 1)  # not 2,000: only the queued chunks were read
