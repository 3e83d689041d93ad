"""kill -9 inside a train stage (round 1) and a synth stage (round 2),
each time rerunning the same command: every stage resumes exactly once, and the final weights equal an
uninterrupted run's."""

from __future__ import annotations

import pytest

from synth.align import app
from synth.io import read_jsonl
from tests.align.helpers import CHUNK1, compose_align, killed_run, ledger, same_rows, same_weights

pytestmark = pytest.mark.slow


def test_kill_9_in_train_and_synth_stages_over_two_rounds(tmp_path, server):
    args = ("rounds=2", "no_evaluate", *CHUNK1)
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    app.run(compose_align(ref, server.url, "cai_rounds", *args))

    killed_run(out, server.url, "train:1/sft", *args)  # between its two optimizer steps
    assert (out / "rounds/1/sft/checkpoints/step-00000001").exists() and not (out / "rounds/1/sft/final").exists()
    killed_run(out, server.url, "synth:2/critique_revision", *args)  # after its first committed chunk
    led = ledger(out)
    assert "1/sft" in led["stages"] and "2/critique_revision" not in led["stages"]
    assert len(read_jsonl(out / "rounds/2/critique_revision/sft.jsonl")) >= 1

    summary = app.run(compose_align(out, server.url, "cai_rounds", *args))
    assert summary["rounds_done"] == 2 and summary["stages_run_now"] == 3  # 2/critique_revision, 2/sft, 2/dpo
    same_rows(out, ref, "rounds/2/critique_revision/sft.jsonl")
    assert ledger(out)["stages"]["1/sft"]["steps"] == 2
    for k in (1, 2):
        for stage in ("sft", "dpo"):
            same_weights(out, ref, f"rounds/{k}/{stage}/final")
    assert set(ledger(out)["stages"]) == set(ledger(ref)["stages"])
