"""Opt-in: every pipeline against a real llama.cpp server (scripts/serve-llamacpp.sh), through the
`llm=openai` backend with its defaults (send_n auto, the prefill probe).

    bash scripts/serve-llamacpp.sh &          # prints READY http://127.0.0.1:8080/v1
    LLAMACPP_URL=http://127.0.0.1:8080/v1 python -m pytest -q -m llamacpp tests/synth/test_llamacpp_server.py

Skipped when LLAMACPP_URL is unset or nothing answers there. What a pipeline needs from the server that
llama.cpp lacks is checked too: labels read after an assistant prefill (every label mode of ai_feedback,
pairwise logprobs=true) are refused in one line at start-up, because llama.cpp ignores the prefill; JSON
answers go as response_format json_object with the schema, because it answers json_schema with HTTP 500.
"""

from __future__ import annotations

import os
import urllib.request

import pytest

from synth.errors import BackendError
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.llamacpp
URL = os.environ.get("LLAMACPP_URL", "")
HH = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


def _reachable(url: str) -> bool:
    if not url:
        return False
    try:
        urllib.request.urlopen(url.rstrip("/") + "/models", timeout=3)
        return True
    except OSError:
        return False


needs_server = pytest.mark.skipif(not _reachable(URL), reason="no llama.cpp server at $LLAMACPP_URL")
SERVER = (
    "llm=openai",
    f"llm.base_url={URL}",
    "model.name_or_path=smollm2-135m",
    "llm.progress=false",
    "preset=small",
    "llm.max_concurrency=4",
)
LIMIT = int(os.environ.get("LLAMACPP_LIMIT", "3"))  # prompts per pipeline (1 on a loaded machine)
HH_SOURCE = ("source=hh_rlhf", f"source.path={HH}", f"source.limit={LIMIT}")

PIPELINES = {
    "generate": ("pipeline=generate", *HH_SOURCE),
    "critique_revision": ("pipeline=critique_revision", "constitution=safety_en", *HH_SOURCE),
    "red_team_taxonomy": (
        "pipeline=red_team",
        "constitution=safety_en",
        "pipeline.categories=[crime/drugs]",
        "pipeline.families=[direct]",
    ),
    "red_team_seeds": ("pipeline=red_team", "constitution=safety_en", "pipeline.seeds=true", *HH_SOURCE),
    "judge_pairwise_text": (
        "pipeline=judge",
        "source=hh_rlhf",
        f"source.path={HH}",
        f"source.limit={LIMIT}",
        "source.turns=all",
    ),
    "self_rewarding": ("pipeline=self_rewarding", *HH_SOURCE),
    "rlrf": ("pipeline=rlrf", *HH_SOURCE),
    "bpo": ("pipeline=bpo", "source=hh_rlhf", f"source.path={HH}", f"source.limit={LIMIT}", "source.turns=all"),
    "bpo_rewrite": ("pipeline=bpo_rewrite", *HH_SOURCE),
    "rs_dpo_judge": ("pipeline=rs_dpo", "pipeline.k=2", "pipeline.scorer.kind=judge", *HH_SOURCE),
    "r_tuning": ("pipeline=r_tuning", *HH_SOURCE, "source.turns=all"),  # the reference: the HH chosen answer
    "iteralign_discover": ("pipeline=iteralign_discover", "constitution=safety_en", *HH_SOURCE, "source.turns=all"),
}


@needs_server
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_finishes_against_llamacpp(tmp_path, name):
    from tests.synth.safety_helpers import run_synth

    m = run_synth(tmp_path / name, *SERVER, *PIPELINES[name])
    assert m["status"] == "finished" and m["processed"] == m["inputs"] > 0
    assert m["tokens"].get("completion", 0) > 0, m  # the server answered something (not all dropped before a call)


@needs_server
@pytest.mark.parametrize(
    "labels",
    [
        ("pipeline=ai_feedback", "pipeline.label=logprobs"),
        ("pipeline=judge", "pipeline.pairwise.logprobs=true", "source.turns=all"),
    ],
)
def test_logprob_labels_are_refused_in_one_line(tmp_path, labels):
    """Refused at start-up: before any answer is sampled, even when no pair would reach the judge."""
    from tests.synth.safety_helpers import run_synth

    with pytest.raises(BackendError, match="does not continue an assistant prefill") as e:
        run_synth(tmp_path / "o", *SERVER, "source=hh_rlhf", f"source.path={HH}", "source.limit=2", *labels)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()  # refused before the folder is made


@needs_server
def test_json_schema_answers_go_as_json_object_with_the_schema(caplog):
    import json
    import logging

    from synth.llm import build_llm
    from synth.llm import openai as openai_backend
    from synth.llm.base import SamplingParams
    from synth.records import messages

    schema = {
        "type": "object",
        "properties": {"verdict": {"type": "string", "enum": ["safe", "unsafe"]}},
        "required": ["verdict"],
        "additionalProperties": False,
    }
    openai_backend._STRUCTURED.pop((URL.rstrip("/"), "smollm2-135m"), None)
    llm = build_llm({"kind": "openai", "base_url": URL, "progress": False}, {"name_or_path": "smollm2-135m"})
    with caplog.at_level(logging.INFO, logger="synth.llm.openai"):
        out = llm.generate(
            [messages(("user", "Is boiling an egg safe? Answer in JSON."))] * 2,
            SamplingParams(temperature=0.0, max_new_tokens=24, json_schema=schema),
        )
    assert all(json.loads(g[0].text)["verdict"] in ("safe", "unsafe") for g in out)  # the grammar held
    assert openai_backend._STRUCTURED[(URL.rstrip("/"), "smollm2-135m")] == "json_object"
    assert sum("json_object with the schema" in r.message for r in caplog.records) == 1


@needs_server
def test_send_n_auto_gets_every_sample_from_llamacpp():
    from synth.llm import build_llm
    from synth.llm.base import SamplingParams
    from synth.records import messages

    llm = build_llm({"kind": "openai", "base_url": URL, "progress": False}, {"name_or_path": "smollm2-135m"})
    out = llm.generate([messages(("user", "Name a colour."))], SamplingParams(n=3, temperature=1.0, max_new_tokens=8))
    assert len(out[0]) == 3 and all(c.finish_reason in ("stop", "length") for c in out[0])
