"""Sharded synthesis: `synth ... shard=i/n` runs an ordinary exact-once run over the items whose id
hashes to i.

- Membership: `int(sha256(id)[:8], 16) % n == i`, applied to what `pipeline.items()` yields, so that
  `source.limit` (the first N rows) stays global, self_rewarding's few-shot seed pool is built from every
  item, and red_team shards its taxonomy items. Item ids are content hashes (`records.stable_id`), so
  membership depends neither on file order nor on the backend; the n shards partition the items.
- Layout: `output_dir/shards/<iiiii>-of-<nnnnn>/` is a complete run folder (ledger, outputs, trace,
  manifest, call cache, config.yaml, run marker). `synth.merge` builds the top-level outputs once every
  shard has finished.
- A shard skips `finalize` (Bradley-Terry tables, statistics): whole-run work happens once, at merge.

This is the pattern NeMo Curator's slurm_array backend and NVIDIA Data Designer converged on (a
deterministic id hashed to a shard, one durable completion record per shard, one merge job).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth.errors import ConfigError
from synth.records import SourceItem

SHARDS = "shards"
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_DIR = re.compile(r"^(\d+)-of-(\d+)$")


def shard_of(item_id: str, n: int) -> int:
    """The shard (0..n-1) an item id belongs to: the first 32 bits of sha256(id), mod n."""
    return int(hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:8], 16) % n


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, spec: str | int | None) -> Shard | None:
        """`"3/8"` -> Shard(3, 8); None -> None; anything else is a ConfigError naming `shard`."""
        if spec is None:
            return None
        m = _SPEC.match(str(spec))
        if not m:
            raise ConfigError(f"shard={spec!r} is not i/n; pass e.g. shard=0/4 (shard i of n, 0 <= i < n)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard={spec!r}: need n >= 1 and 0 <= i < n, e.g. shard=0/{max(n, 1)}")
        return cls(i, n)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def folder(self, out_dir: str | Path) -> Path:
        return Path(out_dir) / SHARDS / self.name

    def owns(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_folders(out_dir: str | Path) -> dict[int, dict[int, Path]]:
    """{n: {i: folder}} for every `shards/<i>-of-<n>` folder under `out_dir`."""
    found: dict[int, dict[int, Path]] = {}
    root = Path(out_dir) / SHARDS
    if root.is_dir():
        for p in sorted(root.iterdir()):
            m = _DIR.match(p.name)
            if m and p.is_dir():
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return found


def check_shard_count(out_dir: str | Path, shard: Shard) -> None:
    """Refuse to start shard i/n in an output_dir that already holds shards of another n (their items
    would overlap and merge could never combine them)."""
    other = sorted(n for n in shard_folders(out_dir) if n != shard.count)
    if other:
        raise ConfigError(
            f"shard={shard}: {Path(out_dir) / SHARDS} already holds shards of n={other[0]}; use shard=i/{other[0]}, "
            "or another output_dir"
        )


class ShardedPipeline:
    """A pipeline seen through one shard: its items filtered by `Shard.owns`, `finalize` left to merge.
    Everything else (outputs, roles, setup, process, cfg) is the wrapped pipeline's own."""

    def __init__(self, inner: Any, shard: Shard) -> None:
        self.inner = inner
        self.shard = shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def items(self, ctx, source) -> Iterable[SourceItem]:
        return (it for it in self.inner.items(ctx, source) if self.shard.owns(it.id))

    def process(self, items: Sequence[SourceItem], ctx, state) -> None:
        self.inner.process(items, ctx, state)

    def setup(self, ctx, writer) -> None:
        self.inner.setup(ctx, writer)

    def finalize(self, ctx, out_dir: Path) -> dict[str, Any]:
        return {"shard": {"index": self.shard.index, "count": self.shard.count}}
