"""What a hostile user does to `synth`: two runs on one folder, a restart over a bad source, a full disk,
keys in error bodies and URLs, bad values, unreadable files, a large public file with bad rows, kill -9
and Ctrl-C. Each test fails on the code before the reliability work."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth.app import run
from synth.errors import ConfigError, OutputError, SourceError, UserError
from synth.io import LEDGER, OutputLock, read_jsonl
from synth.llm._http import classify_status
from synth.pipelines.base import Context, run_pipeline
from synth.pipelines.generate import GenerateConfig, GeneratePipeline
from synth.records import SourceItem, messages
from synth.secrets import redact_config, scrub
from synth.sources import SkipLog, SourceConfig, iter_source
from synth.testing.loopback import LoopbackServer
from tests.fakes import ScriptedLLM

HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
KEY = "sk-live-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"


def prompts_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(n)), encoding="utf-8")
    return path


def openai_cfg(url: str, src: Path, out: Path, **over) -> dict:
    cfg = {
        "llm": {"kind": "openai", "base_url": url, "max_retries": 1, "progress": False},
        "model": {"name_or_path": "scripted"},
        "pipeline": {"_target_": "synth.pipelines.generate.GeneratePipeline", "name": "generate"},
        "source": {"kind": "jsonl", "path": str(src)},
        "output_dir": str(out),
        "chunk_size": 4,
        "progress": False,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def synth_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "synth", *args]


def cli_args(url: str, src: Path, out: Path, *extra: str) -> list[str]:
    return synth_cmd(
        "pipeline=generate",
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=scripted",
        "source=jsonl",
        f"source.path={src}",
        f"output_dir={out}",
        "chunk_size=2",
        "progress=false",
        "llm.max_retries=1",
        *extra,
    )


def ids_of(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


def ctx_with(llm) -> Context:
    return Context(factories={"policy": lambda: llm})


def items(n: int) -> list[SourceItem]:
    return [SourceItem(id=f"id{i}", prompt=messages(("user", f"question {i}"))) for i in range(n)]


# ---- 1. one owner per output folder ------------------------------------------------------------------


@pytest.mark.slow
def test_two_concurrent_runs_one_is_refused_and_rows_are_exact_once(tmp_path):
    src, out = prompts_file(tmp_path / "p.jsonl", 24), tmp_path / "out"
    with LoopbackServer(responder=lambda b: "answer", latency_s=0.6) as server:  # the first run lasts ~7 s
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen(
            cli_args(server.url, src, out, "chunks_in_flight=1"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while not (out / LEDGER).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # the first run holds the folder once it has committed a chunk
        second = subprocess.run(
            cli_args(server.url, src, out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"in use by another run (pid {first.pid})" in err[0], second.stderr
    assert sorted(ids_of(out / "completions.jsonl")) == sorted(set(ids_of(out / "completions.jsonl")))
    assert len(ids_of(out / "completions.jsonl")) == 24


def test_lock_is_exclusive_in_process_and_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("999999\n")  # left behind by a killed run: the file alone holds nothing
    llm = ScriptedLLM(lambda msgs, p, i: "ok")
    with OutputLock(out):
        with pytest.raises(OutputError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            run_pipeline(GeneratePipeline(GenerateConfig()), ctx_with(llm), out, items(3), show_progress=False)
    assert llm.calls == []
    m = run_pipeline(GeneratePipeline(GenerateConfig()), ctx_with(llm), out, items(3), show_progress=False)
    assert m["status"] == "finished" and m["processed"] == 3


def test_train_takes_the_same_lock(tmp_path):
    from train.app import run as train_run

    out = tmp_path / "dpo"
    cfg = {
        "model": {"name_or_path": "builtin:tiny"},
        "data": {"path": str(tmp_path / "prefs.jsonl")},
        "loop": {"name": "preference"},
        "output_dir": str(out),
        "loss": {
            "name": "dpo",
            "kind": "pairwise",
            "needs_reference": True,
            "fn": {"_target_": "train.losses.dpo.dpo_loss", "_partial_": True},
        },
    }
    with OutputLock(out), pytest.raises(OutputError, match="in use by another run"):
        train_run(cfg)


def test_a_killed_holder_releases_the_folder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from synth.io import OutputLock\n"
                f"l = OutputLock({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid}"), OutputLock(out):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with OutputLock(out):  # the kernel dropped the dead holder's lock
        pass


# ---- 2. nothing deleted before validation ------------------------------------------------------------


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file we write (the sqlite cache is left out: sqlite checkpoints its WAL on its own)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != ".lock" and not p.name.startswith("cache.sqlite")
    }


@pytest.mark.parametrize("bad", ["malformed", "empty", "missing", "not_utf8"])
def test_resume_false_with_a_bad_source_keeps_the_previous_outputs(tmp_path, bad):
    src, out = prompts_file(tmp_path / "p.jsonl", 6), tmp_path / "out"
    with LoopbackServer(responder=lambda b: "answer") as server:
        assert run(openai_cfg(server.url, src, out))["status"] == "finished"
        before = _snapshot(out)
        assert {"completions.jsonl", "trace.jsonl", LEDGER, "manifest.json", "config.yaml", ".run.json"} <= set(before)
        broken = tmp_path / "broken.jsonl"
        if bad == "malformed":
            broken.write_text('{"prompt": "fine"}\n{"prompt": \n', encoding="utf-8")
        elif bad == "empty":
            broken.write_text("\n\n", encoding="utf-8")
        elif bad == "not_utf8":
            broken.write_bytes(b'{"prompt": "caf\xe9"}\n')
        source = {"kind": "jsonl", "path": str(broken), "strict": True}
        with pytest.raises(SourceError):
            run(openai_cfg(server.url, src, out, source=source, resume=False))
        assert server.requests == [r for r in server.requests if r.seq < 6]  # no new calls either
    assert _snapshot(out) == before


def test_resume_false_with_bad_backend_settings_keeps_the_previous_outputs(tmp_path):
    src, out = prompts_file(tmp_path / "p.jsonl", 4), tmp_path / "out"
    with LoopbackServer(responder=lambda b: "answer") as server:
        run(openai_cfg(server.url, src, out))
        before = _snapshot(out)
        with pytest.raises(ConfigError, match="judge.llm=openai: max_concurrency"):
            run(
                openai_cfg(
                    server.url,
                    src,
                    out,
                    resume=False,
                    judge={
                        "llm": {"kind": "openai", "base_url": server.url, "max_concurrency": 0},
                        "model": {"name_or_path": "judge"},
                    },
                )
            )
    assert _snapshot(out) == before


# ---- 3. a full disk ----------------------------------------------------------------------------------


def test_disk_full_while_committing_is_one_error_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import synth.io

    real = synth.io._fsync_append
    calls = {"n": 0}

    def filling(path, lines):
        calls["n"] += 1
        if calls["n"] > 4:  # the first chunk commits (completions, trace, ledger), then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, lines)

    monkeypatch.setattr(synth.io, "_fsync_append", filling)
    monkeypatch.setattr(synth.io, "write_text_atomic", _failing_after_first(synth.io.write_text_atomic, calls))
    llm = ScriptedLLM(lambda msgs, p, i: "ok")
    with pytest.raises(OutputError) as info:
        run_pipeline(
            GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, items(8), chunk_size=2, show_progress=False
        )
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "free at least" in msg and "MiB" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not list(tmp_path.glob("*.tmp"))
    assert len(read_jsonl(tmp_path / "completions.jsonl")) == 2  # the failed chunk left no partial bytes
    monkeypatch.undo()
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path, items(8), chunk_size=2, show_progress=False
    )
    assert m["status"] == "finished" and sorted(ids_of(tmp_path / "completions.jsonl")) == sorted(
        f"id{i}" for i in range(8)
    )


def _failing_after_first(write, calls):
    def wrapped(path, text, *args, **kwargs):
        if calls["n"] > 4:  # the manifest write in the failure path hits the same full disk
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text[: len(text) // 2])
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, text, *args, **kwargs)

    return wrapped


def test_sqlite_disk_full_in_the_cache_becomes_the_same_one_line(tmp_path, monkeypatch):
    from synth.llm.cache import CachedLLM

    def full(self, fresh):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(CachedLLM, "_store", full)
    llm = CachedLLM(ScriptedLLM(lambda msgs, p, i: "ok"), tmp_path / "cache.sqlite")
    with pytest.raises(OutputError, match=r"disk full writing .*free at least"):
        run_pipeline(GeneratePipeline(GenerateConfig()), ctx_with(llm), tmp_path / "out", items(2), show_progress=False)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_real_full_tmpfs_gives_one_line_exit_2_and_resumes_elsewhere_intact(tmp_path):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src, out = prompts_file(tmp_path / "p.jsonl", 40), disk / "out"
        with LoopbackServer(responder=lambda b: "x" * 12000) as server:
            res = subprocess.run(
                cli_args(server.url, src, out), cwd=tmp_path, capture_output=True, text=True, timeout=300
            )
        assert res.returncode == 2, res.stderr
        err = res.stderr.strip().splitlines()
        assert "Traceback" not in res.stderr and err[-1].startswith("error: disk full writing ") and str(out) in err[-1]
        assert "free at least" in err[-1]
        assert not list(out.glob("*.tmp"))
        committed = ids_of(out / "completions.jsonl")
        assert len(committed) == len(set(committed)) and len(committed) < 40
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- 4. secret fragments -----------------------------------------------------------------------------


def test_a_key_straddling_the_truncation_point_is_fully_redacted():
    for offset in (250, 280, 295, 299):
        body = json.dumps({"error": {"message": "x" * offset + f" your key {KEY} is not allowed here"}})
        err = classify_status(400, {}, body, KEY)
        text = str(err)
        assert KEY[:8] not in text and "sk-live" not in text, (offset, text)
    # a quoted prefix of the key (as some servers print) is a secret too
    assert KEY[:12] not in scrub(f"invalid key {KEY[:12]}...", KEY)


def test_url_credentials_and_a_pasted_key_never_reach_config_manifest_or_errors(tmp_path):
    cfg = {"llm": {"base_url": ["http://alice:hunter2secret@host:8000/v1"], "api_key_env": KEY}, "x": "ok"}
    saved = json.dumps(redact_config(cfg))
    assert "hunter2secret" not in saved and KEY[:8] not in saved and "http://***@host:8000/v1" in saved
    src = prompts_file(tmp_path / "p.jsonl", 2)
    with pytest.raises(ConfigError) as info:
        run(openai_cfg("http://127.0.0.1:9/v1", src, tmp_path / "o", llm={"api_key_env": KEY}))
    assert KEY[:8] not in str(info.value) and "NAME of an environment variable" in str(info.value)
    assert not (tmp_path / "o" / "config.yaml").exists()
    with pytest.raises(UserError) as info:  # a URL with credentials in a backend failure
        run(
            openai_cfg(
                "http://bob:topsecretpassword@127.0.0.1:9/v1",
                src,
                tmp_path / "o2",
                llm={"max_retries": 0, "timeout_s": 2},
            )
        )
    assert "topsecretpassword" not in str(info.value)
    written = (tmp_path / "o2" / "config.yaml").read_text() + (tmp_path / "o2" / "manifest.json").read_text()
    assert "topsecretpassword" not in written and "***@127.0.0.1:9" in written


def test_a_key_quoted_by_the_server_does_not_reach_stderr_or_the_manifest(tmp_path):
    src, out = prompts_file(tmp_path / "p.jsonl", 2), tmp_path / "out"

    def quoting(seq, body):
        return "400"  # the loopback server quotes the Authorization header back in the error body

    with LoopbackServer(fault_fn=quoting) as server:
        env = {**os.environ, "MY_KEY": KEY}
        res = subprocess.run(
            cli_args(server.url, src, out, "llm.api_key_env=MY_KEY"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert res.returncode == 2
    assert KEY[:8] not in res.stderr + res.stdout + (out / "manifest.json").read_text()


# ---- 5. bad values -----------------------------------------------------------------------------------

BAD_VALUES = [
    ("llm.max_concurrency=0", "max_concurrency"),
    ("llm.timeout_s=0", "timeout_s"),
    ("llm.max_retries=-1", "max_retries"),
    ("llm.base_url=ftp://x/v1", "base_url"),
    ("+llm.foo=1", "unknown key 'foo'"),
    ("chunk_size=0", "chunk_size"),
    ("chunk_size=-1", "chunk_size"),
    ("source.limit=-5", "source.limit"),
    ("pipeline.sampling.temperature=-1", "pipeline.sampling.temperature"),
    ("pipeline.sampling.top_p=5", "pipeline.sampling.top_p"),
    ("pipeline.sampling.max_new_tokens=-5", "pipeline.sampling.max_new_tokens"),
    ("pipeline.n=0", "pipeline.n"),
    ("seed=-1", "seed"),
]


@pytest.fixture(scope="module")
def finished_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    src, out = prompts_file(tmp / "p.jsonl", 3), tmp / "out"
    with LoopbackServer(responder=lambda b: "answer") as server:
        run(openai_cfg(server.url, src, out))
    return src, out


@pytest.mark.parametrize("override,names", BAD_VALUES)
def test_every_bad_value_is_one_line_naming_the_setting_even_on_a_finished_folder(finished_folder, override, names):
    from hydra import compose, initialize_config_module

    src, out = finished_folder
    before = _snapshot(out)
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(
            config_name="synth",
            overrides=["llm=openai", "source=jsonl", f"source.path={src}", f"output_dir={out}", override],
        )
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert names in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(out) == before


def test_every_numeric_setting_has_a_range():
    """Meta-check: a new numeric setting without bounds fails here (add Field(ge=..., le=...))."""
    import importlib
    import pkgutil
    import typing

    import annotated_types as at
    from pydantic import BaseModel

    import synth.pipelines as pipelines
    from synth.app import SynthConfig
    from synth.pipelines.base import PipelineConfig

    def numeric(ann) -> bool:
        return ann in (int, float) or (
            typing.get_origin(ann) is not tuple and any(a in (int, float) for a in typing.get_args(ann))
        )

    unbounded, seen = [], set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, f in cls.model_fields.items():
            for sub in typing.get_args(f.annotation) or (f.annotation,):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub)
            bounded = any(isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) for m in f.metadata)
            if numeric(f.annotation) and not bounded:
                unbounded.append(f"{cls.__name__}.{name}")

    for info in pkgutil.iter_modules(pipelines.__path__):
        mod = importlib.import_module(f"synth.pipelines.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, PipelineConfig):
                walk(obj)
    walk(SynthConfig)
    walk(SourceConfig)
    from synth.evaluate.app import EvaluateConfig
    from train.app import TrainConfig

    walk(TrainConfig)
    walk(EvaluateConfig)
    assert len(seen) > 25 and unbounded == []


# ---- 6. unreadable input -----------------------------------------------------------------------------


def test_unreadable_sources_are_one_line_naming_the_file(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=r"latin1.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column 16\)"):
        list(iter_source(SourceConfig(kind="jsonl", path=str(latin))))
    full = gzip.compress("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(2000)).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(SourceError, match=r"cut.jsonl.gz: the gzip file is truncated"):
        list(iter_source(SourceConfig(kind="jsonl", path=str(cut))))
    for name, content in (("zero.jsonl", b""), ("blank.jsonl", b"\n  \n\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SourceError, match=rf"{name}: the file is empty"):
            list(iter_source(SourceConfig(kind="jsonl", path=str(tmp_path / name))))


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    src = prompts_file(tmp_path / "p.jsonl", 2)
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        run(openai_cfg("http://127.0.0.1:9/v1", src, tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "mine"


def test_non_utf8_training_data_is_one_data_error(tmp_path):
    from train.data import DataError, load_records

    p = tmp_path / "prefs.jsonl"
    p.write_bytes(
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}).encode() + b"\n" + b'{"prompt": "\xff"}\n'
    )
    with pytest.raises(DataError, match=r"prefs.jsonl: line 2: not UTF-8 text"):
        load_records(p)


# ---- 7. a bad row in a large public file ---------------------------------------------------------------


@pytest.mark.skipif(not HH.exists(), reason="shared hh-rlhf test file not present")
def test_shipped_hh_file_reads_in_full_and_bad_rows_are_skipped_and_counted():
    first = list(iter_source(SourceConfig(kind="hh_rlhf", path=str(HH))))
    assert len(first) == 2312  # turns=first needs only the shared first turn: every row is usable
    log = SkipLog()
    full = list(iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), turns="all"), log))
    report = log.report()
    assert len(full) == 2312 - 5
    assert report["source_rows_skipped"] == {"chosen and rejected do not share the same history": 5}
    assert [w.split(":")[1] for w in report["source_rows_skipped_first"]] == ["1255", "1689", "1951", "1953", "2037"]
    with pytest.raises(SourceError, match=r":1255: chosen and rejected do not share"):
        list(iter_source(SourceConfig(kind="hh_rlhf", path=str(HH), turns="all", strict=True)))


def test_skipped_rows_reach_the_manifest_and_a_source_with_no_usable_row_is_an_error(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text('{"prompt": "one"}\n{"question": "wrong field"}\nnot json\n{"prompt": "two"}\n', encoding="utf-8")
    with LoopbackServer(responder=lambda b: "answer") as server:
        m = run(openai_cfg(server.url, src, tmp_path / "out"))
        assert m["processed"] == 2 and m["status"] == "finished"
        assert sum(m["source_rows_skipped"].values()) == 2
        assert [w.split(":")[1] for w in m["source_rows_skipped_first"]] == ["2", "3"]
        bad = tmp_path / "allbad.jsonl"
        bad.write_text('{"question": "a"}\n{"question": "b"}\n', encoding="utf-8")
        with pytest.raises(SourceError, match=r"no usable input .*missing field 'prompt' \(set source.fields.prompt"):
            run(openai_cfg(server.url, bad, tmp_path / "out2"))


# ---- 8. a manifest a reader can trust ----------------------------------------------------------------


def test_manifest_says_running_with_the_committed_counts_mid_run(tmp_path):
    seen = []

    def peek(msgs, p, i):
        path = tmp_path / "manifest.json"
        if path.exists():
            m = json.loads(path.read_text())
            seen.append((m["status"], m["processed"]))
        return "ok"

    run_pipeline(
        GeneratePipeline(GenerateConfig()),
        ctx_with(ScriptedLLM(peek)),
        tmp_path,
        items(6),
        chunk_size=2,
        show_progress=False,
    )
    assert [s for s in seen[::2]] == [("running", 0), ("running", 2), ("running", 4)]
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "finished"


def test_zero_inputs_still_write_every_output_file_and_cache_hits_are_reported(tmp_path):
    m = run_pipeline(
        GeneratePipeline(GenerateConfig()),
        ctx_with(ScriptedLLM(lambda *a: "x")),
        tmp_path / "none",
        [],
        show_progress=False,
    )
    assert m["status"] == "finished" and (tmp_path / "none" / "completions.jsonl").read_text() == ""
    src, out = prompts_file(tmp_path / "p.jsonl", 4), tmp_path / "out"
    with LoopbackServer(responder=lambda b: "answer") as server:
        run(openai_cfg(server.url, src, out))
        again = run(openai_cfg(server.url, src, out, resume=False))
    assert again["cache_hits"] == {"policy": 4} and again["processed"] == 4


# ---- 9. Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_completes_exact_once(tmp_path):
    src, out = prompts_file(tmp_path / "p.jsonl", 20), tmp_path / "out"
    with LoopbackServer(responder=lambda b: "answer", latency_s=0.2) as server:
        # a child inherits an ignored SIGINT (pytest started with `nohup ... &`): restore the default first
        proc = subprocess.Popen(
            cli_args(server.url, src, out, "chunks_in_flight=1"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
        )
        deadline = time.time() + 120
        while not (out / LEDGER).exists() and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert (
            "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
        )
        assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
        res = subprocess.run(cli_args(server.url, src, out), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ids = ids_of(out / "completions.jsonl")
    assert len(ids) == len(set(ids)) == 20
