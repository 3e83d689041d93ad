"""The run folder's lease with fencing (synth/lease.py): a second writer is refused while the lease is
live, takes over after it expires (or with force), and the first writer's next commit is then refused
with nothing of it landing; exact-once rows at the end. The end-to-end test plays two hosts whose shared
storage does not carry `flock` (tests/synth/lease_entry.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from synth.errors import OutputError
from synth.io import LEDGER, ChunkWriter
from synth.lease import DIR, Lease, LeaseConfig, LeaseLost
from synth.shard import Shard
from synth.testing.loopback import LoopbackServer

TTL = 0.6


def freeze(lease: Lease) -> None:
    """Stop `lease`'s heartbeat as a frozen or partitioned process would (SIGSTOP, a hung NFS mount)."""
    lease._stop.set()
    lease._thread.join()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_owner_is_refused_while_live_then_takes_over_after_expiry(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    with pytest.raises(OutputError, match=rf"is leased by another run \(host .* pid {os.getpid()}.*lease epoch 1"):
        Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    time.sleep(TTL * 1.5)  # a live owner keeps heartbeating: still refused after its ttl
    with pytest.raises(OutputError, match="leased by another run"):
        Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    a.check()

    freeze(a)
    time.sleep(TTL * 1.2)
    b = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()  # expired: taken over
    assert (a.epoch, b.epoch) == (1, 2)
    with pytest.raises(LeaseLost, match=r"taken over by host .* \(lease epoch 2 > ours 1\)"):
        a.check()
    b.check()
    a.release()  # a fenced owner's release leaves the new owner's lease alone
    b.check()
    b.release()
    c = Lease(tmp_path, LeaseConfig(ttl_s=60)).acquire()  # released: taken over at once
    assert c.epoch == 3
    c.release()


def test_force_takes_over_a_live_lease_and_fences_the_old_owner(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=60)).acquire()
    b = Lease(tmp_path, LeaseConfig(ttl_s=60, force=True)).acquire()
    with pytest.raises(LeaseLost, match="taken over"):
        a.check()
    time.sleep(0.05)
    b.check()
    a.release()
    b.release()


