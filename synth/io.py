"""Crash-safe, exact-once output for pipelines.

A pipeline processes its inputs in chunks. `ChunkWriter.commit` appends each finished chunk to the
output files (`sft.jsonl`, `preferences.jsonl`, `trace.jsonl`, ...) with flush + fsync, and only THEN
appends one line to the ledger `.progress.jsonl`: the chunk's input ids, every output file's size after
the chunk, and the chunk's counters. A file the chunk wrote nothing to is neither written nor fsynced:
its size is the one an earlier ledger line already made durable. The ledger line is the commit point:

- a crash before it leaves bytes past the last committed size; on restart every output file is cut
  back to its committed size (this also removes a torn last line), so the chunk is redone once;
- a crash while writing the ledger line leaves a torn ledger line, which is detected and dropped
  (the chunk is redone, and its output bytes are cut as above).

So after a `kill -9` at any moment, rerunning the same command ends with every input id present
exactly once. Counters are summed from the ledger, so the manifest is right across resumes.

A power loss can also lose a directory entry: on POSIX a new file's name is durable only once its folder
is fsynced (fsync(2)). So a commit that creates a file (the first commit, or the first rows of an output
that had none) fsyncs the folder once, after the file's data and before the ledger line that names it;
commits that only append do not touch the folder. `write_text_atomic` fsyncs the temporary file, renames
it and fsyncs the folder, so the new name and its content are on disk when it returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from synth.errors import OutputError
from synth.lease import Lease, LeaseConfig

LEDGER = ".progress.jsonl"


def _dumps(row: Any) -> str:
    if isinstance(row, BaseModel):
        return row.model_dump_json()
    return json.dumps(row, ensure_ascii=False, default=str)


def _fsync_append(path: Path, lines: Iterable[str]) -> int:
    """Append lines, flush and fsync; return the file's size afterwards."""
    with path.open("a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so that the files created, renamed or replaced in it keep their names after a power
    loss (POSIX fsync(2): the file's own fsync does not cover its directory entry). A file system that
    cannot fsync a folder (EINVAL / ENOTSUP, e.g. some network mounts) gives no such guarantee anyway."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then every folder in it (deepest first): before a folder written
    in place is renamed into its final name, so the name never points at data still in the page cache."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(folder)


def mkdir_durable(folder: str | Path) -> None:
    """`mkdir -p`, then fsync the parent of every folder it created (top-most first), so that the new
    folders keep their names after a power loss."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        fsync_dir(p.parent)


def write_json_atomic(path: Path, obj: Any, durable: bool = True) -> None:
    """Write a JSON file through a temporary file + rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n", durable)


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Temporary file + rename; on failure (a full disk) the temporary file is removed, never left.
    durable: the content is fsynced before the rename and the folder after it, so after a power loss the
    file is the new one, whole (false: for a file rewritten often that nothing recovers from, such as
    the running manifest)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


# ------------------------------------------------------------------------------------- folder ownership

LOCK = ".lock"


class OutputLock:
    """One owner per output folder: an exclusive `flock` on `<out_dir>/.lock`, held for the whole run.

    The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a stale
    lock file never blocks the next run. A second process on the same folder gets `OutputError` naming
    the holder's pid.

    With `lease` (a `synth.lease.LeaseConfig`) it also holds the folder's lease with fencing, for shared
    storage where a `flock` may not reach across hosts; `check()` is then the fence to call before every
    write (it raises `synth.lease.LeaseLost` once another run took the folder over).
    """

    def __init__(self, out_dir: str | Path, lease: LeaseConfig | None = None) -> None:
        self.out_dir = Path(out_dir)
        self._fd: int | None = None
        self._lease_cfg = lease
        self.lease: Lease | None = None

    def __enter__(self) -> OutputLock:
        check_output_dir(self.out_dir)
        mkdir_durable(self.out_dir)
        fd = os.open(self.out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{self.out_dir} is in use by another run (pid {holder}); wait for it to finish, or pass another "
                "output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if self._lease_cfg is not None:
            try:
                self.lease = Lease(self.out_dir, self._lease_cfg).acquire()
            except BaseException:
                self.__exit__()
                raise
        return self

    def check(self) -> None:
        """The fence (a no-op without a lease): raise LeaseLost once another run owns the folder."""
        if self.lease is not None:
            self.lease.check()

    def __exit__(self, *exc: object) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def check_output_dir(out_dir: Path) -> None:
    """An output_dir that exists must be a writable folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output_dir {out_dir} exists and is not a folder; pass a folder path")
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {out_dir}: {parent} is not writable; pass a folder you can write to")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from a write, or sqlite's 'database or disk is full' (SQLITE_FULL)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def disk_full_error(out_dir: Path, need_bytes: int) -> OutputError:
    free = shutil.disk_usage(next(p for p in [out_dir, *out_dir.parents] if p.exists())).free
    return OutputError(
        f"disk full writing {out_dir} ({_mib(free)} free); free at least {_mib(need_bytes)} there, then rerun the "
        "same command to resume (committed rows are intact)"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class ChunkWriter:
    """Appends committed chunks to `<out_dir>/<name>.jsonl` files; see the module docstring."""

    def __init__(
        self, out_dir: str | Path, files: Iterable[str], resume: bool = True, fence: Callable[[], None] | None = None
    ):
        """`fence` (e.g. `OutputLock.check`) runs before every commit and raises when this process no longer
        owns the folder; the chunk is then not written at all."""
        self.out_dir = Path(out_dir)
        self.fence = fence
        mkdir_durable(self.out_dir)
        self.files = list(dict.fromkeys([*files, "trace"]))
        self.ledger = self.out_dir / LEDGER
        self.done_ids: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.chunks = 0
        self.torn_ledger_lines = 0
        self.largest_chunk_bytes = 0
        if not resume:
            self._reset()
        self._recover()
        # files an earlier run created may not have durable names yet (it may have been killed before
        # the kernel wrote its folder): one folder fsync now. `_durable` holds the names made durable, so
        # a commit knows which files it creates without a stat per file
        fsync_dir(self.out_dir)
        self._durable = {p.name for p in self.out_dir.iterdir()}
        self._names = [LEDGER, *(self.path(name).name for name in self.files)]

    def path(self, name: str) -> Path:
        return self.out_dir / f"{name}.jsonl"

    def touch_outputs(self) -> None:
        """Every declared output exists from the start, even when a run has no inputs, so that the next
        step of a recipe reads an empty dataset instead of failing on a missing file."""
        missing = [name for name in self.files if not self.path(name).exists()]
        for name in missing:
            self.path(name).touch()
        if missing:
            fsync_dir(self.out_dir)
        self._durable.update(self.path(name).name for name in self.files)

    def _reset(self) -> None:
        for name in self.files:
            self.path(name).unlink(missing_ok=True)
        self.ledger.unlink(missing_ok=True)

    def _recover(self) -> None:
        """Read the ledger, drop a torn last line, and cut every output back to its committed size."""
        sizes: dict[str, int] = {}
        good: list[str] = []
        if self.ledger.exists():
            for line in self.ledger.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    self.torn_ledger_lines += 1
                    continue
                good.append(line)
                self.done_ids.update(entry["ids"])
                sizes.update(entry["sizes"])
                self.counters.update(entry["counters"])
                self.chunks += 1
            if self.torn_ledger_lines:  # through a rename: a crash while rewriting must not lose the ledger
                write_text_atomic(self.ledger, "".join(x + "\n" for x in good))
        self._sizes = {name: sizes.get(name, 0) for name in self.files}
        for name in self.files:
            p = self.path(name)
            committed = sizes.get(name, 0)
            if p.exists() and p.stat().st_size > committed:
                with p.open("r+b") as fh:
                    fh.truncate(committed)

    def _cut_back(self, sizes: Mapping[str, int], ledger_size: int) -> None:
        for name in self.files:
            _cut(self.path(name), sizes.get(name, 0))
        _cut(self.ledger, ledger_size)

    def commit(self, ids: Iterable[str], rows: Mapping[str, Iterable[Any]], counters: Mapping[str, int]) -> None:
        """Append one finished chunk: outputs first, then the ledger line (the commit point)."""
        if self.fence is not None:
            self.fence()
        ids = list(ids)
        unknown = set(rows) - set(self.files)
        if unknown:
            raise KeyError(f"pipeline produced rows for undeclared outputs {sorted(unknown)}")
        ledger_size = self.ledger.stat().st_size if self.ledger.exists() else 0
        sizes = {}
        try:
            new = [name for name in self._names if name not in self._durable]
            if LEDGER in new:
                self.ledger.touch()  # empty until the line below; its name made durable with the others
            for name in self.files:
                lines = [_dumps(r) for r in rows.get(name, ())]
                if lines:
                    sizes[name] = _fsync_append(self.path(name), lines)
                else:  # untouched: its committed size is already durable, so no write and no fsync
                    self.path(name).touch(exist_ok=True)  # every declared file exists after the first commit
                    sizes[name] = self._sizes[name]
            if new:  # a new name is durable only once its folder is fsynced: before the ledger names it
                fsync_dir(self.out_dir)
                self._durable.update(new)
            entry = {"chunk": self.chunks, "ids": ids, "sizes": sizes, "counters": dict(counters)}
            _fsync_append(self.ledger, [json.dumps(entry, ensure_ascii=False)])
        except OSError:  # e.g. a full disk: leave every file at its last commit now, not at the next start
            self._cut_back(self._sizes, ledger_size)
            raise
        self.largest_chunk_bytes = max(self.largest_chunk_bytes, sum(sizes.values()) - sum(self._sizes.values()))
        self._sizes = sizes
        self.done_ids.update(ids)
        self.counters.update(counters)
        self.chunks += 1


def _cut(path: Path, size: int) -> None:
    with contextlib.suppress(OSError):  # truncating needs no free space; best effort all the same
        if path.exists() and path.stat().st_size > size:
            with path.open("r+b") as fh:
                fh.truncate(size)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a committed jsonl output (our own files; a torn last line is never there after recovery)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
