"""Helpers of the offline-loop tests (tests/train/test_loops*.py and friends): toy preference and ranked
records a tiny model learns in a few steps, Hydra composition and an in-process `train` run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "bread flour water salt yeast dough oven crust brown fox dog honest kind".split()


FAST = [
    "data.max_length=48",
    "progress=false",
    "log.plot=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
    "optim.lr=1e-3",
    "optim.warmup_ratio=0",
]


def toy_pairs(n: int, seed: int = 0, marker: str = "yes", other: str = "no"):
    """Preference records whose chosen response ends with `marker` and rejected with `other`: a
    preference a tiny model can learn in a few steps. score_chosen varies (sDPO/Curry/ODPO need it)."""
    import random

    from synth.records import PreferenceRecord, messages

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=4))
        base = " ".join(rng.choices(WORDS, k=3))
        rows.append(
            PreferenceRecord(
                id=f"p{seed}-{i}",
                prompt=messages(("user", prompt)),
                chosen=messages(("assistant", f"{base} {marker}")),
                rejected=messages(("assistant", f"{base} {other}")),
                method="toy",
                score_chosen=2.0 + i % 3,
                score_rejected=1.0,
                meta={"safe_chosen": True, "safe_rejected": i % 2 == 0},
            )
        )
    return rows


def toy_ranked(n: int, seed: int = 0):
    """Ranked records: the response ending in 'yes' scores 2, 'maybe' 1, 'no' 0."""
    import random

    from synth.records import RankedRecord, messages

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = " ".join(rng.choices(WORDS, k=3))
        rows.append(
            RankedRecord(
                id=f"r{seed}-{i}",
                prompt=messages(("user", " ".join(rng.choices(WORDS, k=4)))),
                responses=[messages(("assistant", f"{base} {w}")) for w in ("no", "yes", "maybe")],
                scores=[0.0, 2.0, 1.0],
                method="toy",
            )
        )
    return rows


def write_records(path: Path, records) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in records))
    return path


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def train(out: Path, *overrides: str) -> dict:
    from train.app import run

    return run(compose(*FAST, f"output_dir={out}", *overrides))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def initial_weights(tiny_path: Path) -> dict[str, torch.Tensor]:
    return state_dict(tiny_path)


def varied_batch(tokenizer, n: int = 4):
    from train.data import make_collator, normalise_rows, tokenize_dataset

    rows = [r.model_dump() for r in toy_pairs(n)]
    for i, r in enumerate(rows):  # lengths that differ a lot, so rows pack two or three to a bin
        r["chosen"][0]["content"] = " ".join((WORDS * 4)[: 1 + 12 * i])
    ds, _ = tokenize_dataset(
        normalise_rows([{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in rows]), tokenizer
    )
    return make_collator("pairwise", tokenizer.pad_token_id)(ds.to_list())
