"""Fixtures for tests/synth. Each owner keeps their fixtures in one marked block."""

from __future__ import annotations

import pytest

# ---- llm backends (synth/llm: hf, vllm, openai, cache) ------------------------------------------------


@pytest.fixture
def openai_server():
    """A loopback OpenAI-compatible server with the default echo responder, stopped after the test."""
    from synth.testing.loopback import LoopbackServer

    with LoopbackServer() as server:
        yield server


@pytest.fixture
def make_openai_server():
    """`make_openai_server(responder=..., latency_s=..., fault_rate=..., schedule=...)` -> a started
    LoopbackServer; every server made is stopped after the test."""
    from synth.testing.loopback import LoopbackServer

    servers = []

    def make(**kwargs):
        servers.append(LoopbackServer(**kwargs).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tiny_hf_llm():
    """The hf backend on the tiny model (CPU), built once per session through the factory."""
    from synth.llm import build_llm

    return build_llm({"kind": "hf", "device": "cpu", "batch_size": 16}, {"name_or_path": "builtin:tiny"})


# ---- end llm backends -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_score_model(tiny_model_dir, tmp_path_factory):
    """A tiny causal LM with a random one-output score head, saved like a `train loop=reward` output."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "final"
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
