"""The loops learn: on a toy preference (the chosen answer ends with "yes", the rejected with "no"), a
pairwise (DPO), a listwise (LiPO-λ) and an unpaired (KTO) objective rank chosen above rejected on
held-out pairs; so does the reward model.

Held-out accuracy is measured here, independently of the loop's own metrics: the implicit reward
margin [ℓθ(y_w) − ℓref(y_w)] − [ℓθ(y_l) − ℓref(y_l)] > 0 with the trained final/ model against the
initial tiny model, on pairs with prompts and contexts the run never saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.loop_helpers import compose, toy_pairs, toy_ranked, write_records

LEARN = [
    "data.max_length=48",
    "progress=false",
    "log.plot=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=0",
    "optim.warmup_ratio=0",
    "optim.scheduler=constant",
    "optim.batch_size=8",
    "seed=1",
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("learning")
    return {
        "pairs": write_records(d / "train.jsonl", toy_pairs(64, seed=1)),
        "ranked": write_records(d / "ranked.jsonl", toy_ranked(48, seed=2)),
        "held_out": write_records(d / "held_out.jsonl", toy_pairs(48, seed=99)),
    }


def held_out_accuracy(final: Path, base: Path, held_out: Path) -> float:
    """Share of held-out pairs whose implicit reward margin (trained vs initial model) is positive."""
    from transformers import AutoModelForCausalLM

    from train.data import load_records, make_collator, tokenize_dataset
    from train.logprobs import concatenated_forward
    from train.models import load_tokenizer

    tok = load_tokenizer(str(base))
    ds, _ = tokenize_dataset(load_records(held_out), tok)
    batch = make_collator("pairwise", tok.pad_token_id)(ds.to_list())
    margins = []
    for path in (final, base):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out = concatenated_forward(model, batch)
        margins.append(out["chosen_logps"] - out["rejected_logps"])
    return float(((margins[0] - margins[1]) > 0).float().mean())


@pytest.mark.parametrize(
    "loss,data,extra",
    [
        ("dpo", "pairs", ["optim.lr=2e-3", "optim.epochs=2"]),
        ("lipo_lambda", "ranked", ["optim.lr=2e-3", "optim.epochs=3", "loss.fn.beta=0.1"]),
        ("kto", "pairs", ["optim.lr=2e-3", "optim.epochs=1"]),  # pairs unpaired: 128 labelled completions
    ],
)
def test_objective_learns_the_toy_preference(loss, data, extra, toy, tmp_path, tiny_path):
    from train.app import run

    summary = run(compose(*LEARN, f"loss={loss}", f"data.path={toy[data]}", f"output_dir={tmp_path}", *extra))
    assert summary["steps"] >= 8
    acc = held_out_accuracy(tmp_path / "final", tiny_path, toy["held_out"])
    assert acc >= 0.9, f"{loss}: held-out pair accuracy {acc:.2f} after {summary['steps']} steps"


def test_reward_model_learns_the_toy_preference(toy, tmp_path):
    from train.app import run

    summary = run(
        compose(
            *LEARN,
            "loop=reward",
            f"data.path={toy['pairs']}",
            f"data.eval_path={toy['held_out']}",
            f"output_dir={tmp_path}",
            "optim.lr=2e-3",
            "optim.epochs=2",
        )
    )
    assert summary["final_eval"]["eval/rewards/accuracy"] >= 0.9, summary["final_eval"]
