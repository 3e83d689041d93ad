"""Training data, tokenisation: chat-template tokenisation of canonical rows, the truncation policy
(`TokenizeConfig`) and what it did (`TokenisationReport`); column layout in `train.data`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from datasets import Dataset, Features, List, Value

from train.data.load import DataError, RowKind, detect_kind, has_distinct_prompts

IGNORE_INDEX = -100
_MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected", "responses", "completion", "prompt_rejected")


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
    # DOVE (pairwise only): `distinct_prompts` accepts rows whose rejected side has its own prompt
    # (`prompt_rejected`); each side is then split and truncated on its own. `joint_prompts` labels the
    # prompt tokens too (ℓ = log π(x) + log π(y|x)): the prompt moves into each completion, prompt_ids = [].
    distinct_prompts: bool = False
    joint_prompts: bool = False

    def __post_init__(self) -> None:
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be keep_end or keep_start, got {self.truncation_mode!r}")
        if self.assistant_turns not in ("all", "last"):
            raise ValueError(f"assistant_turns must be all or last, got {self.assistant_turns!r}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be >= 1 (or None)")
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                f"({self.max_length}) so that some completion fits"
            )


@dataclass
class TokenisationReport:
    """What tokenisation did to the data; print `summary()` at the start of training."""

    kind: str
    rows_in: int
    rows_out: int
    prompt_truncated: int = 0  # rows whose prompt was cut to max_prompt_length
    rejected_prompt_truncated: int = 0  # DOVE rows whose rejected side's own prompt was cut
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
_TOKEN_FEATURES = {
    "pairwise": {"prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": _IDS},
    "ranked": {"prompt_ids": _IDS, "response_ids": List(_IDS)},
    "unpaired": {"prompt_ids": _IDS, "completion_ids": _IDS},
    "sft": {"input_ids": _IDS, "labels": _IDS},
}
_STATUS_FEATURES = {
    "_prompt_cut": Value("bool"),
    "_rprompt_cut": Value("bool"),
    "_completion_cut": Value("bool"),
    "_drop": Value("string"),
    "_split": Value("string"),
    "_lost_turns": Value("int64"),
    "_prompt_len": Value("int64"),
    "_seq_len": Value("int64"),
}
_STATUS = tuple(_STATUS_FEATURES)
_SPLIT_RANK = {"prefix": 0, "text": 1, "diverged": 2}


class ChatEncoder:
    """Chat-template tokenisation of one row at a time (picklable, for `Dataset.map(num_proc=...)`)."""

    def __init__(self, tokenizer: Any, cfg: TokenizeConfig) -> None:
        self.tok, self.cfg = tokenizer, cfg
        self.template = cfg.chat_template or getattr(tokenizer, "chat_template", None)

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=self.template
        )

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
        for text, ids in zip(f_texts, f_ids, strict=True):
            if ids[: len(p_ids)] == p_ids:
                starts.append(len(p_ids)), outs.append(ids[len(p_ids) :])
            elif text.startswith(p_text):
                how = max(how, "text", key=_SPLIT_RANK.get)
                starts.append(len(p_ids)), outs.append(self.ids([text[len(p_text) :]])[0])
            else:
                how = "diverged"
                k = next(
                    (i for i, (a, b) in enumerate(zip(p_ids, ids, strict=False)) if a != b), min(len(p_ids), len(ids))
                )
                starts.append(k), outs.append(ids[k:])
        k = min(starts)  # a shared prompt: hand any longer prompt part back to its completion
        return p_ids[:k], [p_ids[k:s] + o for s, o in zip(starts, outs, strict=True)], how

    def sft(self, messages: list[dict]) -> tuple[list[int], list[int], int, str]:
        """(input_ids, labels, turns_unlabelled, how) labelling the chosen assistant turns."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = turns[-1:] if self.cfg.assistant_turns == "last" else turns
        ids: list[int] = []
        labels: list[int] = []
        labelled = lost = 0
        how = "prefix"
        for i in turns:
            prompt, (completion,), h = self.split(messages[:i], [messages[i : i + 1]])
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
        status = {
            "_prompt_cut": False,
            "_completion_cut": False,
            "_drop": "",
            "_prompt_len": len(prompt),
            "_seq_len": len(prompt) + longest,
        }
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


