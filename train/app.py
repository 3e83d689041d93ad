"""`train` below Hydra: validate the composed config, then hand it to the loop it names.

Everything here takes plain objects, so tests and the iterative loops call `run(dict)` (or
`run_config(TrainConfig)`) without Hydra. The schema mirrors conf/train.yaml and conf/loop/*.yaml;
unknown keys are rejected with one line naming them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synth.app import ConfigError, one_line, plain_config
from synth.io import OutputLock


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name_or_path: str
    revision: str | None = None
    chat_template: str | None = None  # a Jinja string overriding the tokenizer's template
    gguf_file: str | None = None  # a GGUF file inside name_or_path; folded into it below

    @model_validator(mode="after")
    def _fold_gguf(self) -> ModelConfig:
        """`name_or_path=<folder> gguf_file=<f>.gguf` -> `name_or_path=<folder>/<f>.gguf`: every loader
        reads a `.gguf` name as that file in that folder (synth/modelfiles.py)."""
        if self.gguf_file:
            self.name_or_path, self.gguf_file = f"{self.name_or_path.rstrip('/')}/{self.gguf_file}", None
        return self


class DataConfig(_Strict):
    path: str
    split: str = "train"
    eval_path: str | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    limit: int | None = Field(None, ge=1)
    max_length: int | None = Field(1024, ge=2)
    max_prompt_length: int | None = Field(None, ge=1)
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"
    assistant_turns: Literal["all", "last"] = "all"
    drop_overlong: bool = False

    @model_validator(mode="after")
    def _prompt_fits(self):
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        return self


class LoraConfig(_Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    init_adapter: str | None = None  # start from this saved LoRA adapter (trainable), e.g. the previous round's


class OptimConfig(_Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-7, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    release_memory: bool = False  # glibc: freed blocks >= 1 MiB go back to the system (train.loops.common)
    packing: bool = True


class CheckpointConfig(_Strict):
    every_steps: int = Field(500, ge=0)
    keep_last: int = Field(2, ge=1)
    final: bool = True  # a resumable checkpoint (optimizer, scheduler, RNG) at the end too, beside final/
    stop_after_steps: int | None = Field(None, ge=1)


class EvalConfig(_Strict):
    every_steps: int = Field(0, ge=0)
    batch_size: int | None = Field(None, ge=1)


class LogConfig(_Strict):
    every_steps: int = Field(1, ge=1)
    tensorboard: bool = True
    plot: bool = True


class LossSpec(_Strict):
    """A conf/loss YAML: the loop-facing flags documented in train/losses/__init__.py."""

    name: str
    kind: Literal["pairwise", "ranked", "unpaired", "sft", "reward", "reward_ranked", "policy"]
    needs_reference: bool = False
    length_normalised: bool = False
    paper: str | None = None
    fn: dict[str, Any]
    needs_nll: bool = False
    needs_kl_pairs: bool = False
    needs_scores: bool = False
    needs_logits: bool = False
    needs_safety_labels: bool = False
    stateful: Literal["running_mean"] | None = None
    joint_distribution: bool = False
    distinct_prompts: bool = False
    needs_prompt_embeddings: bool = False
    embedding_model: str | None = None
    needs_reward_cost: bool = False

    @model_validator(mode="after")
    def _encoder(self):
        if self.needs_prompt_embeddings and not self.embedding_model:
            raise ValueError(
                f"loss={self.name} needs prompt embeddings: set loss.embedding_model (an encoder id or folder)"
            )
        return self


class ReferenceConfig(_Strict):
    mode: Literal["auto", "precomputed", "adapter_disabled", "model"] = "auto"
    name_or_path: str | None = None
    batch_size: int | None = Field(None, ge=1)
    cache_dir: str | None = None
    update: Literal["none", "tr_dpo_soft", "tr_dpo_hard"] = "none"
    mixup_alpha: float = Field(0.6, ge=0.0, le=1.0)
    sync_steps: int = Field(512, ge=1)


class SFTLoop(_Strict):
    name: Literal["sft"]


class PreferenceLoop(_Strict):
    name: Literal["preference"]
    reference: ReferenceConfig = ReferenceConfig()
    sdpo_stages: int = Field(1, ge=1)
    curriculum: Literal["none", "curry"] = "none"
    curriculum_stages: int = Field(3, ge=1)


class RewardLoop(_Strict):
    name: Literal["reward"]
    use_margin: bool = True
    safe_chosen_field: str = "safe_chosen"
    safe_rejected_field: str = "safe_rejected"


class KLSettings(_Strict):
    """KL to the reference: its estimator and where it acts are explicit (train/advantages.py)."""

    coef: float = Field(0.0, ge=0)  # β; 0 loads no reference model (initial β when adaptive)
    placement: Literal["reward", "loss"] = "reward"
    estimator: Literal["k1", "k2", "k3", "k3_ratio"] = "k1"
    clamp: float | None = Field(10.0, gt=0)  # each per-token estimate bounded to ±clamp (OpenRLHF)
    adaptive: bool = False  # Ziegler et al. 2019 controller on β
    target_per_sequence_nats: float = Field(6.0, gt=0)  # unit: batch mean of the sequence-summed k1 KL, nats
    horizon: int = Field(10_000, ge=1)


class JudgeSettings(_Strict):
    """An AI judge through a synth backend (conf/llm + conf/model blocks) or a `module:function` factory
    returning one (a custom backend; tests script one)."""

    llm: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    factory: str | None = None
    language: str = "en"
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    cache_path: str | None = None

    @model_validator(mode="after")
    def _one_backend(self):
        if (self.factory is None) == (not self.llm):
            raise ValueError("give exactly one of judge.llm (a backend block) or judge.factory (module:function)")
        return self


class ScorerSettings(_Strict):
    """What scores a completion, in one batched call per step. NaN = unscorable (zero advantage).
    kind=weighted: Σ_i weight_i · (s_i − shift_i) / scale_i over `components` (e.g. helpful + harmless
    reward models), one scorer to the loop; unscorable when any component is."""

    kind: Literal["function", "model", "judge", "weighted"] = "function"
    function: str | None = None  # module:function(prompts=, completions=, completion_ids=) -> list[float | None]
    path: str | None = None  # a `train loop=reward` output (final/ folder: full model or LoRA adapter)
    batch_size: int = Field(16, ge=1)  # reward-model forward chunk
    judge: JudgeSettings | None = None  # kind=judge: rubric 1-10 score (pairwise labels for online_dpo)
    components: list[WeightedComponent] | None = None  # kind=weighted

    @model_validator(mode="after")
    def _fields(self):
        need = {"function": "function", "model": "path", "judge": "judge", "weighted": "components"}[self.kind]
        if not getattr(self, need):
            raise ValueError(f"a scorer of kind {self.kind} needs `{need}`")
        if self.components and self.kind != "weighted":
            raise ValueError(f"`components` belong to a scorer of kind weighted, not {self.kind}")
        return self


class WeightedComponent(_Strict):
    """One term of a weighted scorer: weight · (score − shift) / scale (shift/scale put reward models with
    different ranges on one scale, e.g. their mean and std on the SFT policy's samples, frozen)."""

    scorer: ScorerSettings
    weight: float = Field(1.0, gt=-1e9, lt=1e9)  # negative: a cost (e.g. harmfulness) subtracted
    shift: float = 0.0
    scale: float = Field(1.0, gt=0)


ScorerSettings.model_rebuild()


class GenerationSettings(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1)  # vllm
    sleep_level: Literal[0, 1, 2] = 2  # vllm: 0 keeps the engine awake
    lora_sync: Literal["merged", "adapter"] = "merged"  # vllm under LoRA
    enforce_eager: bool = False  # vllm: no torch.compile / CUDA graphs (starts in seconds, decodes slower)
    # vllm: tolerance of the probe after each sync (mean |Δ log p| vLLM vs trainer); None: 1e-3 in float32, 0.05
    # in bfloat16 (not measured on a GPU)
    probe_tol: float | None = Field(None, gt=0)
    # vllm rollouts: train/inference mismatch correction (train.advantages.sampler_is_weights): token-level tis
    # (truncate) / token_mask, sequence-level seq_truncate / seq_mask, each bounded by [is_min, is_cap]; TRL 1.16's
    # default is seq_mask at 3.0 with no lower bound. Inert with backend=hf (the trainer samples: no mismatch)
    is_correction: Literal["none", "tis", "token_mask", "seq_truncate", "seq_mask"] = "seq_mask"
    is_cap: float = Field(3.0, gt=0)
    is_min: float | None = Field(None, ge=0)  # the lower bound (None: none)

    @model_validator(mode="after")
    def _is_bounds(self) -> GenerationSettings:
        if self.is_min is not None and self.is_min >= self.is_cap:
            raise ValueError(f"loop.generation.is_min={self.is_min:g} must be below is_cap={self.is_cap:g}")
        return self


class CriticSettings(_Strict):
    """PPO value function: a scalar head on every token with its own optimizer. kind `separate`: a separate
    model initialised from the reward model (`init_from: reward`) or the policy's weights (`policy`);
    `adapter`: a second LoRA adapter (+ head) on the policy's own frozen base (LoRA only; its head starts
    from the reward model's score head under `init_from: reward`, else from zero); `auto`: adapter under
    LoRA, separate for full fine-tuning."""

    kind: Literal["auto", "separate", "adapter"] = "auto"
    init_from: Literal["reward", "policy"] = "reward"
    lora_r: int | None = Field(None, ge=1)  # kind adapter: the critic adapter's rank (None: lora.r)
    lora_alpha: float | None = Field(None, gt=0)  # (None: lora.alpha)
    lr: float = Field(5e-6, gt=0)
    value_clip: float | None = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)  # rollouts during which only the critic learns


