"""`loop.generation.backend=vllm`: a vLLM engine colocated with the trainer on the same GPU (opt-in; needs
the `vllm` extra and CUDA; tests are marked `vllm` and `gpu`).

Per step (the pattern of TRL colocate, OpenRLHF and verl):
    1. wake_up(tags=["weights"])       only the weights, so the KV cache is not resident during the sync
    2. sync                             merged: every parameter through the model's `load_weights` (PEFT:
                                        merge_adapter → names cleaned → unmerge_adapter); adapter: the LoRA
                                        adapter saved to a versioned folder and served as a new LoRARequest
    3. reset_prefix_cache()             stale cached prefixes must not serve the new weights
    4. probe                            vLLM's log-prob of a fixed token sequence must equal the trainer's
                                        (float32, |Δ| ≤ probe_tol): proof that the engine holds the new
                                        weights (a silent no-op sync samples the initial policy forever,
                                        verl#7495); the measured Δ is logged
    5. wake_up(tags=["kv_cache"]), one `generate` over all prompts × n (token ids in, token ids and the
       sampled tokens' processed log-probs out), sleep(level)

Log-probs for the update still come from the trainer (train/rollout.py); vLLM's are only used for the
|Δ log p| monitor. `vllm` is imported here only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from train.models import is_peft
from train.rollout import Rollout, eos_mask, eos_token_ids, left_pad, token_logps


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
        probe_tol: float = 1e-3,
    ):
        from vllm import LLM

        os.environ.setdefault("RANK", str(accelerator.process_index))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
        self.gen, self.sleep_level, self.probe_tol = gen, gen.sleep_level, probe_tol
        self.adapter = gen.lora_sync == "adapter" and lora_rank is not None
        kwargs: dict[str, Any] = {}
        if self.adapter:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gen.gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=self.sleep_level > 0,
            distributed_executor_backend="external_launcher",
            seed=seed + accelerator.process_index,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.version = 0
        self.lora_dir = Path(
            tempfile.mkdtemp(prefix="rlaif-forge-lora-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        )
        self.lora_request = None
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    # ------------------------------------------------------------------------------------------ sync

    def _runner_model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    @torch.no_grad()
    def sync(self, model, probe_ids: list[int], device) -> float:
        """Push the policy's weights, reset the prefix cache, and return the probe's max |Δ log p|
        (RuntimeError when it exceeds probe_tol: the engine does not hold the trainer's weights)."""
        unwrapped = getattr(model, "module", model)
        if self.sleep_level:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        if self.adapter:
            self.version += 1
            folder = self.lora_dir / f"policy-v{self.version}"
            unwrapped.save_pretrained(folder)
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(f"policy-v{self.version}", self.version, str(folder))
        else:
            target = self._runner_model()
            for name, param in merged_parameters(unwrapped):
                target.load_weights([(name, param)])
        self.llm.reset_prefix_cache()
        return self.probe(unwrapped, probe_ids, device)

    @torch.no_grad()
    def probe(self, model, probe_ids: list[int], device) -> float:
        from vllm import SamplingParams

        out = self.llm.generate(
            [{"prompt_token_ids": probe_ids}],
            SamplingParams(max_tokens=1, prompt_logprobs=0),
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        theirs = torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], probe_ids[1:], strict=True)])
        rollout = Rollout(
            torch.tensor([probe_ids[:1]]),
            torch.ones(1, 1, dtype=torch.long),
            torch.tensor([probe_ids[1:]]),
            torch.ones(1, len(probe_ids) - 1, dtype=torch.bool),
            torch.zeros(1, dtype=torch.bool),
            torch.zeros(1),
        )
        ours = token_logps(model, rollout, 1.0, device)[0][0].float().cpu()
        delta = float((ours - theirs).abs().max())
        if delta > self.probe_tol:
            raise RuntimeError(
                f"vLLM weight sync check failed: probe log-probs differ from the trainer's by {delta:.3g} "
                f"(> {self.probe_tol}); the engine does not hold the current policy"
            )
        return delta

    # ------------------------------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(
        self, model, tokenizer, prompts: list[list[int]], n: int, gen, *, seed: int, greedy: bool = False, device=None
    ) -> Rollout:
        from vllm import SamplingParams

        if self.sleep_level:
            self.llm.wake_up(tags=["kv_cache"])
        params = SamplingParams(
            n=n,
            max_tokens=gen.max_new_tokens,
            seed=seed,
            logprobs=0,
            **(
                {"temperature": 0.0}
                if greedy
                else {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k or 0}
            ),
        )
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False, lora_request=self.lora_request
        )
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
        eos = eos_token_ids(getattr(model, "module", model), tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        rows = [list(c.token_ids) for o in outs for c in o.outputs]
        width = max(1, max(len(r) for r in rows))
        comp = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        cmask, truncated = eos_mask(comp, eos)
        cmask &= torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
        ids, mask = left_pad([list(p) for p in prompts for _ in range(n)], pad)
        return Rollout(
            ids,
            mask,
            torch.where(cmask, comp, torch.full_like(comp, pad)),
            cmask,
            truncated,
            torch.arange(len(prompts)).repeat_interleave(n),
        )


def merged_parameters(model):
    """(name, tensor) pairs in the base model's naming. PEFT: the adapter is merged for the read and
    unmerged after (TRL colocate); `base_model.model.` and `.base_layer` are dropped, `lora_` skipped,
    `modules_to_save` copies replace their originals."""

    if not is_peft(model):
        for name, p in model.named_parameters():
            yield name, p.data
        return
    model.merge_adapter()
    try:
        for name, p in model.named_parameters():
            if "lora_" in name or "original_module" in name:
                continue
            name = (
                name.removeprefix("base_model.model.")
                .replace(".base_layer", "")
                .replace("modules_to_save.default.", "")
            )
            yield name, p.data
    finally:
        model.unmerge_adapter()