def _tok_two_prompts(enc: ChatEncoder, row: Mapping[str, Any]) -> dict[str, Any]:
    """DOVE pairs: each side (prompt, completion) is split and truncated on its own (its own lengths, not
    the chosen side's). Joint scoring moves each prompt into its completion so every token is labelled."""
    sides = []
    for prompt, name in ((row["prompt"], "chosen"), (row.get("prompt_rejected") or row["prompt"], "rejected")):
        p, (c,), how = enc.split(prompt, [row[name]])
        p, (c,), status = enc.fit(p, [c])
        sides.append((p, c, how, status))
    (pc, cc, how_c, st_c), (pr, cr, how_r, st_r) = sides
    status = {
        "_prompt_cut": st_c["_prompt_cut"],
        "_rprompt_cut": st_r["_prompt_cut"],
        "_completion_cut": st_c["_completion_cut"] or st_r["_completion_cut"],
        "_drop": st_c["_drop"] or st_r["_drop"],
        "_prompt_len": max(st_c["_prompt_len"], st_r["_prompt_len"]),
        "_seq_len": max(st_c["_seq_len"], st_r["_seq_len"]),
        "_split": max(how_c, how_r, key=_SPLIT_RANK.get),
    }
    if enc.cfg.joint_prompts:
        return {"prompt_ids": [], "chosen_ids": pc + cc, "rejected_ids": pr + cr, **status}
    return {"prompt_ids": pc, "chosen_ids": cc, "rejected_prompt_ids": pr, "rejected_ids": cr, **status}


def _tok_prompted(enc: ChatEncoder, row: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """pairwise / ranked / unpaired: one shared prompt, one or more completions."""
    if kind == "pairwise" and (enc.cfg.joint_prompts or enc.cfg.distinct_prompts):
        return _tok_two_prompts(enc, row)
    names = _COMPLETIONS.get(kind, ())
    completions = row["responses"] if kind == "ranked" else [row[n] for n in names]
    prompt, completions, how = enc.split(row["prompt"], completions)
    prompt, completions, status = enc.fit(prompt, completions)
    out = (
        {"response_ids": completions}
        if kind == "ranked"
        else {f"{n}_ids": c for n, c in zip(names, completions, strict=True)}
    )
    return {"prompt_ids": prompt, **out, **status, "_split": how}


def _tok_sft(enc: ChatEncoder, row: Mapping[str, Any], kind: str = "sft") -> dict[str, Any]:
    ids, labels, lost, how = enc.sft(row["messages"])
    first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(ids))  # none: dropped as empty
    prompt, (rest,), status = enc.fit(ids[:first], [ids[first:]])
    return {
        "input_ids": prompt + rest,
        "labels": [IGNORE_INDEX] * len(prompt) + labels[first : first + len(rest)],
        **status,
        "_split": how,
        "_lost_turns": lost,
    }


