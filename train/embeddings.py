"""Frozen prompt embeddings for objectives that weight pairs by prompt similarity (Relative PO).

A sentence encoder (e.g. sentence-transformers/all-MiniLM-L6-v2, the official RPO encoder) is loaded with
plain transformers and pooled as sentence-transformers does for that model: the attention-masked mean of
the last hidden states, L2-normalised, float32. The embeddings are computed once per data set, before
training, and travel with the rows as a `prompt_embedding` column (the collator stacks them to [B, D]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from synth.errors import ConfigError


def prompt_text(messages: Sequence[dict]) -> str:
    """What the encoder reads: the prompt's message contents (no chat template), one per line."""
    return "\n".join(m["content"] for m in messages)


@torch.no_grad()
def encode_texts(
    texts: Sequence[str],
    model_name: str,
    *,
    batch_size: int = 32,
    max_length: int = 256,
    where: str = "loss.embedding_model",
) -> list[list[float]]:
    """Mean-pooled, L2-normalised embeddings of `texts` ([len(texts)] lists of D floats)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_name)
        model = AutoModel.from_pretrained(model_name).float().eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}={model_name}: cannot load the prompt encoder ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    out: list[list[float]] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.extend(torch.nn.functional.normalize(pooled, p=2, dim=-1).tolist())
    return out


def with_prompt_embeddings(rows: Dataset, model_name: str) -> Dataset:
    """Canonical rows (a `prompt` column of messages) plus `prompt_embedding`; identical prompts share one
    forward."""
    texts = [prompt_text(p) for p in rows["prompt"]]
    unique = sorted(set(texts))
    vectors = dict(zip(unique, encode_texts(unique, model_name), strict=True))
    if "prompt_embedding" in rows.column_names:
        rows = rows.remove_columns("prompt_embedding")
    return rows.add_column("prompt_embedding", [vectors[t] for t in texts])
