"""Prompts for the online loops: any file the offline loops read, reduced to its prompt conversations.

Accepted rows: `prompt` (a string, an hh-rlhf "Human: ..." text, or a list of messages); `messages` (the
trailing assistant turns are dropped); pairwise rows without `prompt` (hh-rlhf `chosen` texts or TRL's
implicit prompt: the conversation before the last assistant turn). Each prompt is tokenised with the chat
template and the generation prompt; a prompt over `max_prompt_length` keeps its end (or is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from synth.errors import DataError
from train.data.load import hh_to_messages, is_hh_text, read_rows

Messages = list[dict[str, str]]


def _strip_assistant_tail(msgs: Messages) -> Messages:
    end = len(msgs)
    while end and msgs[end - 1].get("role") == "assistant":
        end -= 1
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:end]]


def row_prompt(row: Mapping[str, Any], where: str) -> Messages:
    value = row.get("prompt")
    if value is None:
        value = row.get("messages", row.get("chosen"))
    if isinstance(value, str):
        msgs = hh_to_messages(value) if is_hh_text(value) else [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        msgs = list(value)
    else:
        raise DataError(f"{where}: no prompt (give `prompt` as text or messages, or `messages`)")
    msgs = _strip_assistant_tail(msgs)
    if not msgs:
        raise DataError(f"{where}: the prompt is empty after dropping assistant turns")
    return msgs


def load_prompts(path: str, split: str = "train", limit: int | None = None) -> list[Messages]:
    prompts = []
    for i, row in enumerate(read_rows(path, split)):
        if limit is not None and i >= limit:
            break
        prompts.append(row_prompt(row, f"{path}: row {i}"))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def encode_prompts(
    prompts: list[Messages], tokenizer, chat_template: str | None, max_prompt_length: int | None, drop_overlong: bool
) -> tuple[list[list[int]], list[int], int]:
    """(token ids per kept prompt, indices of the kept prompts, number truncated). Over-long prompts keep
    their end (the question) unless drop_overlong."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
        for p in prompts
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept, index, truncated = [], [], 0
    for i, row in enumerate(ids):
        if max_prompt_length is not None and len(row) > max_prompt_length:
            if drop_overlong:
                continue
            row, truncated = row[-max_prompt_length:], truncated + 1
        kept.append(row)
        index.append(i)
    return kept, index, truncated
