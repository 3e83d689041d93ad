"""In-process scripted backend for unit tests of steps and pipelines (the loopback HTTP server in
synth/testing/loopback.py covers the real network path)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from synth.llm.base import SamplingParams, as_params_list
from synth.records import Completion, Message


class ScriptedLLM:
    """`responder(messages, params, sample_index) -> str | Completion`; records every generate call."""

    kind = "fake"

    def __init__(
        self, responder: Callable[[list[Message], SamplingParams, int], str | Completion], model: str = "fake-model"
    ):
        self.responder = responder
        self.model = model
        self.calls: list[tuple[list[list[Message]], list[SamplingParams]]] = []

    def generate(self, requests: Sequence[Sequence[Message]], params) -> list[list[Completion]]:
        plist = as_params_list(params, len(requests))
        self.calls.append(([list(r) for r in requests], plist))
        out = []
        for req, p in zip(requests, plist, strict=True):
            comps = []
            for i in range(p.n):
                r = self.responder(list(req), p, i)
                comps.append(
                    r
                    if isinstance(r, Completion)
                    else Completion(text=r, finish_reason="stop", prompt_tokens=3, completion_tokens=len(r.split()))
                )
            out.append(comps)
        return out
