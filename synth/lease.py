"""A lease with fencing on a run folder: one writer at a time, also on shared storage (NFS, Lustre) where
the kernel `flock` of `synth.io.OutputLock` may not reach across hosts (e.g. a Slurm requeue that starts
the shard again on another node while the old task still runs, or a Ray retry after a network split).

The files, in `<run folder>/.lease/`:
- `<epoch>` (`00000001`, `00000002`, ...): one per owner, created with `O_CREAT | O_EXCL`, so exactly one
  process can create each; the epoch is the fencing token. It names the owner (host, pid, a random
  token, Slurm job) and holds `ttl_s` and `heartbeat_at`; only its owner rewrites it (a heartbeat every
  ttl_s/4, `released: true` at a clean exit). Never deleted: an epoch is never handed out twice.
- `current`: the latest epoch, rewritten in place (fixed width) by each new owner. Reading a file that
  exists is fresh at every open on NFS (close-to-open consistency); a lookup of a missing name may be
  cached, so the fence reads both.

`acquire` finds the latest epoch e (from `current`, then probing e+1, e+2, ... for an owner that died
before it wrote `current`). Its owner may be replaced when it released the lease, when its last
heartbeat is older than its ttl_s, when it is a dead process on this same machine (kill -9, then a
rerun: no wait), or with `force`. Then epoch e+1 is created with O_EXCL; losing that race means another
process took over just now, and the lease is looked at again. Otherwise the run is refused with one
line (or waits up to `wait_s`).

`check` is the fence, called before every ledger commit and manifest write: the epoch after ours must
not exist, `current` must still name ours, and our own last heartbeat must be younger than ttl_s/2. A
newer owner appears only after ttl_s without our heartbeat, so a writer that stops at ttl_s/2 leaves a
margin for clock skew between hosts (heartbeats are wall-clock times; NTP keeps that far below ttl_s)
and for the commit in flight: the check and the append are two steps (no POSIX filesystem offers an
atomic compare-and-append), and this margin is what keeps a paused writer from landing a chunk after a
takeover. See Kleppmann, "How to do distributed locking" (2016) on leases and fencing tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth.errors import OutputError

DIR = ".lease"
CURRENT = "current"
WIDTH = 512  # bytes of every lease file: one pwrite, never a stale tail
UNREADABLE = "unreadable"


class LeaseConfig(BaseModel):
    """`lease:` in synth's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttl_s: float = Field(60.0, gt=0)  # another run may take over after this long without a heartbeat
    wait_s: float = Field(0.0, ge=0)  # a live lease held by another run: wait this long for it, then refuse
    force: bool = False  # take over even a live lease (that run is fenced at its next commit)


DEFAULT = LeaseConfig()


class LeaseLost(OutputError):
    """Another run owns the folder now (or our heartbeat stalled): this run must write nothing more."""


def machine() -> tuple[str, str]:
    """(host name to show, machine id to compare). Pids mean the same process only within one boot and
    one pid namespace, so the id is the host name, the boot id and the pid namespace."""
    host = socket.gethostname()
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        boot += f"/{os.stat('/proc/self/ns/pid').st_ino}"
    return host, f"{host}/{boot}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: not alive


def _alive(pid: int, start: str | None) -> bool:
    """Is the process `pid` that started at `start` still running on this machine (pid reuse aware)?"""
    if Path("/proc/self/stat").exists():
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _pwrite(fd: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, sort_keys=True).encode()
    if len(data) >= WIDTH:
        raise ValueError(f"lease record over {WIDTH} bytes")
    os.pwrite(fd, data.ljust(WIDTH - 1) + b"\n", 0)
    os.fsync(fd)


