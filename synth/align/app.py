"""`align` below Hydra: rounds of synth / train / evaluate stages with the current model in the loop.

    output_dir/
      ledger.json            the recipe ledger: settings fingerprint, every finished stage, the model
                             each round produced, why the recipe stopped
      rounds/0/evaluate/     the initial model's evaluation (round 1's baseline)
      rounds/<k>/<stage>/    each stage's own output folder (an ordinary synth/train/evaluate run)
      report.md, report.json, plots/   the round report (rebuilt after every round)

Exact-once: a stage is an ordinary resumable run in its own folder, and the ledger records it as
finished only after the run returned. After a kill -9 the same command skips every finished stage
(no backend call, no training step) and reruns the interrupted one, which resumes from its own
chunks or checkpoints. A finished recipe returns at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.align import report, stages
from synth.align.models import ModelRef, materialized_base
from synth.align.recipe import Recipe, StopRule, load_recipe
from synth.app import ModelConfig, RoleConfig, one_line, plain_config
from synth.errors import ConfigError, DataError
from synth.io import OutputLock, check_output_dir, read_jsonl, write_json_atomic, write_text_atomic


class Served(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str | None = None  # llm=openai: the initial model's served name (null: model.name_or_path)
    adapter: str = (
        "{recipe}-r{round}-{stage}"  # llm=openai: the served name of the model stage <stage> of round k trained
    )
    load: bool = False  # POST <base_url>/load_lora_adapter before using round k's adapter (vLLM serve)


class AlignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: dict[str, Any]
    llm: dict[str, Any]
    model: ModelConfig
    judge: RoleConfig = RoleConfig()
    attacker: RoleConfig = RoleConfig()
    rounds: int | None = Field(None, ge=1)
    output_dir: str
    seed: int = Field(0, ge=0)
    force: bool = False
    progress: bool = True
    served: Served = Served()
    stop: StopRule = StopRule()
    overrides: dict[str, list[str]] = Field(default_factory=lambda: {"synth": [], "train": [], "evaluate": []})
    # by stage name: extra overrides applied last (after the recipe's and `overrides.<tool>`)
    stage_overrides: dict[str, list[str]] = Field(default_factory=dict)
    # by stage name: input references that replace / add to the recipe's `inputs` of that stage
    stage_inputs: dict[str, dict[str, str]] = Field(default_factory=dict)
    preset: str = "default"  # settings by model size: passed as preset=<name> to every synth stage


def validate(raw: dict[str, Any]) -> AlignConfig:
    try:
        cfg = AlignConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None
    bad = sorted(set(cfg.overrides) - {"synth", "train", "evaluate"})
    if bad:
        raise ConfigError(f"overrides.{bad[0]}: not a tool (valid: synth, train, evaluate)")
    return cfg


def fingerprint(cfg: AlignConfig, recipe: Recipe) -> str:
    """What must not change between rounds (the number of rounds and the stop rule may)."""
    keep = {
        "recipe": recipe.model_dump(exclude={"rounds"}),
        "model": cfg.model.model_dump(),
        "llm": {k: v for k, v in cfg.llm.items() if k in ("kind", "dtype")},
        "judge": cfg.judge.model.model_dump() if cfg.judge.model else None,
        "attacker": cfg.attacker.model.model_dump() if cfg.attacker.model else None,
        "seed": cfg.seed,
        "overrides": cfg.overrides,
        **(
            {"stage_overrides": cfg.stage_overrides, "preset": cfg.preset}
            if cfg.stage_overrides or cfg.preset != "default"
            else {}
        ),
        "served": cfg.served.adapter,
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ ledger


class Ledger:
    """ledger.json: written through a temporary file + rename after every finished stage."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @classmethod
    def open(cls, out: Path, recipe: str, fp: str, force: bool) -> Ledger:
        path = out / "ledger.json"
        if not path.exists():
            return cls(path, {"recipe": recipe, "fingerprint": fp, "history": [], "stages": {}, "stopped": None})
        data = json.loads(path.read_text())
        if data["recipe"] != recipe:
            raise ConfigError(f"{out} holds recipe {data['recipe']}, not {recipe}; use another output_dir")
        if data["fingerprint"] != fp:
            if not force:
                raise ConfigError(
                    f"{out}: the recipe's settings changed since round(s) {cls._rounds(data)} ran "
                    "(recipe/model/judge/overrides/seed); use another output_dir, or force=true to continue "
                    "with the new settings from the next stage on"
                )
            data["history"].append({"fingerprint": data["fingerprint"], "until": cls._rounds(data), "at": time.time()})
            data["fingerprint"] = fp
        return cls(path, data)

    @staticmethod
    def _rounds(data: dict[str, Any]) -> str:
        return ",".join(sorted({k.split("/")[0] for k in data["stages"]}, key=int)) or "none"

    def done(self, key: str) -> dict[str, Any] | None:
        return self.data["stages"].get(key)

    def record(self, key: str, entry: dict[str, Any]) -> None:
        self.data["stages"][key] = {**entry, "finished_at": time.time()}
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


