"""launcher=ray on a local Ray cluster (opt-in: marker `ray`, skipped without the ray package): an actor
is SIGKILLed mid-shard, Ray restarts it and retries the shard, the ledger resumes it, and the merged
output is exact-once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from synth.io import LEDGER
from synth.shard import Shard
from tests.synth.test_shard import answer, synth_cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ray = pytest.importorskip("ray")


def kill_one_actor_mid_shard(out: Path, n: int, stop: threading.Event, killed: list) -> None:
    """SIGKILL the process holding a shard's folder lock once that shard has committed a chunk."""
    while not stop.is_set() and not killed:
        for i in range(n):
            folder = Shard(i, n).folder(out)
            ledger, lock = folder / LEDGER, folder / ".lock"
            try:
                done = json.loads((folder / "manifest.json").read_text())["status"] == "finished"
                lines = ledger.read_text().count("\n")
                pid = int(lock.read_text().strip())
            except (OSError, ValueError, KeyError):
                continue
            if not done and lines >= 1 and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append((i, pid))
                return
        time.sleep(0.002)


def test_ray_pool_survives_an_actor_killed_mid_shard(tmp_path, make_openai_server):
    server = make_openai_server(responder=answer, latency_s=0.05)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(50)))
    out, n = tmp_path / "out", 4
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=kill_one_actor_mid_shard, args=(out, n, stop, killed), daemon=True)
    watcher.start()
    try:
        from synth.app import run

        m = run(
            synth_cfg(
                server.url,
                src,
                out,
                "chunk_size=2",
                "launcher=ray",
                f"launcher.shards={n}",
                "launcher.actors=2",
                "launcher.init_num_cpus=4",
                f"launcher.temp_dir={temp}",
            )
        )
    finally:
        stop.set()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert killed, "no actor was killed: the shards finished too fast"
    shard, _ = killed[0]
    assert json.loads((Shard(shard, n).folder(out) / "manifest.json").read_text())["resumed_from_previous_runs"] > 0
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == 50 and m["processed"] == 50 and m["ray"]["shards_run"] == n
    calls = len(server.requests)
    run(synth_cfg(server.url, src, out, "chunk_size=2", "launcher=ray", f"launcher.shards={n}"))  # all finished
    assert len(server.requests) == calls  # no shard reran, no cluster needed
