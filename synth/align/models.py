"""The current model of a round and how each tool receives it.

A round's model is `base` weights plus, under LoRA, an `adapter`. With LoRA (the default) the base
stays the initial model for every round and each round's training continues the previous round's
adapter (`lora.init_adapter`), so one server or engine can hold every round:

    hf       llm.adapter=<round k adapter>                      (peft, in-process)
    vllm     llm.adapter=<round k adapter>                      (a LoRARequest with every request)
    openai   model.name_or_path=<served name of round k>       (align.served.adapter, e.g.
             cai_rounds-r1-dpo: the adapter of round 1's stage dpo; with
             align.served.load=true it is loaded first: POST <base_url>/load_lora_adapter, vLLM serve
             with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)

Full fine-tuning (lora.enabled=false) hands the round's `final/` folder itself as the base.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from synth.errors import BackendError, ConfigError
from synth.io import fsync_dir, fsync_tree
from synth.modelfiles import load_model, load_tokenizer, resolve_model


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any]  # a model block: name_or_path, revision, chat_template, gguf_file
    adapter: str | None = None
    round: int = 0  # the round whose training produced it (0 = the initial model)
    stage: str | None = None  # the train stage that produced it (a round may train twice: SFT then DPO)


def served_name(ref: ModelRef, served: dict[str, Any], recipe: str) -> str:
    if ref.round == 0:
        return served.get("base") or ref.base["name_or_path"]
    return str(served["adapter"]).format(recipe=recipe, round=ref.round, stage=ref.stage)


def policy_blocks(ref: ModelRef, llm: dict[str, Any], served: dict[str, Any], recipe: str) -> tuple[dict, dict]:
    """(llm block, model block) that make synth / evaluate generate with `ref`."""
    llm = dict(llm)
    model = dict(ref.base)
    if llm.get("kind") == "openai":
        model["name_or_path"] = served_name(ref, served, recipe)
        if ref.adapter is not None and served.get("load"):
            load_served_adapter(llm, model["name_or_path"], ref.adapter)
    elif ref.adapter is not None:
        llm["adapter"] = ref.adapter
    return llm, model


def load_served_adapter(llm: dict[str, Any], name: str, adapter: str) -> None:
    """vLLM serve's runtime LoRA loading; an adapter already loaded under that name is fine."""
    import httpx

    urls = llm["base_url"] if isinstance(llm["base_url"], list) else [llm["base_url"]]
    key = os.environ.get(llm.get("api_key_env") or "", "EMPTY")
    for url in urls:
        try:
            r = httpx.post(
                f"{url.rstrip('/')}/load_lora_adapter",
                json={"lora_name": name, "lora_path": str(adapter)},
                headers={"Authorization": f"Bearer {key}"},
                timeout=float(llm.get("timeout_s", 600)),
            )
        except httpx.HTTPError as e:
            raise BackendError(
                f"{url}: cannot load adapter {name} ({type(e).__name__}); start the server with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True or set align served.load=false"
            ) from None
        if r.status_code >= 400 and "already" not in r.text.lower():
            raise BackendError(
                f"{url}/load_lora_adapter answered {r.status_code} for {name}; serve the adapter "
                f"{adapter} as {name} yourself and set served.load=false"
            )


def merged_copy(ref: ModelRef, out: Path) -> str:
    """`ref` as one full-weights folder (base + adapter merged): what a DPO reference of "the previous
    iterate" loads. Written once, through a temporary folder renamed into place (kill-safe)."""
    if ref.adapter is None:
        return ref.base["name_or_path"]
    if (out / "config.json").exists():
        return str(out)
    from peft import PeftModel
    from transformers import AutoTokenizer

    from train.models import load_frozen  # lazy: keeps torch out of synth.align.models's import

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = load_frozen(ref.base["name_or_path"], revision=ref.base.get("revision"))
    merged = PeftModel.from_pretrained(base, ref.adapter).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(ref.adapter).save_pretrained(tmp)
    fsync_tree(tmp)  # content first, then the name: a power loss never leaves `out` with unwritten weights
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return str(out)


def materialized_base(model: dict[str, Any], out: Path) -> dict[str, Any]:
    """A GGUF initial model (e.g. model=smollm2-135m) de-quantized ONCE into `out` (safetensors + its
    tokenizer and chat template), so that the recipe's many stages load a plain folder (about a second)
    instead of de-quantizing the GGUF again (a minute each on a loaded 2-core CPU). The weights are the
    same floats every stage would get from the GGUF; other models are returned unchanged. Written
    through a temporary folder renamed into place (kill-safe)."""

    source = resolve_model(model["name_or_path"], model.get("gguf_file"))
    if not source.gguf_file:
        return model
    if not (out / "config.json").exists():
        from transformers import AutoModelForCausalLM

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = load_tokenizer(source, model.get("revision"))
        if model.get("chat_template"):
            tok.chat_template = model["chat_template"]
        net = load_model(AutoModelForCausalLM, source, model.get("revision"))
        net.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"de-quantized from {source.display}\n")
        fsync_tree(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    return {**model, "name_or_path": str(out), "gguf_file": None, "revision": None}


def trained_ref(final: Path, start: ModelRef, lora: bool, round_: int, stage: str) -> ModelRef:
    """The model a train stage produced from `start`."""
    if not final.exists():
        raise ConfigError(f"{final}: the train stage wrote no final/ folder")
    if lora:
        return ModelRef(base=start.base, adapter=str(final), round=round_, stage=stage)
    return ModelRef(
        base={
            "name_or_path": str(final),
            "revision": None,
            "chat_template": start.base.get("chat_template"),
            "gguf_file": None,
        },
        round=round_,
        stage=stage,
    )