# ------------------------------------------------------------------------------------------ rounds


class Round:
    """What the stages of round k see: the folders, the current model, the recipe's settings."""

    def __init__(
        self,
        cfg: AlignConfig,
        recipe: Recipe,
        out: Path,
        k: int,
        model: ModelRef,
        initial: ModelRef,
        scorers: dict[str, str],
    ):
        self.cfg, self.recipe, self.out, self.k = cfg, recipe, out, k
        self.model, self.initial, self.scorers = model, initial, scorers

    def dir(self, stage: str, k: int | None = None) -> Path:
        return self.out / "rounds" / str(self.k if k is None else k) / stage

    def resolve(self, ref: str, ledger: Ledger) -> Path | dict[str, Any] | None:
        """A stage input reference (synth/align/recipe.py) -> a path, a source config, or None."""
        kind, _, rest = ref.rpartition(":") if ":" in ref else ("", "", ref)
        if kind == "data":
            return dict(self.recipe.data[rest])
        stage, file = rest.split("/", 1)
        k = self.k
        if kind == "prev":
            k = self.k - 1
            if k < 1 or ledger.done(f"{k}/{stage}") is None:
                return None
        elif kind == "first":
            ran = sorted(int(key.split("/")[0]) for key in ledger.data["stages"] if key.split("/", 1)[1] == stage)
            if not ran:
                raise ConfigError(f"{ref}: stage {stage} has not run in any round yet")
            k = ran[0]
        path = self.dir(stage, k) / file
        check_rows(path, stage, k)
        return path


def check_rows(path: Path, stage: str, k: int) -> None:
    """A stage that produced 0 rows stops the recipe, naming the stage and the drops its manifest counted."""
    if not path.name.endswith(".jsonl"):
        if not path.exists():
            raise DataError(f"round {k}, stage {stage}: {path} does not exist")
        return
    if path.exists() and read_jsonl(path):
        return
    m = path.parent / "manifest.json"
    why = "no manifest"
    if m.exists():
        man = json.loads(m.read_text())
        parts = {
            **{f"drop/{k_}": v for k_, v in (man.get("drops") or {}).items()},
            **{f"parse_failed/{k_}": v for k_, v in (man.get("parse_failures") or {}).items()},
            **{f"{u}/{r}": v for u, rs in (man.get("dropped_parts") or {}).items() for r, v in rs.items()},
        }
        why = f"{man.get('inputs', '?')} input(s); " + (
            ", ".join(f"{a}={b}" for a, b in parts.items()) or "no drops counted"
        )
    raise DataError(
        f"round {k}, stage {stage} produced 0 rows in {path.name} ({why}); the recipe stops here rather than "
        "train on an empty file: see its manifest.json and trace.jsonl"
    )


