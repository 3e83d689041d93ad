"""A recording fake of the vLLM calls train/vllm_colocate.py makes, for CPU tests (no GPU, no vllm here).

Signatures and checks mirror vLLM 0.25.1 (vllm/entrypoints/llm.py, vllm/v1/engine/llm_engine.py,
vllm/sampling_params.py, vllm/lora/request.py, vllm/config/{model,lora}.py; 0.33.0 has the same), so a call
the real engine would refuse fails here too:
- `LLM(model, **engine_args)`: only engine arguments that exist in vLLM (TypeError otherwise, as EngineArgs),
  with vLLM's allowed values for dtype, logprobs_mode, max_lora_rank and distributed_executor_backend;
- `llm.sleep(level=1, mode="abort")`, `llm.wake_up(tags=None)` (tags among weights / kv_cache /
  scheduling), `llm.reset_prefix_cache(reset_running_requests=False, reset_connector=False) -> bool`;
- `llm.generate(prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, ...)` (a list of
  SamplingParams must match the prompts one to one);
- `llm.apply_model(func) -> [func(model)]`, the model exposing vLLM's `load_weights(weights: Iterable[(name,
  tensor)]) -> set[str]` and `named_parameters()`; the older route `llm.llm_engine.model_executor.
  driver_worker.model_runner.model` reaches the same model;
- `llm.llm_engine.remove_lora(id) -> bool`; `SamplingParams(...)` keyword-only, with vLLM's defaults and
  range checks; `LoRARequest(lora_name, lora_int_id, lora_path)` (id ≥ 1, path required).

Behaviour of the real engine that the module relies on:
- the engine holds its own copy of the weights (a real tiny model on CPU, loaded from `model`), so its
  samples and log-probs are real; `load_weights` copies into it by name (KeyError on an unknown name, as
  vLLM's `params_dict[name]`), returns the names it wrote, and fails while the weights sleep;
- sleep level 2 discards the weights (here: overwritten with noise, what a wake-up without a push
  serves), level 1 keeps them, level 0 only pauses scheduling; `generate` fails while anything sleeps
  (the real engine resumes scheduling only once every tag is awake: its `generate` would wait forever);
- n > 1 children of a seeded request use seeds seed + k (vllm/v1/engine/parallel_sampling.py);
  `logprobs=0` returns {sampled token: Logprob} per generated token (processed: after the temperature);
  `prompt_logprobs=0` returns [None, {token: Logprob}, ...] (raw log-softmax);
- a LoRA adapter is loaded from its folder the first time its lora_int_id is seen and cached by id (so
  a reused id would serve a stale adapter, as the real engine does without load_inplace); max_lora_rank is
  checked.

Knobs: `drop_weights` (load_weights accepts the tensors, ignores them and reports them loaded: a silent no-op
sync), `unmapped` (a parameter name load_weights skips without a word and leaves out of the names it returns,
as vLLM's loader does for a name it maps nowhere), `no_apply_model` (an older vLLM without LLM.apply_model)
and `logp_offset` (added to every sampled token's log-prob: a known train/inference mismatch). Every call is
appended to `engine.calls`; `ENGINES` holds the engines built since `install`.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import torch

ENGINES: list[FakeLLM] = []
DEFAULT_KNOBS = {"drop_weights": False, "unmapped": None, "no_apply_model": False, "logp_offset": 0.0}
KNOBS = dict(DEFAULT_KNOBS)
# engine arguments the module passes, each an EngineArgs field of vLLM 0.25.1 and 0.33.0 (vllm/engine/arg_utils.py);
# any other name fails as EngineArgs(**kwargs) would
LLM_KWARGS = {
    "dtype",
    "gpu_memory_utilization",
    "max_model_len",
    "enable_sleep_mode",
    "distributed_executor_backend",
    "seed",
    "max_num_batched_tokens",
    "logprobs_mode",
    "enable_lora",
    "max_lora_rank",
    "max_loras",
    "enable_prefix_caching",
    "enforce_eager",
}
ALLOWED = {  # vllm/config/model.py ModelDType, LogprobsMode; vllm/config/lora.py MaxLoRARanks
    "dtype": ("auto", "half", "float16", "bfloat16", "float", "float32"),
    "logprobs_mode": ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs"),
    "max_lora_rank": (1, 8, 16, 32, 64, 128, 256, 320, 512),
    "distributed_executor_backend": (None, "ray", "mp", "uni", "external_launcher"),
}
WAKE_TAGS = ("weights", "kv_cache", "scheduling")


@dataclass(kw_only=True)
class SamplingParams:
    """The fields the module sets, with vLLM's defaults and its range checks (SamplingParams._verify_args)."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0, "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k in (-1, 0) or self.top_k >= 1, "top_k must be 0 (disable), or at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.logprobs is None or self.logprobs >= -1, "logprobs must be non-negative or -1"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= -1, "prompt_logprobs must be >= -1"),
            (self.seed is None or isinstance(self.seed, int), "seed must be an int"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    load_inplace: bool = False

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        assert self.lora_path, "lora_path cannot be empty"


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


class _EngineModel:
    """The engine's model as `apply_model` and the driver worker hand it out."""

    def __init__(self, engine: FakeLLM):
        self.engine = engine

    def load_weights(self, weights) -> set[str]:
        return self.engine._load_weights(weights)

    def named_parameters(self):
        return self.engine.net.named_parameters()


class FakeLLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - LLM_KWARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        for key, allowed in ALLOWED.items():
            if key in kwargs and kwargs[key] not in allowed:
                raise ValueError(f"{key}={kwargs[key]!r} is not one of {allowed}")
        if not 0 < kwargs.get("gpu_memory_utilization", 0.92) <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        self.kwargs = kwargs
        self.net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        eos = self.net.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or [])) | {self.net.config.eos_token_id} - {None}
        self.calls: list[tuple] = [("init",)]
        self.sleeping: set[str] = set()
        self.loras: dict[int, torch.nn.Module] = {}
        self.loaded_loras: list[tuple[str, int, str]] = []
        self.removed_loras: list[int] = []
        self.drop_weights, self.unmapped = KNOBS["drop_weights"], KNOBS["unmapped"]
        self.logp_offset = KNOBS["logp_offset"]
        self.first_push: dict[str, torch.Tensor] | None = None  # the weights after the first complete push
        self.model = _EngineModel(self)
        runner = SimpleNamespace(model=self.model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)),
            remove_lora=self._remove_lora,
        )
        if KNOBS["no_apply_model"]:
            self.apply_model = None  # getattr(llm, "apply_model", None) is None: an older vLLM
        ENGINES.append(self)

    def apply_model(self, func):
        self.calls.append(("apply_model",))
        return [func(self.model)]  # one worker (external_launcher: this process's)

    # ------------------------------------------------------------------------------ memory
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if level not in (0, 1, 2) or mode not in ("abort", "wait", "keep"):
            raise ValueError(f"sleep(level={level}, mode={mode!r})")
        if level and not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("sleep() needs LLM(enable_sleep_mode=True)")
        self.calls.append(("sleep", level))
        if level == 2:  # weights discarded: what a later wake-up serves without a push is garbage
            g = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
        self.sleeping = {"weights", "kv_cache", "scheduling"} if level else {"scheduling"}

    def wake_up(self, tags: list[str] | None = None) -> bool:
        if tags is not None and not set(tags) <= set(WAKE_TAGS):
            raise ValueError(f"wake_up tags must be among {WAKE_TAGS}, got {tags}")
        tags = list(WAKE_TAGS if tags is None else tags)
        self.calls.append(("wake_up", tuple(tags)))
        self.sleeping -= set(tags)
        if not self.sleeping & {"weights", "kv_cache"}:
            self.sleeping.discard("scheduling")  # vLLM resumes scheduling once all memory is resident
        return not self.sleeping

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        if self.first_push is None and any(c[0] == "load_weights" for c in self.calls):
            self.first_push = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return True

    # ------------------------------------------------------------------------------ weights
    def _load_weights(self, weights) -> set[str]:
        if "weights" in self.sleeping:
            raise RuntimeError("load_weights while the weights sleep (writes to unmapped memory)")
        params = dict(self.net.named_parameters())
        done = set()
        for name, tensor in weights:
            self.calls.append(("load_weights", name))
            if name == self.unmapped:
                continue
            if name not in params:
                raise KeyError(name)
            if not self.drop_weights:
                with torch.no_grad():
                    params[name].copy_(tensor.detach().to(params[name].dtype).cpu())
            done.add(name)
        return done

    def _remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove_lora", lora_id))
        self.removed_loras.append(lora_id)
        return self.loras.pop(lora_id, None) is not None

    def _net_for(self, request: LoRARequest | None):
        if request is None:
            return self.net
        if not self.kwargs.get("enable_lora"):
            raise ValueError("a LoRARequest needs LLM(enable_lora=True)")
        if request.lora_int_id not in self.loras:  # loaded once per id, as vLLM's adapter cache
            from peft import PeftModel

            merged = PeftModel.from_pretrained(copy.deepcopy(self.net), request.lora_path).merge_and_unload()
            self.loras[request.lora_int_id] = merged.eval()
            self.loaded_loras.append((request.lora_name, request.lora_int_id, request.lora_path))
        return self.loras[request.lora_int_id]

    # ------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        prompts,
        sampling_params=None,
        *,
        use_tqdm=True,
        lora_request=None,
        priority=None,
        tokenization_kwargs=None,
        mm_processor_kwargs=None,
    ):
        if self.sleeping:
            raise RuntimeError(f"generate() while {sorted(self.sleeping)} sleep")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, list) and len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        probe = any(p.prompt_logprobs is not None for p in params)
        lora_id = getattr(lora_request, "lora_int_id", None)
        self.calls.append(("generate", "probe" if probe else "sample", lora_id, tuple(p.seed for p in params)))
        net = self._net_for(lora_request)
        return [self._one(net, list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params, strict=True)]

    def _one(self, net, prompt: list[int], sp: SamplingParams):
        if sp.top_p != 1.0 or sp.top_k not in (0, -1):
            raise NotImplementedError("the fake samples from the full distribution only")
        prompt_lps = None
        if sp.prompt_logprobs is not None:
            lp = torch.log_softmax(net(torch.tensor([prompt])).logits[0].float(), -1)
            prompt_lps = [None] + [{prompt[t]: Logprob(float(lp[t - 1, prompt[t]]), 1)} for t in range(1, len(prompt))]
        outputs = []
        for k in range(sp.n):
            g = torch.Generator().manual_seed(sp.seed + k) if sp.seed is not None else None
            ids, toks, lps = list(prompt), [], []
            for _ in range(sp.max_tokens):
                logits = net(torch.tensor([ids])).logits[0, -1].float()
                if sp.temperature == 0:
                    tok = int(logits.argmax())
                    logp = torch.log_softmax(logits, -1)
                else:
                    logp = torch.log_softmax(logits / sp.temperature, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=g))
                toks.append(tok)
                lps.append({tok: Logprob(float(logp[tok]) + self.logp_offset, 1)})
                ids.append(tok)
                if tok in self.eos:
                    break
            outputs.append(
                SimpleNamespace(
                    index=k,
                    token_ids=toks,
                    logprobs=lps if sp.logprobs is not None else None,
                    finish_reason="stop" if toks and toks[-1] in self.eos else "length",
                )
            )
        return SimpleNamespace(prompt_token_ids=prompt, prompt_logprobs=prompt_lps, outputs=outputs)


def install(monkeypatch, **knobs) -> None:
    """Make `import vllm` (and vllm.lora.request) resolve to this fake for one test."""
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown fake_vllm knobs {sorted(unknown)}")
    KNOBS.update(DEFAULT_KNOBS | knobs)
    ENGINES.clear()
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    lora.request, vllm.lora = request, lora
    for name, mod in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, mod)


def call_names(engine: FakeLLM) -> list[str]:
    """The call log with consecutive load_weights collapsed: e.g. ['wake_up:weights', 'load_weights', ...]."""
    out: list[str] = []
    for c in engine.calls:
        name = (
            c[0]
            if c[0] in ("load_weights", "init", "reset_prefix_cache", "apply_model")
            else f"{c[0]}:{c[1] if len(c) > 1 else ''}"
        )
        if c[0] == "wake_up":
            name = "wake_up:" + "+".join(c[1])
        if not (out and out[-1] == name == "load_weights"):
            out.append(name)
    return out