class LagrangianSettings(_Strict):
    """Safe-RLHF PPO-Lagrangian multiplier (safe-rlhf ppo_lag defaults of scripts/ppo-lag.sh)."""

    cost_threshold: float = Field(0.0, gt=-1e9, lt=1e9)  # any finite value (costs may be negative)
    lambda_init: float = Field(1.0, gt=0)
    lambda_lr: float = Field(0.1, gt=0)
    lambda_max: float | None = Field(5.0, gt=0)
    window: int = Field(128, ge=1)  # episode costs averaged for J̄_C
    delay_steps: int = Field(0, ge=0)
    token_clip: float | None = Field(50.0, gt=0)  # shaped per-token reward and cost clip


class OnlineLoop(_Strict):
    name: Literal["ppo", "rloo", "remax", "grpo", "ppo_lag", "online_dpo"]
    estimator: Literal["gae", "reinforce_pp", "reinforce_pp_baseline", "rloo", "grpo", "dr_grpo", "remax", "pairs"]
    prompts_per_step: int = Field(8, ge=1)  # P, over all processes
    samples_per_prompt: int = Field(4, ge=1)  # n
    mini_batches: int = Field(1, ge=1)  # optimizer steps per pass over a rollout
    epochs_per_rollout: int = Field(1, ge=1)  # passes over a rollout (μ)
    generation: GenerationSettings = GenerationSettings()
    kl: KLSettings = KLSettings()
    reward: ScorerSettings
    cost: ScorerSettings | None = None  # ppo_lag
    critic: CriticSettings = CriticSettings()
    lagrangian: LagrangianSettings = LagrangianSettings()
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo estimator
    whiten_advantages: bool = False  # token advantages whitened over the rollout (gae, reinforce_pp*)
    score_clip: float | None = Field(None, gt=0)  # clip scores to ±score_clip
    missing_eos_penalty: float | None = Field(None, ge=0)  # subtracted from the score of a truncated completion
    overlong_buffer: int | None = Field(None, ge=1)  # DAPO soft overlong penalty over the last B tokens
    overlong_factor: float = Field(1.0, ge=0)
    mask_truncated_completions: bool = False  # DAPO / TRL: completions without EOS get no policy loss
    normalize_reward: Literal["none", "affine", "scale", "translate"] = (
        "none"  # running mean/std (safe-rlhf Normalizer)
    )
    normalize_cost: Literal["none", "affine", "scale", "translate"] = "none"  # ppo_lag cost scorer, same normaliser
    normalize_eps: float = Field(1e-8, gt=0, le=1.0)  # (x - mean) / (std + eps)
    entropy_coef: float = Field(0.0, ge=0)  # entropy bonus, aggregated as the policy loss (off: verl PR#781)
    reference: Literal["auto", "adapter_disabled", "model"] = "auto"

    @model_validator(mode="after")
    def _buffer_fits(self):
        if self.overlong_buffer is not None and self.overlong_buffer > self.generation.max_new_tokens:
            raise ValueError(
                f"overlong_buffer ({self.overlong_buffer}) must be <= generation.max_new_tokens "
                f"({self.generation.max_new_tokens})"
            )
        return self


