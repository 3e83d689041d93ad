"""A recipe (conf/recipe/<name>.yaml): the stages of one round, checked before anything runs.

Each stage is one in-process run of a tool:

    synth     synth.app.run      a pipeline (red_team, critique_revision, generate, self_rewarding, ...)
    train     train.app.run      a loop (sft, preference, online_dpo, reward)
    evaluate  synth.evaluate.app.run
    op        a pure data step of synth/align/ops.py (SPIN pairs, RAFT selection, RSO sampling, ...)

A stage's `overrides` are that tool's command-line overrides (`pipeline=red_team`, `loss=dpo`, ...);
its `inputs` wire earlier outputs into its config: `{config key: reference}`, where a reference is

    <stage>/<file>          this round's output of an earlier stage
    prev:<stage>/<file>     the previous round's (absent in round 1: the key is left unset)
    first:<stage>/<file>    the first round that ran that stage (e.g. a reward model trained once)
    data:<name>             the recipe's `data.<name>` (a source config: kind, path, limit, fields)

The key `source` takes a whole source config (a file becomes `{kind: jsonl, path}`); any other key
is a dotted config key set to the file's path. The current model is never wired by hand: align hands
it to every stage (synth/align/models.py).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synth.app import one_line
from synth.errors import ConfigError

TOOLS = ("synth", "train", "evaluate", "op")
# config groups a stage may pick with `group=name`; an unknown name is refused with the valid ones
GROUPS = ("pipeline", "source", "loop", "loss", "suite", "judge", "attacker", "llm", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    tool: str
    overrides: list[str] = Field(default_factory=list)
    inputs: dict[str, str] = Field(default_factory=dict)
    op: str | None = None  # tool=op: a function of synth/align/ops.py
    args: dict[str, Any] = Field(default_factory=dict)  # tool=op: its settings
    rounds: list[int] | None = None  # run only in these rounds ([1]: once); null: every round
    # train: the DPO reference. previous = the model this round started from (SPIN, self-rewarding);
    # initial = the model round 1 started from (OAIF's fixed SFT reference); auto = the loop's own choice
    reference: Literal["auto", "previous", "initial"] = "auto"
    produces: Literal["policy", "scorer"] | None = None  # train: null = policy, except loop=reward (a scorer)
    baseline: bool = True  # evaluate: win rate against the previous round's evaluate output
    self_judge: bool = False  # synth: the judge role is the current model itself (self-rewarding), not align's judge


class StopRule(_Strict):
    """When to stop before the rounds asked for are done (checked after each round's evaluate)."""

    rule: Literal["win_rate", "none"] = "win_rate"  # win_rate: stop when the win rate against the previous
    # round is not above 0.5 by its interval (lower bound <= 0.5), or cannot be measured
    min_rounds: int = Field(1, ge=1)  # never stop before this many rounds
    max_harmful_increase: float | None = Field(None, ge=0)  # also stop when the harmful rate rose by more


class Recipe(_Strict):
    name: str
    paper: str | None = None
    description: str | None = None
    rounds: int = Field(2, ge=1)
    evaluate_round0: bool = True  # evaluate the initial model first (round 0: round 1's baseline)
    data: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Recipe:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique (repeated: {', '.join(dup)})")
        return self


def conf_names(group: str) -> list[str]:
    root = resources.files("rlaif_forge_conf") / group
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def load_recipe(raw: dict[str, Any]) -> Recipe:
    """The `recipe:` group -> a checked Recipe: unknown tools, ops, config names and references are
    refused with one line listing the valid names, before any stage runs."""

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line(e).replace("invalid config: ", "invalid config: recipe.")) from None
    seen: list[str] = []
    for s in recipe.stages:
        where = f"recipe {recipe.name}, stage {s.name}"
        if s.tool not in TOOLS:
            raise ConfigError(f"{where}: unknown tool {s.tool!r} (valid: {', '.join(TOOLS)})")
        if s.tool == "op":
            from synth.align.ops import OPS

            if s.op not in OPS:
                raise ConfigError(f"{where}: unknown op {s.op!r} (valid: {', '.join(sorted(OPS))})")
        elif s.op is not None or s.args:
            raise ConfigError(f"{where}: `op`/`args` belong to tool=op stages")
        for ov in s.overrides:
            check_group_override(ov, where)
        for key, ref in s.inputs.items():
            check_reference(ref, recipe, seen, f"{where}, inputs.{key}")
            if ref.startswith("data:") and recipe.data[ref[5:]].get("path") in (None, "???"):
                raise ConfigError(
                    f"recipe {recipe.name} needs a file for recipe.data.{ref[5:]}: "
                    f"set recipe.data.{ref[5:]}.path=<file> (used by stage {s.name})"
                )
        seen.append(s.name)
    return recipe


def check_group_override(override: str, where: str) -> None:
    key, eq, value = override.lstrip("+~").partition("=")
    if eq and key in GROUPS and value not in conf_names(key):
        raise ConfigError(f"{where}: unknown {key} {value!r} (valid: {', '.join(conf_names(key))})")


def check_reference(ref: str, recipe: Recipe, earlier: list[str], where: str) -> None:
    kind, _, rest = ref.rpartition(":") if ":" in ref else ("", "", ref)
    if kind == "data":
        if rest not in recipe.data:
            raise ConfigError(
                f"{where}: data:{rest} is not in recipe.data (valid: {', '.join(sorted(recipe.data)) or 'none'})"
            )
        return
    if kind not in ("", "prev", "first"):
        raise ConfigError(
            f"{where}: {ref!r}: unknown reference kind {kind!r} (valid: <stage>/<file>, prev:, first:, data:)"
        )
    stage = rest.split("/", 1)[0]
    valid = earlier if kind == "" else [s.name for s in recipe.stages]
    if "/" not in rest or stage not in valid:
        raise ConfigError(
            f"{where}: {ref!r} names no {'earlier ' if kind == '' else ''}stage "
            f"(valid: {', '.join(valid) or 'none'}; write <stage>/<file>)"
        )
