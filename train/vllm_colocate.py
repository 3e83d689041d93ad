"""`loop.generation.backend=vllm`: a vLLM engine colocated with the trainer on the same GPU (opt-in; needs
the `vllm` extra and CUDA). NEVER RUN ON A GPU so far: every call below was checked against the source of
vLLM 0.25.1 (the newest release built for torch 2.11) and 0.33.0 (the newest), and the call order against
TRL 1.16's colocate mode (trl/generation/vllm_generation.py; TRL 1.16 supports vllm 0.22-0.31). It is tested
on CPU through a recording fake engine (tests/train/fake_vllm.py) and on a GPU by
tests/train/test_online_vllm.py (gpu + vllm markers; scripts/gpu-check.sh runs it).

Per step (TRL colocate, OpenRLHF and verl follow the same pattern):
    sync()      1. wake_up(tags=["weights"])   the weights only: the KV cache stays released during the
                                                sync (waking it first doubles the peak memory)
                2. push                         merged: every parameter, in one `load_weights` call of the
                                                engine's own model, run through the public `LLM.apply_model`
                                                (PEFT: W + ΔW computed out of place, names cleaned); every
                                                parameter of the engine's model must come back as loaded.
                                                adapter: the LoRA adapter saved to a versioned folder, served
                                                as a new LoRARequest, the previous version removed from the
                                                engine (LLMEngine.remove_lora) and the disk
                3. reset_prefix_cache()         cached prefixes were computed with the old weights
                4. wake_up(tags=["kv_cache"])   vLLM resumes scheduling only once both are resident
                5. probe                        vLLM's prompt log-probs of a fixed token sequence (raw log-softmax,
                                                temperature 1; such requests skip the prefix cache) against the
                                                trainer's (float32): the mean |Δ| must be ≤ probe_tol, and if
                                                the trainer's probe moved since the last sync, vLLM's must
                                                have moved too (a silent no-op sync samples the initial
                                                policy forever, verl#7495, trl#5312)
    generate()  one `generate` over all prompts (token ids in; token ids and the sampled tokens' processed
                log-probs out, for the mismatch correction)
    sleep()     sleep(level) once the step's generations (and ReMax's greedy baseline) are done

Sleep level 2 discards the weights (they are re-pushed every step, as TRL; vLLM saves and restores the
model's buffers, e.g. the rotary cache, itself); level 1 offloads them to host RAM. Adapter sync keeps the
base weights inside vLLM, so it needs level 1 or 0 (refused at start-up). There is deliberately no
`collective_rpc("reload_weights")` after the wake-up: without arguments it reloads the checkpoint from disk,
and TRL's colocate mode, which called it for vllm#29341, so generated from the initial weights (trl#5312;
TRL 1.16 re-pushes instead, as here).
Log-probs for the update still come from the trainer (train/rollout.py); vLLM's are used only for the
importance-sampling correction and the |Δ log p| monitor. `vllm` is imported here only.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import weakref
from functools import partial
from pathlib import Path
from typing import Any

import torch

from synth.errors import ConfigError
from train.models import is_peft
from train.rollout import Rollout, eos_mask, eos_token_ids, left_pad, token_logps

# vLLM's LoRAConfig accepts these max_lora_rank values only (vllm/config/lora.py, MaxLoRARanks); an
# adapter of rank r runs under any max_lora_rank ≥ r
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MOVED = 1e-3  # nats: a trainer probe move past this must show in vLLM's probe (the no-op check)
PROBE_TOKENS = (8, 64)  # the probe sequence: at least / at most this many tokens


class VLLMColocate:
    def __init__(
        self,
        model_path: str,
        gen,
        *,
        accelerator,
        dtype: str,
        seed: int,
        max_model_len: int | None = None,
        lora_rank: int | None = None,
    ):
        from vllm import LLM

        # distributed_executor_backend="external_launcher" reads the torch.distributed rendezvous from the
        # environment; a single process (no `accelerate launch`) has none (TRL: ensure_master_addr_port)
        os.environ.setdefault("RANK", str(accelerator.process_index))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        self.sleep_level = gen.sleep_level
        self.probe_tol = gen.probe_tol if gen.probe_tol is not None else (1e-3 if dtype == "float32" else 5e-2)
        self.adapter = gen.lora_sync == "adapter" and lora_rank is not None
        kwargs: dict[str, Any] = {}
        if self.adapter:
            if self.sleep_level == 2:
                raise ConfigError(
                    "loop.generation.lora_sync=adapter keeps the base weights inside vLLM, and sleep_level=2 "
                    "discards them: set loop.generation.sleep_level=1 (or 0)"
                )
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gen.gpu_memory_utilization,
            # prompt + completion, and the probe (PROBE_TOKENS[1] prompt tokens + 1 generated); None: the
            # model's own maximum, whose KV cache may not fit gpu_memory_utilization
            max_model_len=None if max_model_len is None else max(max_model_len, PROBE_TOKENS[1] + 1),
            enable_sleep_mode=self.sleep_level > 0,
            enforce_eager=gen.enforce_eager,
            distributed_executor_backend="external_launcher",
            seed=seed + accelerator.process_index,
            max_num_batched_tokens=4096,  # TRL: the V1 memory profiler is misled by the 32k default
            # the sampled tokens' log-probs under the distribution vLLM samples from: log-softmax after the
            # temperature and the top-k / top-p masks (vllm/v1/sample/ops/topk_topp_sampler.py), the behaviour
            # policy of the importance-sampling correction (TRL passes the same). The trainer's π_old is the full
            # softmax at that temperature, so with top_p < 1 or top_k > 0 the ratio also corrects the truncation
            # and `rollout/abs_logp_diff` includes it (the default raw_logprobs would ignore the temperature)
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.version = 0
        self.lora_dir = Path(
            tempfile.mkdtemp(prefix="rlaif-forge-lora-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        weakref.finalize(self, shutil.rmtree, str(self.lora_dir), True)
        self.lora_request = None
        self.last_probe: tuple[torch.Tensor, torch.Tensor] | None = None  # (trainer's, vLLM's) at the last sync
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    # ------------------------------------------------------------------------------------------ sync

    def _load_weights(self, weights) -> None:
        """Write (HF name, tensor) pairs into the engine's model with the model's own `load_weights` (it maps
        the names, e.g. q/k/v into qkv_proj, and casts to the engine's dtype), called through the public
        `LLM.apply_model`, which hands the function the unwrapped model (no CUDA-graph wrapper) of each worker.
        distributed_executor_backend="external_launcher" makes vLLM set VLLM_ENABLE_V1_MULTIPROCESSING=0
        (vllm/config/parallel.py): the engine core and its one worker live in this process, so the function
        and the tensors are passed by reference, not pickled. vLLM without `LLM.apply_model`: the same model
        reached through the in-process driver worker (the attribute path TRL's colocate mode uses). Raises
        when a parameter of the engine's model was not written (the check vLLM's own loader makes)."""
        apply = getattr(self.llm, "apply_model", None)
        if apply is not None:
            missing = [name for per_worker in apply(partial(_load_into, weights=weights)) for name in per_worker]
        else:
            missing = _load_into(self.llm.llm_engine.model_executor.driver_worker.model_runner.model, weights)
        if missing:
            raise RuntimeError(
                f"vLLM weight sync left {len(missing)} parameter(s) of the engine's model unwritten "
                f"(e.g. {missing[:3]}): the policy's parameter names do not map onto this vLLM model"
            )

    @torch.no_grad()
    def sync(self, model, probe_ids: list[int], device) -> dict[str, float]:
        """Push the policy's weights, reset the prefix cache, wake the KV cache and check the push with the
        probe (RuntimeError when it fails). Returns the probe metrics."""
        unwrapped = getattr(model, "module", model)
        if self.sleep_level:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        if self.adapter:
            self._push_adapter(unwrapped)
        else:
            self._load_weights(merged_parameters(unwrapped))
        if self.llm.reset_prefix_cache() is False:  # vLLM refuses while requests run (none should)
            raise RuntimeError("vLLM did not reset its prefix cache after the weight sync (requests still running)")
        if self.sleep_level:
            self.llm.wake_up(tags=["kv_cache"])  # only now: a KV cache resident during the push doubles the peak
        return self.probe(unwrapped, probe_ids, device)

    def _push_adapter(self, model) -> None:
        """Adapter-only sync (TRL AsyncGRPO, trl#7017): stock vLLM loads a LoRA adapter from a folder, once
        per lora_int_id, so every sync writes `policy-v{k}` and serves it under a new id; the previous
        version is removed from the engine (LLMEngine.remove_lora) and from the disk."""
        from vllm.lora.request import LoRARequest

        previous = self.lora_request
        self.version += 1
        folder = self.lora_dir / f"policy-v{self.version}"
        model.save_pretrained(str(folder), selected_adapters=[model.active_adapter])  # not an adapter critic's
        self.lora_request = LoRARequest(f"policy-v{self.version}", self.version, str(folder))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(self.lora_dir / previous.lora_name, ignore_errors=True)

    @torch.no_grad()
    def probe(self, model, probe_ids: list[int], device) -> dict[str, float]:
        """vLLM's prompt log-probs of `probe_ids` (prompt_logprobs=0: each prompt token's own log-prob,
        position 0 has none) against the trainer's at temperature 1."""
        from vllm import SamplingParams

        out = self.llm.generate(
            [{"prompt_token_ids": list(probe_ids)}],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        theirs = torch.tensor(
            [_logprob(d, t) for d, t in zip(out[0].prompt_logprobs[1:], probe_ids[1:], strict=True)],
            dtype=torch.float32,
        )
        rollout = Rollout(
            torch.tensor([probe_ids[:1]]),
            torch.ones(1, 1, dtype=torch.long),
            torch.tensor([probe_ids[1:]]),
            torch.ones(1, len(probe_ids) - 1, dtype=torch.bool),
            torch.zeros(1, dtype=torch.bool),
            torch.zeros(1),
        )
        ours = token_logps(model, rollout, 1.0, device)[0][0].float().cpu()
        diff = (ours - theirs).abs()
        mean, worst = float(diff.mean()), float(diff.max())
        if not mean <= self.probe_tol:  # (NaN fails too)
            raise RuntimeError(
                f"vLLM weight sync check failed: the probe's log-probs differ from the trainer's by {mean:.3g} "
                f"on average (> loop.generation.probe_tol={self.probe_tol:g}); the engine does not hold the "
                "current policy"
            )
        if self.last_probe is not None:
            trainer_moved = float((ours - self.last_probe[0]).abs().max())
            engine_moved = float((theirs - self.last_probe[1]).abs().max())
            # a real push of weights that moved the trainer's probe by > MOVED nats moves vLLM's too (below
            # that, bfloat16 rounding alone could leave vLLM's weights bit-identical)
            if trainer_moved > min(self.probe_tol, MOVED) and engine_moved == 0.0:
                raise RuntimeError(
                    f"vLLM weight sync was a no-op: the trainer's probe log-probs moved by {trainer_moved:.3g} "
                    "since the last sync and vLLM's did not move at all"
                )
        self.last_probe = (ours, theirs)
        return {"vllm/probe_abs_diff": worst, "vllm/probe_mean_abs_diff": mean}

    # ------------------------------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(
        self, model, tokenizer, prompts: list[list[int]], n: int, gen, *, seed: int, greedy: bool = False, device=None
    ) -> Rollout:
        """n completions per prompt in one call. Each prompt has its own SamplingParams, seeded
        seed + i·n: vLLM V1 gives the n children of a request seeds seed + k (vllm/v1/engine/
        parallel_sampling.py, ParentRequest), so no two rows share a random stream."""
        from vllm import SamplingParams

        sampling = {"temperature": 0.0} if greedy else {"temperature": gen.temperature, "top_p": gen.top_p}
        if not greedy and gen.top_k:
            sampling["top_k"] = gen.top_k
        params = [
            SamplingParams(n=n, max_tokens=gen.max_new_tokens, seed=(seed + i * n) % 2**62, logprobs=0, **sampling)
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False, lora_request=self.lora_request
        )
        eos = eos_token_ids(getattr(model, "module", model), tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        rows: list[list[int]] = []
        logps: list[list[float]] = []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                rows.append(list(c.token_ids))
                # CompletionOutput.logprobs: one {token id: Logprob} per generated token (a list, or vLLM's
                # FlatLogprobs, which indexes the same way); logprobs=0 holds the sampled token's
                logps.append(
                    [math.nan] * len(rows[-1])
                    if c.logprobs is None
                    else [_logprob(d, t) for d, t in zip(c.logprobs, rows[-1], strict=True)]
                )
        width = max(1, max(len(r) for r in rows))
        comp = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        cmask, truncated = eos_mask(comp, eos)
        cmask &= torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
        sampler = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logps], dtype=torch.float32)
        ids, mask = left_pad([list(p) for p in prompts for _ in range(n)], pad)
        return Rollout(
            ids,
            mask,
            torch.where(cmask, comp, torch.full_like(comp, pad)),
            cmask,
            truncated,
            torch.arange(len(prompts)).repeat_interleave(n),
            sampler_logps=torch.where(cmask, sampler, torch.zeros_like(sampler)),
        )

    def sleep(self) -> None:
        """Release the engine's memory for the update (no-op at sleep_level 0)."""
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)


