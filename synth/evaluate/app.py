"""`evaluate` below Hydra: validate the composed config, load the suite, run the evaluation pipeline on
the synth runner (chunked, exact-once, resumable; a finished rerun makes no backend calls), and write
summary.json, report.md and plots/ from results.jsonl.

Callable without Hydra: `run({...plain dict...})` or `run_config(EvaluateConfig(...))`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.app import ModelConfig, RoleConfig, auto_chunks_in_flight, one_line, plain_config
from synth.constitution import load_constitution
from synth.errors import ConfigError
from synth.evaluate.judges import template_refs
from synth.evaluate.pipeline import (
    EvaluatePipeline,
    EvaluatePipelineConfig,
    JudgeSettings,
    ScoreSettings,
    prefix_version,
)
from synth.evaluate.suites import SuiteConfig, load_suite
from synth.io import check_output_dir, write_text_atomic
from synth.llm import build_llm, check_llm
from synth.pipelines.base import run_pipeline
from synth.runtime import Context, Sampling


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llm: dict[str, Any]
    model: ModelConfig
    suite: SuiteConfig
    judge: RoleConfig = RoleConfig()
    n: int = Field(1, ge=1)
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=512)  # seed null: per request
    judges: JudgeSettings = JudgeSettings()
    scores: ScoreSettings = ScoreSettings()
    baseline: str | None = None
    allow_self_judge: bool = False
    output_dir: str
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(16, ge=1)
    chunks_in_flight: int = Field(0, ge=0)  # 0 = auto, as in synth (synth.app.chunks_in_flight)
    cache: bool = True
    resume: bool = True
    progress: bool = True
    bootstrap: int = Field(2000, ge=100)


LOUD = "!" * 78


def validate(raw: dict[str, Any]) -> EvaluateConfig:
    try:
        return EvaluateConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(one_line(e)) from None


def fingerprint(cfg: EvaluateConfig) -> str:
    """What must not change between a run and its resume."""
    keep = {
        "model": cfg.model.model_dump(),
        "adapter": cfg.llm.get("adapter"),
        "suite": cfg.suite.model_dump(exclude={"limit", "gold_limit"}),
        # the judge's identity, not how it is reached (a server's URL or concurrency may change)
        "judge": {
            "model": cfg.judge.model.model_dump() if cfg.judge.model else None,
            "kind": (cfg.judge.llm or {}).get("kind"),
            "adapter": (cfg.judge.llm or {}).get("adapter"),
        },
        "n": cfg.n,
        "sampling": cfg.sampling.model_dump(),
        "judges": cfg.judges.model_dump(),
        "scores": cfg.scores.model_dump(),
        "baseline": cfg.baseline,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(out_dir: Path, cfg: EvaluateConfig) -> None:
    """Refuse to resume a folder holding an evaluation with other settings (read-only)."""
    marker = out_dir / ".run.json"
    if marker.exists() and cfg.resume and json.loads(marker.read_text())["fingerprint"] != fingerprint(cfg):
        raise ConfigError(
            f"{out_dir} holds an evaluation with different settings (model/suite/judge/sampling/scores/baseline); "
            "use another output_dir, or resume=false to start it over"
        )


def mark_run(out_dir: Path, cfg: EvaluateConfig, resolved_yaml: str | None) -> None:
    """Called by the runner once the folder is locked and the inputs are read, before outputs (re)start."""
    write_text_atomic(out_dir / ".run.json", json.dumps({"fingerprint": fingerprint(cfg)}) + "\n")
    if resolved_yaml is not None:
        write_text_atomic(out_dir / "config.yaml", resolved_yaml)


def taxonomy_categories(name: str | None) -> list[str]:
    if not name:
        return []

    return [f"{a}/{b}" for a, b in load_constitution(name).categories()]


def make_context(cfg: EvaluateConfig, out_dir: Path):
    cache = out_dir / "cache.sqlite" if cfg.cache else None
    ctx = Context(factories={}, seed=cfg.seed)
    policy_model = cfg.model.model_dump()
    ctx.factories["policy"] = lambda: build_llm(cfg.llm, policy_model, cache_path=cache)
    if cfg.judge.llm is None and cfg.judge.model is None:
        ctx.factories["judge"] = lambda: ctx.llm("policy")
    else:
        judge_llm, judge_model = cfg.judge.llm or cfg.llm, (cfg.judge.model or cfg.model).model_dump()
        ctx.factories["judge"] = lambda: build_llm(judge_llm, judge_model, cache_path=cache)
    return ctx


def run_config(cfg: EvaluateConfig, resolved_yaml: str | None = None) -> dict[str, Any]:
    warnings: list[str] = []
    judge_is_policy = cfg.judge.llm is None and cfg.judge.model is None
    any_judge = (
        cfg.judges.harm or cfg.judges.refusal or cfg.judges.strongreject or (cfg.baseline and cfg.judges.pairwise)
    )
    if cfg.baseline:
        base = Path(cfg.baseline).expanduser()
        if not (base / "results.jsonl").exists():
            raise ConfigError(
                f"baseline={cfg.baseline}: no results.jsonl there (point it at an earlier evaluate output_dir)"
            )
        if cfg.judges.pairwise and judge_is_policy:
            if not cfg.allow_self_judge:
                raise ConfigError(
                    "the win rate against the baseline would be judged by the evaluated policy itself; pick a judge "
                    "(judge=openai judge.model.name_or_path=<model>, or judge=hf/vllm), or accept self-judging with "
                    "allow_self_judge=true, or judges.pairwise=false"
                )
            msg = (
                "the policy judges its OWN win rate against the baseline (allow_self_judge=true): "
                "self-preference bias; not evidence"
            )
            print(f"{LOUD}\nWARNING: {msg}\n{LOUD}", file=sys.stderr, flush=True)
            warnings.append(msg)
    if judge_is_policy and any_judge:
        print(
            "warning: judge=policy: the evaluated model labels its own answers (pick a fixed judge with "
            "judge=openai|hf|vllm)",
            file=sys.stderr,
            flush=True,
        )
    categories = taxonomy_categories(cfg.suite.taxonomy)
    items, info = load_suite(cfg.suite)
    if info.get("unmapped_subtypes"):
        warnings.append(
            f"suite sub-types without a category mapping (reported as 'unmapped'): {info['unmapped_subtypes']}"
        )
    out_dir = Path(cfg.output_dir).expanduser()
    check_llm(cfg.llm, cfg.model.model_dump(), "llm")
    if cfg.judge.llm is not None or cfg.judge.model is not None:
        check_llm(cfg.judge.llm or cfg.llm, (cfg.judge.model or cfg.model).model_dump(), "judge.llm")
    check_output_dir(out_dir)
    check_resumable(out_dir, cfg)
    run_info = {
        "policy": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "adapter": cfg.llm.get("adapter"),
        "backend": cfg.llm.get("kind"),
        "judge_is_policy": judge_is_policy,
        "judge": (cfg.judge.model.name_or_path if cfg.judge.model else cfg.model.name_or_path),
        "templates": template_refs(cfg.suite.language),
        "refusal_prefix_version": prefix_version(),
        "sampling": {**cfg.sampling.model_dump(), "n": cfg.n},
        "judge_sampling": cfg.judges.sampling.model_dump(),
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "suite_info": info,
        "warnings": warnings,
        "policy_path": cfg.model.name_or_path,
        "reward_model": cfg.scores.reward_model,
        "cost_model": cfg.scores.cost_model,
        "reference": cfg.scores.reference,
    }
    scores = (
        cfg.scores
        if cfg.scores.adapter or not cfg.llm.get("adapter")
        else cfg.scores.model_copy(update={"adapter": cfg.llm["adapter"]})
    )
    pcfg = EvaluatePipelineConfig(
        suite=cfg.suite.model_dump(),
        n=cfg.n,
        sampling=cfg.sampling,
        judges=cfg.judges,
        scores=scores,
        categories=categories,
        baseline=str(Path(cfg.baseline).expanduser()) if cfg.baseline else None,
        judge_is_policy=judge_is_policy,
        run_info=run_info,
        bootstrap=cfg.bootstrap,
    )
    ctx = make_context(cfg, out_dir)
    llms = [cfg.llm] + ([cfg.judge.llm] if cfg.judge.llm is not None else [])
    manifest = run_pipeline(
        EvaluatePipeline(pcfg, items),
        ctx,
        out_dir,
        None,
        cfg.chunk_size,
        cfg.resume,
        cfg.progress,
        on_start=lambda: mark_run(out_dir, cfg, resolved_yaml),
        chunks_in_flight=auto_chunks_in_flight(cfg.chunks_in_flight, llms, cfg.chunk_size),
    )
    print_headline(out_dir)
    return manifest


def print_headline(out_dir: Path) -> None:
    p = out_dir / "summary.json"
    if not p.exists():
        return
    s = json.loads(p.read_text())
    head = s.get("headline", {})
    bad = set(head.get("unreliable", []))
    h = {k: v for k, v in head.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(
        "   evaluate: " + "  ".join(f"{k}={v:.3f}{' (unreliable)' if k in bad else ''}" for k, v in h.items()),
        flush=True,
    )
    for w in s.get("warnings", []):
        print(f"   warning: {w}", flush=True)
    print(f"   report: {out_dir / 'report.md'}", flush=True)


def run(dcfg) -> dict[str, Any]:
    """Entry from Hydra (a DictConfig) or from code (a plain dict)."""
    raw, resolved = plain_config(dcfg)
    return run_config(validate(raw), resolved)
