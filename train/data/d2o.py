"""D2O data: join the model's own samples (`synth pipeline=generate` output) to human negatives.

    rows, counts = d2o_rows(load_generations("out/gen/completions.jsonl"), load_records("negatives.jsonl"))

`generations` are rows {prompt, completions: [{text, finish_reason}, ...]} (GenerationRecord) sampled once
from the initial model with n = K; `negatives` are preference rows whose `rejected` side is the
human-annotated harmful response (their `chosen` is ignored). The join key is the prompt's messages, so
the two files need not share ids. Duplicate and cut-off samples are dropped (a duplicate anchor counts
twice in the mean; a cut-off one is not a response the model would give); a prompt left without samples
is dropped and counted. Output rows {id, prompt, samples, rejected} are what `loss=d2o` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from train.data.load import DataError, read_rows


def _key(messages: list[Mapping[str, Any]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def load_generations(path: str) -> list[Mapping[str, Any]]:
    rows = list(read_rows(path, "train"))
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), list) or not isinstance(r.get("completions"), list):
            raise DataError(f"{path}: row {i}: expected synth generate output (prompt messages + completions)")
    return rows


def d2o_rows(
    generations: Iterable[Mapping[str, Any]], negatives: Iterable[Mapping[str, Any]], max_samples: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(D2O rows, counts: joined, no_generation, no_samples, duplicate_samples, truncated_samples)."""
    samples: dict[str, list[str]] = {}
    counts = {"joined": 0, "no_generation": 0, "no_samples": 0, "duplicate_samples": 0, "truncated_samples": 0}
    for g in generations:
        bucket = samples.setdefault(_key(g["prompt"]), [])
        for c in g["completions"]:
            text = c["text"] if isinstance(c, Mapping) else str(c)
            if isinstance(c, Mapping) and c.get("finish_reason") == "length":
                counts["truncated_samples"] += 1
            elif text in bucket or not text.strip():
                counts["duplicate_samples"] += 1
            else:
                bucket.append(text)
    out = []
    for n in negatives:
        found = samples.get(_key(n["prompt"]))
        if found is None:
            counts["no_generation"] += 1
            continue
        if not found:
            counts["no_samples"] += 1
            continue
        out.append({"id": n["id"], "prompt": n["prompt"], "samples": found[:max_samples], "rejected": n["rejected"]})
        counts["joined"] += 1
    return out, counts
