"""Training data: load rows, tokenise them with the chat template, collate batches.

What a loop calls, top to bottom::

    ds = load_records(cfg.data.path)                  # canonical columns, below; DataError on bad rows
    kind = detect_kind(ds)                            # "sft" | "pairwise" | "ranked" | "unpaired"
    tok_ds, report = tokenize_dataset(ds, tokenizer, TokenizeConfig(max_length=1024, max_prompt_length=512))
    log.info(report.summary())                        # every truncation and drop, counted
    collate = make_collator(kind, pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(tok_ds, batch_size=B, shuffle=True, collate_fn=collate)

Accepted inputs (`load_records`): jsonl / json (optionally .gz), parquet, a `save_to_disk` folder, or a
hub dataset name. Row shapes: sft `messages`; pairwise `prompt`,`chosen`,`rejected` (TRL conversational
lists of {role, content}, TRL standard strings, or TRL's implicit prompt: no `prompt`, full conversations
in `chosen`/`rejected`); hh-rlhf texts "\\n\\nHuman: ...\\n\\nAssistant: ..." (the shared message prefix
becomes the prompt, the rest the completion); ranked `prompt`,`responses`,`scores`; unpaired
`prompt`,`completion`,`label`. Plain strings become one message (user for prompts, assistant otherwise).

Canonical columns (messages are lists of {"role", "content"}); every kind also has `id` (str):
    sft       messages
    pairwise  prompt, chosen, rejected (+ score_chosen, score_rejected, margin, p_chosen when present)
    ranked    prompt, responses (list of message lists), scores (list of float)
    unpaired  prompt, completion, label (bool)
Tokenised columns (`tokenize_dataset`; metadata columns are kept):
    sft       input_ids, labels (-100 outside the labelled assistant turns)
    pairwise  prompt_ids, chosen_ids, rejected_ids
    ranked    prompt_ids, response_ids (list of lists)
    unpaired  prompt_ids, completion_ids (+ kl_completion_ids after `add_kl_completions`)
Batch keys (right padding; `labels` is -100 on prompt and padding; pad ids never matter):
    sft       input_ids, attention_mask, labels                                       [B, T]
    pairwise  input_ids, attention_mask, labels [2B, T]: rows 0..B-1 chosen, B..2B-1 rejected;
              optional [B] floats: score_chosen, score_rejected, margin, p_chosen, ref_chosen_logps,
              ref_rejected_logps, ref_chosen_logps_mean, ref_rejected_logps_mean (NaN where a row lacks it)
    ranked    input_ids, attention_mask, labels [sum(k), T]; list_index [B, Kmax] (row of each
              response in the flat batch, 0 where padded), list_mask [B, Kmax] bool, scores [B, Kmax];
              optional ref_logps, ref_logps_mean [B, Kmax]
    unpaired  input_ids, attention_mask, labels [B, T], label [B] bool; with kl=True also kl_input_ids,
              kl_attention_mask, kl_labels [B, T'] (prompt i with the completion of row i-1, so
              completion i meets prompt (i+1) mod B, as TRL does); optional ref_logps, ref_logps_mean,
              ref_kl_logps [B]

Completion tokens are found by prefix tokenisation (the tokenised prompt with the generation prompt must be a
prefix of the tokenised prompt+completion), so templates need no `{% generation %}` markers; the end-of-turn
tokens the template writes after the assistant message are labels. Fallbacks when the prefix property fails
are described at `_Encoder.split` and counted in the `TokenisationReport`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from datasets import Dataset, Features, List, Value

RowKind = Literal["sft", "pairwise", "ranked", "unpaired"]
IGNORE_INDEX = -100

# Required fields per kind; pairwise `prompt` is optional (TRL's implicit-prompt format, hh-rlhf).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "ranked": ("prompt", "responses", "scores"),
    "pairwise": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "sft": ("messages",),
}
_MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "responses", "completion")
PAIR_SCALARS = ("score_chosen", "score_rejected", "margin", "p_chosen")
PAIR_REF = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_logps_mean", "ref_rejected_logps_mean")
UNPAIRED_REF = ("ref_logps", "ref_logps_mean", "ref_kl_logps")


class DataError(ValueError):
    """A user's data problem, with the file, row and field named."""


# ----------------------------------------------------------------------------------------------- loading


