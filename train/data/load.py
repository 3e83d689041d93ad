"""Training data, loading: read a file / `save_to_disk` folder / hub dataset, detect each row's kind and
normalise it (hh-rlhf texts, TRL formats, plain strings) to the canonical columns (see `train.data`)."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

from synth.errors import DataError

RowKind = Literal["sft", "pairwise", "ranked", "unpaired"]

# Required fields per kind; pairwise `prompt` is optional (TRL's implicit-prompt format, hh-rlhf).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "ranked": ("prompt", "responses", "scores"),
    "pairwise": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "sft": ("messages",),
}
PAIR_SCALARS = (
    "score_chosen",
    "score_rejected",
    "margin",
    "p_chosen",
    "reward_chosen",
    "reward_rejected",
    "cost_chosen",
    "cost_rejected",
)
# D2O rows {prompt, samples: [K responses], rejected} become ranked lists (samples 1, the negative 0).
_D2O_SHAPE = ("prompt", "samples", "rejected")
# DOVE joint preferences as synth's judge mode=joint writes them (JointPreferenceRecord): two (instruction,
# response) sides a and b, `label` naming the preferred one, optional soft label `p_a`; read as a pair with
# prompt / chosen from the preferred side and prompt_rejected / rejected from the other.
_JOINT_SHAPE = ("prompt_a", "response_a", "prompt_b", "response_b", "label")


# ----------------------------------------------------------------------------------------------- loading


def load_records(
    path: str | Path, *, split: str = "train", kind: RowKind | None = None, limit: int | None = None
) -> Dataset:
    """Load a file / `save_to_disk` folder / hub dataset and return it with the canonical columns."""
    rows = read_rows(path, split)
    if limit is not None:
        rows = (row for i, row in zip(range(limit), rows, strict=False))
    return normalise_rows(rows, source=str(path), kind=kind)


def normalise_rows(rows: Iterable[Mapping[str, Any]], *, source: str = "rows", kind: RowKind | None = None) -> Dataset:
    """Validate rows of any accepted shape and convert them to the canonical columns of their kind."""
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{source}: row {i}: expected a JSON object, got {type(row).__name__}")
        if kind is None:
            kind = _detect(row.keys(), f"{source}: row {i}")
        out.append(_NORMALISERS[kind](row, _Where(source, i)))
    if not out:
        raise DataError(f"{source}: the dataset is empty (no rows)")
    return Dataset.from_list(_fill_optional(out))


def has_distinct_prompts(dataset: Dataset) -> bool:
    """True when some pair carries its rejected side's own prompt (a DOVE joint pair)."""
    return "prompt_rejected" in dataset.column_names and any(p is not None for p in dataset["prompt_rejected"])


def detect_kind(dataset: Dataset) -> RowKind:
    """The row kind of a canonical or tokenised dataset, from its columns."""
    cols = set(dataset.column_names)
    markers = {
        "responses": "ranked",
        "response_ids": "ranked",
        "chosen": "pairwise",
        "chosen_ids": "pairwise",
        "label": "unpaired",
        "messages": "sft",
        "input_ids": "sft",
    }
    for marker, kind in markers.items():
        if marker in cols:
            return kind  # type: ignore[return-value]
    raise DataError(f"cannot tell the row kind from columns {sorted(cols)}")


def _detect(keys: Iterable[str], where: str) -> RowKind:
    keys = set(keys)
    if keys.issuperset(_D2O_SHAPE) and "chosen" not in keys:
        return "ranked"
    if keys.issuperset(_JOINT_SHAPE):
        return "pairwise"
    for kind, required in _REQUIRED.items():
        if keys.issuperset(required):
            return kind  # type: ignore[return-value]
    # Name the closest shape's missing fields: "a preference file missing `chosen`" reads as such.
    shapes = "; ".join(f"{k}: {', '.join(v)}" for k, v in _REQUIRED.items())
    best = max(_REQUIRED, key=lambda k: len(keys & (set(_REQUIRED[k]) - {"prompt"})))  # `prompt` is in 3 shapes
    if not keys & (set(_REQUIRED[best]) - {"prompt"}):
        raise DataError(f"{where}: unknown row shape (keys: {sorted(keys)}; accepted shapes: {shapes})")
    missing = [f for f in _REQUIRED[best] if f not in keys]
    raise DataError(
        f"{where}: looks like a {best} row but is missing field(s) {missing} "
        f"(keys present: {sorted(keys)}; accepted shapes: {shapes})"
    )


