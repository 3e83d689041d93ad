"""loop.generation.backend=vllm (colocated engine): opt-in, needs CUDA and the vllm package. Never run so far
(no GPU with vllm has been available to this project); the same code path runs on CPU against a recording
fake engine in tests/train/test_vllm_colocate_fake.py. Run each case in its own process
(`scripts/gpu-check.sh vllm` does): with enable_sleep_mode vLLM's CuMem allocator serves one engine per
process (vllm/v1/worker/gpu_worker.py), and a finished case's engine may not be collected yet."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


@pytest.fixture(autouse=True)
def need_vllm_and_gpu():
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize(
    "lora",
    [
        [],  # the default engine: torch.compile and CUDA graphs (the pushed weights are copied in place)
        [
            "lora.enabled=true",
            "lora.r=8",
            "loop.generation.lora_sync=adapter",
            "loop.generation.sleep_level=1",
            "loop.generation.enforce_eager=true",
        ],
        ["lora.enabled=true", "lora.r=8", "loop.generation.lora_sync=merged", "loop.generation.enforce_eager=true"],
    ],
    ids=["full", "lora-adapter", "lora-merged"],
)
def test_grpo_with_colocated_vllm_syncs_and_learns(tmp_path, lora):
    from tests.train.online_helpers import WORDS, compose
    from train.app import run

    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{WORDS[i % 13]} {WORDS[(i * 5) % 13]} {i}"}) + "\n" for i in range(32))
    )
    run(
        compose(
            f"data.path={data}",
            f"output_dir={tmp_path / 'out'}",
            "progress=false",
            "log.plot=false",
            "loop=grpo",
            "loop.reward.function=train.scorers:even_token_fraction",
            "loop.generation.backend=vllm",
            "loop.generation.max_new_tokens=16",
            "loop.prompts_per_step=8",
            "optim.max_steps=12",
            "optim.lr=2e-2",
            "optim.scheduler=constant",
            "optim.warmup_ratio=0",
            "checkpoint.every_steps=0",
            *lora,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["vllm/probe_mean_abs_diff"] < 1e-3 for r in rows)  # every sync was proven by the probe
    assert all(r["rollout/abs_logp_diff"] < 0.05 for r in rows)  # float32 engine vs trainer (guess: unmeasured)
    assert sum(r["reward/mean"] for r in rows[-3:]) / 3 > sum(r["reward/mean"] for r in rows[:3]) / 3 + 0.1
