"""`train` below Hydra: validate the composed config, then hand it to the loop it names.

Everything here takes plain objects, so tests and the iterative loops call `run(dict)` (or
`run_config(TrainConfig)`) without Hydra. The schema mirrors conf/train.yaml and conf/loop/*.yaml;
unknown keys are rejected with one line naming them.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synth.app import ConfigError, _check_missing, _one_line, redact


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name_or_path: str
    revision: str | None = None
    chat_template: str | None = None  # a Jinja string overriding the tokenizer's template
    gguf_file: str | None = None  # a GGUF file inside name_or_path; folded into it below

    @model_validator(mode="after")
    def _fold_gguf(self) -> "ModelConfig":
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
    alpha: float = 32
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None


class OptimConfig(_Strict):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-7, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    packing: bool = True


class CheckpointConfig(_Strict):
    every_steps: int = Field(500, ge=0)
    keep_last: int = Field(2, ge=1)
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
    kind: Literal["pairwise", "listwise", "unpaired", "sft", "reward"]
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


LOOP_KINDS = {"sft": ("sft",), "preference": ("pairwise", "listwise", "unpaired"), "reward": ("reward",)}


class TrainConfig(_Strict):
    model: ModelConfig
    loop: SFTLoop | PreferenceLoop | RewardLoop = Field(discriminator="name")
    loss: LossSpec
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    output_dir: str
    seed: int = 0
    resume: bool = False
    progress: bool = True


def validate(raw: dict[str, Any]) -> TrainConfig:
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    check_combination(cfg)
    return cfg


def check_combination(cfg: TrainConfig) -> None:
    """Settings that are each valid but do not fit together: one line naming both."""
    kinds = LOOP_KINDS[cfg.loop.name]
    if cfg.loss.kind not in kinds:
        fitting = {"sft": "loss=sft", "reward": "loss=bradley_terry or loss=cost"}.get(cfg.loop.name, "a pairwise, listwise or unpaired loss")
        raise ConfigError(f"loss={cfg.loss.name} is a {cfg.loss.kind} objective; loop={cfg.loop.name} trains {fitting} "
                          f"(use loop={next(k for k, v in LOOP_KINDS.items() if cfg.loss.kind in v)} for loss={cfg.loss.name})")
    if isinstance(cfg.loop, PreferenceLoop):
        ref = cfg.loop.reference
        if ref.mode == "adapter_disabled" and not cfg.lora.enabled:
            raise ConfigError("loop.reference.mode=adapter_disabled needs LoRA (lora.enabled=true); "
                              "use precomputed or model for full fine-tuning")
        if ref.update != "none":
            if cfg.lora.enabled:
                raise ConfigError(f"loop.reference.update={ref.update} (TR-DPO) mixes full parameters; it needs full "
                                  "fine-tuning (lora.enabled=false)")
            if not cfg.loss.needs_reference:
                raise ConfigError(f"loop.reference.update={ref.update} has no effect: loss={cfg.loss.name} uses no reference")
            if ref.mode not in ("auto", "model"):
                raise ConfigError(f"loop.reference.update={ref.update} (TR-DPO) needs loop.reference.mode=model "
                                  f"(a live reference to update), not {ref.mode}")
            if cfg.loop.sdpo_stages > 1 or cfg.loop.curriculum != "none":
                raise ConfigError("TR-DPO (loop.reference.update) cannot be combined with sdpo_stages/curriculum stages")
        staged = cfg.loop.sdpo_stages > 1 or cfg.loop.curriculum != "none"
        if staged and cfg.loss.kind != "pairwise":
            raise ConfigError("loop.sdpo_stages / loop.curriculum stage pairwise data; "
                              f"loss={cfg.loss.name} is {cfg.loss.kind}")
        if staged and ref.mode in ("adapter_disabled", "model"):
            raise ConfigError(f"sDPO/Curry-DPO stages use the previous stage's policy as reference: they need "
                              f"loop.reference.mode=precomputed or auto, not {ref.mode}")
        if cfg.loss.needs_kl_pairs and cfg.optim.batch_size < 2:
            raise ConfigError(f"loss={cfg.loss.name} estimates its KL term from mismatched pairs within a micro-batch: "
                              "optim.batch_size must be >= 2")


def run_config(cfg: TrainConfig, resolved_yaml: str | None = None) -> dict[str, Any]:
    loop = importlib.import_module(f"train.loops.{cfg.loop.name}")
    return loop.run(cfg, resolved_yaml=resolved_yaml)


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(dcfg, DictConfig):
        _check_missing(dcfg)
        raw = OmegaConf.to_container(dcfg, resolve=True, throw_on_missing=False)
    else:
        raw = dict(dcfg)
    cfg = validate(raw)
    resolved = OmegaConf.to_yaml(OmegaConf.create(redact(raw)))
    return run_config(cfg, resolved)
