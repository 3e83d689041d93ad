"""Helpers for the safety pipelines' end-to-end tests (critique_revision, ai_feedback, red_team): run
the real `synth` config composition in-process on the tiny hf model or against the loopback server,
and check that every output file is well-formed."""

from __future__ import annotations

import json
from pathlib import Path

from synth.io import read_jsonl
from synth.records import PreferenceRecord, SFTRecord

TINY = ("llm=hf", "model=tiny", "llm.device=cpu")
# The tiny model writes nonsense and never stops by itself; stopping at a frequent character makes
# some replies end normally, so every stage of a pipeline runs, and parse failures still happen.
TINY_STOP = '["e"]'
RECORDS = {"sft": SFTRecord, "preferences": PreferenceRecord}


def loopback(url: str) -> tuple[str, ...]:
    # send_seed=false: n samples in ONE request, which the scripted server answers with its list of choices
    # (seeded samples go one request each, with no sample index the server could answer by)
    return (
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=scripted",
        "llm.progress=false",
        "llm.send_seed=false",
    )


def prompts_file(path: Path, prompts: list[str], **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"prompt": p, **fields}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8"
    )
    return path


def run_synth(out: Path, *overrides: str) -> dict:
    """`synth <overrides> output_dir=<out>` through Hydra's composition, in-process; the manifest."""
    from hydra import compose, initialize_config_module

    from synth.app import run

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(config_name="synth", overrides=[*overrides, f"output_dir={out}", "progress=false"])
    return run(cfg)


def check_outputs(out: Path, manifest: dict) -> None:
    """Finished; every declared file present with the counted rows; typed rows validate; the trace's
    failed parses are the manifest's parse failures."""
    assert manifest["status"] == "finished", manifest
    for name, count in manifest["outputs"].items():
        rows = read_jsonl(out / f"{name}.jsonl")
        assert (out / f"{name}.jsonl").exists() and len(rows) == count, name
        for row in rows:
            if name in RECORDS:
                RECORDS[name].model_validate(row)
    assert (out / "config.yaml").exists() and json.loads((out / "manifest.json").read_text())["status"] == "finished"
    trace = read_jsonl(out / "trace.jsonl")
    assert trace and sum(t["parse_status"] == "failed" for t in trace) == sum(manifest["parse_failures"].values())