def test_a_fenced_writer_commits_nothing_and_rows_stay_exact_once(tmp_path):
    files = ("sft",)
    a = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    wa = ChunkWriter(tmp_path, files, fence=a.check)
    wa.commit(["x1", "x2"], {"sft": [{"id": "x1"}, {"id": "x2"}]}, {"out/sft": 2})
    freeze(a)  # paused mid-run; its lease expires and a requeued writer takes the folder over
    time.sleep(TTL * 1.2)
    b = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    wb = ChunkWriter(tmp_path, files, fence=b.check)
    assert wb.done_ids == {"x1", "x2"}
    wb.commit(["x3"], {"sft": [{"id": "x3"}]}, {"out/sft": 1})
    before = snapshot(tmp_path)
    with pytest.raises(LeaseLost, match="stops here without writing"):  # the old writer wakes up: refused
        wa.commit(["x3", "x4"], {"sft": [{"id": "x3"}, {"id": "x4"}]}, {"out/sft": 2})
    assert snapshot(tmp_path) == before  # nothing of it landed
    wb.commit(["x4"], {"sft": [{"id": "x4"}]}, {"out/sft": 1})
    b.release()
    ids = [json.loads(x)["id"] for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert ids == ["x1", "x2", "x3", "x4"]
    assert ChunkWriter(tmp_path, files).counters["out/sft"] == 4


def test_a_writer_whose_heartbeat_stalled_stops_before_anyone_may_take_over(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    freeze(a)
    time.sleep(TTL * 0.6)  # past ttl/2: nobody took over yet, but a taker may do so at ttl
    with pytest.raises(LeaseLost, match=r"no lease heartbeat for .*allows 0.3"):
        a.check()


def test_an_unreadable_lease_stops_commits_until_it_reads_again(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=60)).acquire()
    current = tmp_path / DIR / "current"
    good = current.read_bytes()
    current.write_bytes(b'{"epo')  # a torn or unreadable pointer proves nobody's ownership
    with pytest.raises(LeaseLost, match="cannot be read"):
        a.check()
    current.write_bytes(good)
    a.check()  # not a takeover: the owner goes on once it reads again
    a.release()


def test_racing_takers_one_wins(tmp_path):
    """O_EXCL on the next epoch: of 8 processes' worth of takers released at once, exactly one owns it."""
    n, barrier, won, refused = 8, threading.Barrier(8), [], []

    def take() -> None:
        barrier.wait()
        try:
            won.append(Lease(tmp_path, LeaseConfig(ttl_s=60)).acquire())
        except OutputError:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == n - 1 and won[0].epoch == 1
    won[0].release()


def test_an_owner_that_died_before_naming_itself_current_is_skipped(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    freeze(a)
    (tmp_path / DIR / "00000002").write_bytes(b"")  # epoch 2 created, then its process died (no record)
    with pytest.raises(LeaseLost, match="lease epoch 2 > ours 1"):
        a.check()
    with pytest.raises(OutputError, match="lease epoch 2"):  # its file is fresh: wait for ttl from its mtime
        Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    time.sleep(TTL * 1.2)
    b = Lease(tmp_path, LeaseConfig(ttl_s=TTL)).acquire()
    assert b.epoch == 3
    b.release()


def test_wait_s_waits_for_the_owner_to_release(tmp_path):
    a = Lease(tmp_path, LeaseConfig(ttl_s=60)).acquire()
    threading.Timer(0.4, a.release).start()
    t0 = time.monotonic()
    b = Lease(tmp_path, LeaseConfig(ttl_s=60, wait_s=20)).acquire()
    assert b.epoch == 2 and 0.3 < time.monotonic() - t0 < 15
    b.release()


HOLD = "from synth.lease import Lease, LeaseConfig; import sys, time; Lease(sys.argv[1], LeaseConfig(ttl_s=600))" + (
    ".acquire(); print('held', flush=True); time.sleep(600)"
)


def test_a_dead_owner_on_this_machine_is_replaced_at_once(tmp_path):
    """kill -9, then a rerun on the same machine: no need to wait for the ttl (pid + start time checked)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid}"):
        Lease(tmp_path, LeaseConfig(ttl_s=600)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    b = Lease(tmp_path, LeaseConfig(ttl_s=600)).acquire()
    assert b.epoch == 2
    b.release()


# ------------------------------------------------------ end to end: two hosts, one shard, no shared flock

N = 40


def start(host: str, out: Path, src: Path, url: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "tests.synth.lease_entry",
        host,
        "pipeline=generate",
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=scripted",
        "source=jsonl",
        f"source.path={src}",
        f"output_dir={out}",
        "chunk_size=2",
        "chunks_in_flight=1",
        "progress=false",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def chunks(folder: Path) -> int:
    p = folder / LEDGER
    return p.read_text().count("\n") if p.exists() else 0


@pytest.mark.slow
def test_requeued_shard_on_another_host_fences_the_old_writer(tmp_path):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(N)))
    shard = Shard(1, 2).folder(out)
    ttl = "lease.ttl_s=6"  # the old writer stops itself 3 s after its last heartbeat; others wait 6 s
    gate = threading.Event()  # closed: the server holds its answers (the old writer waits mid-chunk)
    gate.set()

    def reply(body):
        gate.wait()
        return "answer to " + body["messages"][-1]["content"]

    with LoopbackServer(responder=reply, latency_s=0.05) as server:
        old = start("node-a", out, src, server.url, "shard=1/2", ttl)
        deadline = time.time() + 120
        while chunks(shard) < 2 and old.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        gate.clear()
        assert old.poll() is None, old.communicate()
        try:
            # a requeued task on another host while the old one still runs (and heartbeats): refused
            refused = start("node-b", out, src, server.url, "shard=1/2", ttl)
            _, err = refused.communicate(timeout=120)
            assert refused.returncode == 2 and err.count("\n") == 1, err
            assert "is leased by another run (host node-a" in err and "lease.wait_s=" in err

            old.send_signal(signal.SIGSTOP)  # now the old one freezes (or is cut off) mid-chunk
            gate.set()
            new = start("node-b", out, src, server.url, "shard=1/2", ttl, "lease.wait_s=60")
            _, err = new.communicate(timeout=180)  # waits out the ttl, takes over, resumes, finishes
            assert new.returncode == 0, err
            m = json.loads((shard / "manifest.json").read_text())
            assert m["status"] == "finished" and m["resumed_from_previous_runs"] >= 2
            after_new = {k: v for k, v in snapshot(shard).items() if not k.startswith("cache.sqlite")}
        finally:
            gate.set()
            old.send_signal(signal.SIGCONT)
        _, err = old.communicate(timeout=120)  # the old writer wakes up: its next commit is refused
        assert old.returncode == 2 and err.count("\n") == 1, err
        assert "was taken over by host node-b" in err and "without writing" in err
        assert {k: v for k, v in snapshot(shard).items() if not k.startswith("cache.sqlite")} == after_new

        other = start("node-a", out, src, server.url, "shard=0/2")
        assert other.wait(timeout=180) == 0
        merge = start("node-a", out, src, server.url, "merge=true")
        _, err = merge.communicate(timeout=180)
        assert merge.returncode == 0, err
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == N  # exact-once
    ledger_ids = [i for x in (shard / LEDGER).read_text().splitlines() for i in json.loads(x)["ids"]]
    assert len(ledger_ids) == len(set(ledger_ids))
