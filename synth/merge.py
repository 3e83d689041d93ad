"""`synth-merge output_dir=...` (or `synth ... merge=true`): build the top-level outputs of a sharded run.

1. Refuse unless every shard `shards/<i>-of-<n>/` of one n exists and its manifest says `finished`,
   and every shard was run with the same settings (their run fingerprints agree).
2. Check that the shards' items are disjoint: every id in shard i's ledger must hash to i
   (`synth.shard.shard_of`). Membership is a pure function of the id, so this proves disjointness
   without holding a set of ids: memory stays independent of the number of rows.
3. Copy each output's committed bytes (the size recorded in the shard's last ledger line), shard by
   shard, into a temporary file, fsync it, then `os.replace` it over `<output_dir>/<name>.jsonl`.
4. Sum the shards' ledger counters (streamed line by line) into the top-level manifest.
5. Cross-item state that a shard only saw locally gets one global pass: red_team attack prompts and
   self_rewarding's self-instruct prompts are near-deduplicated across shards (first shard wins); every
   row dropped is written to `dropped.jsonl` with reason `cross_shard_duplicate` and counted.
6. Run the pipeline's `finalize` once on the merged files, with a context that has no backends (any
   backend call would fail), and write `manifest.json` last.

Merge is idempotent: a second merge rebuilds the same files from the same shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from synth.cli import guarded_call
from synth.constitution import load_constitution
from synth.errors import ConfigError, DataError, OutputError
from synth.io import LEDGER, OutputLock, fsync_dir, write_json_atomic, write_text_atomic
from synth.pipelines.base import build_manifest, print_summary
from synth.pipelines.red_team import RedTeamPipeline
from synth.records import stable_id
from synth.runtime import Context
from synth.shard import Shard, shard_folders, shard_of
from synth.steps.filters import NearDuplicateIndex

SHARD_INFO = "shard.json"  # written in each shard folder when it starts: what merge needs to finalize
_BLOCK = 1 << 20
_STANDARD = {  # manifest keys build_manifest writes; any other key of a shard's manifest is source-wide
    "pipeline",
    "status",
    "error",
    "inputs",
    "processed",
    "resumed_from_previous_runs",
    "duplicate_inputs_skipped",
    "chunks",
    "outputs",
    "drops",
    "dropped_parts",
    "parse_failures",
    "truncated",
    "calls",
    "retries",
    "cache_hits",
    "tokens",
    "per_category",
    "wall_time_s_this_run",
    "shard",
}


def write_shard_info(
    folder: Path, shard: Shard, fingerprint: str, pipeline: dict[str, Any], constitution: str, seed: int
) -> None:
    """What merge needs without the original command line: the pipeline settings, constitution, seed."""
    info = {
        "index": shard.index,
        "count": shard.count,
        "fingerprint": fingerprint,
        "pipeline": pipeline,
        "constitution": constitution,
        "seed": seed,
    }
    write_json_atomic(folder / SHARD_INFO, info)


# --------------------------------------------------------------------------------------------- checks


def find_shards(out_dir: Path) -> tuple[int, list[Path]]:
    """(n, the n shard folders in order); refuse a missing shard or a mix of shard counts."""
    found = shard_folders(out_dir)
    if not found:
        raise ConfigError(
            f"{out_dir} holds no shards/<i>-of-<n>/ folders; run `synth ... shard=i/n output_dir={out_dir}` "
            "for every i first"
        )
    if len(found) > 1:
        ns = sorted(found)
        raise ConfigError(
            f"{out_dir / 'shards'} holds shards of n={ns} whose items overlap; remove all but one n and merge again"
        )
    ((n, folders),) = found.items()
    missing = [i for i in range(n) if i not in folders]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(
            f"shards {', '.join(f'{i}/{n}' for i in missing[:5])}{more} missing under {out_dir / 'shards'}; "
            f"run `synth ... shard={missing[0]}/{n}` (same settings) before merging"
        )
    return n, [folders[i] for i in range(n)]


def check_finished(folders: list[Path], n: int, fingerprint: str | None) -> list[dict[str, Any]]:
    """Every shard's manifest says finished and every shard ran with the same settings."""
    manifests, infos = [], []
    for i, folder in enumerate(folders):
        try:
            m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            m = {"status": "not started"}
        if m.get("status") != "finished":
            raise ConfigError(
                f"shard {i}/{n} is {m.get('status')!r}, not finished ({folder}); rerun "
                f"`synth ... shard={i}/{n}` to finish it, then merge"
            )
        try:
            info = json.loads((folder / SHARD_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(
                f"{folder / SHARD_INFO} is missing or damaged; rerun `synth ... shard={i}/{n}` "
                "(it returns at once and rewrites it)"
            ) from None
        manifests.append(m)
        infos.append(info)
    prints = {info["fingerprint"] for info in infos}
    if len(prints) > 1 or (fingerprint is not None and prints != {fingerprint}):
        bad = next(i for i, info in enumerate(infos) if info["fingerprint"] != (fingerprint or infos[0]["fingerprint"]))
        raise ConfigError(
            f"shard {bad}/{n} was run with other settings (pipeline/model/judge/constitution/seed/source) "
            f"than {'this command' if fingerprint else f'shard 0/{n}'}; rerun it with resume=false and "
            "the same settings"
        )
    return [{**m, "_info": info} for m, info in zip(manifests, infos, strict=True)]


def ledger_entries(folder: Path) -> Iterator[dict[str, Any]]:
    """A finished shard's ledger, one committed chunk at a time (never the whole file in memory)."""
    path = folder / LEDGER
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for k, line in enumerate(fh, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {k} is damaged; rerun that shard's synth command to repair it") from None


def scan_ledgers(folders: list[Path], n: int) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Summed counters and, per shard, {processed, chunks, sizes}; refuse an id outside its shard."""
    total: Counter[str] = Counter()
    per: list[dict[str, Any]] = []
    for i, folder in enumerate(folders):
        processed = chunks = 0
        sizes: dict[str, int] = {}
        for entry in ledger_entries(folder):
            for item_id in entry["ids"]:
                if shard_of(item_id, n) != i:
                    raise DataError(
                        f"item {item_id} committed in shard {i}/{n} belongs to shard "
                        f"{shard_of(item_id, n)}/{n}: shards overlap ({folder}); rerun shard {i}/{n} with "
                        "resume=false"
                    )
            processed += len(entry["ids"])
            chunks += 1
            sizes.update(entry["sizes"])
            total.update(entry["counters"])
        per.append({"processed": processed, "chunks": chunks, "sizes": sizes})
    return total, per


# --------------------------------------------------------------------------------- cross-shard dedup


def cross_shard_duplicates(pipeline, folders: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """{output: {row id: dropped-row record}} for rows that repeat, across shards, what an earlier shard
    kept. Only pipelines with cross-item dedup inside a run need it: red_team (attack prompts) and
    self_rewarding (self-instruct prompts). The index holds every prompt once (a global dedup cannot do
    with less); the rows themselves are streamed."""
    from synth.pipelines.self_rewarding import SelfRewardingPipeline  # lazy: keeps numpy out of synth.merge's import

    if isinstance(pipeline, RedTeamPipeline):
        threshold, text = pipeline.cfg.near_duplicate, (lambda r: r["prompt"])
    elif isinstance(pipeline, SelfRewardingPipeline) and pipeline.cfg.new_prompts.enabled:
        threshold, text = pipeline.cfg.new_prompts.near_duplicate_threshold, (lambda r: r["prompt"][-1]["content"])
    else:
        return {}
    index = NearDuplicateIndex(threshold)
    dropped: dict[str, dict[str, dict[str, Any]]] = {}
    for i, folder in enumerate(folders):
        for row in _rows(folder / "prompts.jsonl"):
            dup = index.add_unless_duplicate(row["id"], text(row))
            if dup is not None:
                rec = {"reason": "cross_shard_duplicate", "kind": dup[0], "duplicate_of": dup[1], "shard": i}
                dropped.setdefault("prompts", {})[row["id"]] = {**rec, "output": "prompts", "id": row["id"]}
    gone = dropped.get("prompts", {})
    if isinstance(pipeline, RedTeamPipeline):  # a dropped prompt takes its answers and its unsafe row along
        for folder in folders:
            for row in _rows(folder / "answers.jsonl"):
                if row["prompt_id"] in gone:
                    dropped.setdefault("answers", {})[row["id"]] = {
                        **gone[row["prompt_id"]],
                        "output": "answers",
                        "id": row["id"],
                    }
        dropped["unsafe"] = {pid: {**rec, "output": "unsafe"} for pid, rec in gone.items()}
    else:  # self_rewarding: the pair built on a dropped prompt (its id is derived from the prompt's)
        it = pipeline.cfg.iteration
        dropped["preferences"] = {
            stable_id(pid, "self_rewarding", it): {
                **rec,
                "output": "preferences",
                "id": stable_id(pid, "self_rewarding", it),
            }
            for pid, rec in gone.items()
        }
    return dropped


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


# -------------------------------------------------------------------------------------------- copying


def _copy_committed(src: Path, size: int, dst) -> None:
    """Append the first `size` bytes of `src` (its committed part) to the open file `dst`, in blocks."""
    if size == 0:
        return
    with src.open("rb") as fh:
        left = size
        while left:
            block = fh.read(min(_BLOCK, left))
            if not block:
                raise DataError(
                    f"{src} is shorter than its ledger says ({size} bytes); rerun that shard's synth "
                    "command to repair it"
                )
            dst.write(block)
            left -= len(block)


def _copy_filtered(src: Path, size: int, dst, drop: dict[str, Any], log) -> int:
    """Like `_copy_committed`, line by line, leaving out rows whose id is in `drop` (each written to `log`)."""
    kept = 0
    with src.open("rb") as fh:
        left = size
        while left > 0:
            line = fh.readline(left)
            left -= len(line)
            row_id = json.loads(line).get("id") if line.strip() else None
            if row_id in drop:
                log.write(json.dumps(drop[row_id], ensure_ascii=False) + "\n")
                continue
            dst.write(line)
            kept += 1
    return kept


def merge_files(
    out_dir: Path, folders: list[Path], per: list[dict[str, Any]], names: list[str], dropped: dict[str, dict[str, Any]]
) -> None:
    """Every output rebuilt from the shards' committed bytes, through temporary files + rename."""
    tmp_drop = out_dir / "dropped.jsonl.merging"
    with tmp_drop.open("w", encoding="utf-8") as log:
        for name in names:
            tmp = out_dir / f"{name}.jsonl.merging"
            try:
                with tmp.open("wb") as dst:
                    for folder, shard in zip(folders, per, strict=True):
                        src, size = folder / f"{name}.jsonl", shard["sizes"].get(name, 0)
                        if name in dropped:
                            _copy_filtered(src, size, dst, dropped[name], log)
                        else:
                            _copy_committed(src, size, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, out_dir / f"{name}.jsonl")
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        log.flush()
        os.fsync(log.fileno())
    if dropped:
        os.replace(tmp_drop, out_dir / "dropped.jsonl")
    else:
        tmp_drop.unlink()
        (out_dir / "dropped.jsonl").unlink(missing_ok=True)
    fsync_dir(out_dir)  # the renamed outputs keep their new content's names after a power loss


# ---------------------------------------------------------------------------------------------- merge


def merge_shards(out_dir: str | Path, fingerprint: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Merge `out_dir/shards/*` into `out_dir`; return the top-level manifest (also written)."""
    from tqdm.auto import tqdm

    from synth.app import build_pipeline  # lazy: synth.app imports this module (cycle)

    start = time.time()
    out_dir = Path(out_dir).expanduser()
    if (out_dir / LEDGER).exists():
        raise OutputError(f"{out_dir} holds an unsharded run ({LEDGER}); merge shards into another output_dir")
    n, folders = find_shards(out_dir)
    with OutputLock(out_dir), contextlib.ExitStack() as locks:
        for folder in folders:  # no shard may be (re)running while it is merged
            locks.enter_context(OutputLock(folder))
        shards = check_finished(folders, n, fingerprint)
        info = shards[0]["_info"]
        pipeline = build_pipeline(info["pipeline"])
        counters, per = scan_ledgers(folders, n)
        names = sorted({name for p in per for name in p["sizes"]} | {*pipeline.outputs, "trace"})
        dropped = cross_shard_duplicates(pipeline, folders)
        bar = tqdm(total=len(names), desc=f"merge {n} shards", unit="file", disable=not show_progress)
        merge_files(out_dir, folders, per, names, dropped)
        bar.update(len(names))
        bar.close()
        for output, rows in dropped.items():  # the merged outputs count what they hold
            counters[f"out/{output}"] -= len(rows)
        ctx = Context(factories={}, constitution=load_constitution(info["constitution"]), seed=info["seed"])
        extra = {k: v for k, v in shards[0].items() if k not in _STANDARD and not k.startswith("_")}
        extra["shards"] = {
            "count": n,
            "per_shard": [
                {
                    "index": i,
                    "processed": p["processed"],
                    "chunks": p["chunks"],
                    "status": m["status"],
                    "resumed_from_previous_runs": m.get("resumed_from_previous_runs", 0),
                    "wall_time_s_last_run": m.get("wall_time_s_this_run"),
                }
                for i, (p, m) in enumerate(zip(per, shards, strict=True))
            ],
        }
        extra["cross_shard_duplicates"] = {k: len(v) for k, v in sorted(dropped.items())}
        extra.update(pipeline.finalize(ctx, out_dir))
        totals = _Totals(counters, sum(p["processed"] for p in per), sum(p["chunks"] for p in per))
        m = build_manifest(
            pipeline,
            totals,
            sum(s.get("inputs", 0) for s in shards),
            sum(s.get("resumed_from_previous_runs", 0) for s in shards),
            sum(s.get("duplicate_inputs_skipped", 0) for s in shards),
            time.time() - start,
            "finished",
            None,
            extra,
        )
        m["merged"] = True
        write_text_atomic(
            out_dir / ".run.json", json.dumps({"fingerprint": info["fingerprint"], "merged_shards": n}) + "\n"
        )
        write_json_atomic(out_dir / "manifest.json", m)
    if dropped:
        print(
            f"merge: {sum(map(len, dropped.values()))} rows dropped as cross_shard_duplicate "
            f"({', '.join(f'{k}={len(v)}' for k, v in sorted(dropped.items()))}); see {out_dir / 'dropped.jsonl'}",
            flush=True,
        )
    print_summary(m, out_dir)
    return m


class _Totals:
    """What build_manifest reads from a ChunkWriter, summed over the shards (no id set is held)."""

    def __init__(self, counters: Counter[str], processed: int, chunks: int) -> None:
        self.counters = counters
        self.done_ids = range(processed)  # only its length is read
        self.chunks = chunks


def main(argv: list[str] | None = None) -> None:
    """`synth-merge output_dir=DIR [progress=false]`: one line and exit 2 on a user error."""
    import sys

    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    bad = [a for a in (sys.argv[1:] if argv is None else argv) if "=" not in a] + sorted(
        set(args) - {"output_dir", "progress"}
    )
    if bad or "output_dir" not in args:
        print("usage: synth-merge output_dir=DIR [progress=false]", file=sys.stderr)
        sys.exit(2)
    progress = args.get("progress", "true").lower() not in {"false", "0", "no"}
    guarded_call(lambda: merge_shards(args["output_dir"], show_progress=progress))


if __name__ == "__main__":
    main()
