"""One stage of a round: compose its tool's config, hand it the current model and the earlier outputs,
run it in-process (synth.app.run, train.app.run, synth.evaluate.app.run or an op), record it."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

from synth import app as synth_app
from synth.align.models import ModelRef, merged_copy, policy_blocks, trained_ref
from synth.align.recipe import Stage
from synth.errors import ConfigError
from synth.io import write_json_atomic
from train import app as train_app

CONFIG_NAMES = {"synth": "synth", "train": "train", "evaluate": "evaluate"}


def compose(config_name: str, overrides: list[str], where: str) -> dict[str, Any]:
    """A tool's config composed as its command line would (inside `align`'s Hydra app, or standalone)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        else:
            with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
                cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def compose_stage(cfg, stage: Stage, k: int = 1) -> dict[str, Any] | None:
    """align's `preset` (synth stages), the stage's overrides, align's `overrides.<tool>`, then align's
    `stage_overrides.<stage>` (the user's last word), composed as that tool's command line; `{round}` is
    the round number."""
    if stage.tool == "op":
        return None
    preset = [f"preset={cfg.preset}"] if stage.tool == "synth" and cfg.preset != "default" else []
    chain = [*preset, *stage.overrides, *cfg.overrides.get(stage.tool, []), *cfg.stage_overrides.get(stage.name, [])]
    overrides = [o.replace("{round}", str(k)) for o in chain]
    return compose(CONFIG_NAMES[stage.tool], overrides, f"recipe stage {stage.name} ({stage.tool})")


