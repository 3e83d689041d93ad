"""`pipeline=red_team`: taxonomy x attack families -> adversarial prompts, target answers, verdicts
(Perez et al. 2022, arXiv 2202.03286).

Items are the constitution's taxonomy categories (safety_zh: 33 L2 categories) crossed with the
attack families (no source). Per chunk, one batched call per stage:
1. attacker: k prompts per (category, family); exact and near-duplicate prompts are removed against
   every prompt committed so far in this output folder (loaded in `setup`) and earlier in the chunk;
2. target: every prompt answered under every decoding setting of `decoding` (greedy-only
   safety results overstate robustness), one request per (prompt, setting) with its own params;
3. judge: a safety verdict + violated category per answer; an unparseable verdict is no verdict
   (counted), never "safe".

`seeds: true` takes the attack prompts from a source instead (e.g. HH red-team first turns,
`source=hh_rlhf source.path=...`): stage 1 is skipped, every source prompt (near-duplicates removed) is
answered and judged, and a prompt without a category takes the judge's category in unsafe.jsonl. This is
the route for attacker models too small to write attacks (a 135M model writes off-topic text).

Outputs: prompts.jsonl (prompt, L1/L2 category, attack family, generator config, labels),
answers.jsonl (prompt, answer, decoding setting, verdict, category), unsafe.jsonl (prompts with at
least one unsafe answer; `prompt` + `category` + `answer`, the first answer judged unsafe in the order
of `decoding`, read directly by `pipeline=critique_revision source=jsonl source.path=<out>/unsafe.jsonl`,
which critiques and revises that very answer, as in SL-CAI where the red-team response is revised).
Harmful answers are never SFT targets: critique_revision uses them only as the rejected side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth.errors import ConfigError, ConstitutionError
from synth.io import ChunkWriter, read_jsonl
from synth.llm.base import SamplingParams
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.records import SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps import attack as attack_step
from synth.steps import safety_verdict
from synth.steps.base import Call, run_calls, user
from synth.steps.filters import NearDuplicateIndex


class Decoding(BaseModel):
    """One target decoding setting of the sweep."""

    model_config = ConfigDict(extra="forbid")
    name: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(100, ge=1)  # max_new_tokens=100

    def params(self, seed: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
        )


DEFAULT_DECODING = [  # greedy, the "default" setting (T=0.1, top-p 0.9), and two grid points
    Decoding(name="greedy", temperature=0.0),
    Decoding(name="default", temperature=0.1, top_p=0.9),
    Decoding(name="t0.7_p1.0", temperature=0.7, top_p=1.0),
    Decoding(name="t1.0_p0.9", temperature=1.0, top_p=0.9),
]


class RedTeamConfig(PipelineConfig):
    name: str = "red_team"
    families: list[str] = list(attack_step.FAMILIES)
    categories: list[str] = []  # "L1/L2" paths or L1 names to walk; [] = the whole taxonomy
    prompts_per_item: int = Field(4, ge=1)  # k attacker samples per (category, family)
    attacker_sampling: Sampling = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=256)  # nucleus p=0.95
    near_duplicate: float = Field(0.8, gt=0, le=1)  # Jaccard of character 3-grams
    decoding: list[Decoding] = DEFAULT_DECODING
    # null (default): every sampled target request gets its own seed from the run's `seed` and its (prompt,
    # setting) key (synth.steps.base.seed_requests), so reruns reproduce the sweep; a number: that seed for
    # every sampled target request
    target_seed: int | None = Field(None, ge=0)
    judge_sampling: Sampling = Sampling(temperature=0.0, max_new_tokens=128)  # judge at T=0
    seeds: bool = False  # true: the attack prompts are the source's prompts (no attacker stage)

    @field_validator("families")
    @classmethod
    def _known_families(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in attack_step.FAMILIES]
        if unknown or not v:
            raise ValueError(f"unknown attack families {unknown}; valid: {list(attack_step.FAMILIES)}")
        return v

    @field_validator("decoding")
    @classmethod
    def _unique_names(cls, v: list[Decoding]) -> list[Decoding]:
        names = [d.name for d in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"decoding needs at least one setting and unique names, got {names}")
        return v


class RedTeamPipeline(Pipeline):
    Config = RedTeamConfig
    outputs = ("prompts", "answers", "unsafe")
    roles = ("attacker", "target", "judge")
    needs_source = False

    def __init__(self, cfg: RedTeamConfig):
        super().__init__(cfg)
        self.index = NearDuplicateIndex(cfg.near_duplicate)
        self.needs_source = cfg.seeds  # type: ignore[misc] - per instance: a source only in seed mode

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        if self.cfg.seeds:
            yield from self.seed_items(ctx, source)
            return
        for path in self.category_paths(ctx):
            l1, l2 = path.split("/", 1)
            for fam in self.cfg.families:
                yield SourceItem(
                    id=stable_id("red_team", path, fam),
                    prompt=[],
                    category=path,
                    meta={"l1": l1, "l2": l2, "attack_family": fam},
                )

    def seed_items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        if source is None:
            raise ConfigError(
                "pipeline.seeds=true takes its attack prompts from a source; add source=hh_rlhf "
                "source.path=<file> (or source=jsonl)"
            )
        known = {f"{a}/{b}" for a, b in ctx.constitution.categories()}
        for it in source:
            users = [m for m in it.prompt if m.role == "user"]
            if not users:
                continue
            cat = it.category if it.category in known else None
            l1, _, l2 = (cat or "unlabelled/unlabelled").partition("/")
            yield SourceItem(
                id=it.id, prompt=[users[-1]], category=cat, meta={"l1": l1, "l2": l2, "attack_family": "seed"}
            )

    def check_constitution(self, constitution) -> None:
        self.category_paths_of(constitution)  # seeds too: the judge names a taxonomy category

    def category_paths(self, ctx: Context) -> list[str]:
        return self.category_paths_of(ctx.constitution)

    def category_paths_of(self, cons) -> list[str]:
        if cons is None or not cons.taxonomy:
            name = getattr(cons, "name", None)
            raise ConstitutionError(
                f"pipeline=red_team walks a constitution's harm taxonomy and constitution={name} has none; "
                "use constitution=safety_en (English) or constitution=safety_zh, or add a `taxonomy:` to your file "
                "(constitutions/README.md)"
            )
        paths = [f"{l1}/{l2}" for l1, l2 in cons.categories()]
        if not self.cfg.categories:
            return paths
        unknown = [c for c in self.cfg.categories if not any(p == c or p.startswith(c + "/") for p in paths)]
        if unknown:
            raise ConfigError(f"pipeline.categories: {unknown} not in the taxonomy of {cons.name!r}; e.g. {paths[0]!r}")
        return [p for p in paths if any(p == c or p.startswith(c + "/") for c in self.cfg.categories)]

    def estimate(self, n_items: int) -> dict[str, int]:
        """Per item: one attacker request (k samples); per prompt, one target request per decoding setting
        and one verdict per answer (upper bounds: duplicates and failures only lower them)."""
        k, d = (1, len(self.cfg.decoding)) if self.cfg.seeds else (self.cfg.prompts_per_item, len(self.cfg.decoding))
        attacker = 0 if self.cfg.seeds else n_items
        answers = n_items * k * d
        tokens = n_items * k * sum(x.max_new_tokens for x in self.cfg.decoding)
        tokens += attacker * k * self.cfg.attacker_sampling.max_new_tokens
        return {
            "requests": attacker + 2 * answers,
            "new_tokens": tokens + answers * self.cfg.judge_sampling.max_new_tokens,
        }

    def setup(self, ctx: Context, writer: ChunkWriter) -> None:
        """Prompts committed by earlier chunks (and earlier runs into this folder) count for dedup."""
        self.index = NearDuplicateIndex(self.cfg.near_duplicate)
        for row in read_jsonl(writer.path("prompts")):
            self.index.add(row["id"], row["prompt"])

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        prompts = self.seeded(items, state) if self.cfg.seeds else self.attack(items, ctx, state)
        answers = self.answer(prompts, ctx, state)
        self.judge(prompts, answers, ctx, state)

    # ------------------------------------------------------------------ stages

    def seeded(self, items: Sequence[SourceItem], state: ChunkState) -> list[dict[str, Any]]:
        """Seed mode's stage 1: the source prompts themselves, near-duplicates removed; ids kept."""
        rows = []
        for it in items:
            text = it.prompt[-1].content.strip()
            dup = self.index.add_unless_duplicate(it.id, text)
            if dup is not None:
                state.drop_part("attack_prompt", f"prompt_duplicate_{dup[0]}")
                continue
            row = {
                "id": it.id,
                "prompt": text,
                "category": it.category,
                "l1": it.meta["l1"],
                "l2": it.meta["l2"],
                "attack_family": "seed",
                "item_id": it.id,
                "generator": {"source": "seed"},
            }
            state.emit("prompts", row)
            state.count(f"category/{it.category or 'unlabelled'}")
            rows.append(row)
        return rows

    def attack(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> list[dict[str, Any]]:
        cons = ctx.constitution
        targets = [
            attack_step.AttackTarget(
                it.id,
                it.meta["l1"],
                it.meta["l2"],
                cons.taxonomy_category(it.category).description,
                cons.taxonomy_category(it.category).red_team,
                it.meta["attack_family"],
            )
            for it in items
        ]
        k = self.cfg.prompts_per_item
        results = attack_step.attack(ctx, state, targets, self.cfg.attacker_sampling.params(), k)
        generator = {
            "model": ctx.llm("attacker").model,
            "sampling": {**self.cfg.attacker_sampling.model_dump(), "n": k},
            **template_ref("red_team_attack", ctx.language),
        }
        rows = []
        for it, samples in zip(items, results, strict=True):
            state.count(f"category/{it.category}", 0)  # every walked category shows in the manifest
            for s in samples:
                if not s.ok:
                    state.drop_part("attack_prompt", "attack_truncated" if s.completion.truncated else "attack_empty")
                    continue
                text, pid = s.parsed_text, stable_id(it.id, s.index, s.parsed_text)
                dup = self.index.add_unless_duplicate(pid, text)
                if dup is not None:
                    state.drop_part("attack_prompt", f"prompt_duplicate_{dup[0]}")
                    continue
                row = {
                    "id": pid,
                    "prompt": text,
                    "category": it.category,
                    "l1": it.meta["l1"],
                    "l2": it.meta["l2"],
                    "attack_family": it.meta["attack_family"],
                    "item_id": it.id,
                    "generator": generator,
                }
                state.emit("prompts", row)
                state.count(f"category/{it.category}")
                rows.append(row)
        return rows

    def answer(self, prompts: list[dict[str, Any]], ctx: Context, state: ChunkState) -> list[list[Any]]:
        """ONE target call: every prompt x every decoding setting, each request with its own params."""
        calls, params = [], []
        for p in prompts:
            for d in self.cfg.decoding:
                calls.append(Call(p["id"], [user(p["prompt"])], {"decoding": d.name}))
                params.append(d.params(None if d.temperature == 0 else self.cfg.target_seed))
        flat = run_calls(ctx, state, "target", "target", calls, params)
        n = len(self.cfg.decoding)
        return [[s[0] for s in flat[i * n : (i + 1) * n]] for i in range(len(prompts))]

    def judge(self, prompts: list[dict[str, Any]], answers: list[list[Any]], ctx: Context, state: ChunkState) -> None:
        cats = [f"{a}/{b}" for a, b in ctx.constitution.categories()]
        inputs, rows = [], []
        for p, samples in zip(prompts, answers, strict=True):
            for d, s in zip(self.cfg.decoding, samples, strict=True):
                row = {
                    "id": stable_id(p["id"], d.name),
                    "prompt_id": p["id"],
                    "prompt": p["prompt"],
                    "answer": s.text.strip(),
                    "finish_reason": s.completion.finish_reason,
                    "decoding": d.model_dump(),
                    "verdict": None,
                    "judge_category": None,
                    "category": p["category"],
                    "l1": p["l1"],
                    "l2": p["l2"],
                    "attack_family": p["attack_family"],
                }
                rows.append(row)
                if not row["answer"]:
                    state.drop_part("answer", "verdict_skipped_empty_answer")  # the row stays, verdict null
                    continue
                inputs.append(
                    (
                        row,
                        safety_verdict.VerdictInput(
                            p["id"], p["prompt"], row["answer"], p["category"], {"decoding": d.name}
                        ),
                    )
                )
        verdicts = safety_verdict.judge(ctx, state, [x for _, x in inputs], cats, self.cfg.judge_sampling.params())
        for (row, _), v in zip(inputs, verdicts, strict=True):
            if v.ok:  # parsed AND not cut off at max_new_tokens (a cut-off verdict is not trusted)
                row["verdict"], row["judge_category"] = v.parsed["verdict"], v.parsed["category"]
        for row in rows:
            state.emit("answers", row)
        self.emit_unsafe(prompts, rows, state)

    def emit_unsafe(self, prompts: list[dict[str, Any]], rows: list[dict[str, Any]], state: ChunkState) -> None:
        for p in prompts:
            mine = [r for r in rows if r["prompt_id"] == p["id"]]
            bad = [r for r in mine if r["verdict"] == "unsafe"]
            if not bad:
                continue
            first = bad[0]  # decoding order: greedy first in the default sweep
            judged_cats = sorted({r["judge_category"] for r in bad if r["judge_category"]})
            # a seed prompt without a category takes the judge's (the first unsafe answer's) category
            cat = p["category"] or first["judge_category"] or (judged_cats[0] if judged_cats else None)
            l1, _, l2 = (cat or f"{p['l1']}/{p['l2']}").partition("/")
            state.emit(
                "unsafe",
                {
                    "id": p["id"],
                    "prompt": p["prompt"],
                    "category": cat,
                    "l1": l1,
                    "l2": l2,
                    "attack_family": p["attack_family"],
                    "answer": first["answer"],
                    "answer_id": first["id"],
                    "answer_decoding": first["decoding"]["name"],
                    "unsafe_decodings": [r["decoding"]["name"] for r in bad],
                    "judge_categories": judged_cats,
                    "judged": sum(r["verdict"] is not None for r in mine),
                },
            )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        """Attack yield (unsafe share of judged answers) by family, decoding setting and L1 category."""
        rows = read_jsonl(out_dir / "answers.jsonl")

        def table(key) -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for r in rows:
                t = out.setdefault(key(r), {"answers": 0, "judged": 0, "unsafe": 0})
                t["answers"] += 1
                t["judged"] += r["verdict"] is not None
                t["unsafe"] += r["verdict"] == "unsafe"
            for t in out.values():
                t["unsafe_rate"] = round(t["unsafe"] / t["judged"], 4) if t["judged"] else None  # type: ignore[assignment]
            return dict(sorted(out.items()))

        return {
            "red_team": {
                "by_family": table(lambda r: r["attack_family"]),
                "by_decoding": table(lambda r: r["decoding"]["name"]),
                "by_l1": table(lambda r: r["l1"]),
            }
        }