def load_records(path: str | Path, *, split: str = "train", kind: RowKind | None = None,
                 limit: int | None = None) -> Dataset:
    """Load a file / `save_to_disk` folder / hub dataset and return it with the canonical columns."""
    rows = _read_rows(path, split)
    if limit is not None:
        rows = (row for i, row in zip(range(limit), rows))
    return normalise_rows(rows, source=str(path), kind=kind)


def normalise_rows(rows: Iterable[Mapping[str, Any]], *, source: str = "rows",
                   kind: RowKind | None = None) -> Dataset:
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


def detect_kind(dataset: Dataset) -> RowKind:
    """The row kind of a canonical or tokenised dataset, from its columns."""
    cols = set(dataset.column_names)
    markers = {"responses": "ranked", "response_ids": "ranked", "chosen": "pairwise", "chosen_ids": "pairwise",
               "label": "unpaired", "messages": "sft", "input_ids": "sft"}
    for marker, kind in markers.items():
        if marker in cols:
            return kind  # type: ignore[return-value]
    raise DataError(f"cannot tell the row kind from columns {sorted(cols)}")


def _detect(keys: Iterable[str], where: str) -> RowKind:
    keys = set(keys)
    for kind, required in _REQUIRED.items():
        if keys.issuperset(required):
            return kind  # type: ignore[return-value]
    # Name the closest shape's missing fields: "a preference file missing `chosen`" reads as such.
    shapes = "; ".join(f"{k}: {', '.join(v)}" for k, v in _REQUIRED.items())
    best = max(_REQUIRED, key=lambda k: len(keys & (set(_REQUIRED[k]) - {"prompt"})))  # `prompt` is in 3 shapes
    if not keys & (set(_REQUIRED[best]) - {"prompt"}):
        raise DataError(f"{where}: unknown row shape (keys: {sorted(keys)}; accepted shapes: {shapes})")
    missing = [f for f in _REQUIRED[best] if f not in keys]
    raise DataError(f"{where}: looks like a {best} row but is missing field(s) {missing} "
                    f"(keys present: {sorted(keys)}; accepted shapes: {shapes})")


def _read_rows(path: str | Path, split: str) -> Iterable[Mapping[str, Any]]:
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


def _read_jsonl(p: Path) -> Iterable[Mapping[str, Any]]:
    with _open_text(p) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: line {line_no}: invalid JSON ({e.msg})") from None


