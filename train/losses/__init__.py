"""The objective catalogue: pure loss functions, one file per family; each function's docstring cites
its paper (arXiv id, equation) and, where it follows one, the official or TRL code.

Every function takes tensors and scalar hyperparameters as keyword arguments and returns a
:class:`LossOutput`; none sees a config, model, tokenizer or device, so each can be checked
against worked values on its own (as in eric-mitchell/direct-preference-optimization's `preference_loss`).
This package imports only torch and the standard library, so importing it stays cheap.

Keyword vocabulary (the training loop feeds a loss by inspecting its signature)
-----------------------------------------------------------------------------
pairwise ([B] each)
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        completion log-probs: sums, or per-token means when the YAML says ``length_normalised: true``
    chosen_nll          per-sequence length-normalised NLL of the chosen completion (CPO/RPO/ORPO)
    chosen_lengths, rejected_lengths   completion token counts
    score_chosen, score_rejected       scores from the data (ODPO offsets)
    p_chosen            soft preference labels P(chosen > rejected) when the data has them
    sft_target_logps    ℓθ of an SFT target for the prompt (SLiC-HF regulariser; chosen if absent)
    prompt_embeddings   [B, D] frozen sentence-encoder embeddings of each row's prompt (Relative PO)
    reward_chosen, reward_rejected, cost_chosen, cost_rejected
                        precomputed reward-model / cost-model scores of each response (C-DPO)
listwise ([B, K] each)
    policy_logps, reference_logps, lengths, scores (higher is better), mask (bool, False = padding
    slot; a padding slot contributes nothing, whatever values it holds), nll (reserved: no current
    objective needs it; PRO/RRHF derive their NLL terms from summed policy_logps)
unpaired ([B] each)
    policy_logps, reference_logps, labels (bool, True = desirable),
    policy_kl_logps, reference_kl_logps (mismatched prompt/completion pairs, KTO's z0),
    kl (optional precomputed, already all-reduced KTO z0 instead of the KL-pair log-probs),
    running_mean (a :class:`RunningMean`, BCO), fixed_delta (a fixed BCO shift instead), density_ratio
    (BCO UDM weights), reduce (see below)
token-level (Cringe) / sft
    logits [B, T, V] (already shifted: position t predicts target_ids[:, t]), target_ids [B, T] long,
    token_logps [B, T] (log-prob of target_ids, float32), token_mask [B, T] bool (completion tokens),
    labels [B] bool (Cringe: True = positive sequence), generator (torch.Generator, Cringe sampling)
reward models ([B] each)
    rewards_chosen, rewards_rejected, margin (optional);
    score_chosen, score_rejected (pointwise regression targets), chosen_nll (the LM loss of the chosen
    response, length-normalised) and chosen_logps (its summed log-prob): the LM-regularised reward model;
    cost model: costs_chosen (the safer response), costs_rejected (the more harmful one),
    safe_chosen, safe_rejected (bool, True = the response is safe)
listwise reward models ([B, K] each)
    rewards (scalar head per response), scores (higher is better), mask (bool, False = padding slot)
policy (online loops, train/losses/policy.py; [B, T] per completion position)
    logps, old_logps, ref_logps, advantages ([B, T] or [B]), mask (bool), total_tokens /
    total_sequences (counts of the whole optimizer step, per process), kl_coef / kl_estimator /
    kl_clamp (loop.kl, KL in the loss), is_weights ([B, T] importance weights of a vLLM-sampled
    rollout, loop.generation.is_correction; None when the trainer sampled)
reduce
    optional ``Callable[[Tensor], Tensor]`` that mean-all-reduces a 0-dim tensor across processes
    (e.g. ``lambda t: accelerator.reduce(t, "mean")``). Used by KTO (z0) and BCO (δ); the default
    ``None`` means single process.

Every parameter is keyword-only. A parameter named in this vocabulary is data; every other one is
a hyperparameter set by the YAML. A generic loop passes ``{k: batch[k] for k in signature if k in
batch}`` (``DATA_ARGS[kind]`` lists the names); optional data (default ``None``) may be omitted.

Return type: :class:`LossOutput` (``losses`` [B] per example: the batch loss is ``losses.mean()``).

Loop-facing YAML flags (``conf/loss/<name>.yaml``)
--------------------------------------------------
name                str, equals the file name
kind                pairwise | ranked | unpaired | sft | reward | reward_ranked | policy: which
                    collator/forward to use
needs_reference     bool: the loop must supply reference_* log-probs (frozen model or cache)
length_normalised   bool: policy_*/reference_* log-probs are per-token means (true) or sums (false)
paper               str: citation
fn                  ``_target_`` + ``_partial_: true`` + hyperparameters (paper defaults)
needs_nll           optional bool: the loop must supply chosen_nll (pairwise) / nll (listwise)
needs_kl_pairs      optional bool: the loop must run the no-grad forward on mismatched pairs and
                    pass policy_kl_logps / reference_kl_logps (KTO); pass ``reduce`` when distributed
needs_scores        optional bool: the data must carry score_chosen / score_rejected (ODPO)
needs_logits        optional bool: pass full logits [B, T, V] + target_ids instead of log-probs (Cringe)
needs_safety_labels optional bool: the data must carry safe_chosen / safe_rejected (cost model)
joint_distribution  optional bool: score the prompt tokens too, ℓ = log π(x) + log π(y|x) (DOVE)
distinct_prompts    optional bool: a pair may carry its rejected side's own prompt (`prompt_rejected`, DOVE);
                    losses without it refuse such rows
needs_prompt_embeddings  optional bool: the loop embeds every row's prompt with `embedding_model` (a
                    frozen encoder, mean-pooled, L2-normalised) and passes prompt_embeddings (Relative PO)
embedding_model     optional str: the encoder for needs_prompt_embeddings (a hub id or a local folder)
needs_reward_cost   optional bool: pairs must carry reward_chosen / reward_rejected / cost_chosen /
                    cost_rejected (C-DPO)
stateful            optional str, ``running_mean``: the loop owns one :class:`RunningMean`, passes it
                    as ``running_mean`` every step, saves ``state_dict()`` with each checkpoint and
                    restores it on resume (BCO)
"""

