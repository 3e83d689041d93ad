"""Fixtures for tests/align: the scripted loopback server and one torch thread (CI has two cores)."""

from __future__ import annotations

import pytest


@pytest.fixture
def server():
    from synth.testing.loopback import LoopbackServer
    from tests.align.scripted import responder

    with LoopbackServer(responder=responder) as s:
        yield s


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from tests.align.helpers import prefs_file, prompts_file, sft_file

    d = tmp_path_factory.mktemp("align-data")
    prompts_file(d / "prompts.jsonl", 4)
    prompts_file(d / "sft_pairs.jsonl", 4, answers=True)
    prefs_file(d / "prefs.jsonl", 4)
    sft_file(d / "sft.jsonl", 4)
    return d


@pytest.fixture
def make_server():
    """`make_server(responder)` -> a started loopback server, stopped after the test."""
    from synth.testing.loopback import LoopbackServer

    servers = []

    def make(fn):
        servers.append(LoopbackServer(responder=fn).start())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()