def _read_json(p: Path, split: str) -> Iterable[Mapping[str, Any]]:
    with _open_text(p) as f:
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


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def hh_to_messages(text: str) -> list[dict[str, str]]:
    """hh-rlhf text -> messages. Consecutive turns of one role (a few hh rows have them, and templates
    such as Llama 2's reject them) are merged with a blank line."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
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
        if _is_hh(value):
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
        raise where.error(name, f"a completion must be one or more assistant messages, got roles "
                                f"{[m['role'] for m in messages]}")
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


def _norm_pairwise(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    hh = any(_is_hh(row.get(k)) for k in ("prompt", "chosen", "rejected"))
    if row.get("prompt") is None:
        chosen = _to_messages(row.get("chosen"), "assistant", where, "chosen")
        rejected = _to_messages(row.get("rejected"), "assistant", where, "rejected")
        prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
    else:
        prompt = _to_messages(row["prompt"], "user", where, "prompt")
        chosen, rejected = row.get("chosen"), row.get("rejected")
    out = {"id": _row_id(row, where), "prompt": prompt,
           "chosen": _completion(chosen, where, "chosen", strip=hh),
           "rejected": _completion(rejected, where, "rejected", strip=hh)}
    for key in PAIR_SCALARS:
        if row.get(key) is not None:
            out[key] = _number(row[key], where, key)
    return out


def _norm_ranked(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    responses, scores = row["responses"], row["scores"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise where.error("responses", "expected a list of at least 2 responses")
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise where.error("scores", f"expected a list of {len(responses)} numbers, one per response")
    return {"id": _row_id(row, where), "prompt": _to_messages(row["prompt"], "user", where, "prompt"),
            "responses": [_completion(r, where, f"responses[{j}]") for j, r in enumerate(responses)],
            "scores": [_number(s, where, f"scores[{j}]") for j, s in enumerate(scores)]}


def _norm_unpaired(row: Mapping[str, Any], where: _Where) -> dict[str, Any]:
    label = row["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise where.error("label", f"expected a boolean (desirable or not), got {label!r}")
    return {"id": _row_id(row, where), "prompt": _to_messages(row["prompt"], "user", where, "prompt"),
            "completion": _completion(row["completion"], where, "completion"), "label": bool(label)}


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
    optional = {k for row in rows for k in row if k in PAIR_SCALARS}
    for row in rows:
        for k in optional:
            row.setdefault(k, None)
    return rows


# ----------------------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TokenizeConfig:
    """Tokenisation and truncation policy.

    Truncation happens only when a row does not fit `max_length` (prompt + its longest completion):
    1. the prompt is cut to `max_prompt_length` (keep_end: keep its last tokens, i.e. the latest turns and
       the generation prompt; keep_start: keep its first tokens);
    2. completions are cut (their ends) to the room left, `max_length - len(prompt)`;
    3. a row whose prompt alone leaves no room is dropped (only possible with max_prompt_length unset).
    For multi-turn SFT the "prompt" is everything before the first labelled token.
    """

    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    assistant_turns: Literal["all", "last"] = "all"  # SFT: which assistant turns are labelled
    chat_template: str | None = None  # overrides the tokenizer's template (a Jinja string)

    def __post_init__(self) -> None:
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be keep_end or keep_start, got {self.truncation_mode!r}")
        if self.assistant_turns not in ("all", "last"):
            raise ValueError(f"assistant_turns must be all or last, got {self.assistant_turns!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be >= 1 (or None)")
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                             f"({self.max_length}) so that some completion fits")


@dataclass
class TokenisationReport:
    """What tokenisation did to the data; print `summary()` at the start of training."""

    kind: str
    rows_in: int
    rows_out: int
    prompt_truncated: int = 0  # rows whose prompt was cut to max_prompt_length
    completion_truncated: int = 0  # rows with at least one completion cut to fit max_length
    dropped_prompt_too_long: int = 0  # prompt alone >= max_length
    dropped_empty_completion: int = 0  # a completion rendered to zero tokens
    dropped_ids: list[str] = field(default_factory=list)
    split_text_fallback: int = 0  # prompt tokens not a prefix; split at the rendered prompt text
    split_diverged_fallback: int = 0  # rendered prompt not a prefix either; split where tokens diverge
    sft_turns_unlabelled: int = 0  # earlier assistant turns the template re-rendered later (not labelled)
    longest_prompt_tokens: int = 0  # before truncation
    longest_sequence_tokens: int = 0  # prompt + longest completion, before truncation
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, max_ids: int = 20) -> str:
        counts = {k: v for k, v in self.to_dict().items() if isinstance(v, int) and k not in ("rows_in", "rows_out")}
        lines = [f"tokenised {self.kind} rows: {self.rows_in} in, {self.rows_out} out"]
        lines += [f"  {k}: {v}" for k, v in counts.items() if v]
        if self.dropped_ids:
            more = f" (+{len(self.dropped_ids) - max_ids} more)" if len(self.dropped_ids) > max_ids else ""
            lines.append(f"  dropped ids: {', '.join(self.dropped_ids[:max_ids])}{more}")
        return "\n".join(lines)


_IDS = List(Value("int32"))
_TOKEN_FEATURES = {"pairwise": {"prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": _IDS},
                   "ranked": {"prompt_ids": _IDS, "response_ids": List(_IDS)},
                   "unpaired": {"prompt_ids": _IDS, "completion_ids": _IDS},
                   "sft": {"input_ids": _IDS, "labels": _IDS}}
_STATUS_FEATURES = {"_prompt_cut": Value("bool"), "_completion_cut": Value("bool"), "_drop": Value("string"),
                    "_split": Value("string"), "_lost_turns": Value("int64"), "_prompt_len": Value("int64"),
                    "_seq_len": Value("int64")}
_STATUS = tuple(_STATUS_FEATURES)
_SPLIT_RANK = {"prefix": 0, "text": 1, "diverged": 2}


class _Encoder:
    """Chat-template tokenisation of one row at a time (picklable, for `Dataset.map(num_proc=...)`)."""

    def __init__(self, tokenizer: Any, cfg: TokenizeConfig) -> None:
        self.tok, self.cfg = tokenizer, cfg
        self.template = cfg.chat_template or getattr(tokenizer, "chat_template", None)

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                            chat_template=self.template)

    def ids(self, texts: list[str]) -> list[list[int]]:
        # The template writes its own BOS / special tokens, so the tokenizer must not add them again.
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def split(self, prompt: list[dict], completions: list[list[dict]]) -> tuple[list[int], list[list[int]], str]:
        """(prompt_ids, completion_ids per completion, how). Normally the prompt tokens are a prefix of the
        prompt+completion tokens ("prefix"). If not, but the rendered prompt text is a prefix of the
        rendered conversation (tokens merged across the boundary), the rest of the text is tokenised on its
        own, so the model sees exactly the inference-time prompt ("text"). If the template renders the
        prompt differently altogether, the split is where the tokens diverge, as TRL does ("diverged")."""
        p_text = self.render(prompt, True)
        f_texts = [self.render(prompt + c, False) for c in completions]
        p_ids, *f_ids = self.ids([p_text, *f_texts])
        starts, outs, how = [], [], "prefix"
        for text, ids in zip(f_texts, f_ids):
            if ids[: len(p_ids)] == p_ids:
                starts.append(len(p_ids)), outs.append(ids[len(p_ids):])
            elif text.startswith(p_text):
                how = max(how, "text", key=_SPLIT_RANK.get)
                starts.append(len(p_ids)), outs.append(self.ids([text[len(p_text):]])[0])
            else:
                how = "diverged"
                k = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
                starts.append(k), outs.append(ids[k:])
        k = min(starts)  # a shared prompt: hand any longer prompt part back to its completion
        return p_ids[:k], [p_ids[k:s] + o for s, o in zip(starts, outs)], how

    def sft(self, messages: list[dict]) -> tuple[list[int], list[int], int, str]:
        """(input_ids, labels, turns_unlabelled, how) labelling the chosen assistant turns."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = turns[-1:] if self.cfg.assistant_turns == "last" else turns
        ids: list[int] = []
        labels: list[int] = []
        labelled = lost = 0
        how = "prefix"
        for i in turns:
            prompt, (completion,), h = self.split(messages[:i], [messages[i: i + 1]])
            how = max(how, h, key=_SPLIT_RANK.get)
            if prompt[: len(ids)] != ids:  # the template renders earlier turns differently now (e.g. drops
                lost, labelled, ids, labels = lost + labelled, 0, [], []  # reasoning): restart from here
            labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + completion
            ids = prompt + completion
            labelled += 1
        return ids, labels, lost, how

    def fit(self, prompt: list[int], completions: list[list[int]]) -> tuple[list[int], list[list[int]], dict]:
        """Apply the truncation policy of `TokenizeConfig` -> (prompt, completions, status columns)."""
        cfg, longest = self.cfg, max(len(c) for c in completions)
        status = {"_prompt_cut": False, "_completion_cut": False, "_drop": "",
                  "_prompt_len": len(prompt), "_seq_len": len(prompt) + longest}
        if min(len(c) for c in completions) == 0:
            return prompt, completions, {**status, "_drop": "empty_completion"}
        if cfg.max_length is None or len(prompt) + longest <= cfg.max_length:
            return prompt, completions, status
        if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
            m = cfg.max_prompt_length
            prompt = prompt[-m:] if cfg.truncation_mode == "keep_end" else prompt[:m]
            status["_prompt_cut"] = True
        room = cfg.max_length - len(prompt)
        if room <= 0:
            return prompt, completions, {**status, "_drop": "prompt_too_long"}
        status["_completion_cut"] = longest > room
        return prompt, [c[:room] for c in completions], status


