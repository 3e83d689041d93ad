"""In-process engines with chunks in flight: the concurrent stage calls of the chunks become ONE engine
call with all their requests (synth.llm.merge), every caller gets its own results back, and the rows are
byte-identical to one chunk at a time."""

from __future__ import annotations

import threading

import pytest

from synth.constitution import load_constitution
from synth.llm.base import SamplingParams
from synth.llm.merge import CallMerger, MergedLLM
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.critique_revision import CritiqueRevisionConfig, CritiqueRevisionPipeline
from synth.records import SourceItem, messages
from tests.fakes import ScriptedLLM
from tests.synth.test_critique_revision import cai_responder


class FakeEngine(ScriptedLLM):
    """An in-process backend (kind "vllm") that records the size of every engine call; refuses to be
    entered by two threads at once, as vLLM's offline engine must not be."""

    kind = "vllm"

    def __init__(self, responder):
        super().__init__(responder)
        self.sizes: list[int] = []
        self._entered = threading.Lock()

    def generate(self, requests, params):
        assert self._entered.acquire(blocking=False), "two engine calls at once"
        try:
            self.sizes.append(len(requests))
            return super().generate(requests, params)
        finally:
            self._entered.release()


def echo(msgs, p, i):
    return f"{msgs[-1].content} | t={p.temperature} | sample {i}"


def reqs(prefix, n):
    return [messages(("user", f"{prefix} {k}")) for k in range(n)]