from __future__ import annotations

from train.losses._core import LossOutput, Reduce
from train.losses.bco import RunningMean

__all__ = ["DATA_ARGS", "LossOutput", "Reduce", "RunningMean"]


_PAIR = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
# Names that are data or runtime objects, per YAML kind; every other keyword is a hyperparameter.
DATA_ARGS: dict[str, tuple[str, ...]] = {
    "pairwise": _PAIR
    + (
        "chosen_nll",
        "chosen_lengths",
        "rejected_lengths",
        "score_chosen",
        "score_rejected",
        "p_chosen",
        "sft_target_logps",
        "running_mean",
        "reduce",
        "prompt_embeddings",
        "reward_chosen",
        "reward_rejected",
        "cost_chosen",
        "cost_rejected",
    ),
    "ranked": ("policy_logps", "reference_logps", "lengths", "scores", "mask", "nll"),
    "unpaired": (
        "policy_logps",
        "reference_logps",
        "labels",
        "policy_kl_logps",
        "reference_kl_logps",
        "kl",
        "running_mean",
        "fixed_delta",
        "density_ratio",
        "reduce",
        "logits",
        "target_ids",
        "token_mask",
        "generator",
        "prompt_embeddings",
    ),
    "sft": ("token_logps", "token_mask"),
    "reward": (
        "rewards_chosen",
        "rewards_rejected",
        "margin",
        "costs_chosen",
        "costs_rejected",
        "safe_chosen",
        "safe_rejected",
        "score_chosen",
        "score_rejected",
        "chosen_nll",
        "chosen_logps",
    ),
    "reward_ranked": ("rewards", "scores", "mask"),
    "policy": (
        "logps",
        "old_logps",
        "advantages",
        "mask",
        "ref_logps",
        "total_tokens",
        "total_sequences",
        "kl_coef",
        "kl_estimator",
        "kl_clamp",
        "is_weights",
    ),
}