def _load_into(model, weights) -> list[str]:
    """model.load_weights(weights) (vLLM models return the names of the parameters they wrote); the names of
    the model's parameters left unwritten."""
    loaded = model.load_weights(weights)
    if loaded is None:  # a model that does not report what it loaded: nothing to check
        return []
    return sorted({name for name, _ in model.named_parameters()} - set(loaded))


def _logprob(entry, token: int) -> float:
    """The log-prob of `token` in one position's {token id: Logprob} (NaN when vLLM gave none)."""
    if entry is None or token not in entry:
        return math.nan
    return float(entry[token].logprob)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of rank `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ConfigError(f"lora.r={rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}); use a smaller r")


def probe_sequence(prompt_ids: list[list[int]]) -> list[int]:
    """The fixed token sequence whose log-probs check each sync: the first prompts laid end to end until at
    least PROBE_TOKENS[0] tokens, cut at PROBE_TOKENS[1]."""
    out: list[int] = []
    for p in prompt_ids:
        out.extend(p)
        if len(out) >= PROBE_TOKENS[0]:
            break
    if len(out) < 2:
        raise ConfigError("the prompts hold fewer than 2 tokens in all: nothing to probe a vLLM weight sync with")
    return out[: PROBE_TOKENS[1]]


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.",)  # activation-checkpoint wrappers (TRL _fix_param_name_to_vllm)


def merged_parameters(model):
    """(name, tensor) pairs in the base model's naming, as vLLM's `load_weights` expects them. PEFT:
    `base_model.model.` and `.base_layer` are dropped, `lora_` tensors skipped, `modules_to_save` copies
    replace their originals, and each LoRA layer's base weight is yielded merged, W + ΔW (PEFT's own
    `get_delta_weight`, the value `merge_adapter` writes), as a new tensor: the policy is never modified.
    (TRL merges in place and unmerges after; W + ΔW − ΔW is not W in floating point, so the frozen base
    would drift a little every step: 3e-8 per step in float32 on the tiny model, up to an ulp in bfloat16.)"""

    def clean(name: str) -> str:
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        return name

    if not is_peft(model):
        for name, p in model.named_parameters():
            yield clean(name), p.data
        return
    deltas = _lora_deltas(model)
    active = model.active_adapter  # the policy's; an adapter critic (loop.critic.kind=adapter) is not pushed
    for name, p in model.named_parameters():
        if "lora_" in name or "original_module" in name:
            continue
        if ".modules_to_save." in name and f".modules_to_save.{active}." not in name:
            continue  # another adapter's copy of a modules_to_save module
        t = p.data
        if name in deltas:
            layer, adapters = deltas[name]
            for a in adapters:
                t = t + layer.get_delta_weight(a).to(t.dtype)
        name = (
            name.removeprefix("base_model.model.").replace(".base_layer", "").replace(f"modules_to_save.{active}.", "")
        )
        yield clean(name), t


def _lora_deltas(model) -> dict[str, tuple[Any, list[str]]]:
    """{parameter name of a LoRA layer's base weight: (layer, its active, unmerged adapters)}."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for mname, module in model.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        adapters = [
            a
            for a in module.active_adapters
            if (a in module.lora_A or a in module.lora_embedding_A) and a not in module.merged_adapters
        ]
        if any(a in getattr(module, "lora_variant", {}) or module.lora_bias.get(a, False) for a in adapters):
            raise NotImplementedError(f"{mname}: merged vLLM sync handles plain LoRA only (no DoRA / lora_bias)")
        if adapters:
            out[f"{mname}.base_layer.weight"] = (module, adapters)
    return out
