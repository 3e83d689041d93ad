"""Shared helpers for the ranking pipelines' end-to-end tests: compose the real `synth` config
(Hydra, as the command line does) and run it on the tiny hf model or the loopback server."""

from __future__ import annotations

import json
from pathlib import Path

from synth.io import read_jsonl
from synth.records import PreferenceRecord, RankedRecord, SFTRecord

RECORDS = {"preferences": PreferenceRecord, "ranked": RankedRecord, "sft": SFTRecord}


def pairs_file(path: Path, n: int = 3) -> Path:
    rows = [
        {
            "prompt": f"How can I stay safe when walking home at night, case {i}?",
            "chosen": "Stay on lit streets and tell a friend.",
            "rejected": "Just run.",
            "category": "safety/personal",
        }
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TINY = ("llm=hf", "model=tiny")


def loopback(url: str) -> tuple[str, ...]:
    # send_seed=false: n samples in ONE request, which the scripted server answers with its list of choices
    # (seeded samples go one request each, with no sample index the server could answer by)
    return ("llm=openai", f"llm.base_url={url}", "model.name_or_path=scripted", "llm.send_seed=false")


def run_synth(tmp_path: Path, pipeline: str, *overrides: str, backend: tuple[str, ...] = TINY, n: int = 3) -> dict:
    """`synth pipeline=<pipeline> <backend> source=jsonl ... output_dir=<tmp>/out` in-process (the
    command line's own config composition); returns the manifest."""
    from hydra import compose, initialize_config_module

    from synth.app import run

    src = pairs_file(tmp_path / "src.jsonl", n)
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(
            config_name="synth",
            overrides=[
                f"pipeline={pipeline}",
                *backend,
                "source=jsonl",
                f"source.path={src}",
                f"output_dir={tmp_path / 'out'}",
                "progress=false",
                *overrides,
            ],
        )
    return run(cfg)


def check_outputs(out: Path, manifest: dict) -> None:
    """Finished, every declared file present and every row valid, one trace row per sample."""
    assert manifest["status"] == "finished", manifest
    for name, count in manifest["outputs"].items():
        rows = read_jsonl(out / f"{name}.jsonl")
        assert len(rows) == count
        if name in RECORDS:
            for row in rows:
                RECORDS[name].model_validate(row)
    assert (out / "manifest.json").exists() and (out / "config.yaml").exists()
    trace = read_jsonl(out / "trace.jsonl")
    assert trace and all(r["parse_status"] in ("ok", "failed", "skipped") for r in trace)
    failed = sum(r["parse_status"] == "failed" for r in trace)
    assert failed == sum(manifest["parse_failures"].values())
