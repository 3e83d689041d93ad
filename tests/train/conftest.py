"""Shared fixtures for tests/train: a private RLAIF_FORGE_HOME, the tiny model (built once per session) and the
online loops' prompt file. Plain helpers live in loop_helpers.py and online_helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.train.online_helpers import WORDS as ONLINE_WORDS


@pytest.fixture(scope="session", autouse=True)
def forge_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every train test builds and caches into a temporary home, never the user's ~/.cache."""
    home = tmp_path_factory.mktemp("forge_home")
    old = os.environ.get("RLAIF_FORGE_HOME")
    os.environ["RLAIF_FORGE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("RLAIF_FORGE_HOME", None)
    else:
        os.environ["RLAIF_FORGE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_path(forge_home: Path) -> Path:
    from synth.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path):
    """Shared, float32, eval mode. Do not modify it: use `fresh_tiny_model` for that."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype="float32").eval()


@pytest.fixture
def fresh_tiny_model(tiny_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype="float32").eval()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (timing-stable training tests); modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("online") / "prompts.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": " ".join(ONLINE_WORDS[(i + k) % len(ONLINE_WORDS)] for k in range(3))}]}
        for i in range(32)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