def run_workers(merger, llm, jobs):
    """One thread per (requests, params), each announced to the merger as a chunk, like the runner does."""
    results: dict[int, list] = {}
    for _ in jobs:
        merger.chunk_started()

    def worker(k, requests, params):
        try:
            results[k] = llm.generate(requests, params)
        finally:
            merger.chunk_finished()

    threads = [threading.Thread(target=worker, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_k_chunks_of_one_stage_make_one_engine_call_and_each_gets_its_own_results():
    engine = FakeEngine(echo)
    merger = CallMerger(workers=4)
    llm = merger.wrap(engine)
    assert isinstance(llm, MergedLLM) and llm.kind == "vllm" and llm.model == engine.model
    jobs = [
        (reqs("a", 3), SamplingParams(temperature=0.1)),
        (reqs("b", 5), SamplingParams(temperature=0.2, n=2)),
        (reqs("c", 1), [SamplingParams(temperature=0.3)]),
        (reqs("d", 4), SamplingParams(temperature=0.4)),
    ]
    results = run_workers(merger, llm, jobs)
    assert engine.sizes == [13] and merger.engine_calls == [13]  # one call holding all 3 + 5 + 1 + 4 requests
    assert [p.temperature for p in engine.calls[0][1]].count(0.2) == 5  # each request kept its own params
    for k, (requests, _) in enumerate(jobs):
        t = [0.1, 0.2, 0.3, 0.4][k]
        want = [[f"{r[-1].content} | t={t} | sample {i}" for i in range(2 if k == 1 else 1)] for r in requests]
        assert [[c.text for c in comps] for comps in results[k]] == want


def test_a_caller_the_runner_did_not_announce_never_waits():
    engine = FakeEngine(echo)
    llm = CallMerger(workers=4).wrap(engine)
    out = llm.generate(reqs("x", 2), SamplingParams())  # no chunk announced: runs at once
    assert [o[0].text for o in out] == ["x 0 | t=1.0 | sample 0", "x 1 | t=1.0 | sample 0"]
    assert llm.generate([], SamplingParams()) == [] and engine.sizes == [2]


def test_servers_are_not_wrapped_and_wrapping_is_idempotent():
    merger = CallMerger(workers=2)
    server = ScriptedLLM(echo)  # kind "fake": not an in-process engine
    assert merger.wrap(server) is server
    engine = FakeEngine(echo)
    assert merger.wrap(engine) is merger.wrap(merger.wrap(engine))


def test_an_engine_error_reaches_every_chunk_of_the_merged_call_and_the_merger_stays_usable():
    def fail(msgs, p, i):
        if msgs[-1].content == "b 1":
            raise RuntimeError("CUDA out of memory")
        return "ok"

    engine = FakeEngine(fail)
    merger = CallMerger(workers=2)
    llm = merger.wrap(engine)
    errors: list[BaseException] = []

    def call(prefix):
        try:
            llm.generate(reqs(prefix, 2), SamplingParams())
        except RuntimeError as e:
            errors.append(e)
        finally:
            merger.chunk_finished()

    merger.chunk_started()
    merger.chunk_started()
    threads = [threading.Thread(target=call, args=(p,)) for p in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert engine.sizes == [4] and len(errors) == 2 and "out of memory" in str(errors[0])
    assert llm.generate(reqs("c", 1), SamplingParams())[0][0].text == "ok"  # nothing left waiting


def test_a_worker_still_building_prompts_is_waited_for():
    engine = FakeEngine(echo)
    merger = CallMerger(workers=2)
    llm = merger.wrap(engine)
    merger.chunk_started()
    merger.chunk_started()
    first_done = threading.Event()
    out: dict[str, list] = {}

    def early():
        out["a"] = llm.generate(reqs("a", 2), SamplingParams())
        first_done.set()
        merger.chunk_finished()

    t = threading.Thread(target=early)
    t.start()
    assert not first_done.wait(0.3)  # the other chunk has not made its call yet: no engine call
    assert engine.sizes == []
    out["b"] = llm.generate(reqs("b", 3), SamplingParams())
    merger.chunk_finished()
    t.join(10)
    assert engine.sizes == [5] and out["a"][1][0].text.startswith("a 1") and out["b"][2][0].text.startswith("b 2")


def prompts(n):
    return [SourceItem(id=f"id{k:03d}", prompt=messages(("user", f"how do I fix thing {k}?"))) for k in range(n)]


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_multi_stage_pipeline_writes_the_same_rows_with_merged_engine_calls(tmp_path, rounds):
    files = {}
    sizes = {}
    for workers in (1, 4):
        engine = FakeEngine(cai_responder())
        ctx = Context(factories={"policy": lambda e=engine: e}, constitution=load_constitution("hhh_en"), seed=3)
        out = tmp_path / f"{rounds}-{workers}"
        m = run_pipeline(
            CritiqueRevisionPipeline(CritiqueRevisionConfig(rounds=rounds)),
            ctx,
            out,
            prompts(64),
            chunk_size=8,
            show_progress=False,
            chunks_in_flight=workers,
        )
        assert m["status"] == "finished" and m["processed"] == 64 and ctx.merger is None
        files[workers] = {name: (out / name).read_bytes() for name in ("sft.jsonl", "preferences.jsonl", "trace.jsonl")}
        sizes[workers] = engine.sizes
    assert files[4] == files[1]  # byte-identical rows and trace
    stages = 1 + 2 * rounds  # initial answer, then critique + revision per round
    assert sizes[1] == [8] * (8 * stages)  # one chunk at a time: one call of 8 per stage per chunk
    # 4 chunks in flight: their calls of a stage merged; every call holds 4 chunks' requests, and every
    # request is made exactly once
    assert sizes[4] == [32] * (2 * stages)


def test_synth_with_llm_vllm_merges_the_chunks_in_flight_by_default(tmp_path):
    """The whole `synth` path: llm=vllm (a fake engine in place of vllm.LLM), chunks_in_flight auto."""
    from synth.app import run_config, validate

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(f'{{"prompt": "question {k}"}}\n' for k in range(96)))
    engines: list[FakeEngine] = []

    def build_llm(llm_cfg, model_cfg, cache_path=None):
        assert llm_cfg["kind"] == "vllm"
        engines.append(FakeEngine(echo))
        return engines[-1]

    cfg = validate(
        {
            "llm": {"kind": "vllm"},
            "model": {"name_or_path": "m"},
            "pipeline": {"_target_": "synth.pipelines.generate.GeneratePipeline", "name": "generate", "n": 2},
            "source": {"kind": "jsonl", "path": str(src)},
            "output_dir": str(tmp_path / "out"),
            "chunk_size": 8,
            "progress": False,
            "cache": False,
        }
    )
    m = run_config(cfg, build_llm=build_llm)
    assert m["status"] == "finished" and m["processed"] == 96 and len(engines) == 1
    assert engines[0].sizes == [96]  # 12 chunks of 8 in flight: ONE engine call
