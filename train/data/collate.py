"""Training data, collators: tokenised rows -> right-padded batches (batch keys in `train.data`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from train.data.load import PAIR_SCALARS, RowKind
from train.data.tokenize import IGNORE_INDEX

PAIR_REF = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_logps_mean", "ref_rejected_logps_mean")
UNPAIRED_REF = ("ref_logps", "ref_logps_mean", "ref_kl_logps")


def _pad(seqs: Sequence[Sequence[int]], value: int, multiple: int | None) -> torch.Tensor:
    """Right padding to the longest row (rounded up to `multiple`)."""
    width = max((len(s) for s in seqs), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _sequences(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, multiple: int | None = None
) -> dict[str, torch.Tensor]:
    """(prompt_ids, completion_ids) pairs -> input_ids / attention_mask / labels (completion only)."""
    ids = [list(p) + list(c) for p, c in pairs]
    labels = [[IGNORE_INDEX] * len(p) + list(c) for p, c in pairs]
    return {
        "input_ids": _pad(ids, pad_id, multiple),
        "attention_mask": _pad([[1] * len(x) for x in ids], 0, multiple),
        "labels": _pad(labels, IGNORE_INDEX, multiple),
    }


def _scalars(rows: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor([math.nan if r[k] is None else float(r[k]) for r in rows], dtype=torch.float32)
        for k in keys
        if k in rows[0]
    }


@dataclass
class SFTCollator:
    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": _pad(ids, self.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0, self.pad_to_multiple_of),
            "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, self.pad_to_multiple_of),
        }


@dataclass
class PairCollator:
    """Chosen and rejected in one batch of 2B rows (first B chosen, then B rejected). A DOVE row's
    rejected side uses its own prompt (`rejected_prompt_ids`) when the row has one."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [
            (r.get("rejected_prompt_ids") or r["prompt_ids"], r["rejected_ids"]) for r in rows
        ]
        batch = {
            **_sequences(pairs, self.pad_token_id, self.pad_to_multiple_of),
            **_scalars(rows, PAIR_SCALARS + PAIR_REF),
        }
        if "prompt_embedding" in rows[0]:  # Relative PO: [B, D] frozen prompt embeddings (train.embeddings)
            batch["prompt_embeddings"] = torch.tensor([r["prompt_embedding"] for r in rows], dtype=torch.float32)
        return batch


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
        batch = _sequences(
            [(r["prompt_ids"], r["completion_ids"]) for r in rows], self.pad_token_id, self.pad_to_multiple_of
        )
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
        batch.update(_scalars(rows, UNPAIRED_REF))
        if "prompt_embedding" in rows[0]:  # Relative PO, unpaired: [B, D] frozen prompt embeddings
            batch["prompt_embeddings"] = torch.tensor([r["prompt_embedding"] for r in rows], dtype=torch.float32)
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
        return [(r["prompt_ids"], c[:n]) for r, c, n in zip(rows, completions, room, strict=True)]


def make_collator(
    kind: RowKind, pad_token_id: int | None, **kwargs: Any
) -> SFTCollator | PairCollator | RankedCollator | UnpairedCollator:
    """The collator for a row kind. `pad_token_id` None (a tokenizer without one) pads with 0: padded
    positions are masked and carry label -100, so the pad id never changes a result."""
    classes = {
        "sft": SFTCollator,
        "pairwise": PairCollator,
        "ranked": RankedCollator,
        "unpaired": UnpairedCollator,
    }
    if kind not in classes:
        raise ValueError(f"unknown row kind {kind!r}; valid: {sorted(classes)}")
    return classes[kind](pad_token_id=0 if pad_token_id is None else pad_token_id, **kwargs)
