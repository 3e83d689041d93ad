"""`launcher=ray`: an actor pool over shard ids (Ray core; `pip install 'rlaif-forge[ray]'`).

- Each actor (`ShardRunner`) builds a role's backend once, when its first shard needs it, and reuses it
  for every later shard it runs (an in-process vLLM engine stays loaded); only the call cache, which
  lives in the shard's folder, is opened per shard.
- `ray.util.ActorPool` hands the next unfinished shard to whichever actor is free: over-decompose
  (shards ~ 4-8 x actors) so a slow shard matters little.
- A dead actor (node lost, OOM, os._exit) is restarted by Ray (`max_restarts`) and its shard call
  retried (`max_task_retries`); the shard's ledger makes the retry resume mid-shard, exact-once.
- Actors ask for fractional CPUs (`num_cpus: 0.5`): an actor per logical CPU leaves nothing for the
  driver and other tasks, and Ray then waits forever without an error.
- Driver or cluster lost: rerun the same command; finished shards are skipped, partial ones resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from synth.app import SynthConfig, merge_config, run_config
from synth.errors import ConfigError, UserError
from synth.launch import RayLauncher, shard_config, unfinished
from synth.launch.local import shard_yaml
from synth.llm import build_llm
from synth.llm.base import CallStats
from synth.llm.cache import CachedLLM


class ShardRunner:
    """One Ray actor: runs shards of one synth config, building each role's backend once."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = SynthConfig.model_validate(cfg)
        self.backends: dict[str, Any] = {}

    def pid(self) -> int:
        import os

        return os.getpid()

    def build(self, llm_cfg, model_cfg, cache_path=None):
        """synth.llm.build_llm with the backend itself kept across shards (the cache is per shard)."""

        key = json.dumps([llm_cfg, model_cfg], sort_keys=True, default=str)
        if key not in self.backends:
            self.backends[key] = build_llm(llm_cfg, model_cfg)
        inner = self.backends[key]
        return CachedLLM(inner, cache_path) if cache_path is not None else inner

    def run(self, i: int, n: int, resolved_yaml: str | None) -> dict[str, Any]:
        """Run shard i/n; a user error comes back as a value (Ray would otherwise wrap and retry it)."""

        for backend in self.backends.values():  # retries/cache hits are counted per shard
            if isinstance(getattr(backend, "stats", None), CallStats):
                backend.stats = CallStats()
        t = time.time()
        try:
            m = run_config(shard_config(self.cfg, i, n), resolved_yaml, build_llm=self.build)
        except UserError as e:
            return {"shard": i, "error": str(e), "kind": type(e).__name__}
        return {
            "shard": i,
            "status": m["status"],
            "resumed": m["resumed_from_previous_runs"],
            "wall_s": time.time() - t,
        }


def run_ray(cfg, lc: RayLauncher, resolved_yaml: str | None) -> dict[str, Any]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ConfigError(
            "launcher=ray needs ray: pip install 'rlaif-forge[ray]' (or use launcher=local|slurm)"
        ) from None

    out_dir = Path(cfg.output_dir).expanduser()
    n = lc.shards
    todo = unfinished(out_dir, n)
    started = False
    t0 = time.time()
    if todo and not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if lc.address:
            ray.init(address=lc.address, **kw)
        else:
            ray.init(num_cpus=lc.init_num_cpus, _temp_dir=lc.temp_dir, **kw)
            started = True
    startup = time.time() - t0
    results: list[dict[str, Any]] = []
    try:
        if todo:
            remote = ray.remote(
                num_cpus=lc.num_cpus,
                num_gpus=lc.num_gpus,
                max_restarts=lc.max_restarts,
                max_task_retries=lc.max_restarts,
            )(ShardRunner)
            actors = [remote.remote(cfg.model_dump()) for _ in range(min(lc.actors, len(todo)))]
            pool = ActorPool(actors)
            yamls = {i: shard_yaml(resolved_yaml, i, n) for i in todo}
            for r in pool.map_unordered(lambda a, i: a.run.remote(i, n, yamls[i]), todo):
                results.append(r)
                print(f"== shard {r['shard']}/{n}: {r.get('status') or r['kind'] + ': ' + r['error']}", flush=True)
    finally:
        if started:
            ray.shutdown()
    failed = [r for r in results if "error" in r]
    if failed:
        first = failed[0]
        raise ConfigError(f"{len(failed)} of {len(todo)} shards failed; shard {first['shard']}/{n}: {first['error']}")
    print(f"ray: {len(todo)} shards run in {time.time() - t0:.1f}s (cluster start-up {startup:.1f}s)", flush=True)
    if not lc.merge:
        return {"status": "shards finished", "shards": n, "ray_startup_s": startup}

    m = merge_config(cfg.model_copy(update={"merge": True}))
    return {**m, "ray": {"startup_s": round(startup, 3), "shards_run": len(todo)}}