def describe(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "an owner that left no record"
    job = f", slurm job {rec['slurm_job']}" if rec.get("slurm_job") else ""
    return f"host {rec.get('host')} pid {rec.get('pid')}{job}"


@dataclass
class _Holder:
    epoch: int  # 0: nobody ever held the lease
    record: dict[str, Any] | None
    mtime: float


class Lease:
    """The lease of one folder; `with Lease(folder, cfg):` acquires, heartbeats and releases it."""

    def __init__(self, folder: str | Path, cfg: LeaseConfig | None = None) -> None:
        self.folder = Path(folder)
        self.dir = self.folder / DIR
        self.cfg = cfg or LeaseConfig()
        self.token = secrets.token_hex(8)
        self.epoch = 0
        self.lost: str | None = None
        self._beat_at = 0.0  # time.monotonic() of our last successful heartbeat
        self._stop = threading.Event()
        self._io = threading.Lock()  # the heartbeat thread and release() never write at once
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ files

    def _path(self, epoch: int) -> Path:
        return self.dir / f"{epoch:08d}"

    def _current(self) -> int | None:
        rec = _read(self.dir / CURRENT)
        return rec.get("epoch") if isinstance(rec, dict) else None

    def _latest(self, known: int = 0) -> _Holder:
        """The latest owner; `known`: an epoch we know exists (our O_EXCL create of it failed), in case a
        cached lookup on NFS does not show it yet."""
        e = max(self._current() or 0, known)
        while self._path(e + 1).exists():  # an owner that died between its claim and `current`
            e += 1
        if e == 0:
            return _Holder(0, None, 0.0)
        path = self._path(e)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = time.time()  # it exists but is not visible here yet: count it as fresh
        return _Holder(e, _read(path), mtime)

    def _record(self, **extra: Any) -> dict[str, Any]:
        host, node = machine()
        return {
            "epoch": self.epoch,
            "token": self.token,
            "host": host,
            "node": node,
            "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID")),
            "ttl_s": self.cfg.ttl_s,
            "heartbeat_at": time.time(),
            "released": False,
            **extra,
        }

    def _write_own(self, **extra: Any) -> None:
        fd = os.open(self._path(self.epoch), os.O_WRONLY)
        try:
            _pwrite(fd, self._record(**extra))
        finally:
            os.close(fd)

    # -------------------------------------------------------------------------------------- acquiring

    def _replaceable(self, h: _Holder) -> bool:
        """May the owner of `h` be replaced now (see the module docstring)?"""
        rec = h.record
        if h.epoch == 0 or (rec is not None and rec.get("released")) or self.cfg.force:
            return True
        if rec is not None and rec.get("node") == machine()[1] and not _alive(rec["pid"], rec.get("pid_start")):
            return True
        return time.time() > self._expires(h)

    def _expires(self, h: _Holder) -> float:
        rec = h.record
        if rec is None:  # it died while writing its record: count from the file's last change
            return h.mtime + self.cfg.ttl_s
        return float(rec.get("heartbeat_at", 0)) + float(rec.get("ttl_s", self.cfg.ttl_s))

    def _claim(self, epoch: int) -> bool:
        """Create epoch `epoch` (O_EXCL: one winner), then point `current` at it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._path(epoch), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        started = time.monotonic()
        self.epoch = epoch
        try:
            _pwrite(fd, self._record(acquired_at=time.time()))
        finally:
            os.close(fd)
        fd = os.open(self.dir / CURRENT, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _pwrite(fd, {"epoch": epoch})
        finally:
            os.close(fd)
        self._beat_at = started
        return True

    def acquire(self) -> Lease:
        deadline, known = time.monotonic() + self.cfg.wait_s, 0
        while True:
            h = self._latest(known)
            if self._replaceable(h):
                if self._claim(h.epoch + 1):
                    break
                known = h.epoch + 1  # another process took epoch e+1 just now: look at it
                continue
            if time.monotonic() >= deadline:
                raise OutputError(self._refusal(h))
            time.sleep(min(1.0, self.cfg.ttl_s / 10, max(0.01, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def _refusal(self, h: _Holder) -> str:
        left = max(0.0, self._expires(h) - time.time())
        age = time.time() - float((h.record or {}).get("heartbeat_at", h.mtime))
        return (
            f"{self.folder} is leased by another run ({describe(h.record)}, lease epoch {h.epoch}, last heartbeat "
            f"{age:.0f}s ago, expires in {left:.0f}s); wait for it to finish, pass lease.wait_s={left + 5:.0f} to "
            "wait for the lease, or lease.force=true if that run is gone"
        )

    # ------------------------------------------------------------------------------------------ fencing

    def _ownership(self) -> str | None:
        """None while we own the lease; else why not: "unreadable" (cannot tell now), or a takeover."""
        nxt = self._path(self.epoch + 1)
        if nxt.exists():
            return f"taken over by {describe(_read(nxt))} (lease epoch {self.epoch + 1} > ours {self.epoch})"
        cur = self._current()
        if cur is None:
            return UNREADABLE
        if cur != self.epoch:
            return f"taken over (the lease names epoch {cur}, ours is {self.epoch})"
        return None

    def check(self) -> None:
        """The fence: raise LeaseLost unless this process still owns the folder (call before every write)."""
        if self.epoch == 0:
            raise RuntimeError("Lease.check() before acquire()")
        why = self.lost or self._ownership()
        if why == UNREADABLE:  # ownership cannot be shown now (not a takeover by itself)
            raise LeaseLost(f"{self.folder}: {self.dir / CURRENT} cannot be read; this run stops without writing")
        if why:
            self.lost = why
            raise LeaseLost(f"{self.folder} was {why}; this run stops here without writing (the other continues)")
        stale = time.monotonic() - self._beat_at
        if stale > self.cfg.ttl_s / 2:
            raise LeaseLost(
                f"{self.folder}: no lease heartbeat for {stale:.0f}s (lease.ttl_s={self.cfg.ttl_s:g} allows "
                f"{self.cfg.ttl_s / 2:g}), so another run may own it now; this run stops without writing; rerun the "
                "same command to resume"
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.ttl_s / 4):
            with self._io:
                if self._stop.is_set():
                    return
                why = self.lost or self._ownership()
                if why == UNREADABLE:
                    continue  # no heartbeat this time (check() refuses once the last one is ttl_s/2 old)
                if why:
                    self.lost = why
                    return  # never touch a folder another run owns; the next check() raises
                started = time.monotonic()
                try:
                    self._write_own()
                except OSError:
                    continue  # the storage hiccuped: check() refuses once the heartbeat is ttl_s/2 old
                self._beat_at = started

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (so the next run takes over at once)."""
        self._stop.set()
        with self._io:
            if self.epoch and not self.lost and self._ownership() is None:
                with contextlib.suppress(OSError):
                    self._write_own(released=True)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
