"""build_llm: config validation before any model loads, conf/llm/*.yaml in sync with the settings models."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from synth.llm import BACKENDS, build_llm

CONF_LLM = Path(__file__).resolve().parents[2] / "conf" / "llm"


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"llm.kind='tgi' is not a backend; valid: hf, openai, vllm"):
        build_llm({"kind": "tgi"}, {"name_or_path": "m"})


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_unknown_key_is_one_line_naming_the_valid_keys(kind):
    with pytest.raises(ValueError) as e:
        build_llm({"kind": kind, "batchsize": 4}, {"name_or_path": "/no/such/model"})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"llm={kind}: unknown key 'batchsize'; valid keys: ")
    assert "kind" in msg


def test_bad_value_names_the_key():
    with pytest.raises(ValueError) as e:
        build_llm({"kind": "hf", "batch_size": "many"}, {"name_or_path": "/no/such/model"})
    assert str(e.value).startswith("llm=hf: batch_size: ") and "'many'" in str(e.value)
    with pytest.raises(ValueError, match="llm=hf: device: "):
        build_llm({"kind": "hf", "device": "tpu"}, {"name_or_path": "/no/such/model"})
    with pytest.raises(ValueError, match="model: name_or_path: "):
        build_llm({"kind": "hf"}, {"revision": "x"})


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_yaml_defaults_validate(kind):
    """Every key in conf/llm/<kind>.yaml is a setting, and the YAML's defaults are the model's."""
    module, settings_name, _ = BACKENDS[kind]
    model = getattr(importlib.import_module(module), settings_name)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_LLM / f"{kind}.yaml"))
    assert cfg["kind"] == kind
    assert model.model_validate(cfg) == model()  # same defaults in both places
    assert set(cfg) == set(model.model_fields)  # and every setting documented in the YAML


def test_dictconfig_is_accepted(openai_server):
    cfg = OmegaConf.create({"kind": "openai", "base_url": openai_server.url, "progress": False})
    llm = build_llm(cfg, OmegaConf.create({"name_or_path": "test-model", "revision": None, "chat_template": None}))
    assert llm.kind == "openai" and llm.model == "test-model"


def test_importing_synth_llm_is_light():
    import subprocess

    code = (
        "import sys, synth.llm, synth.llm.openai, synth.llm.vllm, synth.llm.hf, synth.llm.cache; "
        "print(sorted(m for m in ('vllm', 'openai', 'peft', 'transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