_COMPLETIONS = {"pairwise": ("chosen", "rejected"), "unpaired": ("completion",)}


def _tok_prompted(enc: _Encoder, row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """pairwise / ranked / unpaired: one shared prompt, one or more completions."""
    names = _COMPLETIONS.get(kind, ())
    completions = row["responses"] if kind == "ranked" else [row[n] for n in names]
    prompt, completions, how = enc.split(row["prompt"], completions)
    prompt, completions, status = enc.fit(prompt, completions)
    out = {"response_ids": completions} if kind == "ranked" else {f"{n}_ids": c for n, c in zip(names, completions)}
    return {"prompt_ids": prompt, **out, **status, "_split": how}


def _tok_sft(enc: _Encoder, row: Mapping[str, Any], kind: str = "sft") -> dict[str, Any]:
    ids, labels, lost, how = enc.sft(row["messages"])
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))  # none: dropped as empty
    prompt, (rest,), status = enc.fit(ids[:first], [ids[first:]])
    return {"input_ids": prompt + rest, "labels": [IGNORE_INDEX] * len(prompt) + labels[first: first + len(rest)],
            **status, "_split": how, "_lost_turns": lost}


def require_chat_template(tokenizer: Any, override: str | None = None) -> str:
    """The template to use, or a DataError naming the tokenizer and the fix."""
    template = override or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"tokenizer {name!r} has no chat template; set model.chat_template to a Jinja chat "
                        f"template string (for example the instruct model's), or use a tokenizer that has one")
    return template


