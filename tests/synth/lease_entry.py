"""Run `synth` as if on another host that shares the output folder over NFS without shared locks
(tests/synth/test_shard_lease.py):

    python -m tests.synth.lease_entry <host> [synth overrides...]

`flock` becomes a no-op (a `nolock` NFS mount, or two hosts: each one's lock is local), and the lease
sees the machine as `<host>`, so only the lease (synth/lease.py) stands between two writers."""

from __future__ import annotations

import fcntl
import sys


def main() -> None:
    host = sys.argv.pop(1)
    from synth import lease

    fcntl.flock = lambda fd, op: None
    lease.machine = lambda: (host, f"{host}/test")
    from synth.__main__ import main as synth_main

    synth_main()


if __name__ == "__main__":
    main()