def check_stage(cfg: AlignConfig, stage, raw: dict[str, Any] | None) -> None:
    """Combinations that would only fail rounds later, refused before round 1."""
    self_judged = cfg.judge.llm is None and cfg.judge.model is None
    if (
        stage.tool == "evaluate"
        and stage.baseline
        and raw["judges"]["pairwise"]
        and self_judged
        and not raw["allow_self_judge"]
    ):
        raise ConfigError(
            f"recipe stage {stage.name}: the win rate against the previous round would be judged by the policy "
            "itself; pick a judge (judge=openai judge.llm.base_url=... judge.model.name_or_path=...), or accept "
            "self-judging with overrides.evaluate=['allow_self_judge=true']"
        )
    if (
        stage.tool == "train"
        and stage.reference == "previous"
        and isinstance((raw["loop"] or {}).get("reference"), str)
    ):
        raise ConfigError(
            f"recipe stage {stage.name}: loop={raw['loop']['name']} keeps the initial model as its reference "
            "(OAIF); use reference: initial"
        )


def run_config(cfg: AlignConfig, resolved_yaml: str | None = None) -> dict[str, Any]:
    names = [s["name"] for s in cfg.recipe.get("stages") or [] if isinstance(s, dict)]
    for field in ("stage_overrides", "stage_inputs"):
        unknown = sorted(set(getattr(cfg, field)) - set(names))
        if unknown:
            raise ConfigError(
                f"{field}.{unknown[0]}: recipe {cfg.recipe.get('name')} has no such stage (valid: {', '.join(names)})"
            )
    raw_recipe = dict(cfg.recipe)
    if cfg.stage_inputs:  # checked by load_recipe like the recipe's own references
        raw_recipe["stages"] = [
            {**s, "inputs": {**(s.get("inputs") or {}), **cfg.stage_inputs.get(s["name"], {})}}
            for s in raw_recipe["stages"]
        ]
    recipe = load_recipe(raw_recipe)
    rounds = cfg.rounds or recipe.rounds
    out = Path(cfg.output_dir).expanduser()
    check_output_dir(out)
    for s in recipe.stages:  # every stage composes (unknown pipelines, losses, suites fail now)
        check_stage(cfg, s, stages.compose_stage(cfg, s))
    started = time.perf_counter()
    with OutputLock(out):
        ledger = Ledger.open(out, recipe.name, fingerprint(cfg, recipe), cfg.force)
        if cfg.stop.rule == "none":  # an earlier stop is lifted by asking for every round
            ledger.data["stopped"] = None
        if resolved_yaml is not None:
            write_text_atomic(out / "config.yaml", resolved_yaml)
        ledger.save()
        base = cfg.model.model_dump()
        if cfg.llm.get("kind") != "openai":  # a server serves its own copy under the model's name
            base = materialized_base(base, out / "base")
        initial = ModelRef(base=base, round=0)
        model, scorers, ran = initial, {}, 0
        if recipe.evaluate_round0 and any(s.tool == "evaluate" for s in recipe.stages):
            ev = next(s for s in recipe.stages if s.tool == "evaluate")
            ran += stages.run_stage(Round(cfg, recipe, out, 0, model, initial, scorers), ev, ledger)
        for k in range(1, rounds + 1):
            if ledger.data["stopped"] and ledger.data["stopped"]["round"] < k:
                break
            rnd = Round(cfg, recipe, out, k, model, initial, scorers)
            for s in recipe.stages:
                if s.rounds is None or k in s.rounds:
                    ran += stages.run_stage(rnd, s, ledger)
            model = rnd.model
            rep = report.build(out, ledger, cfg.stop, rounds)
            if rep["stop"] is not None and not ledger.data["stopped"]:
                ledger.data["stopped"] = rep["stop"]
                ledger.save()
        rep = report.build(out, ledger, cfg.stop, rounds)
    summary = {
        "recipe": recipe.name,
        "rounds_done": rep["rounds_done"],
        "stages_run_now": ran,
        "model": model.model_dump(),
        "stopped": ledger.data["stopped"],
        "report": str(out / "report.md"),
        "wall_time_s_this_run": round(time.perf_counter() - started, 1),
    }
    print(
        f"== align {recipe.name}: {rep['rounds_done']} round(s) done, {ran} stage(s) run now, "
        f"{summary['wall_time_s_this_run']}s -> {out}\n   {rep['verdict']}\n   report: {out / 'report.md'}",
        flush=True,
    )
    return summary


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    raw, resolved = plain_config(dcfg)
    return run_config(validate(raw), resolved)
