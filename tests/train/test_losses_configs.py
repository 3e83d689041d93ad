"""conf/loss is the registry: every YAML composes, its flags match its function, and its function runs
on a small batch of its kind fed the way the training loop feeds it (by signature)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train.app import LossSpec
from train.losses import DATA_ARGS, LossOutput, RunningMean

ROOT = Path(__file__).resolve().parents[2]
LOSS_CONF = ROOT / "conf" / "loss"
YAMLS = sorted(LOSS_CONF.glob("*.yaml"))
REQUIRED = {
    "dpo",
    "cdpo",
    "robust_dpo",
    "slic_hf",
    "hinge",
    "ipo",
    "kto",
    "bco",
    "cpo",
    "orpo",
    "exo",
    "dpop",
    "simpo",
    "rpo",
    "odpo",
    "npo",
    "apo_zero",
    "apo_down",
    "lipo_lambda",
    "pro",
    "rrhf",
    "cringe",
    "sft",
    "bradley_terry",
    "cost",
    "ppo",
    "grpo",
    "dr_grpo",
    "rloo",
    "remax",
    # issue 18
    "pointwise",
    "bradley_terry_lm",
    "listwise_bt",
    "plackett_luce",
    "dove",
    "relative_po",
    "relative_po_unpaired",
    "d2o",
    "c_dpo",
}
B = 4


def test_every_objective_has_a_config() -> None:
    assert REQUIRED <= {p.stem for p in YAMLS}


def small_batch(kind: str, mean: bool, stateful: str | None) -> dict[str, object]:
    """What the loop would hand over for this kind (policy tensors require grad)."""
    g = torch.Generator().manual_seed(0)

    def logps(*shape: int) -> torch.Tensor:
        scale = 1.0 if mean else 20.0
        return (-scale * (0.5 + torch.rand(*shape, generator=g, dtype=torch.float64))).requires_grad_(True)

    labels = torch.tensor([True, False, True, False])
    batch: dict[str, object] = {"reduce": lambda x: x}
    if stateful == "running_mean":
        batch["running_mean"] = RunningMean()
    if kind == "pairwise":
        batch.update(
            policy_chosen_logps=logps(B),
            policy_rejected_logps=logps(B),
            reference_chosen_logps=logps(B).detach(),
            reference_rejected_logps=logps(B).detach(),
            chosen_nll=torch.rand(B, generator=g, dtype=torch.float64).requires_grad_(True),
            chosen_lengths=torch.tensor([3.0, 5.0, 7.0, 2.0]),
            rejected_lengths=torch.tensor([4.0, 4.0, 6.0, 9.0]),
            score_chosen=torch.tensor([5.0, 0.9, 3.0, 2.0]),
            score_rejected=torch.tensor([2.0, 0.4, 1.0, 1.5]),
            p_chosen=torch.tensor([1.0, 0.9, 0.7, 0.6]),
            sft_target_logps=logps(B),
            prompt_embeddings=torch.randn(B, 5, generator=g),
            reward_chosen=torch.randn(B, generator=g),
            reward_rejected=torch.randn(B, generator=g),
            cost_chosen=torch.randn(B, generator=g),
            cost_rejected=torch.randn(B, generator=g),
        )
    elif kind in ("ranked", "reward_ranked"):
        batch.update(
            rewards=torch.randn(B, 3, generator=g, dtype=torch.float64).requires_grad_(True),
            policy_logps=logps(B, 3),
            reference_logps=logps(B, 3).detach(),
            lengths=torch.randint(1, 9, (B, 3), generator=g).double(),
            scores=torch.rand(B, 3, generator=g),
            mask=torch.tensor([[True, True, True], [True, True, False], [True, True, True], [True, False, False]]),
            nll=torch.rand(B, 3, generator=g, dtype=torch.float64),
        )
    elif kind == "unpaired":
        batch.update(
            policy_logps=logps(B),
            reference_logps=logps(B).detach(),
            labels=labels,
            policy_kl_logps=logps(B).detach(),
            reference_kl_logps=logps(B).detach(),
            logits=torch.randn(B, 5, 11, generator=g, dtype=torch.float64).requires_grad_(True),
            target_ids=torch.randint(0, 11, (B, 5), generator=g),
            token_mask=torch.rand(B, 5, generator=g) > 0.3,
            generator=torch.Generator().manual_seed(1),
            prompt_embeddings=torch.randn(B, 8, generator=g),
        )
    elif kind == "sft":
        batch.update(token_logps=logps(B, 6), token_mask=torch.rand(B, 6, generator=g) > 0.3)
    elif kind == "reward":
        batch.update(
            rewards_chosen=torch.randn(B, generator=g).requires_grad_(True),
            rewards_rejected=torch.randn(B, generator=g).requires_grad_(True),
            margin=torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]),
            costs_chosen=torch.randn(B, generator=g).requires_grad_(True),
            costs_rejected=torch.randn(B, generator=g).requires_grad_(True),
            safe_chosen=torch.tensor([True, True, False, True]),
            safe_rejected=torch.tensor([False, False, False, True]),
            score_chosen=torch.tensor([5.0, 0.9, 3.0, 2.0]),
            score_rejected=torch.tensor([2.0, 0.4, 1.0, 1.5]),
            chosen_nll=torch.rand(B, generator=g, dtype=torch.float64).requires_grad_(True),
            chosen_logps=-20 * torch.rand(B, generator=g, dtype=torch.float64).requires_grad_(True),
        )
    elif kind == "policy":
        batch.update(
            logps=logps(B, 6),
            old_logps=logps(B, 6).detach(),
            ref_logps=logps(B, 6).detach(),
            advantages=torch.randn(B, generator=g, dtype=torch.float64),
            mask=torch.rand(B, 6, generator=g) > 0.3,
        )
    return batch


def required_params(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.default is inspect.Parameter.empty}


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_config_flags_match_function(path: Path) -> None:
    cfg = OmegaConf.load(path)
    LossSpec.model_validate(OmegaConf.to_container(cfg))  # the loop's own schema: unknown flags, kinds refused
    assert {"name", "kind", "needs_reference", "length_normalised", "paper", "fn"} <= set(cfg.keys())
    assert cfg.name == path.stem and cfg.fn._partial_ is True
    assert cfg.get("stateful") in (None, "running_mean")
    fn = instantiate(cfg.fn).func
    params = inspect.signature(fn).parameters
    required = required_params(fn)
    data = set(DATA_ARGS[cfg.kind])
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), "keyword-only"
    assert required <= data, f"required arguments outside the {cfg.kind} vocabulary: {required - data}"
    assert cfg.needs_reference == any(n.startswith("reference_") for n in required)
    assert cfg.get("needs_nll", False) == bool(required & {"chosen_nll", "nll"})
    assert cfg.get("needs_kl_pairs", False) == ("policy_kl_logps" in params)
    assert cfg.get("needs_scores", False) == ("score_chosen" in required)
    assert cfg.get("needs_logits", False) == ("logits" in required)
    assert cfg.get("needs_safety_labels", False) == ("safe_chosen" in required)
    assert cfg.get("needs_prompt_embeddings", False) == ("prompt_embeddings" in required)
    assert cfg.get("needs_prompt_embeddings", False) == bool(cfg.get("embedding_model"))
    assert cfg.get("needs_reward_cost", False) == ("reward_chosen" in required)
    if cfg.get("stateful") == "running_mean":
        assert "running_mean" in params
    # hyperparameters in the YAML are the function's own (paper) defaults: one source of truth
    for key, value in cfg.fn.items():
        if key in ("_target_", "_partial_"):
            continue
        assert key in params and key not in data, f"{key} is not a hyperparameter of {fn.__name__}"
        default = params[key].default
        assert default == value, f"{path.name}: {key}={value} but the function default is {default}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_config_instantiates_and_runs(path: Path) -> None:
    cfg = OmegaConf.load(path)
    fn = instantiate(cfg.fn)
    batch = small_batch(cfg.kind, cfg.length_normalised, cfg.get("stateful"))
    if cfg.name == "d2o":  # every D2O list holds a negative and at least one sample (a 1-slot list is invalid data)
        batch["mask"] = batch["mask"] | torch.tensor([False, True, False])
    names = inspect.signature(fn).parameters
    out = fn(**{k: v for k, v in batch.items() if k in names})
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (B,) and torch.isfinite(out.losses).all()
    out.losses.mean().backward()


def test_losses_package_imports_only_torch_and_stdlib() -> None:
    allowed = {"torch", "math", "dataclasses", "typing", "collections", "functools", "__future__", "train"}
    for path in (ROOT / "train" / "losses").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
                if node.module and node.module.startswith("train") and not node.module.startswith("train.losses"):
                    pytest.fail(f"{path.name} imports {node.module}")
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
        assert len(path.read_text().splitlines()) < 400, f"{path.name} is over 400 lines"
