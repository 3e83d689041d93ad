"""Agreement with TRL 1.16 where our objective and TRL's are the same function, and the documented
difference where they are not (label smoothing in "sigmoid", IPO length normalisation, ORPO's
log1mexp, SimPO's γ, token-mean NLL terms).

TRL's own code is called wherever it runs without a model: ``DPOTrainer._compute_loss`` and
``KTOTrainer._compute_loss`` with a lightweight stand-in ``self`` and a fake model that returns chosen
per-token log-probs, ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss`` with a stand-in
``self``, and ``trl.experimental.orpo.orpo_trainer.log1mexp``. TRL's NLL terms live inside closures
that need a model; they are reproduced with the same expression and the file/line quoted.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from train.losses._core import log1mexp  # noqa: E402
from train.losses.apo import apo_down_loss, apo_zero_loss  # noqa: E402
from train.losses.calibration import hinge_loss, ipo_loss, slic_hf_loss  # noqa: E402
from train.losses.dpo import bco_pair_loss, cdpo_loss, dpo_loss, exo_pair_loss, robust_dpo_loss, rpo_loss  # noqa: E402
from train.losses.kto import kto_loss  # noqa: E402
from train.losses.reference_free import cpo_loss, orpo_loss, simpo_loss  # noqa: E402
from train.losses.sft import sft_loss  # noqa: E402

F64 = torch.float64
PROMPT = 2  # prompt tokens in every fake sequence


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, model):
        return model


def _trainer_self(**attrs) -> SimpleNamespace:
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    return SimpleNamespace(**(base | attrs))


def _sequences(logps: torch.Tensor, lengths: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """input_ids/attention_mask/completion_mask [N, T] and shifted per-token log-probs [N, T−1] whose
    completion tokens carry logps[i] / lengths[i] each (TRL's fused head returns 0 at ignored labels)."""
    n, width = len(lengths), PROMPT + max(lengths)
    completion = torch.zeros(n, width, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        completion[i, PROMPT : PROMPT + length] = 1
        attention[i, : PROMPT + length] = 1
    per_token = completion[:, 1:].to(F64) * (logps / torch.tensor(lengths, dtype=F64)).unsqueeze(-1)
    ids = torch.arange(n * width).reshape(n, width)
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, per_token


class _FakeModel:
    """Returns TRL's fused-head outputs for whichever input_ids tensor it is called with."""

    def __init__(self) -> None:
        self.table: dict[int, torch.Tensor] = {}

    def register(self, input_ids: torch.Tensor, per_token: torch.Tensor) -> None:
        self.table[id(input_ids)] = per_token

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        lp = self.table[id(input_ids)]
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
        )


# A batch of three pairs with different lengths (policy sums, reference sums).
PAIRS = dict(
    policy_chosen_logps=torch.tensor([-10.0, -25.0, -7.0], dtype=F64),
    policy_rejected_logps=torch.tensor([-12.0, -20.0, -9.5], dtype=F64),
    reference_chosen_logps=torch.tensor([-11.0, -24.0, -8.0], dtype=F64),
    reference_rejected_logps=torch.tensor([-11.0, -21.0, -9.0], dtype=F64),
)
CHOSEN_LEN, REJECTED_LEN = [5, 10, 3], [6, 8, 4]


def trl_dpo(
    loss_type: str | list[str],
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    pairs: dict[str, torch.Tensor] = PAIRS,
    lengths: tuple[list[int], list[int]] = (CHOSEN_LEN, REJECTED_LEN),
) -> float:
    """``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py:1285-1528) on ``pairs``: the batch mean."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    logps = torch.cat([pairs["policy_chosen_logps"], pairs["policy_rejected_logps"]])
    inputs, per_token = _sequences(logps, lengths[0] + lengths[1])
    model = _FakeModel()
    model.register(inputs["input_ids"], per_token)
    inputs |= {
        "ref_chosen_logps": pairs["reference_chosen_logps"],
        "ref_rejected_logps": pairs["reference_rejected_logps"],
    }
    trainer = _trainer_self(
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    return DPOTrainer._compute_loss(trainer, model, inputs, False).item()


def ours(fn, **kwargs) -> float:
    return fn(**PAIRS, **kwargs).losses.mean().item()


@pytest.mark.parametrize(
    "loss_type, fn, kwargs, trl_kwargs",
    [
        ("sigmoid", dpo_loss, {"beta": 0.1}, {}),
        ("hinge", hinge_loss, {"beta": 0.1}, {}),
        ("robust", robust_dpo_loss, {"beta": 0.1, "epsilon": 0.1}, {"label_smoothing": 0.1}),
        ("exo_pair", exo_pair_loss, {"beta": 0.1, "epsilon": 1e-3}, {"label_smoothing": 1e-3}),
        ("bco_pair", bco_pair_loss, {"beta": 0.1}, {}),
        ("apo_zero", apo_zero_loss, {"beta": 0.1}, {}),
        ("apo_down", apo_down_loss, {"beta": 0.1}, {}),
        (
            "ipo",
            functools.partial(
                ipo_loss,
                length_normalise=True,
                chosen_lengths=torch.tensor(CHOSEN_LEN),
                rejected_lengths=torch.tensor(REJECTED_LEN),
            ),
            {"tau": 0.1},
            {},
        ),
    ],
)
def test_dpo_trainer_losses_agree(loss_type: str, fn, kwargs: dict, trl_kwargs: dict) -> None:
    # 1e-7: TRL builds exo_pair's ε as a float32 tensor
    assert ours(fn, **kwargs) == pytest.approx(trl_dpo(loss_type, **trl_kwargs), abs=1e-7)


def test_ipo_paper_form_differs_from_trl_by_length_normalisation() -> None:
    # TRL averages IPO's log-probs over tokens, arXiv 2310.12036 Eq. 17 does not: TRL 21.467778, paper 9.000000
    t0 = {k: torch.tensor([v], dtype=F64) for k, v in zip(PAIRS, (-10.0, -12.0, -11.0, -11.0), strict=True)}
    assert trl_dpo("ipo", pairs=t0, lengths=([5], [6])) == pytest.approx(21.467778, abs=1e-6)
    assert ipo_loss(**t0, tau=0.1).losses.item() == pytest.approx(9.0)
    trl = trl_dpo("ipo")
    # and the TRL form equals the paper form fed per-token-mean log-ratios (YAML length_normalised: true)
    lengths = {"chosen": torch.tensor(CHOSEN_LEN, dtype=F64), "rejected": torch.tensor(REJECTED_LEN, dtype=F64)}
    means = {k: v / lengths[k.split("_")[1]] for k, v in PAIRS.items()}
    assert ipo_loss(**means, tau=0.1).losses.mean().item() == pytest.approx(trl, abs=1e-10)


def test_cdpo_label_smoothing_ignored_by_trl_sigmoid() -> None:
    # TRL >= 0.29 "sigmoid" drops label_smoothing, so a ported cDPO config silently becomes DPO
    trl = trl_dpo("sigmoid", label_smoothing=0.1)
    assert trl == pytest.approx(ours(dpo_loss, beta=0.1), abs=1e-10)
    assert ours(cdpo_loss, beta=0.1, epsilon=0.1) != pytest.approx(trl, abs=1e-3)
    # the label-smoothing loss TRL still has ("robust") is rDPO, a different estimator from cDPO
    assert ours(robust_dpo_loss, epsilon=0.1) != pytest.approx(ours(cdpo_loss, epsilon=0.1), abs=1e-3)


def test_trl_hinge_is_not_slic_hf() -> None:
    trl = trl_dpo("hinge")
    slic = slic_hf_loss(
        policy_chosen_logps=PAIRS["policy_chosen_logps"],
        policy_rejected_logps=PAIRS["policy_rejected_logps"],
        delta=1.0,
        lam=0.0,
    )
    slic = slic.losses.mean().item()
    assert trl != pytest.approx(slic, abs=1e-3)


def test_rpo_nll_per_sequence_vs_trl_token_mean() -> None:
    # TRL HEAD: loss_type=["sigmoid","sft"], loss_weights=[1, α]; "sft" is one token-mean NLL over the batch
    alpha = 1.0
    trl = trl_dpo(["sigmoid", "sft"], loss_weights=[1.0, alpha])
    per_seq_nll = -PAIRS["policy_chosen_logps"] / torch.tensor(CHOSEN_LEN, dtype=F64)
    ours_rpo = ours(rpo_loss, chosen_nll=per_seq_nll, alpha=alpha)
    assert ours_rpo != pytest.approx(trl, abs=1e-3)  # lengths differ: mean of means ≠ token mean
    token_mean = -PAIRS["policy_chosen_logps"].sum().item() / sum(CHOSEN_LEN)
    assert trl == pytest.approx(ours(dpo_loss) + alpha * token_mean, abs=1e-10)
    # our sft_loss(batch_token_mean) reproduces TRL's "sft" term exactly
    _, per_token = _sequences(PAIRS["policy_chosen_logps"], CHOSEN_LEN)
    sft = sft_loss(token_logps=per_token, token_mask=per_token != 0, normalisation="batch_token_mean")
    assert sft.losses.mean().item() == pytest.approx(token_mean, abs=1e-10)


def test_kto_trainer_agrees() -> None:
    labels = torch.tensor([True, False, True, False, False])
    policy = torch.tensor([-10.0, -12.0, -30.0, -8.0, -15.0], dtype=F64)
    reference = torch.tensor([-11.0, -11.0, -29.0, -9.0, -14.0], dtype=F64)
    kl_policy = torch.tensor([-11.5, -12.2, -31.0, -9.0, -13.0], dtype=F64)
    kl_reference = torch.tensor([-11.8, -12.0, -30.0, -9.5, -13.1], dtype=F64)
    inputs, per_token = _sequences(policy, [5, 6, 9, 3, 4])
    kl_inputs, kl_per_token = _sequences(kl_policy, [6, 9, 3, 4, 5])
    model = _FakeModel()
    model.register(inputs["input_ids"], per_token)
    model.register(kl_inputs["input_ids"], kl_per_token)
    batch = (
        inputs
        | {f"KL_{k}": v for k, v in kl_inputs.items()}
        | {"label": labels, "ref_logps": reference, "ref_KL_logps": kl_reference}
    )
    trainer = _trainer_self(calculate_KL=True, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    trainer._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer)
    trl = KTOTrainer._compute_loss(trainer, model, batch, False).item()
    out = kto_loss(
        policy_logps=policy,
        reference_logps=reference,
        labels=labels,
        policy_kl_logps=kl_policy,
        reference_kl_logps=kl_reference,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.33,
    )
    assert out.losses.mean().item() == pytest.approx(trl, abs=1e-10)
    assert out.metrics["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-10)


def _cpo_self(loss_type: str, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        accelerator=_Accelerator(),
    )


def test_cpo_preference_term_agrees() -> None:
    w, lo = PAIRS["policy_chosen_logps"], PAIRS["policy_rejected_logps"]
    trl, trl_chosen, _ = CPOTrainer.cpo_loss(_cpo_self("sigmoid", 0.1), w, lo)
    out = cpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, beta=0.1, alpha=0.0)
    torch.testing.assert_close(out.losses, trl)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen)


def test_cpo_nll_paper_sequence_vs_trl_token_mean() -> None:
    # TRL: loss = losses.mean() + cpo_alpha * CE, CE = nn.CrossEntropyLoss() over all chosen completion
    # tokens of the batch (trl/experimental/cpo/cpo_trainer.py:826-845, 890). Example with |y_w| = 5.
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, dtype=F64)
    targets = torch.randint(0, 7, (1, 5))
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = token_logps - token_logps.sum() / 5 - 2.0  # shift so ℓθ(y_w) = −10 (mean −2 per token)
    w, lo = token_logps.sum().reshape(1), torch.tensor([-12.0], dtype=F64)
    preference = CPOTrainer.cpo_loss(_cpo_self("sigmoid", 0.1), w, lo)[0].mean().item()
    trl_total = preference + 1.0 * (-token_logps.mean().item())
    assert trl_total == pytest.approx(2.598139, abs=1e-6)
    paper = cpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo).losses.item()
    assert paper == pytest.approx(10.598139, abs=1e-6)
    per_seq = cpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, chosen_nll=-w / 5, nll_form="sequence_mean")
    assert per_seq.losses.item() == pytest.approx(trl_total, abs=1e-10)  # one sequence: the forms coincide
    # the CE expression itself: sft_loss(batch_token_mean) == nn.CrossEntropyLoss with ignore_index −100
    labels = torch.tensor([[3, 1, -100], [2, -100, -100]])
    ce_logits = torch.randn(2, 3, 7, dtype=F64)
    trl_ce = nn.CrossEntropyLoss()(ce_logits.view(-1, 7), labels.view(-1)).item()
    mask = labels != -100
    lp = torch.log_softmax(ce_logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert sft_loss(
        token_logps=lp, token_mask=mask, normalisation="batch_token_mean"
    ).losses.mean().item() == pytest.approx(trl_ce, abs=1e-10)


def test_simpo_matches_trl_cpo_simpo_in_both_parametrisations() -> None:
    w = torch.tensor([-1.0, -2.0, -0.7], dtype=F64)
    lo = torch.tensor([-1.5, -2.0, -0.9], dtype=F64)
    trl = CPOTrainer.cpo_loss(_cpo_self("simpo", beta=2.0, simpo_gamma=0.5), w, lo)[0]
    torch.testing.assert_close(simpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, beta=2.0).losses, trl)
    absolute = simpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, beta=2.0, gamma=0.5, gamma_beta_ratio=None)
    torch.testing.assert_close(absolute.losses, trl)
    # TRL CPO's default β = 0.1 with simpo_gamma = 0.5 is a different objective from SimPO's β = 2
    trl_default_beta = CPOTrainer.cpo_loss(_cpo_self("simpo", beta=0.1, simpo_gamma=0.5), w, lo)[0]
    assert not torch.allclose(trl_default_beta, trl, atol=1e-3)
    smoothed = CPOTrainer.cpo_loss(_cpo_self("simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.2), w, lo)[0]
    torch.testing.assert_close(
        simpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, label_smoothing=0.2).losses, smoothed
    )


def test_orpo_odds_ratio_agrees() -> None:
    w = torch.tensor([-1.0, -0.01, -3.0, -1e-6], dtype=torch.float32)
    lo = torch.tensor([-1.5, -0.2, -2.0, -5.0], dtype=torch.float32)
    nll = torch.tensor([1.0, 0.01, 3.0, 1e-6])
    trl_losses, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=_Accelerator()), w, lo)
    out = orpo_loss(policy_chosen_logps=w, policy_rejected_logps=lo, chosen_nll=nll, lam=0.1)
    # TRL: loss = policy_nll_loss − losses.mean(), losses = β·logσ(log_odds) (orpo_trainer.py:697, 848)
    assert out.losses.mean().item() == pytest.approx(nll.mean().item() - trl_losses.mean().item(), abs=1e-6)


def test_log1mexp_agrees_with_trl_except_at_zero() -> None:
    x = -torch.logspace(-8, 3, 200, dtype=torch.float32)
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x))
    zero = torch.zeros(1)
    assert torch.isinf(trl_log1mexp(zero)).all() and torch.isfinite(log1mexp(zero)).all()


def test_orpo_nll_trl_includes_prompt_tokens() -> None:
    # TRL 1.16 ORPO: labels = input_ids where attention_mask == 1, i.e. prompt + completion
    # (trl/experimental/orpo/orpo_trainer.py:795-800); our chosen_nll is completion-only (the paper's L_SFT
    # on the response; TRL 1.16 does not mask the prompt here).
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 9, dtype=F64)
    ids = torch.randint(0, 9, (1, 6))
    completion = torch.tensor([[0, 0, 0, 1, 1, 1]])
    shift_logits, shift_ids = logits[:, :-1], ids[:, 1:]
    trl_labels = shift_ids  # all tokens attended
    trl_nll = nn.CrossEntropyLoss()(shift_logits.reshape(-1, 9), trl_labels.reshape(-1)).item()
    lp = torch.log_softmax(shift_logits, -1).gather(-1, shift_ids.unsqueeze(-1)).squeeze(-1)
    ours_nll = sft_loss(token_logps=lp, token_mask=completion[:, 1:].bool()).losses.item()
    assert ours_nll != pytest.approx(trl_nll, abs=1e-3)
    assert sft_loss(token_logps=lp, token_mask=torch.ones_like(lp, dtype=torch.bool)).losses.item() == pytest.approx(
        trl_nll, abs=1e-10
    )
