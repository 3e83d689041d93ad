"""Session-wide test settings: build the tiny model once, in a temporary home, never downloading."""

import os
import tempfile
from pathlib import Path

import pytest

# Set before any test module imports synth.tiny, so every test (synth and train) shares one build.
_HOME = Path(tempfile.mkdtemp(prefix="rlaif-forge-test-home-"))
os.environ.setdefault("RLAIF_FORGE_HOME", str(_HOME))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails loudly
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from synth.tiny import tiny_model_path

    return tiny_model_path()


@pytest.fixture(scope="session")
def hh_rlhf_path() -> Path:
    path = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data folder sits beside the repository)")
    return path
