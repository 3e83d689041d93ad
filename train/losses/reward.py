"""Reward- and cost-model losses on scalar model outputs (Bradley–Terry: Ouyang et al. 2022,
arXiv 2203.02155, with Llama 2's margin, arXiv 2307.09288; cost model: Dai et al. 2023, arXiv 2310.12773, Eq. 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float, pair_output


def bradley_terry_loss(
    *,
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    """Bradley–Terry reward loss (InstructGPT, arXiv 2203.02155, Eq. 1) with the Llama 2 margin
    (Touvron et al. 2023, arXiv 2307.09288, Eq. 2) and the centring term of Eisenstein et al. 2023
    (arXiv 2312.09244):

    L = −log σ(r(x, y_c) − r(x, y_r) − m) + η (r(x, y_c) + r(x, y_r))²

    Shapes: all [B]. ``margin`` m is data (detached; 0 when absent); η = ``center_coef`` (TRL's
    ``center_rewards_coefficient``, 0.01 recommended, off by default).
    """
    r_c, r_r = as_float(rewards_chosen), as_float(rewards_rejected)
    m = torch.zeros_like(r_c) if margin is None else as_float(margin).detach()
    losses = -F.logsigmoid(r_c - r_r - m)
    if center_coef:
        losses = losses + center_coef * (r_c + r_r) ** 2
    return pair_output(losses, r_c, r_r)


def cost_model_loss(
    *,
    costs_chosen: Tensor,
    costs_rejected: Tensor,
    safe_chosen: Tensor,
    safe_rejected: Tensor,
) -> LossOutput:
    """Safe-RLHF cost-model loss, Dai et al. 2023 (arXiv 2310.12773), Eq. 6:

    L = −log σ(C(y_w) − C(y_l)) − log σ(s_w C(y_w)) − log σ(s_l C(y_l)),

    where y_w is the **more harmful** response and s(y) = +1 if y is harmful, −1 if safe; the sign
    terms anchor C = 0 at the safe/unsafe boundary. In our pair convention the *chosen* response is
    the safer one, so y_w = rejected and y_l = chosen.

    Shapes: costs_chosen (the safer response), costs_rejected (the more harmful response),
    safe_chosen, safe_rejected (bool, True = safe): all [B]. Labels are data (no gradient).
    ``chosen_rewards`` / ``rejected_rewards`` are the negated costs, so "accuracy" means the safer
    response got the lower cost.
    """
    c_safer, c_harmful = as_float(costs_chosen), as_float(costs_rejected)
    sign_safer = 1.0 - 2.0 * safe_chosen.to(c_safer.dtype)  # safe → −1, harmful → +1
    sign_harmful = 1.0 - 2.0 * safe_rejected.to(c_harmful.dtype)
    ranking = -F.logsigmoid(c_harmful - c_safer)
    anchors = -F.logsigmoid(sign_harmful * c_harmful) - F.logsigmoid(sign_safer * c_safer)
    # "rewards" are costs here: chosen (safer) should be lower, so report −C for margin/accuracy metrics
    return pair_output(ranking + anchors, -c_safer, -c_harmful, ranking=ranking, sign_terms=anchors)


# ------------------------------------------------------------------ the reward-model family beside BT


def pointwise_regression_loss(
    *,
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    score_chosen: Tensor,
    score_rejected: Tensor,
    target_shift: float = 0.0,
    target_scale: float = 1.0,
) -> LossOutput:
    """Pointwise reward model: least-squares regression of r(x, y) on an absolute score, as the
    regression reward models of SteerLM (Dong et al. 2023, arXiv 2310.05344, §3.1: MSE on attribute
    scores) and HelpSteer (Wang et al. 2023, arXiv 2311.09528) are trained:

    L = ½ [(r(x, y_c) − t_c)² + (r(x, y_r) − t_r)²],   t = (s − shift) / scale.

    Shapes: all [B]. Both responses of a pair are regressed on their own score (e.g. our judge's
    rubric scores, score_chosen / score_rejected); the pair order plays no role. Scores are data
    (detached). ``target_shift`` / ``target_scale`` map the score range onto the head's (e.g. a 1–10
    rubric with shift 5.5, scale 4.5 lands in [−1, 1]); scale must be > 0.
    """
    if target_scale <= 0:
        raise ValueError(f"target_scale must be > 0, got {target_scale}")
    r_c, r_r = as_float(rewards_chosen), as_float(rewards_rejected)
    t_c = (as_float(score_chosen).detach() - target_shift) / target_scale
    t_r = (as_float(score_rejected).detach() - target_shift) / target_scale
    losses = 0.5 * ((r_c - t_c) ** 2 + (r_r - t_r) ** 2)
    return pair_output(losses, r_c, r_r, abs_error=((r_c - t_c).abs() + (r_r - t_r).abs()) / 2)


def bradley_terry_lm_loss(
    *,
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    chosen_nll: Tensor,
    chosen_logps: Tensor | None = None,
    margin: Tensor | None = None,
    lm_coef: float = 0.01,
    regularizer: str = "sft",
    beta: float = 0.1,
) -> LossOutput:
    """Bradley–Terry reward loss regularised by a text-generation loss on the best answer: the
    Generalizable Reward Model (Yang et al. 2024, arXiv 2406.10216) keeps the LM head and trains it on
    the chosen response from the same hidden states, against reward over-optimisation. As in its
    official code (YangRui2015/Generalizable-Reward-Model, reward_models/grm_reward_trainer.py,
    ``GRMRewardTrainer.compute_loss``; defaults weight_ratio 0.01, beta 0.1, sft_only, reference-free):

    L = (1 − α) [−log σ(r(x, y_c) − r(x, y_r) − m)] + α · R,
    R = −log σ(β · log π(y_c | x))      regularizer="sft" (the code's default; log π summed over y_c's tokens)
    R = NLL(y_c | x) / |y_c|            regularizer="nll" (per-token mean NLL: scale-free in the length)

    Shapes: all [B]. ``chosen_logps`` is the **summed** log-prob of the chosen response's tokens and
    ``chosen_nll`` its per-token mean NLL, both under the model's LM head; ``margin`` m as in
    :func:`bradley_terry_loss`. α = ``lm_coef`` in [0, 1]; α = 0 is plain Bradley–Terry.
    """
    if not 0.0 <= lm_coef <= 1.0:
        raise ValueError(f"lm_coef must lie in [0, 1], got {lm_coef}")
    if regularizer not in ("sft", "nll"):
        raise ValueError(f"regularizer must be sft or nll, got {regularizer!r}")
    bt = bradley_terry_loss(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected, margin=margin)
    nll = as_float(chosen_nll)
    if regularizer == "sft":
        if chosen_logps is None:
            raise ValueError("regularizer=sft needs chosen_logps (the summed log-prob of the chosen response)")
        reg = -F.logsigmoid(beta * as_float(chosen_logps))
    else:
        reg = nll
    metrics = {**bt.metrics, "bt": bt.losses.detach().mean(), "nll": nll.detach().mean(), "lm_reg": reg.detach().mean()}
    return LossOutput((1 - lm_coef) * bt.losses + lm_coef * reg, bt.chosen_rewards, bt.rejected_rewards, metrics)
