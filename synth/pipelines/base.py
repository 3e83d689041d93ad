"""The pipeline contract and the chunked, resumable runner every pipeline uses.

A pipeline is a class with
- `Config`: a pydantic model of its settings (the `pipeline:` config group minus `_target_`), extra keys
  forbidden, validated before any model loads;
- `outputs`: the jsonl files it writes (without `.jsonl`; `trace` is always added);
- `roles`: the model roles it calls ("policy", "judge", "attacker", ...); roles are built lazily at their
  first call, and the automatic `chunks_in_flight` looks at these roles only;
- `process(items, ctx, state)`: turn one chunk of SourceItems into rows (`state.emit`), drops
  (`state.drop`) and counters, making one batched backend call per stage (`synth.steps.base.run_calls`);
- optionally `setup(ctx, writer)` (e.g. read what earlier chunks wrote, for dedup) and
  `finalize(ctx, out_dir) -> dict` (whole-run work on the committed files, e.g. a Bradley-Terry
  table; it must make no backend calls and be idempotent, because a finished rerun calls it again).

`run_pipeline` feeds chunks, commits each one through `synth.io.ChunkWriter` (exact-once across
crashes), shows a progress bar, and writes `manifest.json` and a one-screen summary.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from synth.errors import ConfigError, UserError
from synth.io import (
    ChunkWriter,
    OutputLock,
    disk_full_error,
    is_disk_full,
    write_json_atomic,
)
from synth.lease import DEFAULT as DEFAULT_LEASE
from synth.lease import LeaseConfig
from synth.llm.merge import CallMerger
from synth.records import SourceItem
from synth.runtime import ChunkState, Context  # noqa: F401 - re-exported for pipelines
from synth.secrets import scrub


class PipelineConfig(BaseModel):
    """Base of every pipeline's Config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")
    name: str


class Pipeline:
    Config: ClassVar[type[PipelineConfig]] = PipelineConfig
    outputs: ClassVar[tuple[str, ...]] = ()
    roles: ClassVar[tuple[str, ...]] = ("policy",)
    needs_source: ClassVar[bool] = True

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        """The inputs; pipelines without a source (red_team) override this."""
        if source is None:
            raise ConfigError(f"pipeline {self.cfg.name!r} needs a source (source=...)")
        return source

    def check_constitution(self, constitution) -> None:  # noqa: B027 - optional hook
        """Raise a one-line ConstitutionError when `constitution` lacks what this pipeline needs. Called
        at start-up, before any output folder is touched or any model loads."""

    def prefill_roles(self) -> tuple[str, ...]:
        """The roles whose answers this run reads after an assistant prefill (a label at an answer stem).
        `synth` checks at start-up, before any output folder is touched, that a server behind such a role
        continues an assistant message (`synth.llm.require_prefill`)."""
        return ()

    def estimate(self, n_items: int) -> dict[str, int] | None:
        """Upper bounds on this run's backend work for `n_items` inputs: {"requests": .., "new_tokens": ..}
        (printed before the run starts), or None when the pipeline cannot say."""
        return None

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:  # noqa: B027 - optional hook
        pass

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        raise NotImplementedError

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        return {}


