"""Helpers of the online-loop tests: Hydra composition, an in-process `train` run, metrics and weights readers,
and the scripted judges and odd reward functions the tests name as `module:function`."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import torch

from synth.records import Completion

_REPLY = re.compile(r"\[Reply A\]\n(.*?)\n\[End of reply A\].*?\[Reply B\]\n(.*?)\n\[End of reply B\]", re.S)
CALLS: list[int] = []  # number of requests per backend call (one call per step is the contract)


@lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from synth.tiny import tiny_model_path

    return AutoTokenizer.from_pretrained(tiny_model_path())


def even_fraction_of_text(text: str) -> float:
    """The judge's taste: the fraction of even token ids of the reply re-tokenised with the tiny tokenizer."""
    ids = _tokenizer()(text, add_special_tokens=False)["input_ids"]
    return sum(i % 2 == 0 for i in ids) / max(len(ids), 1)


class ScriptedPairwise:
    """Prefers the reply with more even token ids (re-tokenised text); equal is a tie [[C]]. Answers every
    request of a batch; the loop must ask both orders and drop ties."""

    kind, model = "scripted", "scripted-pairwise"

    def generate(self, requests, params):
        CALLS.append(len(requests))
        out = []
        for req in requests:
            a, b = (even_fraction_of_text(x) for x in _REPLY.search(req[-1].content).groups())
            verdict = "C" if a == b else ("A" if a > b else "B")
            out.append([Completion(text=f"More even ids wins. [[{verdict}]]", finish_reason="stop")])
        return out


def scripted_pairwise():
    return ScriptedPairwise()


class ScriptedRubric:
    """Rates a reply 10 minus its number of words (at least 1); every third request gets an unparsable
    answer, which must become NaN, never a score."""

    kind, model = "scripted", "scripted-rubric"

    def generate(self, requests, params):
        CALLS.append(len(requests))
        out = []
        for i, req in enumerate(requests):
            if i % 3 == 2:
                out.append([Completion(text="I cannot rate this.", finish_reason="stop")])
                continue
            reply = req[-1].content.split("[Reply]")[-1] if "[Reply]" in req[-1].content else req[-1].content
            out.append([Completion(text=f"Rating: [[{max(1, 10 - len(reply.split()) % 10)}]]", finish_reason="stop")])
        return out


def scripted_rubric():
    return ScriptedRubric()


def nan_for_odd_rows(completion_ids):
    """Even-token fraction, but every odd row is unscorable (None)."""
    return [None if i % 2 else sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for i, ids in enumerate(completion_ids)]


def all_nan(completions):
    return [math.nan for _ in completions]


WORDS = "bread flour water salt yeast dough oven crust brown fox dog honest kind".split()


FAST = [
    "progress=false",
    "log.plot=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
    "optim.scheduler=constant",
    "optim.warmup_ratio=0",
    "optim.lr=1e-2",
    "loop.generation.max_new_tokens=8",
]


EVEN = "loop.reward.function=train.scorers:even_token_fraction"


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def train(out: Path, prompts: Path, *overrides: str, online: bool = True) -> dict:
    from train.app import run

    fast = FAST if online else FAST[:-1]
    return run(compose(*fast, f"data.path={prompts}", f"output_dir={out}", *overrides))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(
        str(
            folder
            / ("adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors")
        )
    )
