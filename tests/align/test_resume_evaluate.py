"""kill -9 inside an evaluate stage and between a finished train stage and its ledger entry,
each time rerunning the same command: every stage resumes exactly once, and the final weights equal an
uninterrupted run's."""

from __future__ import annotations

import pytest

from synth.align import app
from tests.align.helpers import CHUNK1, compose_align, killed_run, ledger, same_rows, same_weights

pytestmark = pytest.mark.slow


def test_kill_9_in_evaluate_and_before_the_ledger_entry(tmp_path, server):
    args = ("rounds=1", *CHUNK1)
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    app.run(compose_align(ref, server.url, "cai_rounds", *args))

    killed_run(out, server.url, "synth:0/evaluate", *args)  # evaluate, after its first committed chunk
    assert not ledger(out)["stages"]
    killed_run(out, server.url, "ledger:1/dpo", *args)  # DPO finished; killed before the ledger records it
    led = ledger(out)
    assert "1/dpo" not in led["stages"] and "1/sft" in led["stages"] and (out / "rounds/1/dpo/summary.json").exists()
    dpo_mtime = (out / "rounds/1/dpo/final/adapter_model.safetensors").stat().st_mtime_ns

    seen = len(server.requests)
    summary = app.run(compose_align(out, server.url, "cai_rounds", *args))
    assert summary["stages_run_now"] == 2  # 1/dpo (recorded, no step: its summary is there) and 1/evaluate
    assert (out / "rounds/1/dpo/final/adapter_model.safetensors").stat().st_mtime_ns == dpo_mtime
    assert all(
        "cai_rounds-r1-dpo" == r.body["model"] or r.body["model"] == "scripted-judge"
        for r in server.requests[seen:]
        if r.body
    )
    same_rows(out, ref, "rounds/0/evaluate/results.jsonl")
    for stage in ("sft", "dpo"):
        same_weights(out, ref, f"rounds/1/{stage}/final")