def require_chat_template(tokenizer: Any, override: str | None = None) -> str:
    """The template to use, or a DataError naming the tokenizer and the fix."""
    template = override or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(
            f"tokenizer {name!r} has no chat template; set model.chat_template to a Jinja chat "
            f"template string (for example the instruct model's), or use a tokenizer that has one"
        )
    return template


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: Any,
    config: TokenizeConfig | None = None,
    *,
    kind: RowKind | None = None,
    num_proc: int | None = None,
) -> tuple[Dataset, TokenisationReport]:
    """Tokenise a canonical dataset (columns: see `train.data`) -> (tokenised dataset, report)."""
    cfg = config or TokenizeConfig()
    template = require_chat_template(tokenizer, cfg.chat_template)
    kind = kind or detect_kind(dataset)
    if kind == "pairwise" and not cfg.distinct_prompts and has_distinct_prompts(dataset):
        raise DataError(
            "the rows carry prompt_rejected (joint DOVE pairs with two instructions): train them with "
            "loss=dove, or drop that column for a loss that compares responses to one prompt"
        )
    enc, fn = ChatEncoder(tokenizer, cfg), (_tok_sft if kind == "sft" else _tok_prompted)

    def tokenise(row: dict[str, Any], idx: int) -> dict[str, Any]:
        try:
            out = fn(enc, row, kind)
        except DataError:
            raise
        except Exception as e:  # template errors (e.g. "roles must alternate") are data errors here
            raise DataError(f"row {idx} (id {row.get('id')!r}): the chat template failed: {e}") from e
        return {"_lost_turns": 0, "_rprompt_cut": False, **out}

    fingerprint = hashlib.sha256(
        json.dumps(
            [dataset._fingerprint, asdict(cfg), template, getattr(tokenizer, "name_or_path", ""), len(tokenizer), kind]
        ).encode()
    ).hexdigest()[:16]
    removed = [c for c in _MESSAGE_COLUMNS if c in dataset.column_names]
    # Explicit features: an empty list in the first rows must not fix a column's type to list<null>.
    tokens = dict(_TOKEN_FEATURES[kind])
    if kind == "pairwise" and cfg.distinct_prompts and not cfg.joint_prompts:
        tokens["rejected_prompt_ids"] = _IDS
    features = Features(
        {**{k: v for k, v in dataset.features.items() if k not in removed}, **tokens, **_STATUS_FEATURES}
    )
    tokenised = dataset.map(
        tokenise,
        with_indices=True,
        num_proc=num_proc,
        desc=f"Tokenising ({kind})",
        remove_columns=removed,
        features=features,
        new_fingerprint=fingerprint,
    )
    report = _report(tokenised, kind, cfg)
    keep = [i for i, reason in enumerate(tokenised["_drop"]) if not reason]
    tokenised = tokenised.remove_columns(list(_STATUS))
    return (tokenised if len(keep) == len(tokenised) else tokenised.select(keep)), report


def _report(tokenised: Dataset, kind: str, cfg: TokenizeConfig) -> TokenisationReport:
    s = tokenised.select_columns([*_STATUS, "id"]).to_dict()
    drops = s["_drop"]
    return TokenisationReport(
        kind=kind,
        rows_in=len(drops),
        rows_out=sum(not d for d in drops),
        prompt_truncated=sum(s["_prompt_cut"]),
        rejected_prompt_truncated=sum(s["_rprompt_cut"]),
        completion_truncated=sum(s["_completion_cut"]),
        dropped_prompt_too_long=drops.count("prompt_too_long"),
        dropped_empty_completion=drops.count("empty_completion"),
        dropped_ids=[i for i, d in zip(s["id"], drops, strict=True) if d],
        split_text_fallback=s["_split"].count("text"),
        split_diverged_fallback=s["_split"].count("diverged"),
        sft_turns_unlabelled=sum(s["_lost_turns"]),
        longest_prompt_tokens=max(s["_prompt_len"], default=0),
        longest_sequence_tokens=max(s["_seq_len"], default=0),
        settings=asdict(cfg),
    )


def add_kl_completions(dataset: Dataset, batch_size: int) -> Dataset:
    """KTO's mismatched pairs fixed in the data, as TRL does: within consecutive chunks of `batch_size`
    rows, row i gets the completion of row i-1 (the first row of a chunk, its last). Needed when reference
    KL log-probs are precomputed; the loop must then batch sequentially with this batch size."""
    completions = dataset["completion_ids"]
    if len(completions) < 2 or batch_size < 2:
        raise ValueError("KTO's KL pairs need at least 2 rows and batch_size >= 2")
    kl: list[list[int]] = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        # A lone last row would meet its own completion: give it the previous row's instead.
        kl.extend(chunk[-1:] + chunk[:-1] if len(chunk) > 1 else [completions[start - 1]])
    return dataset.add_column("kl_completion_ids", kl, feature=_IDS)