def tokenize_dataset(dataset: Dataset, tokenizer: Any, config: TokenizeConfig | None = None, *,
                     kind: RowKind | None = None, num_proc: int | None = None) -> tuple[Dataset, TokenisationReport]:
    """Tokenise a canonical dataset (see module docstring) -> (tokenised dataset, report)."""
    cfg = config or TokenizeConfig()
    template = require_chat_template(tokenizer, cfg.chat_template)
    kind = kind or detect_kind(dataset)
    enc, fn = _Encoder(tokenizer, cfg), (_tok_sft if kind == "sft" else _tok_prompted)

    def tokenise(row: dict[str, Any], idx: int) -> dict[str, Any]:
        try:
            out = fn(enc, row, kind)
        except DataError:
            raise
        except Exception as e:  # template errors (e.g. "roles must alternate") are data errors here
            raise DataError(f"row {idx} (id {row.get('id')!r}): the chat template failed: {e}") from e
        return {"_lost_turns": 0, **out}

    fingerprint = hashlib.sha256(json.dumps(
        [dataset._fingerprint, asdict(cfg), template, getattr(tokenizer, "name_or_path", ""), len(tokenizer), kind]
    ).encode()).hexdigest()[:16]
    removed = [c for c in _MESSAGE_COLUMNS if c in dataset.column_names]
    # Explicit features: an empty list in the first rows must not fix a column's type to list<null>.
    features = Features({**{k: v for k, v in dataset.features.items() if k not in removed},
                         **_TOKEN_FEATURES[kind], **_STATUS_FEATURES})
    tokenised = dataset.map(tokenise, with_indices=True, num_proc=num_proc, desc=f"Tokenising ({kind})",
                            remove_columns=removed, features=features, new_fingerprint=fingerprint)
    report = _report(tokenised, kind, cfg)
    keep = [i for i, reason in enumerate(tokenised["_drop"]) if not reason]
    tokenised = tokenised.remove_columns(list(_STATUS))
    return (tokenised if len(keep) == len(tokenised) else tokenised.select(keep)), report


def _report(tokenised: Dataset, kind: str, cfg: TokenizeConfig) -> TokenisationReport:
    s = tokenised.select_columns([*_STATUS, "id"]).to_dict()
    drops = s["_drop"]
    return TokenisationReport(
        kind=kind, rows_in=len(drops), rows_out=sum(not d for d in drops),
        prompt_truncated=sum(s["_prompt_cut"]), completion_truncated=sum(s["_completion_cut"]),
        dropped_prompt_too_long=drops.count("prompt_too_long"),
        dropped_empty_completion=drops.count("empty_completion"),
        dropped_ids=[i for i, d in zip(s["id"], drops) if d],
        split_text_fallback=s["_split"].count("text"), split_diverged_fallback=s["_split"].count("diverged"),
        sft_turns_unlabelled=sum(s["_lost_turns"]), longest_prompt_tokens=max(s["_prompt_len"], default=0),
        longest_sequence_tokens=max(s["_seq_len"], default=0), settings=asdict(cfg))


def add_kl_completions(dataset: Dataset, batch_size: int) -> Dataset:
    """KTO's mismatched pairs fixed in the data, as TRL does: within consecutive chunks of `batch_size`
    rows, row i gets the completion of row i-1 (the first row of a chunk, its last). Needed when reference
    KL log-probs are precomputed; the loop must then batch sequentially with this batch size."""
    completions = dataset["completion_ids"]
    if len(completions) < 2 or batch_size < 2:
        raise ValueError("KTO's KL pairs need at least 2 rows and batch_size >= 2")
    kl: list[list[int]] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start: start + batch_size]
        # A lone last row would meet its own completion: give it the previous row's instead.
        kl.extend(chunk[-1:] + chunk[:-1] if len(chunk) > 1 else [completions[start - 1]])
    return dataset.add_column("kl_completion_ids", kl, feature=_IDS)


# ------------------------------------------------------------------------------------------- collators


