"""`synth ... launcher=local|ray|slurm launcher.shards=n`: run the n shards of one synth run, then merge.

Each shard is the ordinary exact-once run `synth ... shard=i/n` (synth/shard.py); a launcher only
decides where and when the n shard runs happen, and reruns are always safe (a finished shard returns at
once without backend calls, a partial one resumes from its ledger). Merge is synth/merge.py.

- `local`: the shards one after another in this process, then merge (tests, laptops, one node).
- `slurm`: renders an sbatch array script (one task per unfinished shard) and a merge job that depends
  on the array (`afterany`: the merge then names any shard that did not finish); prints them, or submits
  them with `submit=true`.
- `ray`: an actor pool over shard ids on a Ray cluster (optional extra `rlaif-forge[ray]`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import ConfigError
from synth.shard import Shard


class LocalLauncher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["local"] = "local"
    shards: int = Field(4, ge=1)  # n
    merge: bool = True  # merge once every shard has finished


class SlurmLauncher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["slurm"] = "slurm"
    shards: int = Field(64, ge=1)
    concurrent: int | None = Field(None, ge=1)  # array throttle: at most this many tasks at once (%k)
    submit: bool = False  # false: write + print the scripts; true: sbatch them (needs sbatch on PATH)
    script_dir: str | None = None  # default <output_dir>/slurm
    command: str = "synth"  # how a compute node starts synth (e.g. "/path/venv/bin/synth")
    job_name: str = "synth"
    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int = Field(4, ge=1)
    mem: str = "16G"
    gpus_per_task: int = Field(0, ge=0)  # 0 when the models are served elsewhere (llm=openai)
    setup: list[str] = []  # shell lines before synth in every job (module load ..., source venv/bin/activate)
    sbatch: list[str] = []  # more `#SBATCH` options, e.g. ["--qos=normal"]
    merge: bool = True


class RayLauncher(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["ray"] = "ray"
    shards: int = Field(16, ge=1)  # over-decompose: ~4-8 x actors, so a slow shard matters little
    actors: int = Field(2, ge=1)
    num_cpus: float = Field(0.5, gt=0)  # per actor; fractional so the pool cannot starve the driver
    num_gpus: float = Field(0, ge=0)  # per actor (llm=vllm in the actor: tp x pp)
    address: str | None = None  # null: start a local cluster; "auto" or ray://host:10001: join one
    init_num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local cluster (null: Ray's count)
    max_restarts: int = Field(3, ge=0)  # a dead actor is restarted and its shard retried (resumes mid-shard)
    temp_dir: str | None = None  # local cluster's session folder (null: Ray's default)
    merge: bool = True


LAUNCHERS = {"local": LocalLauncher, "slurm": SlurmLauncher, "ray": RayLauncher}


def launcher_config(raw: dict[str, Any]):
    kind = raw.get("kind")
    if kind not in LAUNCHERS:
        raise ConfigError(f"launcher.kind={kind!r}; valid: {', '.join(LAUNCHERS)} (launcher=local|ray|slurm)")
    try:
        return LAUNCHERS[kind].model_validate(raw)
    except ValidationError as e:
        from synth.app import one_line

        raise ConfigError(one_line(e).replace("invalid config: ", "invalid config: launcher.")) from None


def launch(cfg, resolved_yaml: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run every shard of `cfg` with its launcher; return the merged manifest (slurm: what was rendered)."""
    if cfg.shard is not None or cfg.merge:
        raise ConfigError("launcher= runs every shard and the merge itself; drop shard= / merge=")
    lc = launcher_config(cfg.launcher)
    base = cfg.model_copy(update={"launcher": None})
    if lc.kind == "local":
        from synth.launch.local import run_local

        return run_local(base, lc, resolved_yaml)
    if lc.kind == "slurm":
        from synth.launch.slurm import run_slurm

        return run_slurm(base, lc, overrides)
    from synth.launch.ray import run_ray  # lazy: synth.launch.ray imports this module (cycle)

    return run_ray(base, lc, resolved_yaml)


def shard_config(cfg, i: int, n: int):
    """The SynthConfig of shard i/n (the launcher's own settings removed)."""
    return cfg.model_copy(update={"shard": f"{i}/{n}", "launcher": None, "merge": False})


def unfinished(out_dir, n: int) -> list[int]:
    """Shards of n whose manifest does not say finished (all of them before the first run)."""
    import json
    from pathlib import Path

    todo = []
    for i in range(n):
        try:
            status = json.loads((Shard(i, n).folder(Path(out_dir).expanduser()) / "manifest.json").read_text())[
                "status"
            ]
        except (OSError, ValueError, KeyError):
            status = None
        if status != "finished":
            todo.append(i)
    return todo