def set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def get_key(raw: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = raw
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def role(rc) -> dict[str, Any]:
    return {"llm": rc.llm, "model": rc.model.model_dump() if rc.model else None}


def run_stage(rnd, stage: Stage, ledger) -> int:
    """Run `stage` of round `rnd.k` unless the ledger holds it; 1 when it ran now, else 0."""
    key = f"{rnd.k}/{stage.name}"
    entry = ledger.done(key)
    if entry is None:
        out = rnd.dir(stage.name)
        print(f"== align round {rnd.k}: stage {stage.name} ({stage.tool}) -> {out}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        entry = {"tool": stage.tool, "dir": str(out), **RUNNERS[stage.tool](rnd, stage, out, ledger)}
        entry["clock"] = {  # this process: CPU seconds of all its threads; peak RSS so far (Linux: KiB)
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        c = entry["clock"]
        print(
            f"-- align round {rnd.k}: stage {stage.name} took {c['wall_s']}s wall, {c['cpu_s']}s CPU "
            f"(peak RSS so far {c['peak_rss_mb']} MB)",
            flush=True,
        )
        ledger.record(key, entry)
        ran = 1
    else:
        ran = 0
    if entry.get("model") is not None:
        rnd.model = ModelRef.model_validate(entry["model"])
    if entry.get("scorer") is not None:
        rnd.scorers[stage.name] = entry["scorer"]
    return ran


def wire(rnd, stage: Stage, raw: dict[str, Any], ledger) -> None:
    for key, ref in stage.inputs.items():
        value = rnd.resolve(ref, ledger)
        if value is None:
            continue
        if key == "source":
            value = value if isinstance(value, dict) else {"kind": "jsonl", "path": str(value)}
        elif isinstance(value, dict):
            value = value["path"]
        set_key(raw, key, value if isinstance(value, dict) else str(value))


def run_synth(rnd, stage: Stage, out: Path, ledger) -> dict[str, Any]:
    cfg = rnd.cfg
    raw = compose_stage(cfg, stage, rnd.k)
    raw["llm"], raw["model"] = policy_blocks(rnd.model, cfg.llm, cfg.served.model_dump(), rnd.recipe.name)
    raw["judge"], raw["attacker"] = role(cfg.judge), role(cfg.attacker)
    if stage.self_judge:  # the model judges its own candidates (the method, not a shortcut)
        raw["judge"] = {"llm": None, "model": None}
    raw.update(output_dir=str(out), progress=cfg.progress, seed=cfg.seed + rnd.k, resume=True)
    wire(rnd, stage, raw, ledger)
    manifest = synth_app.run(raw)
    return {"outputs": manifest["outputs"], "drops": manifest["drops"]}


def run_evaluate(rnd, stage: Stage, out: Path, ledger) -> dict[str, Any]:
    from synth.evaluate.app import run  # lazy: keeps numpy out of synth.align's import

    cfg = rnd.cfg
    raw = compose_stage(cfg, stage, rnd.k)
    raw["llm"], raw["model"] = policy_blocks(rnd.model, cfg.llm, cfg.served.model_dump(), rnd.recipe.name)
    raw["judge"] = role(cfg.judge)
    raw.update(output_dir=str(out), progress=cfg.progress, seed=cfg.seed, resume=True)
    prev = rnd.dir(stage.name, rnd.k - 1)
    if stage.baseline and rnd.k >= 1 and ledger.done(f"{rnd.k - 1}/{stage.name}") is not None:
        raw["baseline"] = str(prev)
    s = raw.get("sampling") or {}
    if s.get("temperature") == 1.0 and s.get("top_p") == 1.0 and not get_key(raw, "scores.reference"):
        # KL(policy || initial model) per answer, on the local weights of the round's model
        raw["scores"].update(
            reference=rnd.initial.base["name_or_path"], policy=rnd.model.base["name_or_path"], adapter=rnd.model.adapter
        )
    for name, path in rnd.scorers.items():  # a reward / cost model trained by the recipe scores every round
        kind = "cost_model" if "cost" in name else "reward_model"
        if not raw["scores"].get(kind):
            raw["scores"][kind] = path
    wire(rnd, stage, raw, ledger)
    run(raw)
    summary = json.loads((out / "summary.json").read_text())
    return {"headline": summary.get("headline", {})}


def run_train(rnd, stage: Stage, out: Path, ledger) -> dict[str, Any]:
    cfg = rnd.cfg
    raw = compose_stage(cfg, stage, rnd.k)
    loop = raw["loop"]["name"]
    produces = stage.produces or ("scorer" if loop == "reward" else "policy")
    lora = bool(get_key(raw, "lora.enabled"))
    start = rnd.model if produces == "policy" else rnd.initial
    raw["model"] = dict(start.base)
    if start.adapter is not None:
        if not lora:
            raise ConfigError(
                f"recipe stage {stage.name}: round {rnd.k} starts from a LoRA adapter ({start.adapter}); "
                "keep lora.enabled=true for every train stage of the recipe"
            )
        set_key(raw, "lora.init_adapter", start.adapter)
    raw.update(output_dir=str(out), progress=cfg.progress, seed=cfg.seed + rnd.k, resume=True)
    judge = get_key(raw, "loop.reward.kind") == "judge"
    if judge and get_key(raw, "loop.reward.judge") is None:
        raw["loop"]["reward"]["judge"] = judge_block(rnd)
    reference(rnd, stage, raw, lora, out)
    wire(rnd, stage, raw, ledger)
    if not (out / "summary.json").exists():  # a run killed after its summary needs no more steps
        train_app.run(raw)
    summary = json.loads((out / "summary.json").read_text())
    entry: dict[str, Any] = {"steps": summary.get("steps"), "final_train": summary.get("final_train"), "loop": loop}
    if produces == "policy":
        entry["model"] = trained_ref(out / "final", start, lora, rnd.k, stage.name).model_dump()
    else:
        entry["scorer"] = str(out / "final")  # train.scorers loads full weights or a LoRA adapter
    return entry


def judge_block(rnd) -> dict[str, Any]:
    """An online loop's AI judge: align's judge role, or the initial model on align's backend (a fixed
    annotator, never the policy being trained)."""
    cfg = rnd.cfg
    if cfg.judge.llm is not None or cfg.judge.model is not None:
        return {"llm": cfg.judge.llm or cfg.llm, "model": (cfg.judge.model or cfg.model).model_dump()}
    llm, model = policy_blocks(rnd.initial, cfg.llm, cfg.served.model_dump(), rnd.recipe.name)
    return {"llm": llm, "model": model}


def reference(rnd, stage: Stage, raw: dict[str, Any], lora: bool, out: Path) -> None:
    """The DPO reference the method asks for: the previous iterate (SPIN, self-rewarding rounds) or the
    initial model (OAIF). Under LoRA the base is the initial model, so `previous` needs the round's
    starting model merged once; under full fine-tuning `initial` points the reference at it."""
    if stage.reference == "auto" or raw["loop"]["name"] == "sft":
        return
    online = isinstance(raw["loop"].get("reference"), str)
    start = rnd.model
    if stage.reference == "previous":
        if online:  # refused at start (synth/align/app.py check_stage)
            return
        if lora and start.adapter is not None:
            raw["loop"]["reference"].update(
                mode="precomputed", name_or_path=merged_copy(start, out.parent / f"{stage.name}.reference")
            )
        return
    # initial
    if online:
        if not lora and start.round > 0:
            raise ConfigError(
                f"recipe stage {stage.name}: the initial model as reference of an online loop needs LoRA "
                "(lora.enabled=true: the base with the adapter disabled)"
            )
        return
    if lora:
        raw["loop"]["reference"]["mode"] = "adapter_disabled"  # the base = the initial model
    elif start.round > 0:
        raw["loop"]["reference"].update(mode="precomputed", name_or_path=rnd.initial.base["name_or_path"])


def run_op(rnd, stage: Stage, out: Path, ledger) -> dict[str, Any]:
    from synth.align.ops import OPS, OpContext  # lazy: keeps torch out of synth.align.stages's import

    inputs = {key: rnd.resolve(ref, ledger) for key, ref in stage.inputs.items()}
    out.mkdir(parents=True, exist_ok=True)
    ctx = OpContext(
        round=rnd.k,
        out=out,
        seed=rnd.cfg.seed + rnd.k,
        scorers=dict(rnd.scorers),
        progress=rnd.cfg.progress,
        recipe=rnd.recipe.name,
    )
    manifest = OPS[stage.op](ctx, inputs, **stage.args)

    write_json_atomic(out / "manifest.json", manifest)
    entry = {"outputs": manifest.get("outputs", {}), "drops": manifest.get("drops", {})}
    if "state" in manifest:  # what the next round continues from (C-DPO's λ)
        entry["state"] = manifest["state"]
    return entry


RUNNERS = {"synth": run_synth, "train": run_train, "evaluate": run_evaluate, "op": run_op}
