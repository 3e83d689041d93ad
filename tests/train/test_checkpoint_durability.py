"""A checkpoint's trainer_state.json (the mark of a complete save) is fsynced, renamed into place, and
its folder, checkpoints/ and the output folder fsynced: after a power loss resume finds it by name."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train.loops.checkpoints as ck


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync as (path, every file name in that folder at that moment)."""
    seen: list[tuple[str, set[str]]] = []
    real = os.fsync

    def record(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        seen.append((path, {p.name for p in folder.iterdir()}))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def save(out, step=3, tensors=None):
    """save_checkpoint on one process (a stand-in accelerator) with a real optimizer and scheduler."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    accelerator = SimpleNamespace(
        distributed_type=SimpleNamespace(value="NO"),
        is_main_process=True,
        process_index=0,
        wait_for_everyone=lambda: None,
    )
    return ck.save_checkpoint(
        out,
        step,
        accelerator=accelerator,
        model=None,
        tokenizer=None,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        state={"epoch": 0},
        tensors=tensors,
        keep_last=2,
    )


def test_checkpoint_state_file_and_folders_are_fsynced_after_the_rename(tmp_path, fsyncs, monkeypatch):
    monkeypatch.setattr(ck, "save_model", lambda model, tok, folder, acc: Path(folder).mkdir(parents=True))
    out = tmp_path / "train"
    ckpt = save(out)
    paths = [p for p, _ in fsyncs]
    i = paths.index(str(ckpt / (ck.STATE_FILE + ".tmp")))
    assert paths[i:] == [str(ckpt / (ck.STATE_FILE + ".tmp")), str(ckpt), str(ckpt.parent), str(out)]
    assert ck.STATE_FILE in fsyncs[i + 1][1] and ck.STATE_FILE + ".tmp" not in fsyncs[i + 1][1]
    assert ck.find_last_checkpoint(out) == ckpt


def test_every_checkpoint_file_is_fsynced_before_the_state_file(tmp_path, fsyncs, monkeypatch):
    """Weights, optimizer, scheduler, tensors and RNG files reach the disk before trainer_state.json marks
    the checkpoint complete, so a power loss never leaves a "complete" checkpoint with unwritten weights."""

    def fake_save(model, tok, folder, acc):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(ck, "save_model", fake_save)
    ckpt = save(tmp_path / "train", step=1, tensors={"ref": torch.zeros(1)})
    paths = [p for p, _ in fsyncs]
    state = paths.index(str(ckpt / (ck.STATE_FILE + ".tmp")))
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "tensors.pt", "rng_0.pt"):
        assert str(ckpt / name) in paths[:state], name


def test_reference_cache_is_durable_before_its_key_file(tmp_path, fsyncs):
    """train/reference.py's cache of reference log-probs: the tensors are fsynced before the rename, the
    folder after it, and the .json that names them is written (atomically, fsynced) only then."""
    from train.reference import _save

    path = tmp_path / "ref" / "cache.safetensors"
    _save({"ref_logps": torch.zeros(3)}, {"model": "m"}, path)
    paths = [p for p, _ in fsyncs]
    tmp = paths.index(str(path.with_suffix(f".tmp{os.getpid()}")))  # the tensors, before the rename
    assert paths[tmp + 1] == str(path.parent)  # the rename made durable
    assert paths[tmp + 2] == str(path.with_suffix(".json")) + ".tmp" and paths[tmp + 3] == str(path.parent)


def test_summary_json_is_written_durably(tmp_path, fsyncs):
    from train.loops.metrics import write_json

    write_json(tmp_path / "summary.json", {"steps": 3})
    assert [p for p, _ in fsyncs] == [str(tmp_path / "summary.json.tmp"), str(tmp_path)]