def read_rows(path: str | Path, split: str) -> Iterable[Mapping[str, Any]]:
    p = Path(path)
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"{p}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        return ds
    if p.exists():
        name = p.name.removesuffix(".gz")
        if name.endswith(".parquet"):
            return Dataset.from_parquet(str(p))
        if name.endswith(".json"):
            return _read_json(p, split)
        return _read_jsonl(p)
    if p.suffix in {".jsonl", ".json", ".gz", ".parquet"} or p.is_absolute() or str(path).startswith("."):
        raise DataError(f"{path}: no such file")
    return _load_hub(str(path), split)


def _open_text(p: Path):
    return gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(p, encoding="utf-8")


@contextlib.contextmanager
def _readable(p: Path, where: Callable[[], str]):
    """Undecodable bytes or a cut gzip stream -> one DataError naming the file and where it happened."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(
            f"{p}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} {where()}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{p}: the gzip file is truncated or corrupt {where()} ({e})") from None


def _read_jsonl(p: Path) -> Iterable[Mapping[str, Any]]:
    """Rows of a JSON-lines file, decoded line by line so that a bad byte is reported at its line."""
    line_no = 0
    opener = gzip.open if p.suffix == ".gz" else open
    with _readable(p, lambda: f"after line {line_no}"), opener(p, "rb") as f:
        for line_no, raw in enumerate(f, 1):  # noqa: B007 - read by the gzip error message above
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{p}: line {line_no}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r}); "
                    "convert it to UTF-8 (e.g. iconv -t utf-8)"
                ) from None
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: line {line_no}: invalid JSON ({e.msg})") from None


def _read_json(p: Path, split: str) -> Iterable[Mapping[str, Any]]:
    with _readable(p, lambda: "in the file"), _open_text(p) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # many ".json" files are really JSON lines
        return _read_jsonl(p)
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        data = data.get(split, data.get("data"))
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a list of rows (or {{{split!r}: [...]}}), got {type(data).__name__}")
    return data


def _load_hub(name: str, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; the user needs one message
        raise DataError(f"{name}: not a local file or folder, and loading it from the hub failed: {e}") from e


# ------------------------------------------------------------------------------------------- normalising


@dataclass(frozen=True)
class _Where:
    source: str
    row: int

    def error(self, field_name: str, why: str) -> DataError:
        return DataError(f"{self.source}: row {self.row}: field {field_name!r}: {why}")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def is_hh_text(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """hh-rlhf text -> messages. Consecutive turns of one role (a few hh rows have them, and templates
    such as Llama 2's reject them) are merged with a blank line."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content.strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    return messages


def _to_messages(value: Any, role: str, where: _Where, name: str, *, strip: bool = False) -> list[dict]:
    if value is None:
        raise where.error(name, "missing")
    if isinstance(value, str):
        if is_hh_text(value):
            messages = hh_to_messages(value)
            # A standard-format hh prompt ends with an empty "Assistant:" turn: the generation prompt.
            empty_turn = messages and messages[-1] == {"role": "assistant", "content": ""}
            return messages[:-1] if empty_turn and name == "prompt" else messages
        return [{"role": role, "content": value.strip() if strip else value}]
    if not isinstance(value, list):
        raise where.error(name, f"expected a string or a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise where.error(f"{name}[{j}]", "expected a message {'role': str, 'content': str}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _completion(value: Any, where: _Where, name: str, *, strip: bool = False) -> list[dict]:
    messages = _to_messages(value, "assistant", where, name, strip=strip)
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise where.error(
            name, f"a completion must be one or more assistant messages, got roles {[m['role'] for m in messages]}"
        )
    return messages


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], where: _Where):
    """Implicit prompt: the longest common message prefix; the rest of each side is its completion."""
    if chosen == rejected:
        raise where.error("chosen", "chosen and rejected are the same conversation (nothing to compare)")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":  # the completion starts at an assistant turn
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def _joint_to_pair(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    """A JointPreferenceRecord row -> {prompt, chosen, prompt_rejected, rejected (, p_chosen)}."""
    label = row["label"]
    if label not in ("a", "b"):
        raise where.error("label", f"expected 'a' or 'b' (the preferred side), got {label!r}")
    win, lose = (label, "b" if label == "a" else "a")
    out = {
        **{k: v for k, v in row.items() if k not in _JOINT_SHAPE and k != "p_a"},
        "prompt": row[f"prompt_{win}"],
        "chosen": row[f"response_{win}"],
        "prompt_rejected": row[f"prompt_{lose}"],
        "rejected": row[f"response_{lose}"],
    }
    if row.get("p_a") is not None:
        p_a = _number(row["p_a"], where, "p_a")
        out["p_chosen"] = p_a if label == "a" else 1.0 - p_a
    return out


def _norm_pairwise(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    if "prompt_a" in row and "chosen" not in row:
        row = _joint_to_pair(row, where)
    hh = any(is_hh_text(row.get(k)) for k in ("prompt", "chosen", "rejected"))
    if row.get("prompt") is None:
        chosen = _to_messages(row.get("chosen"), "assistant", where, "chosen")
        rejected = _to_messages(row.get("rejected"), "assistant", where, "rejected")
        prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
    else:
        prompt = _to_messages(row["prompt"], "user", where, "prompt")
        chosen, rejected = row.get("chosen"), row.get("rejected")
    out = {
        "id": _row_id(row, where),
        "prompt": prompt,
        "chosen": _completion(chosen, where, "chosen", strip=hh),
        "rejected": _completion(rejected, where, "rejected", strip=hh),
    }
    other = row.get("prompt_rejected", (row.get("meta") or {}).get("prompt_rejected"))
    if other is not None:  # DOVE: the rejected side's own instruction (top level, or inside `meta`)
        if row.get("prompt") is None:
            raise where.error(
                "prompt", "a row with prompt_rejected (a joint DOVE pair) needs its chosen side's prompt too"
            )
        out["prompt_rejected"] = _to_messages(other, "user", where, "prompt_rejected")
    for key in PAIR_SCALARS:
        if row.get(key) is not None:
            out[key] = _number(row[key], where, key)
    return out


def _norm_ranked(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    if "responses" not in row and "samples" in row:  # D2O: the K self-samples, then the human negative
        samples = row["samples"]
        if not isinstance(samples, list) or not samples:
            raise where.error("samples", "expected a non-empty list of the model's own responses (D2O anchors)")
        row = {**row, "responses": [*samples, row["rejected"]], "scores": [1.0] * len(samples) + [0.0]}
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise where.error("responses", "expected a list of at least 2 responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise where.error("scores", f"expected a list of {len(responses)} numbers, one per response")
    return {
        "id": _row_id(row, where),
        "prompt": _to_messages(row["prompt"], "user", where, "prompt"),
        "responses": [_completion(r, where, f"responses[{j}]") for j, r in enumerate(responses)],
        "scores": [_number(s, where, f"scores[{j}]") for j, s in enumerate(scores)],
    }


def _norm_unpaired(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    label = row["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise where.error("label", f"expected a boolean (desirable or not), got {label!r}")
    return {
        "id": _row_id(row, where),
        "prompt": _to_messages(row["prompt"], "user", where, "prompt"),
        "completion": _completion(row["completion"], where, "completion"),
        "label": bool(label),
    }


def _norm_sft(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    messages = _to_messages(row["messages"], "user", where, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise where.error("messages", "no assistant turn: nothing to train on")
    return {"id": _row_id(row, where), "messages": messages}


_NORMALISERS = {"pairwise": _norm_pairwise, "ranked": _norm_ranked, "unpaired": _norm_unpaired, "sft": _norm_sft}


def _row_id(row: Mapping[str, Any], where: _Where) -> str:
    return str(row["id"]) if row.get("id") is not None else str(where.row)


def _number(value: Any, where: _Where, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise where.error(name, f"expected a finite number, got {value!r}")
    return float(value)


def _fill_optional(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optional score columns exist for all rows once any row has them (None elsewhere)."""
    optional = {k for row in rows for k in row if k in PAIR_SCALARS or k == "prompt_rejected"}
    for row in rows:
        for k in optional:
            row.setdefault(k, None)
    return rows
