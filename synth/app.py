"""`synth` below Hydra: validate the composed config, build roles lazily, run the pipeline.

Everything here takes plain objects, so tests and the iterative training loops call `run(cfg)` (or
`run_config(SynthConfig)`) without Hydra.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from synth.errors import ConfigError
from synth.io import write_text_atomic
from synth.sources import SourceConfig, iter_source

SECRET_KEY = re.compile(r"(api_?key|token|secret|password|authorization)$", re.IGNORECASE)
REDACTED = "***REDACTED***"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name_or_path: str
    revision: str | None = None
    chat_template: str | None = None
    gguf_file: str | None = None  # a GGUF file inside name_or_path (synth/modelfiles.py)


class RoleConfig(BaseModel):
    """A model role (judge, attacker). Both null = reuse the policy backend itself."""

    model_config = ConfigDict(extra="forbid")
    llm: dict[str, Any] | None = None
    model: ModelConfig | None = None


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llm: dict[str, Any]
    model: ModelConfig
    pipeline: dict[str, Any]
    source: SourceConfig | None = None
    judge: RoleConfig = RoleConfig()
    attacker: RoleConfig = RoleConfig()
    constitution: str = "hhh_en"
    output_dir: str
    seed: int = 0
    chunk_size: int = 32
    cache: bool = True
    resume: bool = True
    progress: bool = True


def redact(obj: Any) -> Any:
    """Copy of a config tree with secret-looking values replaced (names of env vars are kept)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def validate(raw: dict[str, Any]) -> SynthConfig:
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def build_pipeline(pcfg: dict[str, Any]):
    """`pipeline:` group -> a Pipeline instance, its settings validated by the pipeline's Config."""
    from hydra.utils import get_class

    params = dict(pcfg)
    target = params.pop("_target_", None)
    if not target:
        raise ConfigError("pipeline config has no _target_ (pick one with pipeline=<name>)")
    cls = get_class(target)
    try:
        return cls(cls.Config.model_validate(params))
    except ValidationError as e:
        raise ConfigError(_one_line(e).replace("invalid config: ", "invalid config: pipeline.")) from None


def run_fingerprint(cfg: SynthConfig) -> str:
    """What must not change between a run and its resume (else outputs would mix two setups)."""
    keep = {
        "pipeline": cfg.pipeline,
        "model": cfg.model.model_dump(),
        "judge": cfg.judge.model.model_dump() if cfg.judge.model else None,
        "attacker": cfg.attacker.model.model_dump() if cfg.attacker.model else None,
        "constitution": cfg.constitution,
        "seed": cfg.seed,
        "source": cfg.source.model_dump(exclude={"limit"}) if cfg.source else None,
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(out_dir: Path, cfg: SynthConfig) -> None:
    marker = out_dir / ".run.json"
    fp = run_fingerprint(cfg)
    if marker.exists() and cfg.resume:
        old = json.loads(marker.read_text())["fingerprint"]
        if old != fp:
            raise ConfigError(
                f"{out_dir} holds a run with different settings (pipeline/model/judge/constitution/seed/source); "
                "use another output_dir, or resume=false to start it over"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps({"fingerprint": fp}) + "\n")


def make_context(cfg: SynthConfig, out_dir: Path):
    from synth.constitution import load_constitution
    from synth.llm import build_llm
    from synth.pipelines.base import Context

    cache = out_dir / "cache.sqlite" if cfg.cache else None
    constitution = load_constitution(cfg.constitution)
    ctx = Context(factories={}, constitution=constitution, seed=cfg.seed)

    def role(rc: RoleConfig):
        if rc.llm is None and rc.model is None:
            return lambda: ctx.llm("policy")
        llm = rc.llm or cfg.llm
        model = (rc.model or cfg.model).model_dump()
        return lambda: build_llm(llm, model, cache_path=cache)

    policy_model = cfg.model.model_dump()
    ctx.factories.update(
        policy=lambda: build_llm(cfg.llm, policy_model, cache_path=cache),
        target=lambda: ctx.llm("policy"),
        judge=role(cfg.judge),
        attacker=role(cfg.attacker),
    )
    return ctx


def run_config(cfg: SynthConfig, resolved_yaml: str | None = None) -> dict[str, Any]:
    from synth.constitution import load_constitution
    from synth.pipelines.base import run_pipeline

    pipeline = build_pipeline(cfg.pipeline)  # validates pipeline settings before any model loads
    load_constitution(cfg.constitution)  # a bad name or file fails here, before any model loads
    out_dir = Path(cfg.output_dir).expanduser()
    check_resumable(out_dir, cfg)
    if resolved_yaml is not None:
        write_text_atomic(out_dir / "config.yaml", resolved_yaml)
    ctx = make_context(cfg, out_dir)
    source = iter_source(cfg.source) if (cfg.source is not None and pipeline.needs_source) else None
    return run_pipeline(pipeline, ctx, out_dir, source, cfg.chunk_size, cfg.resume, cfg.progress)


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(dcfg, DictConfig):
        raw = OmegaConf.to_container(dcfg, resolve=True, throw_on_missing=False)
        _check_missing(dcfg)
    else:
        raw = dict(dcfg)
    cfg = validate(raw)
    resolved = OmegaConf.to_yaml(OmegaConf.create(redact(raw)))
    return run_config(cfg, resolved)


def _check_missing(dcfg) -> None:
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)} (set them on the command line, e.g. {missing[0]}=...)")