LOOP_KINDS = {
    "sft": ("sft",),
    "preference": ("pairwise", "ranked", "unpaired"),
    "reward": ("reward", "reward_ranked"),
    "ppo": ("policy",),
    "rloo": ("policy",),
    "remax": ("policy",),
    "grpo": ("policy",),
    "ppo_lag": ("policy",),
    "online_dpo": ("pairwise",),
}
ONLINE_LOOPS = ("ppo", "rloo", "remax", "grpo", "ppo_lag", "online_dpo")
ESTIMATORS = {
    "ppo": ("gae",),
    "ppo_lag": ("gae",),
    "remax": ("remax",),
    "rloo": ("rloo",),
    "grpo": ("grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"),
    "online_dpo": ("pairs",),
}
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")


class TrainConfig(_Strict):
    model: ModelConfig
    loop: SFTLoop | PreferenceLoop | RewardLoop | OnlineLoop = Field(discriminator="name")
    loss: LossSpec
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    output_dir: str
    seed: int = Field(0, ge=0)
    resume: bool = False
    progress: bool = True


def validate(raw: dict[str, Any]) -> TrainConfig:
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None
    check_combination(cfg)
    return cfg


def check_combination(cfg: TrainConfig) -> None:
    """Settings that are each valid but do not fit together: one line naming both."""
    kinds = LOOP_KINDS[cfg.loop.name]
    if cfg.loss.kind not in kinds:
        fitting = {
            "sft": "loss=sft",
            "reward": "a reward-model loss (bradley_terry, cost, pointwise, bradley_terry_lm, listwise_bt, "
            "plackett_luce)",
            "online_dpo": "a pairwise (DPO-family) loss",
        }.get(
            cfg.loop.name,
            "a policy loss (loss=ppo, grpo, dr_grpo, rloo, remax)"
            if cfg.loop.name in ONLINE_LOOPS
            else "a pairwise, ranked or unpaired loss",
        )
        raise ConfigError(
            f"loss={cfg.loss.name} is a {cfg.loss.kind} objective; loop={cfg.loop.name} trains {fitting} "
            f"(use loop={next(k for k, v in LOOP_KINDS.items() if cfg.loss.kind in v)} for loss={cfg.loss.name})"
        )
    if isinstance(cfg.loop, OnlineLoop):
        check_online(cfg)
    if isinstance(cfg.loop, PreferenceLoop):
        ref = cfg.loop.reference
        if ref.mode == "adapter_disabled" and not cfg.lora.enabled:
            raise ConfigError(
                "loop.reference.mode=adapter_disabled needs LoRA (lora.enabled=true); "
                "use precomputed or model for full fine-tuning"
            )
        if ref.update != "none":
            if cfg.lora.enabled:
                raise ConfigError(
                    f"loop.reference.update={ref.update} (TR-DPO) mixes full parameters; it needs full "
                    "fine-tuning (lora.enabled=false)"
                )
            if not cfg.loss.needs_reference:
                raise ConfigError(
                    f"loop.reference.update={ref.update} has no effect: loss={cfg.loss.name} uses no reference"
                )
            if ref.mode not in ("auto", "model"):
                raise ConfigError(
                    f"loop.reference.update={ref.update} (TR-DPO) needs loop.reference.mode=model "
                    f"(a live reference to update), not {ref.mode}"
                )
            if cfg.loop.sdpo_stages > 1 or cfg.loop.curriculum != "none":
                raise ConfigError(
                    "TR-DPO (loop.reference.update) cannot be combined with sdpo_stages/curriculum stages"
                )
        staged = cfg.loop.sdpo_stages > 1 or cfg.loop.curriculum != "none"
        if staged and cfg.loss.kind != "pairwise":
            raise ConfigError(
                f"loop.sdpo_stages / loop.curriculum stage pairwise data; loss={cfg.loss.name} is {cfg.loss.kind}"
            )
        if staged and ref.mode in ("adapter_disabled", "model"):
            raise ConfigError(
                f"sDPO/Curry-DPO stages use the previous stage's policy as reference: they need "
                f"loop.reference.mode=precomputed or auto, not {ref.mode}"
            )
        if cfg.loss.needs_prompt_embeddings and cfg.optim.batch_size < 2:
            raise ConfigError(
                f"loss={cfg.loss.name} contrasts the rows of a micro-batch with each other: "
                "optim.batch_size must be >= 2 (with 1 it is plain DPO)"
            )
        if cfg.loss.needs_kl_pairs and cfg.optim.batch_size < 2:
            raise ConfigError(
                f"loss={cfg.loss.name} estimates its KL term from mismatched pairs within a micro-batch: "
                "optim.batch_size must be >= 2"
            )


