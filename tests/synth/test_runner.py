"""The chunked runner: exact-once commits, torn-write recovery, manifest counts, resume."""

import json

import pytest

from synth.io import LEDGER, ChunkWriter, read_jsonl
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.generate import GenerateConfig, GeneratePipeline
from synth.records import SourceItem, messages
from tests.fakes import ScriptedLLM


def items(n):
    return [SourceItem(id=f"id{i}", prompt=messages(("user", f"question {i}"))) for i in range(n)]


def ctx_with(llm):
    return Context(factories={"policy": lambda: llm})


def test_generate_one_backend_call_per_chunk_and_manifest(tmp_path):
    llm = ScriptedLLM(lambda msgs, p, i: f"answer {i} to {msgs[-1].content}")
    pipe = GeneratePipeline(GenerateConfig(n=3))
    m = run_pipeline(pipe, ctx_with(llm), tmp_path, items(10), chunk_size=4, show_progress=False)
    assert len(llm.calls) == 3  # chunks of 4, 4, 2: one call each, n=3 inside the params
    assert [len(reqs) for reqs, _ in llm.calls] == [4, 4, 2]
    assert all(p.n == 3 for _, ps in llm.calls for p in ps)
    rows = read_jsonl(tmp_path / "completions.jsonl")
    assert [r["id"] for r in rows] == [f"id{i}" for i in range(10)]
    assert rows[7]["completions"][2]["text"] == "answer 2 to question 7"
    assert m["outputs"] == {"completions": 10} and m["processed"] == 10 and m["status"] == "finished"
    assert m["calls"] == {"generate": 10}
    assert len(read_jsonl(tmp_path / "trace.jsonl")) == 30
    assert json.loads((tmp_path / "manifest.json").read_text())["inputs"] == 10


def test_rerun_of_finished_run_makes_no_calls(tmp_path):
    llm = ScriptedLLM(lambda msgs, p, i: "x")
    run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, items(5), chunk_size=2, show_progress=False
    )
    llm2 = ScriptedLLM(lambda msgs, p, i: "y")
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm2), tmp_path, items(5), chunk_size=2, show_progress=False
    )
    assert llm2.calls == []
    assert m["resumed_from_previous_runs"] == 5 and m["outputs"] == {"completions": 5}
    assert len(read_jsonl(tmp_path / "completions.jsonl")) == 5


def test_failure_keeps_committed_chunks_and_resume_completes_exactly_once(tmp_path):
    def flaky(msgs, p, i):
        if msgs[-1].content == "question 5":
            raise ConnectionError("server gone")
        return "ok"

    with pytest.raises(ConnectionError):
        run_pipeline(
            GeneratePipeline(GenerateConfig()),
            ctx_with(ScriptedLLM(flaky)),
            tmp_path,
            items(8),
            chunk_size=2,
            show_progress=False,
        )
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["status"] == "failed" and "server gone" in m["error"]
    assert [r["id"] for r in read_jsonl(tmp_path / "completions.jsonl")] == ["id0", "id1", "id2", "id3"]
    llm = ScriptedLLM(lambda msgs, p, i: "ok")
    run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, items(8), chunk_size=2, show_progress=False
    )
    assert [len(r) for r, _ in llm.calls] == [2, 2]  # only the 4 missing inputs
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "completions.jsonl")) == [f"id{i}" for i in range(8)]


def test_uncommitted_bytes_and_torn_lines_are_cut_on_recovery(tmp_path):
    w = ChunkWriter(tmp_path, ["sft"])
    w.commit(["a"], {"sft": [{"id": "a"}]}, {"out/sft": 1})
    # a crash after writing output bytes (one whole row, one torn) but before the ledger line:
    with (tmp_path / "sft.jsonl").open("a") as fh:
        fh.write('{"id": "b"}\n{"id": "c", "tru')
    with (tmp_path / LEDGER).open("a") as fh:  # and a torn ledger line
        fh.write('{"chunk": 1, "ids": ["b", "c"], "si')
    w2 = ChunkWriter(tmp_path, ["sft"])
    assert w2.done_ids == {"a"} and w2.torn_ledger_lines == 1 and w2.counters["out/sft"] == 1
    assert read_jsonl(tmp_path / "sft.jsonl") == [{"id": "a"}]
    w2.commit(["b"], {"sft": [{"id": "b"}]}, {"out/sft": 1})
    assert [r["id"] for r in read_jsonl(tmp_path / "sft.jsonl")] == ["a", "b"]
    assert ChunkWriter(tmp_path, ["sft"]).done_ids == {"a", "b"}


