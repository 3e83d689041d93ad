"""A recording fake of the vLLM calls train/vllm_colocate.py makes, for CPU tests (no GPU, no vllm here).

It implements exactly: `LLM(model=..., <the keyword arguments the module passes>)`, `llm.sleep(level=)`,
`llm.wake_up(tags=)`, `llm.reset_prefix_cache()`, `llm.generate(prompts, params, use_tqdm=, lora_request=)`,
`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])`,
`llm.llm_engine.remove_lora(id)`, `SamplingParams(...)` and `vllm.lora.request.LoRARequest(name, id, path)`,
with the behaviour of the real engine that the module relies on:

- the engine holds its own copy of the weights (a real tiny model on CPU, loaded from `model`), so its
  samples and log-probs are real; `load_weights` copies into it by vLLM/HF name (KeyError on an unknown
  name, as vLLM's `params_dict[name]`), and fails while the weights sleep (unmapped memory);
- sleep level 2 discards the weights (here: overwritten with noise, what a wake-up without a push
  serves), level 1 keeps them; `generate` fails while the weights or the KV cache sleep;
- n > 1 children of a seeded request use seeds seed + k (vllm/v1/engine/parallel_sampling.py);
  `logprobs=0` returns {sampled token: Logprob} per generated token; `prompt_logprobs=0` returns
  [None, {token: Logprob}, ...];
- a LoRA adapter is loaded from its folder the first time its lora_int_id is seen and cached by id (so
  a reused id would serve a stale adapter, as the real engine does); max_lora_rank is checked.

Knobs: `drop_weights` (load_weights accepts the tensors and ignores them: a silent no-op sync) and
`logp_offset` (added to every sampled token's log-prob: a known train/inference mismatch). Every call is
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
KNOBS = {"drop_weights": False, "logp_offset": 0.0}
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
}
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError("lora_int_id must be > 0")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


class _ModelRunnerModel:
    def __init__(self, engine: FakeLLM):
        self.engine = engine

    def load_weights(self, weights):
        return self.engine._load_weights(weights)


class FakeLLM:
    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        unknown = set(kwargs) - LLM_KWARGS
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("enable_lora") and kwargs.get("max_lora_rank") not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank ({kwargs.get('max_lora_rank')}) must be one of {MAX_LORA_RANKS}")
        self.kwargs = kwargs
        self.net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        eos = self.net.generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or [])) | {self.net.config.eos_token_id} - {None}
        self.calls: list[tuple] = [("init",)]
        self.sleeping: set[str] = set()
        self.loras: dict[int, torch.nn.Module] = {}
        self.loaded_loras: list[tuple[str, int, str]] = []
        self.removed_loras: list[int] = []
        self.drop_weights = KNOBS["drop_weights"]
        self.logp_offset = KNOBS["logp_offset"]
        self.first_push: dict[str, torch.Tensor] | None = None  # the weights after the first complete push
        runner = SimpleNamespace(model=_ModelRunnerModel(self))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)),
            remove_lora=self._remove_lora,
        )
        ENGINES.append(self)

    # ------------------------------------------------------------------------------ memory
    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("sleep() needs LLM(enable_sleep_mode=True)")
        self.calls.append(("sleep", level))
        if level == 2:  # weights discarded: what a later wake-up serves without a push is garbage
            g = torch.Generator().manual_seed(1234)
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = list(tags or ["weights", "kv_cache"])
        self.calls.append(("wake_up", tuple(tags)))
        self.sleeping -= set(tags)

    def reset_prefix_cache(self) -> bool:
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
    def generate(self, prompts, sampling_params=None, use_tqdm=True, lora_request=None):
        if self.sleeping:
            raise RuntimeError(f"generate() while {sorted(self.sleeping)} sleep")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        probe = any(p.prompt_logprobs is not None for p in params)
        self.calls.append(("generate", "probe" if probe else "sample", getattr(lora_request, "lora_int_id", None)))
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
    KNOBS.update({"drop_weights": False, "logp_offset": 0.0} | knobs)
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
            c[0] if c[0] in ("load_weights", "init", "reset_prefix_cache") else f"{c[0]}:{c[1] if len(c) > 1 else ''}"
        )
        if c[0] == "wake_up":
            name = "wake_up:" + "+".join(c[1])
        if not (out and out[-1] == name == "load_weights"):
            out.append(name)
    return out
