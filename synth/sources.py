"""Prompt / preference-data sources (`source=`): hh-rlhf text files, jsonl / json files, HF datasets.

Every source yields `SourceItem`s with stable ids (a hash of the content unless the data has an id
field), so the same input gives the same ids across runs and resumes line up. A malformed line raises
`SourceError` naming the file and the line; nothing is silently skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from synth.errors import SourceError
from synth.records import Message, SourceItem, stable_id


class FieldMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = "prompt"
    chosen: str | None = "chosen"
    rejected: str | None = "rejected"
    category: str | None = "category"
    id: str | None = None  # take ids from this field instead of hashing the content


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hh_rlhf", "jsonl", "hf"]
    path: str
    limit: int | None = None
    # hh_rlhf: "first" = the first human turn is the prompt (what CAI red-teaming uses; the pair is kept
    # only for single-turn dialogues, where it answers that prompt); "all" = the whole history up to the
    # last human turn, with chosen/rejected the final assistant turns.
    turns: Literal["first", "all"] = "first"
    fields: FieldMap = FieldMap()
    split: str = "train"  # hf only
    data_dir: str | None = None  # hf only (e.g. "harmless-base" for Anthropic/hh-rlhf)


# --------------------------------------------------------------------------- files


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping (by magic bytes, whatever the suffix)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    with path.open("rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def iter_json_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for a .jsonl file, or (index + 1, row) for a file holding one JSON array."""
    with open_text(path) as fh:
        text_start = fh.read(1)
        while text_start and text_start.isspace():
            text_start = fh.read(1)
        if text_start == "[":
            try:
                rows = json.loads("[" + fh.read())
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            for i, row in enumerate(rows, 1):
                yield i, _as_object(row, path, i)
            return
        first = text_start + fh.readline()
        for lineno, line in enumerate([first], 1):
            yield from _parse_line(line, path, lineno)
        for lineno, line in enumerate(fh, 2):
            yield from _parse_line(line, path, lineno)


def _parse_line(line: str, path, lineno: int):
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})") from None
    yield lineno, _as_object(row, path, lineno)


def _as_object(row, path, lineno) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise SourceError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


# --------------------------------------------------------------------------- hh-rlhf

_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> messages. Raises ValueError when it is not that format."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("text does not start with '\\n\\nHuman:'")
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        out.append(Message(role="user" if speaker == "Human" else "assistant", content=content.strip()))
    return out


def hh_item(row: dict[str, Any], turns: str) -> SourceItem:
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise ValueError("a dialogue does not end with an Assistant turn")
    history = chosen[:-1]
    if history != rejected[:-1]:
        raise ValueError("chosen and rejected do not share the same history")
    single_turn = len(history) == 1
    keep_pair = turns == "all" or single_turn
    prompt = history if turns == "all" else history[:1]
    meta = {"turns": len(history)} if turns == "all" else {"turns": len(history), "history": [m.model_dump() for m in history]}
    return SourceItem(
        id=stable_id("hh", [m.content for m in history], chosen[-1].content, rejected[-1].content),
        prompt=prompt,
        chosen=[chosen[-1]] if keep_pair else None,
        rejected=[rejected[-1]] if keep_pair else None,
        meta=meta,
    )


# --------------------------------------------------------------------------- mapped json / hf rows


def _as_messages(value: Any, role: str, what: str) -> list[Message]:
    """A plain string becomes one message of `role`; a list of {role, content} is validated."""
    if isinstance(value, str):
        return [Message(role=role, content=value)]  # type: ignore[arg-type]
    if isinstance(value, list) and value:
        return [Message.model_validate(m) for m in value]
    raise ValueError(f"field {what!r} must be a string or a non-empty list of messages, got {type(value).__name__}")


def mapped_item(row: dict[str, Any], fields: FieldMap) -> SourceItem:
    if fields.prompt not in row:
        raise ValueError(f"missing field {fields.prompt!r} (set source.fields.prompt=<your field>; row has {sorted(row)})")
    prompt = _as_messages(row[fields.prompt], "user", fields.prompt)
    pair = {}
    for side in ("chosen", "rejected"):
        name = getattr(fields, side)
        if name and row.get(name) is not None:
            msgs = _as_messages(row[name], "assistant", name)
            pair[side] = [m for m in msgs if m.role == "assistant"][-1:] or msgs
    category = row.get(fields.category) if fields.category else None
    ident = str(row[fields.id]) if fields.id else stable_id(
        [m.model_dump() for m in prompt], *[[m.content for m in pair.get(s, [])] for s in ("chosen", "rejected")]
    )
    meta = {k: v for k, v in row.items() if k not in {fields.prompt, fields.chosen, fields.rejected, fields.category, fields.id}}
    return SourceItem(id=ident, prompt=prompt, category=category, meta=_jsonable(meta), **pair)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(meta)
        return meta
    except TypeError:
        return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


# --------------------------------------------------------------------------- entry point


def iter_source(cfg: SourceConfig) -> Iterator[SourceItem]:
    """Yield SourceItems (at most `limit`); malformed rows raise SourceError with file and line."""
    rows = _rows(cfg)
    n = 0
    for where, row in rows:
        if cfg.limit is not None and n >= cfg.limit:
            return
        try:
            item = hh_item(row, cfg.turns) if cfg.kind == "hh_rlhf" else mapped_item(row, cfg.fields)
        except (KeyError, ValueError, ValidationError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise SourceError(f"{where}: {detail}") from None
        n += 1
        yield item


def _rows(cfg: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    path = Path(cfg.path).expanduser()
    # hh_rlhf also reads the hub copy (e.g. path=Anthropic/hh-rlhf data_dir=harmless-base split=test).
    if cfg.kind == "hf" or path.is_dir() or (cfg.kind == "hh_rlhf" and not path.exists()):
        yield from _hf_rows(cfg)
        return
    for lineno, row in iter_json_rows(path):
        yield f"{path}:{lineno}", row


def _hf_rows(cfg: SourceConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    path = Path(cfg.path).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise SourceError(f"{path}: no split {cfg.split!r}; splits are {sorted(ds)} (set source.split=...)")
            ds = ds[cfg.split]
    else:
        try:
            ds = datasets.load_dataset(cfg.path, data_dir=cfg.data_dir, split=cfg.split)
        except Exception as e:  # offline, unknown name, bad split: one clear line
            raise SourceError(
                f"{cfg.path}: not a local file or datasets folder, and loading it as a hub dataset failed: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
    for i, row in enumerate(ds):
        yield f"{cfg.path}[{cfg.split}] row {i}", dict(row)
