"""Load the models a loop trains: policy (causal LM), reward/cost model (scalar head), frozen reference.

Full fine-tuning or LoRA via peft (imported here only when LoRA is on, so peft stays optional); float32 or
bfloat16 weights; gradient checkpointing; the chat template overridden from `model.chat_template`.
Checkpoints are plain `save_pretrained` folders: a LoRA adapter (adapter_config.json +
adapter_model.safetensors, what vLLM's LoRARequest and PeftModel.from_pretrained load) or full weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from synth.app import ConfigError
from synth.modelfiles import load_model, resolve_model
from synth.modelfiles import load_tokenizer as _load_hf_tokenizer
from train.data import require_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_path(name_or_path: str) -> str:
    """`builtin:tiny` -> its built folder, `pkg:...` -> the file in the package; a GGUF file is
    `<folder>/<file>.gguf` (synth/modelfiles.py); hub ids and local folders unchanged."""
    return resolve_model(name_or_path).display


def load_tokenizer(name_or_path: str, revision: str | None = None, chat_template: str | None = None):
    """The tokenizer with a chat template (a DataError naming the fix when there is none) and a pad id."""

    try:
        tok = _load_hf_tokenizer(resolve_model(name_or_path), revision)
    except OSError as e:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: cannot load a tokenizer ({str(e).splitlines()[0]})"
        ) from None
    tok.chat_template = require_chat_template(tok, chat_template)
    if tok.pad_token_id is None:  # padded positions are masked; any id works, eos is conventional
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(cls, path: str, revision: str | None, dtype: str, **kwargs):
    try:
        return load_model(cls, resolve_model(path), revision, dtype=DTYPES[dtype], **kwargs)
    except OSError as e:
        raise ConfigError(f"model.name_or_path={path}: cannot load the model ({str(e).splitlines()[0]})") from None


def load_policy(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    lora: Any = None,
    gradient_checkpointing: bool = False,
    head: str = "causal_lm",
    pad_token_id: int | None = None,
    adapter_path: str | Path | None = None,
):
    """The trainable model. head: causal_lm | score (a scalar head for reward/cost models).

    `lora` is a LoraConfig-like object (enabled, r, alpha, dropout, target_modules, modules_to_save);
    `adapter_path` resumes a LoRA adapter saved by a checkpoint (trainable). For full fine-tuning a
    checkpoint is itself a `save_pretrained` folder: pass it as `name_or_path`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "score":
        model = _from_pretrained(AutoModelForSequenceClassification, name_or_path, revision, dtype, num_labels=1)
        if pad_token_id is not None:  # the score head reads the last non-pad token of each row
            model.config.pad_token_id = pad_token_id
    else:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, revision, dtype)
    model.config.use_cache = False
    if gradient_checkpointing:  # `activation_checkpointing_enable` from transformers 5.x; the old name goes in v6
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and lora.enabled:
        model = _wrap_lora(model, lora, head, adapter_path)
    return model


def _wrap_lora(model, lora, head: str, adapter_path: str | Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    # a checkpoint being resumed wins over `init_adapter` (the adapter a new run starts from)
    if adapter_path is None and head == "causal_lm":
        adapter_path = getattr(lora, "init_adapter", None)
    if adapter_path is not None:
        if not (Path(adapter_path) / "adapter_config.json").exists():
            raise ConfigError(f"lora.init_adapter={adapter_path}: no adapter_config.json there (a LoRA adapter folder)")
        peft_model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
        if _checkpointing(model):
            peft_model.enable_input_require_grads()
        return peft_model
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=lora.modules_to_save,
        task_type="SEQ_CLS" if head == "score" else "CAUSAL_LM",  # SEQ_CLS trains and saves the score head too
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found
        raise ConfigError(f"lora.target_modules={targets}: {str(e).splitlines()[0]}") from None
    if _checkpointing(model):
        peft_model.enable_input_require_grads()
    return peft_model


def _checkpointing(model) -> bool:
    """Whether gradient checkpointing is on. `is_gradient_checkpointing` is deprecated (removed in
    transformers 6); the per-module `gradient_checkpointing` flags are what the layers read."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def load_frozen(name_or_path: str, *, revision: str | None = None, dtype: str = "float32"):
    """A frozen causal LM in eval mode (TR-DPO's live reference, or a reference with other weights)."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, revision, dtype)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    return model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model, exclude: Iterable[torch.nn.Parameter] = ()) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once. Under DeepSpeed ZeRO-3 a rank's
    tensor is empty and `ds_numel` holds the full size. `exclude`: parameters held in `model` that belong
    to another module and are counted there (the critic adapters of loop.critic.kind=adapter live in the
    policy's PeftModel)."""
    seen, trainable, total = {id(p) for p in exclude}, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def save_model(model, tokenizer, path: str | Path, accelerator=None) -> Path:
    """`save_pretrained` folder (adapter only for LoRA, else full weights) + tokenizer. Collective under
    FSDP/DeepSpeed (every process must call it); only the main process writes."""
    path = Path(path)
    state_dict = accelerator.get_state_dict(model) if accelerator is not None else None
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if accelerator is None or accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def mix_parameters(reference, policy, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): θ_ref ← α·θ + (1 − α)·θ_ref, in parameter
    space (α = 1 is the hard update θ_ref ← θ). Both models must have the same architecture."""
    ref_params = dict(reference.named_parameters())
    for name, p in policy.named_parameters():
        ref = ref_params[name]
        ref.mul_(1.0 - alpha).add_(p.detach().to(ref.dtype), alpha=alpha)
