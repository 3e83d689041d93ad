"""Reference-free pairwise objectives: CPO, ORPO, SimPO (CPO: Xu et al. 2024, arXiv
2401.08417; ORPO: Hong et al. 2024, arXiv 2403.07691; SimPO: Meng et al. 2024, arXiv 2405.14734).

Inputs are [B] completion log-probs from the policy only; ORPO and SimPO expect per-token **means**
(their YAMLs say ``length_normalised: true``). Every function returns a :class:`LossOutput`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from train.losses._core import LossOutput, as_float, log1mexp, pair_output
from train.losses.dpo import smoothed_sigmoid_loss

NLL_FORMS = ("sequence_sum", "sequence_mean")


def cpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    nll_form: str = "sequence_sum",
) -> LossOutput:
    """CPO, Xu et al. 2024 (arXiv 2401.08417), Eq. 3 + NLL regulariser (sigmoid form, summed log-probs):

    L = −log σ(β ℓθ(y_w) − β ℓθ(y_l)) + α · NLL(y_w)

    Shapes: all [B]. ``nll_form="sequence_sum"`` (paper): NLL = −ℓθ(y_w), the summed sequence NLL.
    ``"sequence_mean"``: NLL = ``chosen_nll``, the per-sequence length-normalised NLL (closer to
    TRL, which uses one token-mean CE over the batch's chosen tokens).
    """
    if nll_form not in NLL_FORMS:
        raise ValueError(f"cpo nll_form must be one of {NLL_FORMS}, got {nll_form!r}")
    l_w, l_l = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    preference = -F.logsigmoid(beta * (l_w - l_l))
    if nll_form == "sequence_sum":
        nll = -l_w
    elif chosen_nll is None:
        raise ValueError("cpo_loss(nll_form='sequence_mean') needs chosen_nll")
    else:
        nll = as_float(chosen_nll)
    return pair_output(preference + alpha * nll, beta * l_w, beta * l_l, preference=preference, nll=nll)


def orpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
    lam: float = 0.1,
) -> LossOutput:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691), from its Eqs. 4 and 7, on **mean** log-probs ℓ̄ < 0:

    log OR = (ℓ̄_w − ℓ̄_l) − (log(1 − e^ℓ̄_w) − log(1 − e^ℓ̄_l)),
    L = NLL(y_w) + λ · [−log σ(log OR)]

    Shapes: all [B]. ``chosen_nll`` is the per-sequence token-mean NLL of the completion (TRL masks
    the prompt; the original repo includes prompt tokens unless --disable_prompt_loss). log(1 − e^x)
    goes through the branched log1mexp and the link through logsigmoid (TRL does the same;
    the original ORPO code's log(sigmoid) overflows).
    ``lam`` is TRL's ``beta`` (0.1, Mistral-ORPO-β); the original repo's argparse default is 1.0.
    """
    l_w, l_l = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    log_odds = (l_w - l_l) - (log1mexp(l_w) - log1mexp(l_l))
    odds_ratio_loss = -F.logsigmoid(log_odds)
    nll = as_float(chosen_nll)
    return pair_output(
        nll + lam * odds_ratio_loss,
        lam * l_w,
        lam * l_l,
        log_odds_ratio=log_odds,
        odds_ratio_loss=odds_ratio_loss,
        nll=nll,
    )


def simpo_loss(
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float | None = 0.25,
    gamma: float | None = None,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734), on **mean** log-probs:

    L = −log σ(β ℓ̄θ(y_w) − β ℓ̄θ(y_l) − γ)

    Shapes: all [B]. Two parametrisations of the margin, set exactly one:
    ``gamma_beta_ratio`` (official repo, default 0.25 → γ = β·0.25 = 0.5 at β = 2), or ``gamma``
    (absolute γ, TRL CPO's ``simpo_gamma``). TRL's CPO default β = 0.1 is not SimPO's β ≈ 2.
    ``label_smoothing`` > 0 is the repo's cDPO-style option.
    """
    if (gamma is None) == (gamma_beta_ratio is None):
        raise ValueError("simpo_loss: set exactly one of gamma (absolute) or gamma_beta_ratio (set the other to null)")
    margin = gamma if gamma is not None else beta * gamma_beta_ratio
    l_w, l_l = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    losses = smoothed_sigmoid_loss(beta * (l_w - l_l) - margin, label_smoothing)
    return pair_output(losses, beta * l_w, beta * l_l)
