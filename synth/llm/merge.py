"""One engine call for the chunks in flight: the `generate` calls that chunk workers make at the same time
are merged into ONE call of an in-process backend (vLLM's offline engine), and each caller gets its own
results back.

Why: against a server, several chunks in flight keep the server's concurrency full by themselves. An
in-process engine is different: vLLM schedules whatever ONE `LLM.chat` call hands it (continuous
batching), so a call with one chunk's 32 requests ends in a tail where a few long answers decode while
the GPU idles, and the next stage cannot start before it ends. With K chunks in flight their calls
become one call of K x 32 requests: the engine keeps up to `max_num_seqs` sequences decoding and the
tail is paid once per K chunks. A step still sees "one batched call per stage"; requests keep their
own SamplingParams (vLLM takes one per conversation), so calls of different stages or roles that share
the backend may share an engine call too.

When: a call waits until every chunk worker that has a chunk to process is waiting here (none is still
building prompts or parsing answers), then the backend of the oldest waiting call gets ALL waiting
calls for it, in arrival order, concatenated. One engine call runs at a time (in-process engines share
the device and are not thread-safe). The runner tells the merger how many chunks it has handed to its
workers (`chunk_started` / `chunk_finished`); a caller the runner does not know about (code outside the
runner, one chunk at a time) never waits for anyone.

Results do not depend on how calls are merged: with a seed, sample i of a request is drawn with its own
seed whatever else is in the batch (synth.llm.base), so rows are the same as one chunk at a time (up to
the floating-point effects of batch composition that any batching engine has).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from synth.llm.base import LLM, Completion, Request, SamplingParams, as_params_list

# backend kinds whose concurrent calls are merged: in-process engines that batch what one call hands them
MERGED_KINDS = frozenset({"vllm"})


@dataclass(eq=False)
class _Call:
    llm: LLM
    requests: list[Request]
    params: list[SamplingParams]
    done: bool = False
    result: list[list[Completion]] = field(default_factory=list)
    error: BaseException | None = None


class CallMerger:
    """Merges concurrent `generate` calls of up to `workers` chunk workers (see the module docstring)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.engine_calls: list[int] = []  # requests per merged engine call, in order (for tests and benches)
        self._cond = threading.Condition()
        self._chunks = 0  # chunks handed to the workers and not finished
        self._waiting = 0  # callers whose call has not returned yet
        self._queue: list[_Call] = []  # calls not started, in arrival order
        self._busy = False  # an engine call is running
        self._wrapped: dict[int, MergedLLM] = {}

    # ---- the runner's side -------------------------------------------------------------------------
    def chunk_started(self) -> None:
        with self._cond:
            self._chunks += 1

    def chunk_finished(self) -> None:
        with self._cond:
            self._chunks -= 1
            self._cond.notify_all()  # one worker fewer to wait for

    def wrap(self, llm: LLM) -> LLM:
        """`llm` behind this merger when it is an in-process engine (MERGED_KINDS), else `llm` itself."""
        llm = unwrap(llm)
        if llm.kind not in MERGED_KINDS:
            return llm
        with self._cond:
            return self._wrapped.setdefault(id(llm), MergedLLM(llm, self))

    # ---- the callers' side -------------------------------------------------------------------------
    def generate(self, llm: LLM, requests: Sequence[Request], params: Any) -> list[list[Completion]]:
        call = _Call(llm, list(requests), as_params_list(params, len(requests)))
        if not call.requests:
            return []
        with self._cond:
            self._queue.append(call)
            self._waiting += 1
            self._cond.notify_all()
            while not call.done and not (self._ready() and self._queue[0] is call):
                self._cond.wait()
            batch = None if call.done else self._take()
        if batch is not None:  # this caller leads: it runs the merged call for everyone in `batch`
            self._run(batch)
        if call.error is not None:
            raise call.error
        return call.result

    def _ready(self) -> bool:
        """No engine call running, and every worker with a chunk is waiting here."""
        return not self._busy and bool(self._queue) and self._waiting >= min(self.workers, self._chunks)

    def _take(self) -> list[_Call]:
        head = self._queue[0].llm
        batch = [c for c in self._queue if c.llm is head]
        self._queue = [c for c in self._queue if c.llm is not head]
        self._busy = True
        return batch

    def _run(self, batch: list[_Call]) -> None:
        requests = [r for c in batch for r in c.requests]
        try:
            outs = batch[0].llm.generate(requests, [p for c in batch for p in c.params])
            if len(outs) != len(requests):
                raise RuntimeError(f"backend returned {len(outs)} results for {len(requests)} requests")
            start = 0
            for c in batch:
                c.result, start = outs[start : start + len(c.requests)], start + len(c.requests)
        except BaseException as e:  # every call of the batch fails with it (each chunk re-raises it)
            for c in batch:
                c.error = e
        finally:
            with self._cond:
                self.engine_calls.append(len(requests))
                for c in batch:
                    c.done = True
                self._waiting -= len(batch)
                self._busy = False
                self._cond.notify_all()


class MergedLLM:
    """An in-process backend seen through a CallMerger: the same `generate` contract; everything else
    (kind, model, stats, identity, close) is the backend's own."""

    def __init__(self, inner: LLM, merger: CallMerger) -> None:
        self.inner, self.merger = inner, merger

    def generate(
        self, requests: Sequence[Request], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        return self.merger.generate(self.inner, requests, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"MergedLLM({self.inner!r})"


def unwrap(llm: LLM) -> LLM:
    return llm.inner if isinstance(llm, MergedLLM) else llm
