"""`synth` below Hydra: validate the composed config, build roles lazily, run the pipeline.

Everything here takes plain objects, so tests and the iterative training loops call `run(cfg)` (or
`run_config(SynthConfig)`) without Hydra.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.constitution import load_constitution
from synth.errors import ConfigError
from synth.io import check_output_dir, write_text_atomic
from synth.lease import LeaseConfig
from synth.llm import build_llm, check_llm, require_prefill
from synth.merge import find_shards, merge_shards
from synth.pipelines.base import Context, run_pipeline
from synth.secrets import redact_config
from synth.shard import Shard, ShardedPipeline, check_shard_count
from synth.sources import SkipLog, SourceConfig, SourceStream


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
    preset: str = "default"  # conf/preset/<name>.yaml: settings by model size, already merged into `pipeline`
    output_dir: str
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(32, ge=1)
    chunks_in_flight: int = Field(0, ge=0)  # 0 = auto (see chunks_in_flight())
    cache: bool = True
    resume: bool = True
    progress: bool = True
    shard: str | None = None  # "i/n": run only the items whose id hashes to i (synth/shard.py)
    merge: bool = False  # merge output_dir/shards/* into output_dir (synth/merge.py)
    launcher: dict[str, Any] | None = None  # launcher=local|ray|slurm: run every shard, then merge (synth/launch/)
    lease: LeaseConfig = LeaseConfig()  # one writer per run folder, fenced, also on NFS/Lustre (synth/lease.py)


def redact(obj: Any) -> Any:
    """Copy of a config tree fit to save beside the outputs (synth.secrets.redact_config)."""
    return redact_config(obj)


def validate(raw: dict[str, Any]) -> SynthConfig:
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def one_line(e: ValidationError) -> str:
    """A pydantic ValidationError as one line: `invalid config: <dotted.key>: <problem>; ...`."""
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
        raise ConfigError(one_line(e).replace("invalid config: ", "invalid config: pipeline.")) from None


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
    if cfg.shard is not None:  # shards of another n hold other items: never resumed as these
        from synth.shard import Shard

        keep["shards"] = Shard.parse(cfg.shard).count  # type: ignore[union-attr]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(out_dir: Path, cfg: SynthConfig) -> None:
    """Refuse to resume a folder that holds a run with other settings (read-only: writes nothing)."""
    marker = out_dir / ".run.json"
    if marker.exists() and cfg.resume:
        try:
            old = json.loads(marker.read_text())["fingerprint"]
        except (ValueError, KeyError):
            old = None  # a damaged marker: the outputs' ledger still decides what is done
        if old is not None and old != run_fingerprint(cfg):
            raise ConfigError(
                f"{out_dir} holds a run with different settings (pipeline/model/judge/constitution/seed/source); "
                "use another output_dir, or resume=false to start it over"
            )


def mark_run(out_dir: Path, cfg: SynthConfig, resolved_yaml: str | None) -> None:
    """Called by the runner once every input is validated, just before outputs are (re)started."""
    write_text_atomic(out_dir / ".run.json", json.dumps({"fingerprint": run_fingerprint(cfg)}) + "\n")
    if resolved_yaml is not None:
        write_text_atomic(out_dir / "config.yaml", resolved_yaml)


def check_roles(cfg: SynthConfig) -> None:
    """Validate every role's backend and model settings now, before any folder is touched or any model
    is loaded (a role left as `policy` reuses the policy's settings)."""
    check_llm(cfg.llm, cfg.model.model_dump(), "llm")
    for name in ("judge", "attacker"):
        rc: RoleConfig = getattr(cfg, name)
        if rc.llm is not None or rc.model is not None:
            check_llm(rc.llm or cfg.llm, (rc.model or cfg.model).model_dump(), f"{name}.llm")


def check_prefill(cfg: SynthConfig, pipeline) -> None:
    """For each role the pipeline reads labels from after an assistant prefill (`prefill_roles`) and that
    is a server (llm=openai): probe it now, before any folder is touched, so that a server without
    prefill (llama.cpp) is refused in one line before any work. In-process backends always continue."""

    for role in pipeline.prefill_roles():
        rc = getattr(cfg, role, None)
        llm = (rc.llm if isinstance(rc, RoleConfig) else None) or cfg.llm
        model = (rc.model if isinstance(rc, RoleConfig) else None) or cfg.model
        if llm.get("kind") == "openai":
            backend = build_llm(llm, model.model_dump())  # no call cache: nothing is written
            try:
                require_prefill(backend)
            finally:
                backend.close()


def make_context(cfg: SynthConfig, out_dir: Path, build_llm=None):
    """`build_llm(llm, model, cache_path=...)` defaults to synth.llm.build_llm (the Ray launcher passes one
    that reuses an actor's loaded backends across shards)."""

    if build_llm is None:
        from synth.llm import build_llm

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


def run_config(cfg: SynthConfig, resolved_yaml: str | None = None, build_llm=None) -> dict[str, Any]:
    """Validate everything (pipeline settings, constitution, every role's backend settings, the output
    folder), then let the runner lock the folder and read the whole source before anything already in
    the folder is reset or rewritten."""
    from synth.constitution import load_constitution

    pipeline = build_pipeline(cfg.pipeline)  # validates pipeline settings before any model loads
    # a bad name or file, or one that lacks what the pipeline needs, fails here, before any model loads
    pipeline.check_constitution(load_constitution(cfg.constitution))
    check_roles(cfg)
    check_prefill(cfg, pipeline)  # a server behind a label role: one probe request
    out_dir = Path(cfg.output_dir).expanduser()
    if cfg.launcher is not None:
        from synth.launch import launch

        return launch(cfg, resolved_yaml)
    if cfg.merge:
        return merge_config(cfg)
    shard = Shard.parse(cfg.shard)  # "i/n": this run is one shard of n (synth/shard.py)
    on_start = [lambda: mark_run(out_dir, cfg, resolved_yaml)]
    if shard is not None:
        from synth.merge import write_shard_info

        check_shard_count(out_dir, shard)
        out_dir, pipeline = shard.folder(out_dir), ShardedPipeline(pipeline, shard)
        on_start.append(
            lambda: write_shard_info(out_dir, shard, run_fingerprint(cfg), cfg.pipeline, cfg.constitution, cfg.seed)
        )
    check_output_dir(out_dir)
    check_resumable(out_dir, cfg)
    ctx = make_context(cfg, out_dir, build_llm)
    skipped = SkipLog()
    source = SourceStream(cfg.source, skipped) if (cfg.source is not None and pipeline.needs_source) else None
    return run_pipeline(
        pipeline,
        ctx,
        out_dir,
        source,
        cfg.chunk_size,
        cfg.resume,
        cfg.progress,
        on_start=lambda: [f() for f in on_start],
        source_report=skipped.report,
        chunks_in_flight=chunks_in_flight(cfg, pipeline.roles),
        lease=cfg.lease,
    )


def merge_config(cfg: SynthConfig) -> dict[str, Any]:
    """`synth ... merge=true`: merge output_dir/shards/* after checking they ran with these settings."""

    if cfg.shard is not None:
        raise ConfigError("merge=true merges every shard of output_dir; drop shard=")
    out_dir = Path(cfg.output_dir).expanduser()
    n, _ = find_shards(out_dir)
    expected = run_fingerprint(cfg.model_copy(update={"shard": f"0/{n}"}))
    return merge_shards(out_dir, expected, cfg.progress)


def chunks_in_flight(cfg: SynthConfig, roles: tuple[str, ...] = ("policy", "judge", "attacker")) -> int:
    """0 (auto): 1 when any role the pipeline calls (`Pipeline.roles`) runs on hf (one batch at a time is
    all it can use); with a vllm role, enough chunks for VLLM_ITEMS_IN_FLIGHT items, whose concurrent stage
    calls become one engine call (synth.llm.merge); when every such role is a server, enough chunks to keep
    twice the largest server concurrency busy: ceil(2 * C / chunk_size). At most 64. A judge or attacker
    the pipeline never calls does not count."""
    own = [
        rc.llm
        for name, rc in (("judge", cfg.judge), ("attacker", cfg.attacker))
        if name in roles and rc.llm is not None
    ]
    return auto_chunks_in_flight(cfg.chunks_in_flight, [cfg.llm, *own], cfg.chunk_size)


# vLLM's offline engine: items whose stage calls are merged into one engine call (32 chunks of 32). vLLM's
# default max_num_seqs for `LLM` is 1024 on GPUs with >= 70 GiB and 256 on smaller ones (EngineArgs batch
# defaults); a stage has at least one request per item, so the engine's batch stays full on both.
VLLM_ITEMS_IN_FLIGHT = 1024


def auto_chunks_in_flight(setting: int, llms: list[dict[str, Any]], chunk_size: int) -> int:
    """`setting` when it is not 0 (auto), else the rule of `chunks_in_flight` over the roles' `llms`."""
    if setting:
        return setting
    kinds = {llm.get("kind") for llm in llms}
    if kinds - {"openai", "vllm"}:
        return 1
    if "vllm" in kinds:
        return max(1, min(64, -(-VLLM_ITEMS_IN_FLIGHT // chunk_size)))
    conc = [int(llm.get("max_concurrency", 64)) for llm in llms]
    return max(1, min(64, -(-2 * max(conc) // chunk_size)))


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    raw, resolved = plain_config(dcfg)
    return run_config(validate(raw), resolved)


def plain_config(dcfg) -> tuple[dict[str, Any], str]:
    """What every entry point (synth, train, evaluate) starts with: a Hydra DictConfig (its required
    values checked) or a plain dict -> (the plain dict, the redacted YAML to save beside the outputs)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(dcfg, DictConfig):
        check_missing(dcfg)
        raw = OmegaConf.to_container(dcfg, resolve=True, throw_on_missing=False)
    else:
        raw = dict(dcfg)
    return raw, OmegaConf.to_yaml(OmegaConf.create(redact(raw)))


def check_missing(dcfg) -> None:
    """Required values left as `???` -> one ConfigError naming them."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)} (set them on the command line, e.g. {missing[0]}=...)"
        )
