"""The round-k model really generates round k+1's data on the in-process hf backend: round 2's SPIN
generations are reproduced exactly by the base model + round 1's adapter, and not by the base model."""

from __future__ import annotations

import pytest
import yaml

from synth.align import app
from synth.app import run as synth_run
from synth.io import read_jsonl
from tests.align.helpers import compose_align

pytestmark = pytest.mark.slow


def texts(out):
    return {g["id"]: [c["text"] for c in g["completions"]] for g in read_jsonl(out / "completions.jsonl")}


def test_round_two_generates_with_round_one_adapter(tmp_path, server, data_dir):
    out = tmp_path / "spin"
    raw = compose_align(
        out,
        server.url,
        "spin",
        "no_evaluate",
        "llm=hf",
        "llm.device=cpu",
        f"recipe.data.sft.path={data_dir / 'sft_pairs.jsonl'}",
    )
    raw["overrides"]["train"] += ["optim.lr=0.1"]
    raw["recipe"]["stages"][0]["overrides"].append("pipeline.sampling.seed=7")  # seeded sampling: reproducible
    summary = app.run(raw)
    assert summary["rounds_done"] == 2
    adapter1 = str(out / "rounds/1/dpo/final")
    cfg2 = yaml.safe_load((out / "rounds/2/generate/config.yaml").read_text())
    assert cfg2["llm"]["adapter"] == adapter1 and cfg2["model"]["name_or_path"] == "builtin:tiny"
    assert yaml.safe_load((out / "rounds/1/generate/config.yaml").read_text())["llm"]["adapter"] is None

    got = texts(out / "rounds/2/generate")
    # the same stage again, fresh folder, no cache: with round 1's adapter it is reproduced exactly ...
    synth_run({**cfg2, "output_dir": str(tmp_path / "with_adapter"), "cache": False})
    assert texts(tmp_path / "with_adapter") == got
    # ... and the base model alone (what a broken hand-off would use) writes something else
    synth_run({**cfg2, "llm": {**cfg2["llm"], "adapter": None}, "output_dir": str(tmp_path / "base"), "cache": False})
    assert texts(tmp_path / "base") != got


def test_full_finetuning_hands_the_final_folder_on(tmp_path, server, data_dir):
    out = tmp_path / "spin_full"
    raw = compose_align(
        out,
        server.url,
        "spin",
        "no_evaluate",
        "overrides.train=['lora.enabled=false']",
        f"recipe.data.sft.path={data_dir / 'sft_pairs.jsonl'}",
    )
    assert app.run(raw)["model"]["base"]["name_or_path"] == str(out / "rounds/2/dpo/final")
    cfg = yaml.safe_load((out / "rounds/2/dpo/config.yaml").read_text())
    assert cfg["model"]["name_or_path"] == str(out / "rounds/1/dpo/final") and not cfg["lora"]["enabled"]
    assert cfg["loop"]["reference"]["name_or_path"] is None  # precomputed from the start weights = the previous iterate
    assert (out / "rounds/2/dpo/final/model.safetensors").exists()
    assert {r.body["model"] for r in server.chat_requests()} == {"builtin:tiny", "spin-r1-dpo"}
