"""Generation backends (hf, vllm, openai-compatible servers, tiny). `build_llm` is the one way pipelines get one:

    llm = build_llm(cfg.llm, cfg.model, cache_path=out / "cache.sqlite")
    outs = llm.generate(requests, SamplingParams(n=4, temperature=0.7))   # list[list[Completion]]

`llm_cfg` is the `llm` config group (`kind: hf|vllm|openai` + that backend's settings, see
conf/llm/*.yaml), `model_cfg` the `model` group (`name_or_path`, `revision`, `chat_template`).
Settings are validated (unknown keys rejected with one line naming the valid ones) before any model is
loaded; `vllm`, `openai`, `peft` and `transformers` are imported only inside the backend that uses them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synth.errors import ConfigError
from synth.llm.base import (
    LLM,
    BackendError,
    CallStats,
    Completion,
    ModelSettings,
    SamplingParams,
    as_params_list,
    is_prefill,
    settings_from_config,
)

# kind -> (module, settings class, backend class). The config group conf/llm/ lists the same names.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "hf": ("synth.llm.hf", "HFSettings", "HFBackend"),
    "vllm": ("synth.llm.vllm", "VLLMSettings", "VLLMBackend"),
    "openai": ("synth.llm.openai", "OpenAISettings", "OpenAIBackend"),
}


def check_llm(
    llm_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], where: str = "llm"
) -> tuple[Any, ModelSettings]:
    """Validate a role's backend and model settings without loading anything (ConfigError, one line).
    `synth` calls this for every role at start-up, before it touches the output folder."""
    cfg = _plain(llm_cfg)
    kind = cfg.get("kind")
    if kind not in BACKENDS:
        raise ConfigError(f"{where}.kind={kind!r} is not a backend; valid: {', '.join(sorted(BACKENDS))}")
    module_name, settings_name, _ = BACKENDS[kind]
    settings = settings_from_config(
        getattr(importlib.import_module(module_name), settings_name), cfg, f"{where}={kind}"
    )
    return settings, settings_from_config(ModelSettings, _plain(model_cfg), where.replace("llm", "model"))


def build_llm(llm_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], *, cache_path: str | Path | None = None) -> LLM:
    """Validate the settings, build the backend, wrap it in the call cache when `cache_path` is given."""
    settings, model = check_llm(llm_cfg, model_cfg)
    module_name, _, backend_name = BACKENDS[settings.kind]
    backend = getattr(importlib.import_module(module_name), backend_name)(settings, model)
    if cache_path is None:
        return backend
    from synth.llm.cache import CachedLLM  # lazy: synth.llm.cache imports this module (cycle)

    return CachedLLM(backend, cache_path)


def require_prefill(llm: Any) -> None:
    """For a pipeline that reads labels after an assistant prefill: check at start-up, before any other
    request, that `llm` continues an assistant message (the openai backend probes its server once and
    raises a one-line BackendError when it does not; hf and vllm always do)."""
    inner = getattr(llm, "inner", llm)  # the call cache wraps the backend
    check = getattr(inner, "check_prefill", None)
    if check is not None:
        check()


def _plain(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A DictConfig (resolved) or any mapping -> a plain dict."""
    if cfg is None:
        return {}
    if type(cfg).__name__ == "DictConfig":
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


__all__ = [
    "BACKENDS",
    "LLM",
    "BackendError",
    "CallStats",
    "Completion",
    "ModelSettings",
    "SamplingParams",
    "as_params_list",
    "build_llm",
    "check_llm",
    "is_prefill",
    "require_prefill",
]
