"""Durable names: on POSIX a new file's directory entry survives a power loss only once its folder is
fsynced (fsync(2)). A commit that creates a file fsyncs the folder before the ledger line that names
it, and only then; atomic writes fsync the file, rename it and fsync the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import synth.io
from synth.io import LEDGER, ChunkWriter, write_json_atomic


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync as (path, ledger text at that moment, every file name in that folder)."""
    seen: list[tuple[str, str | None, set[str]]] = []
    real = os.fsync

    def record(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        ledger = folder / LEDGER
        seen.append((path, ledger.read_text() if ledger.exists() else None, {p.name for p in folder.iterdir()}))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_a_commit_that_creates_files_fsyncs_the_folder_before_the_ledger_line_and_later_commits_do_not(
    tmp_path, fsyncs
):
    out = tmp_path / "run" / "out"  # two new folders: each one's parent is fsynced, top-most first
    w = ChunkWriter(out, ["sft", "preferences"])
    assert [p for p, _, _ in fsyncs] == [str(tmp_path), str(tmp_path / "run"), str(out)]
    fsyncs.clear()
    w.commit(["a"], {"sft": [{"id": "a"}], "trace": [{"t": 1}]}, {"out/sft": 1})
    paths = [p for p, _, _ in fsyncs]
    assert paths == [str(out / "sft.jsonl"), str(out / "trace.jsonl"), str(out), str(out / LEDGER)]
    _, ledger_then, names_then = fsyncs[2]
    assert ledger_then == ""  # the folder is durable before the ledger line names any file
    assert {"sft.jsonl", "preferences.jsonl", "trace.jsonl", LEDGER} <= names_then
    fsyncs.clear()
    w.commit(["b"], {"preferences": [{"id": "b"}]}, {"out/preferences": 1})  # appends only: no folder fsync
    w.commit(["c"], {"sft": [{"id": "c"}]}, {"out/sft": 1})
    assert str(out) not in [p for p, _, _ in fsyncs]
    assert [json.loads(x)["ids"] for x in (out / LEDGER).read_text().splitlines()] == [["a"], ["b"], ["c"]]


def test_a_file_created_by_a_later_commit_is_made_durable_before_its_ledger_line(tmp_path, fsyncs):
    ChunkWriter(tmp_path, ["sft"]).commit(["a"], {"sft": [{"id": "a"}]}, {})
    w = ChunkWriter(tmp_path, ["sft", "preferences"])  # a resumed run that declares an output with no file yet
    fsyncs.clear()
    w.commit(["b"], {"preferences": [{"id": "b"}]}, {})
    paths = [p for p, _, _ in fsyncs]
    assert paths == [str(tmp_path / "preferences.jsonl"), str(tmp_path), str(tmp_path / LEDGER)]
    assert json.loads(fsyncs[1][1].splitlines()[-1])["ids"] == ["a"]  # b's line not yet written
    fsyncs.clear()
    w.commit(["c"], {"preferences": [{"id": "c"}]}, {})
    assert [p for p, _, _ in fsyncs] == [str(tmp_path / "preferences.jsonl"), str(tmp_path / LEDGER)]


def test_touch_outputs_and_a_torn_ledger_rewrite_are_durable(tmp_path, fsyncs):
    w = ChunkWriter(tmp_path, ["sft"])
    fsyncs.clear()
    w.touch_outputs()
    assert [p for p, _, _ in fsyncs] == [str(tmp_path)]
    w.commit(["a"], {"sft": [{"id": "a"}]}, {})
    with (tmp_path / LEDGER).open("a") as fh:
        fh.write('{"chunk": 1, "ids": ["b"], "si')  # torn
    fsyncs.clear()
    w2 = ChunkWriter(tmp_path, ["sft"])
    assert w2.done_ids == {"a"} and w2.torn_ledger_lines == 1
    # rewritten through a fsynced temporary file + rename + folder fsync, never truncated in place
    assert [p for p, _, _ in fsyncs][:2] == [str(tmp_path / (LEDGER + ".tmp")), str(tmp_path)]


def test_write_text_atomic_fsyncs_the_file_then_the_folder_after_the_rename(tmp_path, fsyncs):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"status": "running"})
    assert [p for p, _, _ in fsyncs] == [str(tmp_path / "manifest.json.tmp"), str(tmp_path)]
    assert fsyncs[1][2] == {"manifest.json"}  # at the folder fsync: renamed, no temporary file left
    fsyncs.clear()
    write_json_atomic(target, {"status": "running"}, durable=False)  # the per-commit running manifest
    assert fsyncs == [] and json.loads(target.read_text()) == {"status": "running"}


def test_fsync_dir_tolerates_a_file_system_that_cannot_fsync_folders(tmp_path, monkeypatch):
    import errno

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    synth.io.fsync_dir(tmp_path)  # no error: such a file system gives no stronger guarantee


def test_merge_fsyncs_the_folder_after_renaming_the_merged_outputs(tmp_path, fsyncs):
    from synth.merge import merge_files

    shards = []
    for k in range(2):
        d = tmp_path / "shards" / str(k)
        d.mkdir(parents=True)
        (d / "sft.jsonl").write_text(json.dumps({"id": f"s{k}"}) + "\n")
        shards.append(d)
    per = [{"sizes": {"sft": (d / "sft.jsonl").stat().st_size}} for d in shards]
    merge_files(tmp_path, shards, per, ["sft"], {})
    paths = [p for p, _, _ in fsyncs]
    assert paths[-1] == str(tmp_path) and "sft.jsonl" in fsyncs[-1][2] and "sft.jsonl.merging" not in fsyncs[-1][2]
    assert [json.loads(x)["id"] for x in (tmp_path / "sft.jsonl").read_text().splitlines()] == ["s0", "s1"]


def test_fsync_tree_syncs_every_file_and_folder_deepest_first(tmp_path, fsyncs):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    for name in ("m/config.json", "m/model.safetensors", "m/sub/tok.json"):
        (tmp_path / name).write_text("x")
    synth.io.fsync_tree(tmp_path / "m")
    paths = [Path(p).relative_to(tmp_path).as_posix() for p, _, _ in fsyncs]
    assert sorted(paths) == sorted(["m/config.json", "m/model.safetensors", "m/sub/tok.json", "m/sub", "m"])
    assert paths.index("m/sub/tok.json") < paths.index("m/sub") < paths.index("m") == len(paths) - 1
