"""Run `align` in a child process that SIGKILLs itself at one point inside a stage (tests/align/test_resume.py):

    python -m tests.align.kill_entry <out> <url> <recipe> <point> [overrides...]

points: synth:<round>/<stage>   right after that stage's first committed chunk (synth or evaluate)
        train:<round>/<stage>   right after that train stage's first checkpoint
        ledger:<round>/<stage>  after the stage finished, before the ledger records it
The kill is a real kill -9 of this process: nothing gets to clean up or flush."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(out: Path, point: str) -> None:
    kind, _, where = point.partition(":")
    target = out / "rounds" / where
    if kind == "synth":
        from synth import io

        commit = io.ChunkWriter.commit

        def killing_commit(self, *a, **kw):
            commit(self, *a, **kw)
            if self.out_dir == target:
                die()

        io.ChunkWriter.commit = killing_commit
    elif kind == "train":
        from train.loops import checkpoints

        save = checkpoints.save_checkpoint

        def killing_save(out_dir, *a, **kw):
            result = save(out_dir, *a, **kw)
            if Path(out_dir) == target:
                die()
            return result

        checkpoints.save_checkpoint = killing_save
    elif kind == "ledger":
        from synth.align import app

        record = app.Ledger.record

        def killing_record(self, key, entry):
            if key == where:
                die()
            record(self, key, entry)

        app.Ledger.record = killing_record
    else:
        raise SystemExit(f"unknown kill point {point}")


def main() -> None:
    out, url, recipe, point, *extra = sys.argv[1:]
    import torch

    torch.set_num_threads(1)
    from synth.align import app
    from tests.align.helpers import compose_align

    install(Path(out), point)
    app.run(compose_align(Path(out), url, recipe, *extra))


if __name__ == "__main__":
    main()