def test_duplicate_input_ids_processed_once(tmp_path):
    llm = ScriptedLLM(lambda msgs, p, i: "ok")
    its = items(3) + items(2)
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, its, chunk_size=10, show_progress=False
    )
    assert m["duplicate_inputs_skipped"] == 2 and m["outputs"] == {"completions": 3}


def test_undeclared_output_is_an_error(tmp_path):
    w = ChunkWriter(tmp_path, ["sft"])
    with pytest.raises(KeyError, match="undeclared"):
        w.commit(["a"], {"preferences": [{}]}, {})


class _SetupFails(GeneratePipeline):
    """setup() raises what a user can fix (a real pipeline's setup reads a baseline, builds a judge...)."""

    def setup(self, ctx, writer):
        from synth.errors import DataError

        raise DataError("baseline /x/results.jsonl: line 3 is not JSON; fix or remove that line")


def test_setup_failure_ends_like_any_failure_and_keeps_committed_rows(tmp_path, capsys):
    from synth.errors import DataError

    llm = ScriptedLLM(lambda msgs, p, i: "ok")
    run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, items(4), chunk_size=2, show_progress=False
    )
    ledger = (tmp_path / LEDGER).read_text()
    capsys.readouterr()
    with pytest.raises(DataError) as e:  # resumed into the same folder with 4 more inputs
        run_pipeline(
            _SetupFails(GenerateConfig()), ctx_with(llm), tmp_path, items(8), chunk_size=2, show_progress=False
        )
    assert "\n" not in str(e.value)  # the CLI prints it as its one line
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] == f"DataError: {e.value}"
    assert m["processed"] == 4 and m["resumed_from_previous_runs"] == 4 and m["outputs"] == {"completions": 4}
    assert [r["id"] for r in read_jsonl(tmp_path / "completions.jsonl")] == [f"id{i}" for i in range(4)]
    assert (tmp_path / LEDGER).read_text() == ledger and len(llm.calls) == 2  # nothing of the failed run was run
    out = capsys.readouterr().out
    assert "generate: failed" in out and "line 3 is not JSON" in out  # the one-screen summary, as for any failure
    fresh = tmp_path / "fresh"  # a first run gets its manifest too
    with pytest.raises(DataError):
        run_pipeline(_SetupFails(GenerateConfig()), ctx_with(llm), fresh, items(2), show_progress=False)
    assert json.loads((fresh / "manifest.json").read_text())["status"] == "failed"


def test_commit_fsyncs_only_the_files_the_chunk_wrote_and_the_ledger_last(tmp_path, monkeypatch):
    import os

    import synth.io

    synced = []
    real = os.fsync
    monkeypatch.setattr(
        synth.io.os, "fsync", lambda fd: (synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))), real(fd))
    )
    w = ChunkWriter(tmp_path, ["sft", "preferences"])
    assert synced == [tmp_path.name]  # the folder, once at start (names an earlier run created)
    synced.clear()
    w.commit(["a"], {"sft": [{"id": "a"}], "trace": [{"t": 1}]}, {"out/sft": 1})
    # preferences: nothing written, nothing to sync; the files are new: the folder before the ledger line
    assert synced == ["sft.jsonl", "trace.jsonl", tmp_path.name, LEDGER]
    assert (tmp_path / "preferences.jsonl").read_text() == ""  # every declared file exists all the same
    synced.clear()
    w.commit(["b"], {"preferences": [{"id": "b"}]}, {"out/preferences": 1})
    assert synced == ["preferences.jsonl", LEDGER]
    synced.clear()
    w.commit(["c"], {}, {})  # a chunk that dropped everything: the ledger line alone
    assert synced == [LEDGER]
    entries = [json.loads(x) for x in (tmp_path / LEDGER).read_text().splitlines()]
    sft, pref, trace = (tmp_path / f"{n}.jsonl" for n in ("sft", "preferences", "trace"))
    assert [e["sizes"] for e in entries] == [
        {"sft": sft.stat().st_size, "preferences": 0, "trace": trace.stat().st_size},
        {"sft": sft.stat().st_size, "preferences": pref.stat().st_size, "trace": trace.stat().st_size},
    ] + [entries[1]["sizes"]]
    # recovery after uncommitted bytes in an untouched file cuts it back to the size the ledger names
    with pref.open("a") as fh:
        fh.write('{"id": "z", "tor')
    w2 = ChunkWriter(tmp_path, ["sft", "preferences"])
    assert w2.done_ids == {"a", "b", "c"} and [r["id"] for r in read_jsonl(pref)] == ["b"]