def _chunks(items: Iterable[SourceItem], size: int):
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def run_pipeline(
    pipeline: Pipeline,
    ctx: Context,
    out_dir: str | Path,
    source: Iterable[SourceItem] | None = None,
    chunk_size: int = 32,
    resume: bool = True,
    show_progress: bool = True,
    on_start: Callable[[], None] | None = None,
    source_report: Callable[[], dict[str, Any]] | None = None,
    chunks_in_flight: int = 1,
    lease: LeaseConfig | None = DEFAULT_LEASE,
) -> dict[str, Any]:
    """Run `pipeline` over its inputs in committed chunks; return the manifest (also written).

    Order matters for the user's data: the folder is locked (one owner), then every input is read and
    validated, and only then are earlier outputs reset (`resume=False`) and `on_start` called (synth
    writes its run marker and config.yaml there). The manifest is written with status "running" at the
    start and after every committed chunk, so a reader can trust it even after a kill -9.
    `source_report` returns what the source skipped (bad rows), for the manifest.

    `chunks_in_flight` > 1 processes that many chunks at once, in worker threads, so that while one
    chunk waits at a stage for its slowest request, the others keep the backend's concurrency full (a
    chunk's stages still run in order, one batched call each). For an in-process engine (vLLM) the calls
    the chunks make at the same time are merged into one engine call instead (synth.llm.merge). Chunks
    are committed in input order, so the output files are the same as with one chunk at a time; resume
    granularity stays one chunk.

    `lease` (synth/lease.py) fences the folder on shared storage: every commit and manifest write first
    checks that no other run took the folder over; a run that lost it stops and writes nothing more.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1 (got {chunk_size})")
    start = time.time()
    out_dir = Path(out_dir)
    with OutputLock(out_dir, lease) as lock:
        if isinstance(source, Iterator):  # a one-shot iterator (a generator): keep what it yields
            source = list(source)
        ids, duplicates = _scan(pipeline.items(ctx, source))  # a bad input fails here, before any reset
        n_items = len(ids)
        if on_start is not None:
            on_start()
        writer = ChunkWriter(out_dir, pipeline.outputs, resume=resume, fence=lock.check)
        writer.touch_outputs()
        done_before = set(writer.done_ids)
        resumed = len(ids & done_before)
        del ids
        # the second pass reads the inputs lazily, one chunk ahead of the workers: memory stays bounded
        todo = (it for it in _unique(pipeline.items(ctx, source)) if it.id not in done_before)
        if show_progress and n_items > resumed:
            print_estimate(pipeline, n_items - resumed)

        def manifest(
            status: str, error: str | None = None, extra: dict[str, Any] | None = None, must_write: bool = True
        ) -> dict[str, Any]:
            m = build_manifest(
                pipeline,
                writer,
                n_items,
                resumed,
                duplicates,
                time.time() - start,
                status,
                error,
                {**(source_report() if source_report else {}), **(extra or {})},
            )
            try:
                lock.check()  # a run that lost the folder's lease raises here (LeaseLost), writing nothing
                # the running manifest is rewritten after every commit and nothing recovers from it: not
                # fsynced; the final one (finished / failed) is
                write_json_atomic(out_dir / "manifest.json", m, durable=status != "running")
            except OSError:
                if must_write:
                    raise
            return m

        bar = tqdm(total=n_items, initial=resumed, desc=pipeline.cfg.name, unit="item", disable=not show_progress)
        try:
            manifest("running")
            pipeline.setup(ctx, writer)  # inside: a failure here ends the run like any other (failed manifest)
            seen = ctx.backend_counters()
            for chunk, state in _processed(pipeline, ctx, _chunks(todo, chunk_size), chunks_in_flight):
                now = ctx.backend_counters()  # retries etc. since the last commit (chunks overlap)
                state.counters.update(now - seen)
                seen = now
                writer.commit([it.id for it in chunk], {**state.rows, "trace": state.trace}, state.counters)
                bar.update(len(chunk))
                manifest("running")
            m = manifest("finished", extra=pipeline.finalize(ctx, out_dir))
        except BaseException as e:  # keep what is committed; record what stopped us, then re-raise
            bar.close()
            failure = _user_facing(e, out_dir, writer)
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            _record_failure(manifest, status, failure or e, out_dir)
            if failure is not None:
                raise failure from None
            raise
        bar.close()
    print_summary(m, out_dir)
    return m


def _processed(pipeline: Pipeline, ctx: Context, chunks: Iterable[Sequence[SourceItem]], workers: int):
    """(chunk, its ChunkState) in input order. One worker: each chunk is processed here, in turn. More:
    up to `2 * workers` chunks are queued for `workers` daemon threads, so a slow chunk at the head does
    not leave the others idle; a failure is raised when its chunk's turn to commit comes."""

    def work(chunk: Sequence[SourceItem]) -> ChunkState:
        state = ChunkState()
        pipeline.process(chunk, ctx, state)
        return state

    if workers <= 1:
        for chunk in chunks:
            yield chunk, work(chunk)
        return
    # in-process engines (vLLM) get one merged call for the concurrent stage calls of the chunks in flight
    merger, outer = CallMerger(workers), ctx.merger
    ctx.merger = merger
    pool, pending, source = _DaemonPool(workers, merger), deque(), iter(chunks)
    try:
        for chunk in itertools.islice(source, 2 * workers):
            pending.append((chunk, pool.submit(work, chunk)))
        while pending:
            chunk, future = pending.popleft()
            state = future.result()
            nxt = next(source, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
            yield chunk, state
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown()
        ctx.merger = outer


class _DaemonPool:
    """A minimal thread pool of daemon threads: a Ctrl-C or a failed chunk never waits for the chunks
    still talking to a server (their answers still reach the call cache; nothing of theirs is committed)."""

    def __init__(self, n: int, merger: CallMerger) -> None:
        self.merger = merger  # told how many chunks the workers hold, so it knows whom a merged call waits for
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._serve, name=f"chunk-worker-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            future, fn, arg = job
            try:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(arg))
                except BaseException as e:  # handed to the committing thread
                    future.set_exception(e)
            finally:
                self.merger.chunk_finished()

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> Future:
        future: Future = Future()
        self.merger.chunk_started()
        self.jobs.put((future, fn, arg))
        return future

    def shutdown(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)


