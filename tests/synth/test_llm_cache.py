"""The call cache: zero backend calls on a rerun, only missing samples fetched (in one call), the seed
contract across partial hits, two processes sharing one sqlite file."""

from __future__ import annotations

import multiprocessing as mp
import random
import sqlite3

import pytest

from synth.llm import build_llm
from synth.llm.base import Completion, SamplingParams, split_seeded
from synth.llm.cache import CachedLLM
from synth.records import messages


class CountingLLM:
    """Honours the seed contract like the real backends: a seeded sample's text depends only on
    (prompt, seed); unseeded samples are random."""

    kind = "fake"

    def __init__(self, model: str = "m", error_on: str | None = None):
        self.model, self.error_on = model, error_on
        self.calls: list[list[tuple[str, SamplingParams]]] = []

    def generate(self, requests, params):
        plist = params if isinstance(params, list) else [params] * len(requests)
        self.calls.append([(r[-1].content, p) for r, p in zip(requests, plist, strict=True)])
        return [self._samples(r[-1].content, p) for r, p in zip(requests, plist, strict=True)]

    def _samples(self, prompt, p):
        if prompt == self.error_on:
            return [Completion(text="", finish_reason="error")] * p.n
        if p.seed is None:
            return [Completion(text=f"{prompt}:rand{random.random():.12f}") for _ in range(p.n)]
        return [Completion(text=f"{prompt}:seed{u.seed}") for u in split_seeded(p)]


def reqs(k):
    return [messages(("user", f"q{i}")) for i in range(k)]


def texts(out):
    return [[c.text for c in g] for g in out]


def test_rerun_makes_zero_backend_calls(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    p = SamplingParams(n=3, temperature=1.0)  # no seed: the cache is what makes a rerun identical
    first = llm.generate(reqs(20), p)
    assert len(inner.calls) == 1 and len(inner.calls[0]) == 20
    again = CachedLLM(inner, tmp_path / "c.sqlite").generate(reqs(20), p)  # a fresh process would do this
    assert texts(again) == texts(first) and len(inner.calls) == 1
    assert llm.stats.cache_hits == 0 and llm.kind == "fake" and llm.model == "m"


def test_only_missing_samples_are_fetched_in_one_call(tmp_path):
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    llm.generate(reqs(4), SamplingParams(n=2))
    out = llm.generate(reqs(6), SamplingParams(n=5))
    assert len(inner.calls) == 2
    second = inner.calls[1]
    assert [(prompt, p.n) for prompt, p in second] == [("q0", 3), ("q1", 3), ("q2", 3), ("q3", 3), ("q4", 5), ("q5", 5)]
    assert [len(g) for g in out] == [5] * 6 and len(set(texts(out)[0])) == 5


def test_seeded_partial_hits_equal_a_fresh_run(tmp_path):
    p = SamplingParams(n=4, seed=7, temperature=1.0)
    inner = CountingLLM()
    llm = CachedLLM(inner, tmp_path / "a.sqlite")
    llm.generate(reqs(3), p.replace(n=2))
    grown = llm.generate(reqs(3), p)
    fresh = CachedLLM(CountingLLM(), tmp_path / "b.sqlite").generate(reqs(3), p)
    assert texts(grown) == texts(fresh)
    # the missing samples 2 and 3 went as n=1 requests with their own sample seeds, in one call
    assert len(inner.calls) == 2 and [p.n for _, p in inner.calls[1]] == [1] * 6


def test_key_covers_model_messages_params_but_not_n(tmp_path):
    llm = CachedLLM(CountingLLM(), tmp_path / "c.sqlite")
    r, p = reqs(1)[0], SamplingParams(temperature=0.5, seed=1)
    k = llm.key(r, p, 0)
    assert llm.key(r, p.replace(n=9), 0) == k
    assert (
        len(
            {
                k,
                llm.key(r, p, 1),
                llm.key(r, p.replace(seed=2), 0),
                llm.key(r, p.replace(temperature=0.6), 0),
                llm.key(reqs(2)[1], p, 0),
                CachedLLM(CountingLLM("other"), tmp_path / "d.sqlite").key(r, p, 0),
            }
        )
        == 6
    )


def test_errors_are_not_cached_and_duplicates_are_asked_once(tmp_path):
    inner = CountingLLM(error_on="q1")
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    dup = reqs(3) + reqs(3)
    out = llm.generate(dup, SamplingParams())
    assert len(inner.calls[0]) == 3  # the repeated requests were planned once
    assert texts(out)[:3] == texts(out)[3:] and out[1][0].finish_reason == "error"
    llm.generate(dup, SamplingParams())
    assert [prompt for prompt, _ in inner.calls[1]] == ["q1"]  # only the failed one again


def test_cache_over_a_real_backend_via_the_factory(tmp_path, openai_server):
    cfg = {"kind": "openai", "base_url": openai_server.url, "progress": False}
    llm = build_llm(cfg, {"name_or_path": "test-model"}, cache_path=tmp_path / "cache" / "calls.sqlite")
    assert type(llm).__name__ == "CachedLLM" and "sk-" not in repr(llm)
    first = llm.generate(reqs(5), SamplingParams(n=2))
    n_http = len(openai_server.chat_requests())
    second = build_llm(cfg, {"name_or_path": "test-model"}, cache_path=tmp_path / "cache" / "calls.sqlite").generate(
        reqs(5), SamplingParams(n=2)
    )
    assert texts(first) == texts(second) and len(openai_server.chat_requests()) == n_http == 5


def test_wal_mode(tmp_path):
    CachedLLM(CountingLLM(), tmp_path / "c.sqlite").generate(reqs(1), SamplingParams())
    with sqlite3.connect(tmp_path / "c.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _worker(path: str, offset: int, rounds: int, queue) -> None:
    llm = CachedLLM(CountingLLM(), path)
    out = []
    for r in range(rounds):  # overlapping key ranges, written while the other process writes
        batch = [messages(("user", f"q{i}")) for i in range(offset + r * 10, offset + r * 10 + 40)]
        out.append(texts(llm.generate(batch, SamplingParams(n=2))))
    queue.put(out)


@pytest.mark.timeout(120)
def test_two_processes_share_one_db(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, off, 6, queue)) for off in (0, 20)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    assert rows == 2 * (20 + 5 * 10 + 40)  # every (prompt, sample) stored once: q0..q109 x 2
    inner = CountingLLM()
    final = CachedLLM(inner, path).generate([messages(("user", f"q{i}")) for i in range(110)], SamplingParams(n=2))
    assert inner.calls == []  # all cached
    stored = {g[0].split(":")[0]: g for g in texts(final)}
    for out in results:  # what each process returned is what the file holds (first writer wins)
        for batch in out:
            for g in batch:
                assert stored[g[0].split(":")[0]] == g
