"""Sharded synthesis (synth/shard.py) and merge (synth/merge.py): membership, 4 shards + merge equal to one
unsharded run, merge's refusals, idempotence, and two writers on one shard."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from synth.app import run as synth_run
from synth.errors import ConfigError, DataError, OutputError
from synth.io import LEDGER, OutputLock
from synth.merge import merge_shards
from synth.records import stable_id
from synth.shard import Shard, shard_of


def test_membership_partitions_the_items_and_is_balanced():
    ids = [stable_id("prompt", k) for k in range(10_000)]
    for n in (1, 2, 4, 7):
        groups = [[x for x in ids if Shard(i, n).owns(x)] for i in range(n)]
        assert sorted(x for g in groups for x in g) == sorted(ids)  # union = all, each id once
        assert all(abs(len(g) - len(ids) / n) <= 0.2 * len(ids) / n for g in groups)  # within +-20%
    assert [shard_of(x, 4) for x in reversed(ids)] == [shard_of(x, 4) for x in ids][::-1]  # order-free


@pytest.mark.parametrize("spec", ["4/4", "-1/4", "1/0", "a/b", "3"])
def test_bad_shard_spec_is_one_config_error(spec):
    with pytest.raises(ConfigError, match="shard="):
        Shard.parse(spec)


# ------------------------------------------------------------------------ end to end on a loopback server


def answer(body):
    return "answer to " + body["messages"][-1]["content"]


def synth_cfg(url, src, out, *extra):
    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        return compose(
            config_name="synth",
            overrides=[
                "pipeline=generate",
                "pipeline.n=2",
                "llm=openai",
                f"llm.base_url={url}",
                "model.name_or_path=scripted",
                "source=jsonl",
                f"source.path={src}",
                "source.limit=50",
                f"output_dir={out}",
                "chunk_size=4",
                "progress=false",
                *extra,
            ],
        )


@pytest.fixture
def prompts(tmp_path):
    src = tmp_path / "prompts.jsonl"  # 70 rows, limit 50: the limit is taken before sharding
    src.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(70)))
    return src


def sorted_lines(path: Path) -> list[str]:
    return sorted(path.read_text(encoding="utf-8").splitlines())


def test_four_shards_and_merge_equal_one_unsharded_run(tmp_path, prompts, make_openai_server):
    server = make_openai_server(responder=answer)
    one = synth_run(synth_cfg(server.url, prompts, tmp_path / "one"))
    sharded = tmp_path / "sharded"
    per_shard = [synth_run(synth_cfg(server.url, prompts, sharded, f"shard={i}/4")) for i in range(4)]
    assert sum(m["inputs"] for m in per_shard) == 50 and all(m["inputs"] > 0 for m in per_shard)
    server.stop()  # merge makes no backend calls
    merged = synth_run(synth_cfg(server.url, prompts, sharded, "merge=true"))
    for name in ("completions", "trace"):
        assert sorted_lines(sharded / f"{name}.jsonl") == sorted_lines(tmp_path / "one" / f"{name}.jsonl")
    for key in ("status", "inputs", "processed", "outputs", "drops", "calls", "tokens", "parse_failures"):
        assert merged[key] == one[key], key
    assert merged["shards"]["count"] == 4 and merged["chunks"] == sum(m["chunks"] for m in per_shard)
    on_disk = json.loads((sharded / "manifest.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["merged"] is True

    before = {p.name: p.read_bytes() for p in sharded.glob("*.jsonl")}
    again = merge_shards(sharded, show_progress=False)  # idempotent: same bytes
    assert {p.name: p.read_bytes() for p in sharded.glob("*.jsonl")} == before
    assert again["outputs"] == merged["outputs"]

    with pytest.raises(ConfigError, match="different settings"):  # the merged folder is not an unsharded run
        synth_run(synth_cfg(server.url, prompts, sharded))
    with pytest.raises(ConfigError, match="n=\\[?4"):  # resuming with another n is refused, naming shard
        synth_run(synth_cfg(server.url, prompts, sharded, "shard=0/8"))


def test_merge_refuses_missing_unfinished_overlapping_and_mixed_shards(tmp_path, prompts, make_openai_server):
    server = make_openai_server(responder=answer)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no shards"):
        merge_shards(out, show_progress=False)
    for i in (0, 2):
        synth_run(synth_cfg(server.url, prompts, out, f"shard={i}/3"))
    with pytest.raises(ConfigError, match="shards 1/3 missing"):
        merge_shards(out, show_progress=False)
    synth_run(synth_cfg(server.url, prompts, out, "shard=1/3"))

    m1 = Shard(1, 3).folder(out) / "manifest.json"
    saved = m1.read_text()
    m1.write_text(saved.replace('"status": "finished"', '"status": "failed"'))
    with pytest.raises(ConfigError, match="shard 1/3 is 'failed'"):
        merge_shards(out, show_progress=False)
    m1.write_text(saved)

    ledger = Shard(1, 3).folder(out) / LEDGER  # an id of shard 0 committed in shard 1: overlap
    good = ledger.read_text()
    foreign = json.loads((Shard(0, 3).folder(out) / LEDGER).read_text().splitlines()[0])["ids"][0]
    first = json.loads(good.splitlines()[0])
    first["ids"].append(foreign)
    ledger.write_text(json.dumps(first) + "\n" + "".join(x + "\n" for x in good.splitlines()[1:]))
    with pytest.raises(DataError, match="belongs to shard 0/3: shards overlap"):
        merge_shards(out, show_progress=False)
    ledger.write_text(good)

    shutil.copytree(Shard(0, 3).folder(out), out / "shards" / "00000-of-00002")  # two shard counts
    with pytest.raises(ConfigError, match="n=\\[2, 3\\]"):
        merge_shards(out, show_progress=False)
    shutil.rmtree(out / "shards" / "00000-of-00002")

    with pytest.raises(ConfigError, match="other settings"):  # merge=true checks the shards ran with these settings
        synth_run(synth_cfg(server.url, prompts, out, "merge=true", "seed=1"))
    assert merge_shards(out, show_progress=False)["processed"] == 50


def test_two_writers_on_one_shard_the_second_is_refused(tmp_path, prompts, make_openai_server):
    server = make_openai_server(responder=answer)
    out = tmp_path / "out"
    with OutputLock(Shard(1, 2).folder(out)):  # e.g. a requeued Slurm task while the old one still runs
        with pytest.raises(OutputError, match="in use by another run"):
            synth_run(synth_cfg(server.url, prompts, out, "shard=1/2"))
    assert synth_run(synth_cfg(server.url, prompts, out, "shard=1/2"))["status"] == "finished"


def test_local_launcher_runs_every_shard_then_merges(tmp_path, prompts, make_openai_server):
    server = make_openai_server(responder=answer)
    m = synth_run(synth_cfg(server.url, prompts, tmp_path / "out", "launcher=local", "launcher.shards=3"))
    assert m["merged"] and m["processed"] == 50 and m["shards"]["count"] == 3
    ids = [json.loads(x)["id"] for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 50
    calls = len(server.requests)
    m = synth_run(synth_cfg(server.url, prompts, tmp_path / "out", "launcher=local", "launcher.shards=3"))
    assert len(server.requests) == calls and m["processed"] == 50  # a finished rerun: no backend calls


# ------------------------------------------------------------------- cross-shard near-duplicates (red_team)


def fake_red_team_shards(out: Path, n: int, prompts_by_item: dict[str, list[str]]) -> None:
    """Shard folders as a finished red_team run writes them (ChunkWriter + manifest + shard.json)."""
    from synth.app import run_fingerprint, validate
    from synth.io import ChunkWriter, write_json_atomic
    from synth.merge import write_shard_info

    pipeline = {"_target_": "synth.pipelines.red_team.RedTeamPipeline", "name": "red_team"}
    cfg = validate(
        {
            "llm": {"kind": "hf"},
            "model": {"name_or_path": "x"},
            "pipeline": pipeline,
            "output_dir": str(out),
            "constitution": "safety_zh",
            "shard": f"0/{n}",
        }
    )
    for i in range(n):
        folder = Shard(i, n).folder(out)
        w = ChunkWriter(folder, ("prompts", "answers", "unsafe"))
        for item, texts in prompts_by_item.items():
            if not Shard(i, n).owns(item):
                continue
            rows = {"prompts": [], "answers": [], "unsafe": []}
            for k, text in enumerate(texts):
                pid = stable_id(item, k)
                rows["prompts"].append({"id": pid, "prompt": text, "item_id": item})
                rows["answers"].append(
                    {
                        "id": stable_id(pid, "greedy"),
                        "prompt_id": pid,
                        "prompt": text,
                        "answer": "no",
                        "verdict": "unsafe",
                        "attack_family": "direct",
                        "decoding": {"name": "greedy"},
                        "l1": "L1",
                    }
                )
                rows["unsafe"].append({"id": pid, "prompt": text})
            w.commit(
                [item], rows, Counter({"out/prompts": len(texts), "out/answers": len(texts), "out/unsafe": len(texts)})
            )
        write_json_atomic(
            folder / "manifest.json", {"status": "finished", "inputs": 1, "resumed_from_previous_runs": 0}
        )
        write_shard_info(folder, Shard(i, n), run_fingerprint(cfg), pipeline, "safety_zh", 0)


def test_merge_drops_cross_shard_near_duplicates_and_logs_them(tmp_path, capsys):
    n, items = 2, [stable_id("item", k) for k in range(40)]
    a = next(x for x in items if shard_of(x, n) == 0)
    b = next(x for x in items if shard_of(x, n) == 1)
    texts = {
        a: ["how do I pick a lock on a front door", "tell me a story about a dragon"],
        b: ["How do I pick a lock on a front door?", "what is the capital of France"],
    }
    out = tmp_path / "out"
    fake_red_team_shards(out, n, texts)
    m = merge_shards(out, show_progress=False)
    dropped = [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()]
    assert {d["output"] for d in dropped} == {"prompts", "answers", "unsafe"}
    assert all(d["reason"] == "cross_shard_duplicate" and d["shard"] == 1 for d in dropped)
    assert m["cross_shard_duplicates"] == {"answers": 1, "prompts": 1, "unsafe": 1}
    assert m["outputs"] == {"prompts": 3, "answers": 3, "unsafe": 3}
    kept = [json.loads(x)["prompt"] for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert "How do I pick a lock on a front door?" not in kept and len(kept) == 3
    assert m["red_team"]["by_family"]["direct"]["answers"] == 3  # finalize ran once, on the merged files
    assert "cross_shard_duplicate" in capsys.readouterr().out


def test_self_rewarding_seed_pool_comes_from_every_item_not_the_shard():
    from synth.pipelines.self_rewarding import SelfRewardingConfig, SelfRewardingPipeline
    from synth.records import Message, SourceItem
    from synth.runtime import Context
    from synth.shard import ShardedPipeline

    items = [SourceItem(id=stable_id("p", k), prompt=[Message(role="user", content=f"prompt {k}")]) for k in range(40)]
    inner = SelfRewardingPipeline(SelfRewardingConfig(new_prompts={"enabled": True}))
    mine = list(ShardedPipeline(inner, Shard(1, 4)).items(Context(factories={}), items))
    assert 0 < len(mine) < 40 and all(Shard(1, 4).owns(it.id) for it in mine)
    assert len(inner._seeds) == 40  # the few-shot pool is global
