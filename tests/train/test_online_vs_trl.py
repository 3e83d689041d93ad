"""Parity with TRL 1.16 GRPOTrainer / RLOOTrainer on identical completions.

Both sides start from the same tiny model and are handed the same completion token ids (TRL through its
`_generate_single_turn` hook, ours through the loop's generator), the same rule reward (fraction of even
token ids) and matching settings; the step-1 loss and the step-1 pre-clip gradient norm must agree to
1e-5 in float32. Prompts have equal token lengths, so neither side pads them (TRL's forward passes no
position ids; with left padding the two would differ by a RoPE shift, which attention does not see,
but we keep the comparison free of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from tests.train.online_helpers import compose
from train.scorers import even_token_fraction  # noqa: E402

P, N = 2, 4
PROMPTS = [[{"role": "user", "content": "bread flour water"}], [{"role": "user", "content": "bread flour salt"}]]


def rule(completion_ids, **_):
    return even_token_fraction(completion_ids)


@pytest.fixture(scope="module")
def setup(tiny_path):
    """Prompt ids (equal length) and N completions per prompt of varied lengths, most ending in EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = [
        tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for p in PROMPTS
    ]
    assert len(ids[0]) == len(ids[1])
    g = torch.Generator().manual_seed(0)
    completions = {}
    for k, p in enumerate(ids):
        rows = []
        for j in range(N):
            length = 3 + 2 * j + k
            body = torch.randint(10, len(tok), (length,), generator=g).tolist()
            rows.append(body + [tok.eos_token_id] if j < N - 1 else body)  # the last one is truncated
        completions[tuple(p)] = rows
    return tok, completions


def ours(tmp_path: Path, monkeypatch, completions, tok, overrides) -> dict:
    import train.loops.online as online
    from train.app import run
    from train.rollout import Rollout, eos_mask, left_pad

    def fake_generate(model, tokenizer, prompts, n, gen, *, seed, greedy=False, device=None):
        rows = [c for p in prompts for c in completions[tuple(p)][:n]]
        width = max(len(r) for r in rows)
        comp = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
        truncated = torch.tensor([r[-1] != tok.eos_token_id for r in rows])
        assert torch.equal(mask[~truncated], eos_mask(comp, [tok.eos_token_id])[0][~truncated])
        pid, pmask = left_pad([list(p) for p in prompts for _ in range(n)], tok.pad_token_id)
        return Rollout(pid, pmask, comp, mask, truncated, torch.arange(len(prompts)).repeat_interleave(n))

    monkeypatch.setattr(online, "hf_generate", fake_generate)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run(
        compose(
            f"data.path={data}",
            f"output_dir={tmp_path / 'ours'}",
            "progress=false",
            "log.plot=false",
            "log.tensorboard=false",
            "checkpoint.every_steps=0",
            "optim.max_steps=1",
            f"loop.prompts_per_step={P}",
            f"loop.samples_per_prompt={N}",
            f"optim.batch_size={P * N}",
            "optim.lr=1e-5",
            "optim.scheduler=constant",
            "optim.warmup_ratio=0",
            "loop.reward.function=tests.train.test_online_vs_trl:rule",
            *overrides,
        )
    )
    return json.loads((tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()[0])


def trl_step(tmp_path: Path, completions, tok, tiny_path, trainer_cls, config_cls, **settings) -> dict:
    from datasets import Dataset

    config = config_cls(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=P * N,
        gradient_accumulation_steps=1,
        num_generations=N,
        max_completion_length=16,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=1,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        shuffle_dataset=False,
        seed=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_dropout=True,
        **settings,
    )
    trainer = trainer_cls(
        model=str(tiny_path),
        reward_funcs=[rule],
        args=config,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
    )
    seen: dict[tuple, int] = {}

    def fake_single_turn(prompt_ids, *args, **kwargs):
        out = []
        for p in prompt_ids:
            k = seen.get(tuple(p), 0)
            seen[tuple(p)] = k + 1
            out.append(completions[tuple(p)][k % N])
        return (out, None) if trainer_cls.__name__ == "GRPOTrainer" else out

    trainer._generate_single_turn = fake_single_turn
    losses = []
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording
    trainer.train()
    assert sum(seen.values()) == P * N  # every prompt was matched to our completions
    grad = next(r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r)
    return {"loss": losses[0], "grad_norm": float(grad)}


@pytest.mark.parametrize(
    "loss_type,beta,overrides",
    [
        ("grpo", 0.0, ["loop=grpo"]),
        ("dapo", 0.0, ["loop=grpo", "loss.fn.aggregation=token_mean"]),
        ("grpo", 0.04, ["loop=grpo", "loop.kl.coef=0.04", "loop.kl.placement=loss", "loop.kl.estimator=k3_ratio"]),
    ],
)
def test_grpo_step_one_matches_trl(tmp_path, monkeypatch, setup, tiny_path, loss_type, beta, overrides):
    from trl import GRPOConfig, GRPOTrainer

    tok, completions = setup
    theirs = trl_step(
        tmp_path,
        completions,
        tok,
        tiny_path,
        GRPOTrainer,
        GRPOConfig,
        beta=beta,
        loss_type=loss_type,
        epsilon=0.2,
        num_iterations=1,
        scale_rewards="group",
        use_bias_correction_kl=True,
        mask_truncated_completions=False,
        importance_sampling_level="token",
    )
    mine = ours(tmp_path, monkeypatch, completions, tok, overrides)
    assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], abs=1e-5)
    assert mine["grad_norm"] > 1e-3  # a real gradient, not two zeros


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_step_one_matches_trl(tmp_path, monkeypatch, setup, tiny_path, beta):
    from trl import RLOOConfig, RLOOTrainer

    tok, completions = setup
    theirs = trl_step(
        tmp_path,
        completions,
        tok,
        tiny_path,
        RLOOTrainer,
        RLOOConfig,
        beta=beta,
        normalize_advantages=False,
        reward_clip_range=None,
        epsilon=0.2,
        num_iterations=1,
    )
    mine = ours(tmp_path, monkeypatch, completions, tok, ["loop=rloo", f"loop.kl.coef={beta}"])
    assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], abs=1e-5)
    assert mine["grad_norm"] > 1e-3
