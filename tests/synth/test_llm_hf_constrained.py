"""llm=hf constrained decoding (xgrammar) on the tiny random model: every sample of a JSON-schema or
regex request follows it, at temperature 0 and 1, mixed with free rows in one batch, seeded samples
the same alone or in a batch; a verdict cut off by max_new_tokens stays a failure ("length")."""

from __future__ import annotations

import json
import re

import pytest

from synth.llm.base import SamplingParams
from synth.records import messages

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["safe", "unsafe"]},
        "harmful": {"type": "boolean"},
        "score": {"enum": [1, 2, 3, 4, 5]},
    },
    "required": ["verdict", "harmful", "score"],
    "additionalProperties": False,
}
PROMPTS = [messages(("user", "Is it safe? Answer in JSON.")), messages(("user", "Rate the answer: 0 1 2 3 4 5"))]


def valid(obj) -> bool:
    return (
        isinstance(obj, dict)
        and set(obj) == {"verdict", "harmful", "score"}
        and obj["verdict"] in ("safe", "unsafe")
        and isinstance(obj["harmful"], bool)
        and obj["score"] in (1, 2, 3, 4, 5)
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_json_schema_sample_parses_and_validates(tiny_hf_llm, temperature):
    p = SamplingParams(temperature=temperature, n=8, seed=3, max_new_tokens=64, json_schema=SCHEMA)
    groups = tiny_hf_llm.generate(PROMPTS, p)
    for comp in (c for g in groups for c in g):
        assert comp.finish_reason == "stop", comp
        assert valid(json.loads(comp.text)), comp.text


@pytest.mark.parametrize("regex", [r"\[\[[ABC]\]\]", r"Rating: \[\[(10|[1-9])\]\]", r"[^\[]{0,40}\[\[[AB]\]\]"])
def test_every_regex_sample_matches(tiny_hf_llm, regex):
    p = SamplingParams(temperature=1.0, n=6, seed=5, max_new_tokens=48, regex=regex)
    for comp in (c for g in tiny_hf_llm.generate(PROMPTS, p) for c in g):
        assert comp.finish_reason == "stop" and re.fullmatch(regex, comp.text), comp


def test_constrained_and_free_rows_share_a_batch_and_keep_their_seeds(tiny_hf_llm):
    free = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    json_p = free.replace(json_schema=SCHEMA, max_new_tokens=64)
    regex_p = free.replace(regex=r"Score: [0-5]")
    batch = tiny_hf_llm.generate(PROMPTS * 3, [free, json_p, regex_p, json_p, free, regex_p])
    alone = [
        tiny_hf_llm.generate([PROMPTS[1]], json_p)[0][0].text,
        tiny_hf_llm.generate([PROMPTS[0]], regex_p)[0][0].text,
    ]
    assert batch[1][0].text == batch[3][0].text == alone[0]  # same prompt, params, seed
    assert batch[2][0].text == alone[1] and re.fullmatch(r"Score: [0-5]", alone[1])
    assert valid(json.loads(alone[0]))
    assert batch[0][0].text == tiny_hf_llm.generate([PROMPTS[0]], free)[0][0].text  # free rows unaffected


def test_a_constrained_answer_cut_off_is_length_not_stop(tiny_hf_llm):
    p = SamplingParams(temperature=0.0, max_new_tokens=3, json_schema=SCHEMA)
    comp = tiny_hf_llm.generate(PROMPTS[:1], p)[0][0]
    assert comp.finish_reason == "length" and comp.truncated


def test_progress_moves_within_a_micro_batch(tiny_hf_llm, monkeypatch):
    """One micro-batch of 8 rows: the bar's postfix names the token being generated, then the rows."""
    import tqdm.auto

    seen = []

    class Bar:
        def __init__(self, *a, total=None, **kw):
            self.n, self.total = 0, total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_postfix_str(self, s, refresh=True):
            seen.append(s)

        def update(self, k):
            self.n += k
            seen.append(f"rows {self.n}/{self.total}")

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    tiny_hf_llm.generate(PROMPTS * 4, SamplingParams(temperature=0.0, max_new_tokens=20))
    assert "token 8/20" in seen and "token 16/20" in seen and seen[-1] == "rows 8/8"


def test_top_p_nucleus_search_equals_the_full_sort():
    """The partial top-k nucleus search and the full sort keep the same tokens (peaked and flat rows)."""
    import torch

    from synth.llm import hf

    torch.manual_seed(0)
    vocab = 5000
    peaked = -1.5 * (torch.stack([torch.randperm(vocab) for _ in range(3)]).float() + 1).log()
    flat = torch.randn(3, vocab) * 0.1  # nucleus far wider than the candidate set
    for x in (peaked, flat, torch.cat([peaked, flat])):
        params = [SamplingParams(temperature=1.0, top_p=tp) for tp in [0.5, 0.9, 1.0][: x.shape[0]] * 2][: x.shape[0]]
        s = hf._RowSampler(params, [0] * len(params), torch.device("cpu"), False, 0)
        got = s._top_p(x.clone())
        sorted_x, order = x.sort(-1, descending=True)
        p = torch.softmax(sorted_x, -1)
        drop = (p.cumsum(-1) - p > s.top_p) & (s.top_p < 1.0)
        want = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
