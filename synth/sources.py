"""Prompt / preference-data sources (`source=`): hh-rlhf text files, jsonl / json files, HF datasets.

Every source yields `SourceItem`s with stable ids (a hash of the content unless the data has an id
field), so the same input gives the same ids across runs and resumes line up.

A bad row (malformed JSON, a missing field, an hh-rlhf pair whose two sides disagree) is skipped and
counted with its reason and first line numbers (`SkipLog`, reported in the manifest), because one bad
row must not stop a run over a large public file; `source.strict=true` makes it an error naming the
file and line instead. A source where no row is usable, an empty file, a file that is not UTF-8 text
or a truncated gzip is always an error.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    limit: int | None = Field(None, ge=1)
    strict: bool = False  # true: a bad row stops the run (file and line named); false: skipped and counted
    # hh_rlhf: "first" = the first human turn is the prompt (what CAI red-teaming uses; the pair is kept
    # only for single-turn dialogues, where it answers that prompt); "all" = the whole history up to the
    # last human turn, with chosen/rejected the final assistant turns.
    turns: Literal["first", "all"] = "first"
    fields: FieldMap = FieldMap()
    split: str = "train"  # hf only
    data_dir: str | None = None  # hf only (e.g. "harmless-base" for Anthropic/hh-rlhf)


# --------------------------------------------------------------------------- files


def open_binary(path: str | Path) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently gunzipping (by magic bytes, whatever the suffix).
    Lines are decoded one by one by the readers, so an undecodable byte is reported at its own line."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if path.is_dir():
        raise SourceError(f"{path}: is a folder; pass a .jsonl / .json file (or source=hf for a datasets folder)")
    with path.open("rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def decode_line(raw: bytes, path: str | Path, lineno: int) -> str:
    """UTF-8 text of one line (a UTF-8 BOM on line 1 is dropped), or SourceError naming file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1}); "
            "convert the file to UTF-8 (e.g. iconv -t utf-8)"
        ) from None
    return text.removeprefix("\ufeff") if lineno == 1 else text


def iter_json_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | SourceError]]:
    """(line number, row) for a .jsonl file, or (index + 1, row) for a file holding one JSON array.
    A malformed row comes as a SourceError in place of the row (the caller skips or raises it); a file
    that cannot be read as text at all raises SourceError naming the file and the line reached."""
    lineno = 0
    try:
        with open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):  # noqa: B007 - lineno is read by the gzip error below
                text = decode_line(raw, path, lineno)
                if not text.strip():
                    continue
                if text.lstrip().startswith("["):  # one JSON array, not JSON lines
                    yield from _json_array(text + decode_line(fh.read(), path, lineno + 1), path)
                    return
                yield from _parse_line(text, path, lineno)
                break
            else:
                raise SourceError(f"{path}: the file is empty (no rows); pass a file with at least one row")
            start = lineno + 1
            for lineno, raw in enumerate(fh, start):
                yield from _parse_line(decode_line(raw, path, lineno), path, lineno)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SourceError(
            f"{path}: the gzip file is truncated or corrupt after line {lineno} ({e}); download or compress it again"
        ) from None


def _json_array(text: str, path) -> Iterator[tuple[int, dict[str, Any] | SourceError]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for i, row in enumerate(rows, 1):
        yield i, _as_object(row, path, i)


def _parse_line(line: str, path, lineno: int):
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        yield lineno, SourceError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})")
        return
    yield lineno, _as_object(row, path, lineno)


def _as_object(row, path, lineno) -> dict[str, Any] | SourceError:
    if not isinstance(row, dict):
        return SourceError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


# --------------------------------------------------------------------------- hh-rlhf

_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> messages. Raises ValueError when it is not that format."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("text does not start with '\\n\\nHuman:'")
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        out.append(Message(role="user" if speaker == "Human" else "assistant", content=content.strip()))
    return out


