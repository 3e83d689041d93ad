"""`launcher=local`: the shards one after another in this process, then merge."""

from __future__ import annotations

from typing import Any

from synth.app import merge_config, run_config
from synth.launch import LocalLauncher, shard_config


def run_local(cfg, lc: LocalLauncher, resolved_yaml: str | None) -> dict[str, Any]:
    n = lc.shards
    for i in range(n):
        print(f"== shard {i}/{n}", flush=True)
        run_config(shard_config(cfg, i, n), shard_yaml(resolved_yaml, i, n))
    if not lc.merge:
        return {"status": "shards finished", "shards": n}
    return merge_config(cfg.model_copy(update={"merge": True}))


def shard_yaml(resolved_yaml: str | None, i: int, n: int) -> str | None:
    """The saved config.yaml of a shard: the launcher's config with its own shard setting."""
    if resolved_yaml is None:
        return None
    from omegaconf import OmegaConf

    c = OmegaConf.create(resolved_yaml)
    c.shard, c.launcher = f"{i}/{n}", None
    return OmegaConf.to_yaml(c)
