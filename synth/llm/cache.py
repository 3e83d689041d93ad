"""The call cache: wraps any backend so that a rerun of a finished stage makes no backend calls.

One sqlite row per SAMPLE. The key is sha256 over (the backend's `identity`: kind, model, revision,
adapter fingerprint, chat template; the messages; the sampling params without `n`, seed included; the
sample index). Dropping `n` from the key is what lets a later call with a larger n reuse the samples
already drawn and ask only for the rest.

On `generate`, every (request, sample index) is looked up; the missing samples go to the inner backend
in ONE call, and everything is returned in order. Answers are stored as they arrive when the backend
reports them one request at a time (`streams_results`, the openai backend): a request that fails for
good then loses only itself, and a rerun pays only for the requests that never got an answer. Other
backends' answers are stored when their call returns. How missing samples are asked for:
- no seed: one sub-request per request with n = number missing; sample indices are filled in order;
- seed s: one n=1 sub-request per missing sample i, with seed `sample_seed(s, i)` (base.py). Every
  backend draws sample i of a seeded request with exactly that seed, so a cached sample and a freshly
  drawn one are the same whatever the cache held before. A backend whose `honours_seeds` is false
  (openai with `send_seed: false`) gets the missing samples as one request, as without a seed.
Identical (messages, params) in one call or across calls share their samples: ask for n > 1, not for
the same request twice, to get distinct samples. With temperature > 0 and no seed a rerun still
returns the stored samples: that is the point (a rerun is free and identical).
Completions with finish_reason "error" (a server rejected the request) are not stored, so a rerun
tries them again.

Storage: WAL journal, synchronous=NORMAL, busy_timeout, one connection per thread and process;
inserts are INSERT OR IGNORE in one transaction and the stored rows are read back, so when two
processes draw the same unseeded sample at once both return the one that was stored first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synth.llm.base import LLM, CallStats, Completion, Request, SamplingParams, as_params_list, sample_seed

_SCHEMA = "CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, completion TEXT NOT NULL)"
_LOOKUP_CHUNK = 500  # stay under old sqlite's 999 host-parameter limit


class CachedLLM:
    def __init__(self, inner: LLM, path: str | Path) -> None:
        self.inner = inner
        self.kind, self.model = inner.kind, inner.model
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.identity = getattr(inner, "identity", None) or {"kind": inner.kind, "model": inner.model}
        self._identity_blob = json.dumps(self.identity, sort_keys=True, default=str)
        self._local = threading.local()
        self._own_stats = CallStats()
        self._lock = threading.Lock()
        self._conn()  # create the file and schema now: a bad path fails at start-up

    def __repr__(self) -> str:
        return f"CachedLLM({self.inner!r}, path={str(self.path)!r})"

    @property
    def stats(self) -> CallStats:
        return getattr(self.inner, "stats", None) or self._own_stats

    # ---- the Protocol ----------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[Request], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        plist = as_params_list(params, len(requests))
        keys = [[self.key(req, p, i) for i in range(p.n)] for req, p in zip(requests, plist, strict=True)]
        found = self._lookup([k for ks in keys for k in ks])
        with self._lock:
            self.stats.cache_hits += sum(k in found for ks in keys for k in ks)
        seeds = getattr(self.inner, "honours_seeds", True)
        sub_requests, sub_params, slots = _plan_missing(requests, plist, keys, found, seeds)
        if sub_requests:
            stored: dict[str, Completion] = {}  # what arrived and was stored while the call ran

            def keep(r: int, comps: list[Completion]) -> None:
                stored.update(self._store(dict(zip(slots[r], comps, strict=True))))

            if getattr(self.inner, "streams_results", False):  # store each answer as it arrives
                outs = self.inner.generate(sub_requests, sub_params, on_result=keep)
            else:
                outs = self.inner.generate(sub_requests, sub_params)
            fresh = {k: c for slot, comps in zip(slots, outs, strict=True) for k, c in zip(slot, comps, strict=True)}
            found.update(fresh)
            found.update(stored)
            found.update(self._store({k: c for k, c in fresh.items() if k not in stored}))
        return [[found[k] for k in ks] for ks in keys]

    def key(self, request: Request, params: SamplingParams, index: int) -> str:
        p = params.to_dict()
        del p["n"]
        if p["regex"] is None:  # added later: keys of requests without one stay what they were
            del p["regex"]
        blob = json.dumps(
            {
                "id": self._identity_blob,
                "messages": [[m.role, m.content] for m in request],
                "params": p,
                "sample": index,
            },
            sort_keys=True,
            ensure_ascii=False,
            default=str,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ---- sqlite ----------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        """One connection per thread and per process (a forked child must not reuse its parent's)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _lookup(self, keys: list[str]) -> dict[str, Completion]:
        conn, out = self._conn(), {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _LOOKUP_CHUNK):
            part = unique[i : i + _LOOKUP_CHUNK]
            sql = f"SELECT key, completion FROM samples WHERE key IN ({','.join('?' * len(part))})"
            out.update((k, Completion.model_validate_json(v)) for k, v in conn.execute(sql, part))
        return out

    def _store(self, fresh: dict[str, Completion]) -> dict[str, Completion]:
        rows = [(k, c.model_dump_json()) for k, c in fresh.items() if c.finish_reason != "error"]
        if not rows:
            return {}
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR IGNORE INTO samples (key, completion) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            # sqlite may already have rolled back (a full disk ends the transaction); a failing ROLLBACK
            # must not replace the error that matters
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return self._lookup([k for k, _ in rows])  # another process may have stored some first

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()


def _plan_missing(
    requests: Sequence[Request],
    plist: list[SamplingParams],
    keys: list[list[str]],
    found: dict[str, Any],
    seeds: bool = True,
) -> tuple[list[Request], list[SamplingParams], list[list[str]]]:
    """Sub-requests for the missing samples (see the module docstring), each key asked for once. With
    `seeds` false (a backend that does not send seeds: openai with send_seed=false) a seeded request's
    missing samples go as one request, as unseeded ones do."""
    sub_requests: list[Request] = []
    sub_params: list[SamplingParams] = []
    slots: list[list[str]] = []
    planned: set[str] = set()
    for req, p, ks in zip(requests, plist, keys, strict=True):
        missing = [(i, k) for i, k in enumerate(ks) if k not in found and k not in planned]
        planned.update(k for _, k in missing)
        if not missing:
            continue
        if p.seed is None or not seeds:
            sub_requests.append(req)
            sub_params.append(p.replace(n=len(missing)))
            slots.append([k for _, k in missing])
            continue
        for i, k in missing:
            sub_requests.append(req)
            sub_params.append(p.replace(n=1, seed=sample_seed(p.seed, i)))
            slots.append([k])
    return sub_requests, sub_params, slots


def _switch_to_wal(conn: sqlite3.Connection, wait_s: float = 60.0) -> None:
    """Put the file in WAL mode. The switch needs the file to itself and SQLite answers "database is
    locked" at once, without the busy handler, while another process is creating or switching the same
    file; so retry until it is WAL (done by whichever process won) or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
