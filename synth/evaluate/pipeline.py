"""`evaluate` as a synth Pipeline: one chunk of prompts -> answers -> every judge -> results rows.

Per chunk, each stage is ONE batched backend call (synth.steps.base.run_calls):
  generate (policy, n samples, seeded per prompt) -> harm judge -> 3-way refusal judge -> StrongREJECT (should-
  refuse prompts only) -> pairwise vs the baseline's answer (both orders)
then the model scores (reward / cost model, KL to a reference) in-process. Rows are committed with the
chunk by the synth runner (exact-once across kill -9; a finished rerun makes no backend calls), and
`finalize` turns results.jsonl into summary.json, report.md and plots/ without any backend call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth.evaluate import judges
from synth.evaluate.refusal import is_refusal, prefixes
from synth.evaluate.report import write_outputs
from synth.evaluate.stats import pairwise_outcome, strongreject_score
from synth.io import read_jsonl
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.records import SourceItem
from synth.runtime import Sampling
from synth.steps.base import Call, run_calls


class JudgeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    harm: bool = True
    refusal: bool = True
    strongreject: bool = True
    pairwise: bool = True  # only when a baseline is given
    max_answer_chars: int = Field(4000, ge=1)  # answers are clipped to this before a judge sees them
    sampling: Sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=256)


class ScoreSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward_model: str | None = None  # a `train loop=reward` output (final folder)
    cost_model: str | None = None  # a `train loop=reward loss=cost` output
    reference: str | None = None  # KL(policy || reference) on the answers (needs temperature 1, top_p 1)
    policy: str | None = None  # the policy weights for KL; null = model.name_or_path (+ llm.adapter)
    adapter: str | None = None
    device: str = "auto"
    batch_size: int = Field(8, ge=1)


class EvaluatePipelineConfig(PipelineConfig):
    name: str = "evaluate"
    suite: dict[str, Any]
    n: int = 1
    # seed null: each request's seed derives from the run's seed and the prompt (synth.steps.base.seed_requests)
    sampling: Sampling = Sampling(temperature=0.7, top_p=0.95, max_new_tokens=512)
    judges: JudgeSettings = JudgeSettings()
    scores: ScoreSettings = ScoreSettings()
    categories: list[str] = []  # the taxonomy the harm judge names ("L1/L2")
    baseline: str | None = None
    judge_is_policy: bool = False
    run_info: dict[str, Any] = {}  # models, judge, templates: copied into summary.json and the report
    bootstrap: int = 2000


class EvaluatePipeline(Pipeline):
    Config = EvaluatePipelineConfig
    outputs = ("results",)
    roles = ("policy", "judge")

    def __init__(self, cfg: EvaluatePipelineConfig, items: list[SourceItem] | None = None):
        super().__init__(cfg)
        self._items = items or []
        self.baseline: dict[tuple[str, int], dict] = {}
        self._scorers: dict[str, Any] = {}
        self._scorers_lock = threading.Lock()

    def items(self, ctx: Context, source) -> list[SourceItem]:
        return self._items

    def setup(self, ctx, writer) -> None:
        if self.cfg.baseline and self.cfg.judges.pairwise:
            for r in read_jsonl(Path(self.cfg.baseline) / "results.jsonl"):
                self.baseline[(r["prompt_id"], r["sample"])] = r
        # The score models are built here, on the runner's thread, before any chunk worker starts: built
        # lazily in the workers, two of them could import transformers at once, which can fail
        # ("cannot import name 'GenerationConfig'"). A finished rerun has nothing to score: none is loaded.
        if any(it.id not in writer.done_ids for it in self._items):
            for name in self.scorer_names():
                self.scorer(name)

    def scorer_names(self) -> list[str]:
        """The score models this run uses: reward, cost, and KL when the answers are sampled at t = 1."""
        s = self.cfg.scores
        names = [name for name, path in (("reward", s.reward_model), ("cost", s.cost_model)) if path]
        if s.reference and self.kl_applies():
            names.append("kl")
        return names

    def kl_applies(self) -> bool:
        sp = self.cfg.sampling
        return sp.temperature == 1.0 and sp.top_p == 1.0 and sp.top_k is None

    # ---------------------------------------------------------------------------------------- chunk
    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        cfg = self.cfg
        lang = cfg.suite.get("language", "en")
        rows = self.generate(items, ctx, state)
        live = [r for r in rows if r["response"].strip()]
        for r in rows:
            if not r["response"].strip():
                state.count("empty_answer")
        j = cfg.judges
        if j.harm:
            self.judge_stage(
                ctx,
                state,
                "harm",
                [r for r in live if r["kind"] != "gold"],
                lambda r: judges.harm_prompt(r["prompt"], self.clip(r["response"]), cfg.categories, lang),
                lambda t: judges.parse_harm(t, cfg.categories),
                judges.HARM_SCHEMA,
                self.set_harm,
            )
        if j.refusal:
            self.judge_stage(
                ctx,
                state,
                "refusal",
                live,
                lambda r: judges.refusal_prompt(r["prompt"], self.clip(r["response"]), lang),
                judges.parse_refusal,
                judges.REFUSAL_SCHEMA,
                self.set_refusal,
            )
        if j.strongreject:
            self.judge_stage(
                ctx,
                state,
                "strongreject",
                [r for r in live if r["kind"] == "harmful"],
                lambda r: judges.strongreject_prompt(r["prompt"], self.clip(r["response"]), lang),
                judges.parse_strongreject,
                judges.STRONGREJECT_SCHEMA,
                self.set_strongreject,
            )
        if j.pairwise and self.baseline:
            self.pairwise(ctx, state, [r for r in rows if r["kind"] != "gold"], lang)
        self.model_scores(rows, items, state)
        for r in rows:
            state.emit("results", r)

    def clip(self, text: str) -> str:
        return judges.clip(text, self.cfg.judges.max_answer_chars)

    def generate(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> list[dict[str, Any]]:
        cfg = self.cfg
        todo = [it for it in items if it.meta["kind"] != "gold"]
        calls = [Call(it.id, list(it.prompt)) for it in todo]
        results = run_calls(ctx, state, "generate", "policy", calls, cfg.sampling.params(n=cfg.n)) if calls else []
        policy_model = ctx.llm("policy").model if calls else None
        by_id = {it.id: samples for it, samples in zip(todo, results, strict=True)}
        rows = []
        for it in items:
            if it.meta["kind"] == "gold":
                answers = [(it.meta["response"], "stop", None)]
            else:
                answers = [
                    (s.completion.text, s.completion.finish_reason, s.completion.completion_tokens)
                    for s in by_id[it.id]
                ]
            for j, (text, finish, ntok) in enumerate(answers):
                match = is_refusal(text)
                rows.append(
                    {
                        "id": f"{it.id}#{j}",
                        "prompt_id": it.id,
                        "sample": j,
                        "suite": cfg.suite["name"],
                        "language": cfg.suite.get("language", "en"),
                        "kind": it.meta["kind"],
                        "category": it.category,
                        "type": it.meta.get("type"),
                        "prompt": it.prompt_text,
                        "response": text,
                        "policy_model": policy_model if it.meta["kind"] != "gold" else "gold",
                        "finish_reason": finish,
                        "n_tokens": ntok,
                        "n_chars": len(text),
                        "refusal_str": "refusal" if match else "none",
                        "refusal_str_match": match,
                        "gold_refusal": it.meta.get("gold_refusal"),
                        "harm": None,
                        "harm_category": None,
                        "harm_raw": None,
                        "refusal": None,
                        "refusal_raw": None,
                        "sr_refused": None,
                        "sr_convincing": None,
                        "sr_specific": None,
                        "sr_score": None,
                        "sr_raw": None,
                        "pair": None,
                        "reward": None,
                        "cost": None,
                        "kl_k1": None,
                        "kl_k3": None,
                        "kl_tokens": None,
                        "judge_model": None,
                    }
                )
        return rows

    def judge_stage(self, ctx, state, step, rows, build, parse, schema, apply) -> None:
        if not rows:
            return
        calls = [Call(r["prompt_id"], build(r), {"sample": r["sample"]}) for r in rows]
        params = self.cfg.judges.sampling.params(n=1, json_schema=schema)
        results = run_calls(ctx, state, step, "judge", calls, params, parse)
        model = ctx.llm("judge").model
        for r, (s,) in zip(rows, results, strict=True):
            r["judge_model"] = model
            apply(r, s.result)

    @staticmethod
    def set_harm(r, jd) -> None:
        r["harm_raw"] = jd.raw
        if jd.ok:
            r["harm"] = int(jd.parsed["verdict"] == "unsafe")
            r["harm_category"] = jd.parsed["category"]

    @staticmethod
    def set_refusal(r, jd) -> None:
        r["refusal_raw"] = jd.raw
        r["refusal"] = jd.parsed if jd.ok else None

    @staticmethod
    def set_strongreject(r, jd) -> None:
        r["sr_raw"] = jd.raw
        if jd.ok:
            p = jd.parsed
            r.update(
                sr_refused=p["refused"],
                sr_convincing=p["convincing"],
                sr_specific=p["specific"],
                sr_score=strongreject_score(p["refused"], p["convincing"], p["specific"]),
            )

    def pairwise(self, ctx, state, rows, lang) -> None:
        """Both orders for every answer with a baseline answer to the same prompt and sample index."""
        todo, calls = [], []
        for r in rows:
            old = self.baseline.get((r["prompt_id"], r["sample"]))
            if old is None:
                state.count("pairwise_no_baseline_answer")
                continue
            new_t, old_t = self.clip(r["response"]), self.clip(old["response"])
            todo.append((r, old))
            calls.append(
                Call(r["prompt_id"], judges.pairwise_prompt(r["prompt"], new_t, old_t, lang), {"order": "new_first"})
            )
            calls.append(
                Call(r["prompt_id"], judges.pairwise_prompt(r["prompt"], old_t, new_t, lang), {"order": "new_second"})
            )
        if not calls:
            return
        params = self.cfg.judges.sampling.params(n=1, json_schema=judges.PAIRWISE_SCHEMA)
        results = run_calls(ctx, state, "pairwise", "judge", calls, params, judges.parse_pairwise)
        for k, (r, old) in enumerate(todo):
            first, second = results[2 * k][0].result, results[2 * k + 1][0].result
            v1 = first.parsed if first.ok else None
            v2 = second.parsed if second.ok else None
            r["judge_model"] = ctx.llm("judge").model
            r["pair"] = {
                "verdict_new_first": v1,
                "verdict_new_second": v2,
                "outcome": pairwise_outcome(v1, v2),
                "raw_new_first": first.raw,
                "raw_new_second": second.raw,
                "baseline_response": old["response"],
                "len_delta": len(r["response"]) - len(old["response"]),
            }

    def scorer(self, name: str):
        """The score model `name`, built once (by `setup`; the lock guards a `process` called without it)."""
        with self._scorers_lock:
            if name not in self._scorers:
                from synth.evaluate import scoring

                s = self.cfg.scores
                if name == "kl":
                    policy = s.policy or self.cfg.run_info.get("policy_path")
                    self._scorers[name] = scoring.LogprobScorer(policy, s.reference, s.adapter, s.device, s.batch_size)
                else:
                    path = s.reward_model if name == "reward" else s.cost_model
                    self._scorers[name] = scoring.ScalarScorer(path, s.device, s.batch_size)
            return self._scorers[name]

    def model_scores(self, rows, items, state) -> None:
        s = self.cfg.scores
        prompts = {it.id: it.prompt for it in items}
        live = [r for r in rows if r["kind"] != "gold" and r["response"].strip()]
        if not live:
            return
        P = [prompts[r["prompt_id"]] for r in live]
        A = [r["response"] for r in live]
        for name, path in (("reward", s.reward_model), ("cost", s.cost_model)):
            if path:
                for r, v in zip(live, self.scorer(name)(P, A), strict=True):
                    r[name] = v
        if s.reference and self.kl_applies():
            for r, v in zip(live, self.scorer("kl")(P, A), strict=True):
                r.update(v)
        elif s.reference:
            state.count("kl_skipped_not_t1")

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        summary = write_outputs(out_dir, self.cfg)
        return {"evaluate": {"headline": summary.get("headline", {}), "warnings": summary.get("warnings", [])}}


def prefix_version() -> int:
    return prefixes()["version"]
