"""The rollout of the online loops: prompts in, token ids out, and the no-grad / grad forwards on them.

Token-in, token-out: the policy is never fed re-tokenised text. A rollout holds N = prompts × n rows,
each a left-padded prompt followed by a right-padded completion:

    prompt_ids [N, Lp], prompt_mask [N, Lp]          left padding (generation layout)
    completion_ids [N, Lc], completion_mask [N, Lc]  real tokens up to and including the first EOS
    truncated [N] bool                                 no EOS within max_new_tokens
    group [N] long                                     the prompt's index in this rollout (groups are contiguous)
    sampler_logps [N, Lc] float32 | None               the sampling engine's log-probs of the completion
                                                       tokens (vLLM; None when the trainer sampled): used
                                                       only for the mismatch correction and its monitor

Log-probs are computed by the trainer in float32 from logits / T at the sampling temperature T (TRL,
OpenRLHF, verl), with only the completion positions through the LM head (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from synth.llm.kv_cache import in_place, in_place_cache
from train.logprobs import selective_log_softmax
from train.loops.packing import bin_capacity, pack_rows


@dataclass
class Rollout:
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    truncated: Tensor
    group: Tensor
    sampler_logps: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: Sequence[int] | Tensor) -> Rollout:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Rollout(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx] for f in fields(self)}
        )

    def forward_inputs(self) -> dict[str, Tensor]:
        """input_ids / attention_mask / position_ids of prompt + completion (positions count real tokens
        from 0, as generation with left padding does)."""
        attn = torch.cat([self.prompt_mask, self.completion_mask], 1).long()
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        return {
            "input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1),
            "attention_mask": attn,
            "position_ids": pos,
        }

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def eos_mask(completion_ids: Tensor, eos_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(mask [N, Lc] bool up to and including the first EOS, truncated [N] bool). Built from the EOS
    position, never from "first pad − 1", so pad == eos cannot drop the EOS itself (trl#3750)."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    has = is_eos.any(1)
    first = torch.where(has, is_eos.float().argmax(1), torch.full_like(has, completion_ids.shape[1], dtype=torch.long))
    positions = torch.arange(completion_ids.shape[1]).expand_as(completion_ids)
    return positions <= first[:, None], ~has


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def hf_generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], n: int, gen, *, seed: int, greedy: bool = False, device=None
) -> Rollout:
    """Sample n completions per prompt with the live policy module (nothing to sync): one batched
    `generate` over prompts × n rows, left-padded, KV cache on, seeded from `seed` (the loop derives
    it from (run seed, step, process), so a resumed run samples the same completions).

    Each prompt is prefilled once, not n times: one forward over the P distinct prompts (all but their
    last token) fills a KV cache that is repeated n times along the batch (`Cache.batch_repeat_interleave`)
    and handed to `generate`, which then runs only the last prompt token and the new ones. The rows see
    the same keys/values and positions as when each row is prefilled, so the tokens drawn for a seed are
    the same (tested against TRL's `generate` path); the prefill's cost drops by n× (on a 2-core CPU,
    1.15-1.25× less generation time at G=4)."""
    unwrapped = getattr(model, "module", model)
    eos = eos_token_ids(unwrapped, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    uniq, uniq_mask = left_pad([list(p) for p in prompts], pad)
    ids, mask = uniq.repeat_interleave(n, 0), uniq_mask.repeat_interleave(n, 0)
    device = device or next(unwrapped.parameters()).device
    if not greedy:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k}
    )  # top_k 0 = off (as a generate() keyword None is off too, transformers 4.56-5.x). Never leave it out:
    # the checkpoint's generation_config would supply its own top_k, i.e. sampling from a truncated
    # distribution that the trainer's full-softmax log-probs do not describe
    was_training = unwrapped.training
    unwrapped.eval()
    cache = _shared_prompt_cache(unwrapped, uniq, uniq_mask, n, device, room=gen.max_new_tokens + 1)
    kwargs.update(cache if cache is not None else in_place_cache(unwrapped, gen.max_new_tokens))
    out = unwrapped.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
        **kwargs,
    )
    unwrapped.train(was_training)
    completion = out[:, ids.shape[1] :].cpu()
    if completion.shape[1] == 0:
        completion = torch.full((len(ids), 1), pad, dtype=torch.long)
    cmask, truncated = eos_mask(completion, eos)
    completion = torch.where(cmask, completion, torch.full_like(completion, pad))
    group = torch.arange(len(prompts)).repeat_interleave(n)
    return Rollout(ids, mask, completion, cmask, truncated, group)


def _shared_prompt_cache(model, ids: Tensor, mask: Tensor, n: int, device, room: int) -> dict[str, Any] | None:
    """The KV cache of each prompt's tokens but its last, computed once per prompt and repeated n times
    along the batch, as the `generate` keyword that takes it; None where that does not apply (n = 1, a
    prompt of one token, a model whose forward takes no position ids or whose cache is not a
    DynamicCache): then `generate` prefills every row. Positions are generate's own for left padding
    (cumsum of the mask − 1, 1 on padding). The cache is written in place for `room` more tokens
    (synth/llm/kv_cache.py: no per-step concatenation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if n < 2 or int(mask.sum(1).min()) < 2 or "position_ids" not in inspect.signature(base.forward).parameters:
        return None
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    out = model(
        input_ids=ids[:, :-1].to(device),
        attention_mask=mask[:, :-1].to(device),
        position_ids=pos[:, :-1].to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    # transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a warning)
    name = "cache" if "cache" in getattr(out, "__dataclass_fields__", {}) else "past_key_values"
    cache = getattr(out, name)
    if not isinstance(cache, DynamicCache):
        return None
    cache.batch_repeat_interleave(n)
    return {name: in_place(cache, room)}


def _logits(model, rollout: Rollout, device) -> Tensor:
    """Logits of the positions that predict each completion token: [N, Lc, V]."""
    inputs = {k: v.to(device) for k, v in rollout.forward_inputs().items()}
    lc = rollout.completion_ids.shape[1]
    out = model(**inputs, use_cache=False, logits_to_keep=lc + 1)
    return out.logits[:, :-1]


def token_logps(
    model,
    rollout: Rollout,
    temperature: float,
    device,
    with_entropy: bool = False,
    packed: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log π(y_t | x, y_<t) of the completion tokens from logits / T, float32 [N, Lc] (0 off mask), and
    with_entropy the per-token entropy of the same distribution (no grad unless entropy_grad: the entropy
    bonus differentiates it). packed: the rows (real prompt
    + completion tokens only) are laid end to end (train/loops/packing.py), so no compute is spent on the
    prompts' left padding or the completions' right padding; same values. A `Packed(head_only=True)` also
    runs the LM head on the M positions that predict completion tokens only, not on the prompts'
    (logits [M, V] instead of [rows, width, V]: the head's compute and the logits' memory scale with the
    completion, which matters at a 49k vocabulary); the loop enables it after `head_only_matches`."""
    if packed:
        logits, index = _packed_logits(model, rollout, device, head_only=getattr(packed, "head_only", False))
    else:
        logits, index = _logits(model, rollout, device), None
    if temperature != 1.0:
        logits = logits / temperature
    mask = rollout.completion_mask.to(device)
    target = rollout.completion_ids.to(device)
    if index is not None:  # packed: logits [P, V] of the positions predicting each completion token
        flat = selective_log_softmax(logits, target[mask])
        logps = torch.zeros(mask.shape, dtype=flat.dtype, device=device).masked_scatter(mask, flat)
    else:
        logps = selective_log_softmax(logits, target, mask)
    entropy = None
    if with_entropy:
        with torch.no_grad() if not entropy_grad else contextlib.nullcontext():
            lf = logits.float() if entropy_grad else logits.detach().float()
            p = lf.softmax(-1)
            ent = lf.logsumexp(-1) - (p * lf).sum(-1)
            entropy = (
                torch.zeros(mask.shape, dtype=ent.dtype, device=device).masked_scatter(mask, ent)
                if index is not None
                else ent * mask
            )
    return logps, entropy


@dataclass(frozen=True)
class Packed:
    """token_logps(packed=Packed(...)): rows packed end to end; head_only: LM head on completion positions."""

    head_only: bool = False


@contextlib.contextmanager
def _head_on(model, index: Tensor):
    """While active, the model's output embedding (LM head) sees only hidden[..., index, :] flattened:
    a forward pre-hook, so the call still goes through the (DDP / PEFT) wrapper and the model's own
    post-processing of the logits (e.g. soft-capping) applies."""
    head = getattr(model, "module", model).get_output_embeddings()

    def select(_module, args):
        h = args[0]
        return (h.reshape(-1, h.shape[-1])[index],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def head_only_matches(model, rollout: Rollout, device, tol: float = 1e-4) -> bool:
    """One-time check (per model) that the completion-only LM head gives the padded forward's log-probs."""
    try:
        with torch.no_grad():
            ref = token_logps(model, rollout, 1.0, device)[0]
            got = token_logps(model, rollout, 1.0, device, packed=Packed(head_only=True))[0]
        return got.shape == ref.shape and bool((got - ref).abs().max() <= tol)
    except Exception:  # a model whose forward reshapes the head's output: keep the full head
        return False


def _packed_logits(model, rollout: Rollout, device, head_only: bool = False) -> tuple[Tensor, Tensor]:
    """One forward over the rows packed end to end -> (logits [M, V] of the positions that predict the
    M real completion tokens, in row-major order of completion_mask; the packed positions)."""

    plen = rollout.prompt_mask.sum(1)
    clen = rollout.completion_mask.sum(1)
    width = int((plen + clen).max())
    n = len(rollout)
    ids = torch.zeros((n, width), dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i in range(n):
        row = torch.cat(
            [
                rollout.prompt_ids[i][rollout.prompt_mask[i].bool()],
                rollout.completion_ids[i][rollout.completion_mask[i]],
            ]
        )
        ids[i, : len(row)] = row
        attn[i, : len(row)] = 1
    pk = pack_rows(ids, attn, ids, capacity=bin_capacity(model, (plen + clen).tolist()))
    # padded position (i, t) sits at packed position where src == i*width + t; token j of row i's completion
    # is predicted at padded position plen_i + j - 1
    where = torch.full((n * width,), -1, dtype=torch.long)
    valid = pk.src >= 0
    where[pk.src[valid]] = torch.arange(pk.src.numel())[valid.reshape(-1)]
    cols = plen[:, None] - 1 + torch.arange(rollout.completion_ids.shape[1])[None]
    flat_index = (torch.arange(n)[:, None] * width + cols.clamp(max=width - 1))[rollout.completion_mask]
    index = where[flat_index].to(device)
    inputs = {"input_ids": pk.input_ids.to(device), "position_ids": pk.position_ids.to(device), "use_cache": False}
    if head_only:
        with _head_on(model, index):
            logits = model(**inputs).logits
        return logits.reshape(-1, logits.shape[-1]), index
    logits = model(**inputs).logits
    return logits.reshape(-1, logits.shape[-1])[index], index


class TokenValues(torch.nn.Module):
    """A critic: a sequence-classification model (e.g. the reward model, `train loop=reward`) whose
    score head is read at every position instead of the last one. Forward -> values [N, Lc] float32 of
    the states before each completion token (OpenRLHF Critic)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, n_completion: int) -> Tensor:
        m = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        trunk = getattr(m, m.base_model_prefix)
        h = trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        h = h[:, -(n_completion + 1) : -1]
        return m.score(h).squeeze(-1).float()


@contextlib.contextmanager
def adapter_active(peft_model, name: str):
    """Run the block with LoRA adapter `name` active (PEFT `set_adapter`), then make the previous one active
    again. PEFT's set_adapter also freezes the adapters it deactivates; `name`'s weights are made trainable
    again on the way out, because a leaf whose requires_grad is switched off between the forward and the
    backward receives no gradient. Both adapters stay trainable: an inactive adapter takes no part in a
    forward, so it gets no gradient from it, and each optimizer keeps its own parameter set."""
    previous = peft_model.active_adapter
    peft_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
        for n, p in peft_model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.requires_grad_(True)


class AdapterValues(torch.nn.Module):
    """A critic on the policy's own frozen base (PPO critic option (b); TRL "multi-adapter RL"): the LoRA
    adapter `name` of the policy's PeftModel, active only inside this forward, plus a scalar head on every
    token. Forward -> values [N, Lc] float32 of the states before each completion token, like TokenValues.

    The PeftModel is held outside the module tree: the policy owns it. `parameters()` yields this
    adapter's LoRA weights and the head, the critic optimizer's set, disjoint from the policy adapter's."""

    def __init__(self, peft_model, name: str, hidden_size: int):
        super().__init__()
        self.name = name
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # V = 0 until the critic has learnt something
        torch.nn.init.zeros_(self.head.bias)
        self.__dict__["peft"] = peft_model  # not registered: a second owner would save and move the policy

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{self.name}." in n and "lora_" in n]

    def parameters(self, recurse: bool = True):
        yield from self.adapter_parameters()
        yield from self.head.parameters()

    def forward(self, input_ids, attention_mask, position_ids, n_completion: int) -> Tensor:
        m = self.peft.get_base_model()
        trunk = getattr(m, m.base_model_prefix)
        with adapter_active(self.peft, self.name):
            h = trunk(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        h = h[:, -(n_completion + 1) : -1]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def token_values(critic, rollout: Rollout, device) -> Tensor:
    inputs = {k: v.to(device) for k, v in rollout.forward_inputs().items()}
    return critic(**inputs, n_completion=rollout.completion_ids.shape[1]) * rollout.completion_mask.to(device)