def check_online(cfg: TrainConfig) -> None:
    """Online settings that do not fit together (specs: OpenRLHF/TRL/verl refuse the same at start-up).
    The group-integrity checks that need the process count run again in train/loops/online.py."""
    loop, kl, fn = cfg.loop, cfg.loop.kl, cfg.loss.fn
    name = loop.name
    if loop.estimator not in ESTIMATORS[name]:
        raise ConfigError(
            f"loop.estimator={loop.estimator} does not fit loop={name} (valid: {', '.join(ESTIMATORS[name])})"
        )
    if loop.estimator in GROUP_ESTIMATORS and loop.samples_per_prompt < 2:
        raise ConfigError(
            f"loop.estimator={loop.estimator} needs a group: loop.samples_per_prompt must be >= 2 "
            f"(got {loop.samples_per_prompt})"
        )
    if name == "online_dpo" and loop.samples_per_prompt != 2:
        raise ConfigError(
            f"loop=online_dpo samples two responses per prompt: set loop.samples_per_prompt=2 "
            f"(got {loop.samples_per_prompt})"
        )
    check_vllm(cfg)
    rollout = loop.prompts_per_step * loop.samples_per_prompt
    if rollout % loop.mini_batches:
        raise ConfigError(
            f"loop.prompts_per_step x loop.samples_per_prompt = {rollout} samples do not split into "
            f"loop.mini_batches={loop.mini_batches} equal mini-batches"
        )
    if cfg.optim.grad_accum != 1:
        raise ConfigError(
            "online loops accumulate micro-batches (optim.batch_size rows) up to a mini-batch "
            "(rollout / loop.mini_batches); set optim.grad_accum=1 and use loop.mini_batches"
        )
    if name == "online_dpo" and (loop.mask_truncated_completions or loop.normalize_reward != "none"):
        raise ConfigError(
            "loop=online_dpo labels pairs (no advantages): loop.mask_truncated_completions and "
            "loop.normalize_reward apply to the policy-gradient loops; use loop.missing_eos_penalty"
        )
    if loop.normalize_cost != "none" and name != "ppo_lag":
        raise ConfigError(
            f"loop.normalize_cost normalises the ppo_lag cost scorer; loop={name} has none (set it to none)"
        )
    if name == "online_dpo":
        if loop.reward.kind == "judge" and loop.reward.judge is None:
            raise ConfigError("loop=online_dpo with loop.reward.kind=judge needs loop.reward.judge")
        if kl.coef:
            raise ConfigError(
                "loop=online_dpo regularises through the DPO loss's beta (loss.fn.beta); set loop.kl.coef=0"
            )
        if not cfg.loss.needs_reference:
            raise ConfigError(
                f"loop=online_dpo (OAIF) trains against the fixed SFT reference: loss={cfg.loss.name} "
                "uses none; use loss=dpo or loss=ipo"
            )
        if loop.entropy_coef:
            raise ConfigError("loop.entropy_coef is a policy-gradient bonus; loop=online_dpo has none (set it to 0)")
        return
    if kl.coef == 0 and kl.adaptive:
        raise ConfigError("loop.kl.adaptive=true needs an initial loop.kl.coef > 0")
    if kl.coef and kl.placement == "loss" and kl.estimator == "k1":
        raise ConfigError(
            "loop.kl.placement=loss with loop.kl.estimator=k1 has zero gradient in expectation; "
            "use k2, k3_ratio (reverse KL) or k3 (forward KL), or put k1 in the reward"
        )
    if kl.placement == "reward" and kl.estimator in ("k2", "k3_ratio"):
        raise ConfigError(f"loop.kl.estimator={kl.estimator} is a loss-side estimator; in the reward use k1 (or k3)")
    if kl.adaptive and kl.placement != "reward":
        raise ConfigError(
            "loop.kl.adaptive=true (Ziegler) controls the KL penalty in the reward: set loop.kl.placement=reward"
        )
    if name == "ppo_lag":
        if loop.cost is None:
            raise ConfigError(
                "loop=ppo_lag needs a cost scorer: loop.cost.kind=model loop.cost.path=<cost model> (or kind=function)"
            )
        if kl.coef and kl.placement != "reward":
            raise ConfigError(
                "loop=ppo_lag puts the KL in both reward and cost streams (±β, λ-neutral): set loop.kl.placement=reward"
            )
    elif loop.cost is not None:
        raise ConfigError(f"loop.cost is used by loop=ppo_lag only, not loop={name}")
    if loop.critic.kind == "adapter" and not cfg.lora.enabled:
        raise ConfigError(
            "loop.critic.kind=adapter puts the critic on the policy's frozen base as a second LoRA adapter: "
            "set lora.enabled=true, or use loop.critic.kind=separate (or auto) for full fine-tuning"
        )
    if kl.coef and kl.placement == "loss" and not _takes(fn.get("_target_"), "ref_logps"):
        raise ConfigError(
            f"loss={cfg.loss.name} has no per-token KL term (sequence-level ratio): put the KL in the "
            "reward (loop.kl.placement=reward)"
        )
    if name == "remax" and (loop.epochs_per_rollout > 1 or loop.mini_batches > 1):
        raise ConfigError(
            "loop=remax is REINFORCE (strictly on-policy): loop.epochs_per_rollout and loop.mini_batches must be 1"
        )


