"""Preferences across different prompts: DOVE's joint preference and Relative Preference Optimization.

Both take the usual pairwise log-probs ([B] each, sums over the scored tokens). What differs from DPO is
the data and the pairing: DOVE compares two (instruction, response) pairs whose instructions may differ;
Relative PO contrasts every chosen response of the micro-batch with every rejected one; its unpaired
variant takes (prompt, completion, label) rows and contrasts every desirable row with every undesirable one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float, pair_output
from train.losses.dpo import dpo_loss, log_ratios


def dove_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    p_chosen: Tensor | None = None,
    beta: float = 0.1,
) -> LossOutput:
    """DOVE / JPO, Bansal et al. 2024 (arXiv 2404.00530; Findings of ACL 2025 as JPO): the DPO form on
    the log-ratios of two (instruction, response) pairs that may have different instructions:

    L = −log σ(β [(ℓθ(x_w, y_w) − ℓref(x_w, y_w)) − (ℓθ(x_l, y_l) − ℓref(x_l, y_l))]).

    Shapes: all [B]. ℓ is the **joint** log-probability log π(x) + log π(y | x) when the loss YAML says
    ``joint_distribution: true`` (the loop then scores the prompt tokens too, as the official
    ``joint_distribution=True`` does); otherwise the conditional log π(y | x) ("DPO across
    prompts"). With x_w = x_l the prompt terms cancel and this is DPO exactly. ``p_chosen`` [B]
    (optional soft labels, e.g. a judge's P(pair w ≻ pair l) from log-probs) gives the soft-label
    cross-entropy −p log σ(βh) − (1−p) log σ(−βh), as :func:`train.losses.dpo.dpo_loss`.
    """
    return dpo_loss(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        p_chosen=p_chosen,
        beta=beta,
    )  # the same form; what differs is how the log-probs were scored


def contrast_weights(prompt_embeddings: Tensor, distance_temperature: float) -> Tensor:
    """ω_ij = softmax_j(−(1 − cos(e_i, e_j)) / τ), [B, B], detached (the encoder is frozen data)."""
    e = F.normalize(as_float(prompt_embeddings).detach(), p=2, dim=-1)
    distance = 1 - e @ e.T
    return torch.softmax(-distance / distance_temperature, dim=-1)


def relative_po_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    prompt_embeddings: Tensor,
    beta: float = 0.1,
    distance_temperature: float = 0.5,
) -> LossOutput:
    """Relative Preference Optimization (paired), Yin et al. 2024 (arXiv 2402.10958; official
    ``RPOTrainer.loss`` in yinyueqin/relative-preference-optimization):

    M_ij = ρ_w,i − ρ_l,j            (chosen of row i against rejected of row j, over the micro-batch)
    ω_ij = softmax_j(−(1 − cos(e_i, e_j)) / τ)
    loss_i = (1/B) Σ_j −log σ(β · ω_ij · M_ij)

    Shapes: log-probs [B]; ``prompt_embeddings`` [B, D] (a frozen sentence encoder's prompt embedding,
    any scale: it is L2-normalised here). The weight multiplies the logit **inside** σ, as the official
    code does. Each row of ω sums to 1, so the diagonal's effective β shrinks as B grows (unrelated
    prompts at cosine distance 0.85, τ = 0.5, B = 8: ω_ii ≈ 0.439). The loss depends on which rows
    share a micro-batch (each process contrasts its own, as the official code). B = 1 is DPO with β.
    Not to be confused with ``rpo`` (Pang et al. 2024, DPO + NLL).
    """
    if distance_temperature <= 0:
        raise ValueError(f"distance_temperature must be > 0, got {distance_temperature}")
    rho_w, rho_l = log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    omega = contrast_weights(prompt_embeddings, distance_temperature).to(rho_w.dtype)
    contrast = rho_w.unsqueeze(-1) - rho_l.unsqueeze(-2)  # [i, j]
    losses = -F.logsigmoid(beta * omega * contrast).mean(dim=-1)
    return pair_output(losses, beta * rho_w, beta * rho_l, omega_diagonal=omega.diagonal())


def relative_po_unpaired_loss(
    *,
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    prompt_embeddings: Tensor,
    beta: float = 0.1,
    distance_temperature: float = 0.5,
) -> LossOutput:
    """Relative Preference Optimization, unpaired (Yin et al. 2024, arXiv 2402.10958; official
    ``RPOUnpairedTrainer.loss``, config/loss/rpo-unpaired.yaml): unpaired rows (prompt, completion,
    desirable or not); every desirable row i of the micro-batch against every undesirable row j,

    ρ = log π(y|x) − log π_ref(y|x),   M_ij = ρ_i − ρ_j             (i desirable, j undesirable)
    ω_ij = softmax_j(−(1 − cos(e_i, e_j)) / τ)                      (over the undesirable rows)
    loss_i = (1/|U|) Σ_j −log σ(β · ω_ij · M_ij)                    one loss per desirable row

    Shapes: ``policy_logps`` / ``reference_logps`` [B] (sums over the completion tokens), ``labels`` [B]
    bool (True = desirable), ``prompt_embeddings`` [B, D]. ``losses`` is [B] like every unpaired loss:
    desirable row i carries loss_i · B/|D| and undesirable rows 0, so ``losses.mean()`` is the official
    mean over the desirable rows. A micro-batch without a desirable or without an undesirable row has no
    contrast: its loss is 0 (kept in the graph, so every process still takes part in the backward pass),
    counted in the ``no_contrast`` metric.
    """
    if distance_temperature <= 0:
        raise ValueError(f"distance_temperature must be > 0, got {distance_temperature}")
    rho = as_float(policy_logps) - as_float(reference_logps).detach()
    good = labels.to(torch.bool)
    rho_d, rho_u = rho[good], rho[~good]
    if rho_d.numel() == 0 or rho_u.numel() == 0:
        return LossOutput(rho * 0, beta * rho_d.detach(), beta * rho_u.detach(), {"no_contrast": torch.ones(())})
    e = F.normalize(as_float(prompt_embeddings).detach(), p=2, dim=-1)
    distance = 1 - e[good] @ e[~good].T  # [|D|, |U|]
    omega = torch.softmax(-distance / distance_temperature, dim=-1).to(rho.dtype)
    contrast = rho_d.unsqueeze(-1) - rho_u.unsqueeze(-2)
    per_desirable = -F.logsigmoid(beta * omega * contrast).mean(dim=-1)  # [|D|]
    losses = torch.zeros_like(rho).masked_scatter(good, per_desirable * (rho.numel() / rho_d.numel()))
    return LossOutput(losses, beta * rho_d.detach(), beta * rho_u.detach(), {"no_contrast": torch.zeros(())})