def hh_item(row: dict[str, Any], turns: str) -> SourceItem:
    chosen, rejected = parse_hh_dialogue(row["chosen"]), parse_hh_dialogue(row["rejected"])
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise ValueError("a dialogue does not end with an Assistant turn")
    history = chosen[:-1]
    same_history = history == rejected[:-1]
    if turns == "all" and not same_history:
        raise ValueError("chosen and rejected do not share the same history")
    if not history or history[0] != rejected[0]:  # turns=first needs only the shared first human turn
        raise ValueError("chosen and rejected do not start with the same human turn")
    single_turn = len(history) == 1 and same_history
    keep_pair = turns == "all" or single_turn
    prompt = history if turns == "all" else history[:1]
    meta = (
        {"turns": len(history)}
        if turns == "all"
        else {"turns": len(history), "history": [m.model_dump() for m in history]}
    )
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
        raise ValueError(
            f"missing field {fields.prompt!r} (set source.fields.prompt=<your field>; row has {sorted(row)})"
        )
    prompt = _as_messages(row[fields.prompt], "user", fields.prompt)
    pair = {}
    for side in ("chosen", "rejected"):
        name = getattr(fields, side)
        if name and row.get(name) is not None:
            msgs = _as_messages(row[name], "assistant", name)
            pair[side] = [m for m in msgs if m.role == "assistant"][-1:] or msgs
    category = row.get(fields.category) if fields.category else None
    ident = (
        str(row[fields.id])
        if fields.id
        else stable_id(
            [m.model_dump() for m in prompt], *[[m.content for m in pair.get(s, [])] for s in ("chosen", "rejected")]
        )
    )
    meta = {
        k: v
        for k, v in row.items()
        if k not in {fields.prompt, fields.chosen, fields.rejected, fields.category, fields.id}
    }
    return SourceItem(id=ident, prompt=prompt, category=category, meta=_jsonable(meta), **pair)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        json.dumps(meta)
        return meta
    except TypeError:
        return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


# --------------------------------------------------------------------------- entry point


class SkipLog:
    """Rows a source skipped, by reason, with the first few places (for the manifest)."""

    FIRST = 5

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.first: list[str] = []
        self.used = 0

    def add(self, where: str, reason: str) -> None:
        self.by_reason[reason] += 1
        if len(self.first) < self.FIRST:
            self.first.append(f"{where}: {reason}")

    def report(self) -> dict[str, Any]:
        if not self.by_reason:
            return {}
        return {"source_rows_skipped": dict(self.by_reason), "source_rows_skipped_first": list(self.first)}


def iter_source(cfg: SourceConfig, skipped: SkipLog | None = None) -> Iterator[SourceItem]:
    """Yield SourceItems (at most `limit`). A bad row is skipped and counted in `skipped` (or raises
    SourceError with file and line when `cfg.strict`); a source with no usable row raises SourceError
    naming the first problem."""
    skipped = skipped if skipped is not None else SkipLog()
    n = 0
    first_error: str | None = None
    for where, row in _rows(cfg):
        if cfg.limit is not None and n >= cfg.limit:
            return
        try:
            if isinstance(row, SourceError):
                raise row
            item = hh_item(row, cfg.turns) if cfg.kind == "hh_rlhf" else mapped_item(row, cfg.fields)
        except (KeyError, ValueError, ValidationError) as e:
            message = str(e) if isinstance(e, SourceError) else f"{where}: {_reason(e)}"
            if cfg.strict:
                raise SourceError(message) from None
            first_error = first_error or message
            skipped.add(where, _reason(e) if not isinstance(e, SourceError) else message.split(": ", 1)[-1])
            continue
        n += 1
        skipped.used = n
        yield item
    if n == 0:
        why = f"every row was skipped; the first: {first_error}" if first_error else "no rows"
        raise SourceError(f"{cfg.path}: no usable input ({why})")


class SourceStream:
    """A source that can be read more than once, lazily each time (the runner validates every row in a
    first pass, then reads chunk by chunk). Skipped rows are logged on the first pass only."""

    def __init__(self, cfg: SourceConfig, skipped: SkipLog | None = None) -> None:
        self.cfg, self.skipped, self._passes = cfg, skipped if skipped is not None else SkipLog(), 0

    def __iter__(self) -> Iterator[SourceItem]:
        self._passes += 1
        return iter_source(self.cfg, self.skipped if self._passes == 1 else SkipLog())


def _reason(e: Exception) -> str:
    return f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]


def _rows(cfg: SourceConfig) -> Iterator[tuple[str, dict[str, Any] | SourceError]]:
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
