"""Model-based scores of `evaluate`: reward / cost model outputs and KL to a reference (torch, lazy).

- `ScalarScorer(path)`: a reward or cost model saved by `train loop=reward` (a causal LM with a one-output
  score head, full weights or a LoRA adapter); the (prompt, answer) pair is tokenised exactly as that
  loop tokenises it (train.data's chat-template split), and the head's output is the score.
- `LogprobScorer(policy, reference)`: per-token log-probs of each answer under the policy and the
  reference; per sequence k1 = Σ ℓ_t and k3 = Σ (e^{−ℓ_t} − 1 + ℓ_t), ℓ_t = log π(y_t) − log π_ref(y_t)
  (Schulman 2020). Only meaningful on answers sampled from the policy at temperature 1, top_p 1 (the
  caller checks). The answer text is re-tokenised, which can differ from the sampled token ids when a
  tokenizer is not round-trip stable; the chat template's end-of-turn token is included.

Both load on first use, score in small batches and never hold gradients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from synth.records import Message


def _encoder(tokenizer):
    from train.data.tokenize import (  # lazy: keeps datasets, torch out of synth.evaluate.scoring's import
        ChatEncoder,
        TokenizeConfig,
    )

    return ChatEncoder(tokenizer, TokenizeConfig(max_length=None, max_prompt_length=None))


def _pairs(enc, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    out = []
    for p, a in zip(prompts, answers, strict=True):
        msgs = [m.model_dump() for m in p]
        prompt_ids, (completion_ids,), _ = enc.split(msgs, [[{"role": "assistant", "content": a}]])
        out.append((prompt_ids, completion_ids))
    return out


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def _device(device: str):
    import torch

    return torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )


class ScalarScorer:
    def __init__(self, path: str, device: str = "auto", batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification

        from train.models import load_tokenizer, model_path  # lazy: keeps torch out of synth.evaluate.scoring's import

        self.path, self.batch_size, self.device = path, batch_size, _device(device)
        folder = Path(model_path(path))
        adapter = folder / "adapter_config.json"
        if adapter.exists():
            from peft import PeftModel

            base = json.loads(adapter.read_text())["base_model_name_or_path"]
            self.tok = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else base)
            model = AutoModelForSequenceClassification.from_pretrained(model_path(base), num_labels=1)
            model = PeftModel.from_pretrained(model, str(folder))
        else:
            self.tok = load_tokenizer(path)
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
        model.config.pad_token_id = self.tok.pad_token_id
        self.model = model.to(self.device).eval()
        self.enc = _encoder(self.tok)

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> list[float]:
        import torch

        pairs = _pairs(self.enc, prompts, answers)
        out: list[float] = []
        with torch.no_grad():
            for idx in _batches(len(pairs), self.batch_size):
                seqs = [pairs[i][0] + pairs[i][1] for i in idx]
                L = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), L), self.tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), L), dtype=torch.long)
                for r, s in enumerate(seqs):  # right padding: the head reads the last non-pad token
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                out += logits[:, 0].float().cpu().tolist()
        return out


class LogprobScorer:
    def __init__(
        self, policy: str, reference: str, adapter: str | None = None, device: str = "auto", batch_size: int = 4
    ):
        from train.models import load_frozen, load_tokenizer  # lazy: keeps torch out of synth.evaluate.scoring's import

        self.batch_size, self.device = batch_size, _device(device)
        self.tok = load_tokenizer(policy)
        self.policy = load_frozen(policy).to(self.device)
        if adapter:
            from peft import PeftModel

            self.policy = PeftModel.from_pretrained(self.policy, adapter).eval()
        self.reference = load_frozen(reference).to(self.device)
        self.enc = _encoder(self.tok)

    def token_logps(self, model, pairs) -> list[list[float]]:
        import torch

        from train.logprobs import IGNORE_INDEX, token_logps  # lazy: keeps torch out of synth.evaluate.scoring's import

        out: list[list[float]] = []
        with torch.no_grad():
            for idx in _batches(len(pairs), self.batch_size):
                seqs = [pairs[i][0] + pairs[i][1] for i in idx]
                L = max(len(s) for s in seqs)
                pad = self.tok.pad_token_id
                ids = torch.full((len(seqs), L), pad, dtype=torch.long)
                labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(seqs), L), dtype=torch.long)
                for r, i in enumerate(idx):
                    p, c = pairs[i]
                    ids[r, : len(p) + len(c)] = torch.tensor(p + c)
                    labels[r, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[r, : len(p) + len(c)] = 1
                logits = model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
                ).logits
                lp, m = token_logps(logits, labels.to(self.device))
                for r in range(len(seqs)):
                    out.append(lp[r][m[r]].float().cpu().tolist())
        return out

    def __call__(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> list[dict[str, float | int]]:
        from synth.evaluate.stats import kl_estimates  # lazy: keeps numpy out of synth.evaluate.scoring's import

        pairs = _pairs(self.enc, prompts, answers)
        lp_pol, lp_ref = self.token_logps(self.policy, pairs), self.token_logps(self.reference, pairs)
        out = []
        for a, b in zip(lp_pol, lp_ref, strict=True):
            k1, k3 = kl_estimates(a, b)
            out.append({"logp_policy": sum(a), "logp_ref": sum(b), "kl_k1": k1, "kl_k3": k3, "kl_tokens": len(a)})
        return out