def check_vllm(cfg: TrainConfig) -> None:
    """loop.generation.backend=vllm: settings that do not fit the colocated engine (train/vllm_colocate.py)."""
    gen, fn = cfg.loop.generation, cfg.loss.fn
    if gen.backend != "vllm":
        return
    if cfg.lora.enabled and gen.lora_sync == "adapter" and gen.sleep_level == 2:
        raise ConfigError(
            "loop.generation.lora_sync=adapter keeps the base weights inside vLLM, and sleep_level=2 discards "
            "them between steps: set loop.generation.sleep_level=1 (or 0)"
        )
    if cfg.loop.name == "online_dpo":  # a DPO loss has no ratio: the correction does not apply (inert)
        return
    if gen.is_correction != "none" and not _takes(fn.get("_target_"), "is_weights"):
        raise ConfigError(
            f"loop.generation.is_correction={gen.is_correction}: loss={cfg.loss.name} takes no is_weights; "
            "set loop.generation.is_correction=none or use a policy loss of train/losses/policy.py"
        )
    if gen.is_correction in ("tis", "token_mask") and not _takes(fn.get("_target_"), "ref_logps"):
        raise ConfigError(
            f"loop.generation.is_correction={gen.is_correction} weights tokens; loss={cfg.loss.name} has one ratio "
            "per sequence: use loop.generation.is_correction=seq_mask (or seq_truncate)"
        )


def _takes(target: str | None, name: str) -> bool:
    import inspect

    from hydra.utils import get_object

    try:
        return name in inspect.signature(get_object(target)).parameters
    except Exception:  # noqa: BLE001 - an unresolvable target is reported by instantiate_loss at start-up
        return True


def run_config(cfg: TrainConfig, resolved_yaml: str | None = None) -> dict[str, Any]:
    """Run the loop, its output folder locked for the whole run (one owner, as in synth). Under
    `accelerate launch` only the global rank 0 takes the lock: the other ranks share that run."""
    module = "online" if cfg.loop.name in ONLINE_LOOPS else cfg.loop.name
    loop = importlib.import_module(f"train.loops.{module}")
    from train.loops.common import return_freed_memory  # lazy: keeps torch out of train.app's import

    if cfg.optim.release_memory:
        return_freed_memory()  # freed activations leave the resident set (glibc; see its docstring)
    if int(os.environ.get("RANK", "0")) != 0:
        return loop.run(cfg, resolved_yaml=resolved_yaml)
    with OutputLock(Path(cfg.output_dir).expanduser()):
        return loop.run(cfg, resolved_yaml=resolved_yaml)


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    raw, resolved = plain_config(dcfg)
    return run_config(validate(raw), resolved)