def _user_facing(e: BaseException, out_dir: Path, writer: ChunkWriter) -> UserError | None:
    """A full disk becomes one OutputError naming the folder and the space to free (never a chain of
    sqlite / rollback / manifest tracebacks); other exceptions are left as they are."""
    if is_disk_full(e):
        return disk_full_error(out_dir, max(64 * 2**20, 4 * writer.largest_chunk_bytes))
    return None


def _record_failure(manifest: Callable[..., dict[str, Any]], status: str, e: BaseException, out_dir: Path) -> None:
    """Best effort: write the failed manifest and print the summary. A second failure here (the disk is
    still full) must not replace the error that stopped the run."""
    what = "interrupted by the user (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
    try:
        m = manifest(status, scrub(what), must_write=False)
    except Exception:
        return
    print_summary(m, out_dir)


def _scan(items: Iterable[SourceItem]) -> tuple[set[str], int]:
    """First pass over the inputs: their ids and how many repeat an earlier id (nothing else is kept)."""
    ids: set[str] = set()
    dups = 0
    for it in items:
        if it.id in ids:
            dups += 1
        ids.add(it.id)
    return ids, dups


def _unique(items: Iterable[SourceItem]) -> Iterable[SourceItem]:
    """The inputs, each id once (the first), lazily."""
    seen: set[str] = set()
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            yield it


def build_manifest(
    pipeline, writer: ChunkWriter, n_inputs, resumed, duplicates, wall, status, error, extra
) -> dict[str, Any]:
    c = writer.counters

    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in sorted(c.items()) if k.startswith(prefix)}

    return {
        "pipeline": pipeline.cfg.name,
        "status": status,
        "error": error,
        "inputs": n_inputs,
        "processed": len(writer.done_ids),
        "resumed_from_previous_runs": resumed,
        "duplicate_inputs_skipped": duplicates,
        "chunks": writer.chunks,
        "outputs": {name: c.get(f"out/{name}", 0) for name in pipeline.outputs},
        "drops": group("drop/"),
        "dropped_parts": _nested(group("drop_part/")),
        "parse_failures": group("parse_failed/"),
        "truncated": group("truncated/"),
        "calls": group("calls/"),
        "retries": group("retries/"),
        "cache_hits": group("cache_hits/"),
        "tokens": group("tokens/"),
        "per_category": group("category/"),
        "wall_time_s_this_run": round(wall, 3),
        **extra,
    }


def _nested(flat: dict[str, int]) -> dict[str, dict[str, int]]:
    """{"candidate/truncated": 2} -> {"candidate": {"truncated": 2}}."""
    out: dict[str, dict[str, int]] = {}
    for key, n in flat.items():
        unit, reason = key.split("/", 1)
        out.setdefault(unit, {})[reason] = n
    return out


def print_estimate(pipeline: Pipeline, n_todo: int) -> None:
    """One line before the work starts: upper bounds on backend requests and new tokens, so a run that
    would take hours on the chosen model is seen before it starts (preset=small is the cure on CPU)."""
    est = pipeline.estimate(n_todo)
    if est:
        print(
            f"== {pipeline.cfg.name}: {n_todo} inputs to do; at most {est['requests']:,} requests and "
            f"{est['new_tokens']:,} new tokens",
            flush=True,
        )


def print_summary(m: dict[str, Any], out_dir: Path) -> None:
    lines = [
        f"== {m['pipeline']}: {m['status']} in {m['wall_time_s_this_run']:.1f}s -> {out_dir}",
        f"   inputs {m['inputs']}  processed {m['processed']}  (resumed {m['resumed_from_previous_runs']}, "
        f"duplicates skipped {m['duplicate_inputs_skipped']})",
        "   outputs:        " + "  ".join(f"{k}={v}" for k, v in m["outputs"].items()),
    ]
    for key in ("drops", "parse_failures", "truncated", "retries", "cache_hits", "tokens", "source_rows_skipped"):
        if m.get(key):
            lines.append(f"   {key + ':':<16}" + "  ".join(f"{k}={v}" for k, v in m[key].items()))
    for unit, reasons in (m.get("dropped_parts") or {}).items():
        lines.append(f"   {'parts dropped:':<16}{unit}: " + "  ".join(f"{k}={v}" for k, v in reasons.items()))
    if m["error"]:
        lines.append(f"   error:          {m['error']}")
    print("\n".join(lines), flush=True)  # stdout: stderr is kept for the one error line