def _pad(seqs: Sequence[Sequence[int]], value: int, multiple: int | None) -> torch.Tensor:
    """Right padding to the longest row (rounded up to `multiple`)."""
    width = max((len(s) for s in seqs), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
               multiple: int | None = None) -> dict[str, torch.Tensor]:
    """(prompt_ids, completion_ids) pairs -> input_ids / attention_mask / labels (completion only)."""
    ids = [list(p) + list(c) for p, c in pairs]
    labels = [[IGNORE_INDEX] * len(p) + list(c) for p, c in pairs]
    return {"input_ids": _pad(ids, pad_id, multiple),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0, multiple),
            "labels": _pad(labels, IGNORE_INDEX, multiple)}


def _scalars(rows: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([math.nan if r[k] is None else float(r[k]) for r in rows], dtype=torch.float32)
            for k in keys if k in rows[0]}


@dataclass
class SFTCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": _pad(ids, self.pad_token_id, self.pad_to_multiple_of),
                "attention_mask": _pad([[1] * len(x) for x in ids], 0, self.pad_to_multiple_of),
                "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of)}


@dataclass
class PairCollator:
    """Chosen and rejected in one batch of 2B rows (first B chosen, then B rejected)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
        return {**_sequences(pairs, self.pad_token_id, self.pad_to_multiple_of),
                **_scalars(rows, PAIR_SCALARS + PAIR_REF)}


@dataclass
class RankedCollator:
    """k responses per prompt (ragged k allowed), flattened to sum(k) rows plus a [B, Kmax] index/mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ks = [len(r["response_ids"]) for r in rows]
        pairs = [(r["prompt_ids"], resp) for r in rows for resp in r["response_ids"]]
        batch = _sequences(pairs, self.pad_token_id, self.pad_to_multiple_of)
        mask = torch.arange(max(ks))[None, :] < torch.tensor(ks)[:, None]
        index = torch.zeros(mask.shape, dtype=torch.long)
        index[mask] = torch.arange(len(pairs))
        batch.update(list_index=index, list_mask=mask)
        for key in ("scores", "ref_logps", "ref_logps_mean"):
            if key in rows[0]:
                values = torch.zeros(mask.shape, dtype=torch.float32)
                values[mask] = torch.tensor([float(x) for r in rows for x in r[key]])
                batch[key] = values
        return batch


@dataclass
class UnpairedCollator:
    """KTO rows plus the mismatched KL batch (prompt i with the completion of row i-1)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    kl: bool = True
    max_length: int | None = None  # the KL sequences are cut to this, like the matched ones were

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _sequences([(r["prompt_ids"], r["completion_ids"]) for r in rows], self.pad_token_id,
                           self.pad_to_multiple_of)
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch.update(_scalars(rows, UNPAIRED_REF))
        if self.kl:
            kl = self._kl_pairs(rows)
            batch.update({f"kl_{k}": v for k, v in _sequences(kl, self.pad_token_id, self.pad_to_multiple_of).items()})
        return batch

    def _kl_pairs(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Sequence[int], Sequence[int]]]:
        if "kl_completion_ids" in rows[0]:
            completions = [r["kl_completion_ids"] for r in rows]
        elif len(rows) < 2:  # the KL estimate would be the matched pair itself (TRL requires B > 1 too)
            raise ValueError("KTO's KL term needs batches of at least 2 rows; use drop_last=True or a larger batch")
        else:
            completions = [rows[i - 1]["completion_ids"] for i in range(len(rows))]
        room = [None if self.max_length is None else max(0, self.max_length - len(r["prompt_ids"])) for r in rows]
        return [(r["prompt_ids"], c[:n]) for r, c, n in zip(rows, completions, room)]


def make_collator(kind: RowKind | Literal["listwise"], pad_token_id: int | None,
                  **kwargs: Any) -> SFTCollator | PairCollator | RankedCollator | UnpairedCollator:
    """The collator for a row kind. `pad_token_id` None (a tokenizer without one) pads with 0: padded
    positions are masked and carry label -100, so the pad id never changes a result."""
    classes = {"sft": SFTCollator, "pairwise": PairCollator, "ranked": RankedCollator, "unpaired": UnpairedCollator,
               "listwise": RankedCollator}  # "listwise" is the loss YAMLs' name for ranked rows
    if kind not in classes:
        raise ValueError(f"unknown row kind {kind!r}; valid: {sorted(classes)}")
    return classes[kind](pad_token_id=0 if pad_token_id is None else pad_token_id, **kwargs)
