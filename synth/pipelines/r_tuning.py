"""`pipeline=r_tuning`: refusal-aware SFT data (R-Tuning, Zhang et al., NAACL 2024, arXiv 2311.09677;
official repository shizhediao/R-Tuning).

Input: questions with reference answers (`source=jsonl source.fields.prompt=question
source.fields.chosen=answer`, or `pipeline.reference=<field>` naming a row field that holds the answer or
a list of aliases). Role: `policy` is the model that will be fine-tuned; the knowledge boundary is its
own, so probe exactly that model.

Per chunk, ONE greedy probe call (`Question: {question} Answer:`, 15 new tokens, cut at the first "."):
an item is *certain* when the probe answer matches the reference (synth.steps.knowledge), else
*uncertain*. Then `sft.jsonl` rows:
- `method=unsure` (R-Tuning): the target is the reference answer followed by the certainty question and
  " I am sure." / " I am unsure.". The answer is kept in both cases: the model learns to state its
  uncertainty, not to withhold the answer.
- `method=unknown` (R-Tuning-R): certain items keep the answer; uncertain ones get a refusal sentence.
- `method=uncertain` (R-Tuning-U, the repository's `--method uncertain`): no reference match. Each
  question is sampled `uncertain.samples` = 5 times (temperature 0.7, 15 tokens, cut at "."), the
  entropy of the answers' frequency distribution (natural log) measures uncertainty, and after the
  whole run the lower-entropy half (ties in input order) gets " I am sure.", the rest " I am unsure.",
  both after the reference answer. The split needs every item's entropy, so chunks commit
  `probes.jsonl` (one row per question, resumable as usual) and `finalize` writes `sft.jsonl` from it
  (rewritten on every finished run: it is derived data).
`target_format=two_turn` puts the certainty question in a user turn and the verdict in a final
assistant turn instead of one assistant text.

Deviation from the paper, on purpose: the repository trains on the whole text (LMFlow `text_only`,
loss on the question too); our chat-template SFT scores only assistant turns. The probe is sent as a
chat user turn, not as raw text: R-Tuning probes a base model with a plain-text prompt.
This is knowledge-boundary uncertainty, not refusal of harmful requests: keep these rows apart from
safety-refusal data.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.errors import SourceError
from synth.io import read_jsonl, write_text_atomic
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.records import Message, Provenance, SFTRecord, SourceItem, stable_id
from synth.runtime import Sampling
from synth.steps.base import Call, run_calls, user
from synth.steps.knowledge import matches, probe_answer, with_period

CERTAINTY_QUESTION = "Are you sure you accurately answered the question based on your internal knowledge?"
REFUSALS = [  # R-Tuning-R: the repository draws from 16 fixed sentences; these are our own wording
    "I do not know the answer to that.",
    "I am not certain of the answer.",
    "I can't answer that reliably.",
    "That is beyond what I know.",
    "I don't have enough knowledge to answer that.",
    "I'm unsure of the answer.",
]


class UncertainSettings(BaseModel):
    """R-Tuning-U (the repository's `--method uncertain`): `--num_try 5` samples at temperature 0.7
    (`do_sample=True`, so transformers' default top_k 50 applied there), 15 new tokens; the lower-entropy
    half is "sure"."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(5, ge=2)
    sampling: Sampling = Sampling(temperature=0.7, top_p=1.0, top_k=50, max_new_tokens=15)
    sure_fraction: float = Field(0.5, gt=0, lt=1)  # the repository's split: floor(N * 0.5) lowest entropies


class RTuningConfig(PipelineConfig):
    name: str = "r_tuning"
    method: Literal["unsure", "unknown", "uncertain"] = "unsure"
    reference: str = "chosen"  # "chosen" = the source's chosen field; else a row field (a string or a list of aliases)
    probe_template: str = "Question: {question} Answer:"  # the repository's probe prompt, as one user turn
    probe: Sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=15)  # greedy, 15 new tokens
    cut_at: str | None = "."  # the probe answer ends at the first "."
    match: Literal["substring", "normalized", "exact"] = "substring"
    sft_prompt: Literal["probe", "source"] = "probe"  # user turn of the SFT row: the probe text, or the source prompt
    target_format: Literal["suffix", "two_turn"] = "suffix"
    certainty_question: str = CERTAINTY_QUESTION
    sure: str = "I am sure."
    unsure: str = "I am unsure."
    refusals: list[str] = Field(default_factory=lambda: list(REFUSALS), min_length=1)
    uncertain: UncertainSettings = UncertainSettings()


def answer_entropy(answers: Sequence[str]) -> float:
    """Entropy (nats) of the empirical distribution of identical answer strings: 0 when all agree,
    log n when all differ (scipy.stats.entropy of the counts, as the repository computes it)."""
    counts = Counter(answers).values()
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts) if n else 0.0


class RTuningPipeline(Pipeline):
    Config = RTuningConfig
    outputs = ("sft",)
    roles = ("policy",)

    def __init__(self, cfg: RTuningConfig):
        super().__init__(cfg)
        if cfg.method == "uncertain":  # the split needs every entropy: chunks commit probes, finalize writes sft
            self.outputs = ("probes",)

    def setup(self, ctx: Context, writer) -> None:
        if self.cfg.method == "uncertain":  # derived from probes.jsonl by finalize; never stale from an older run
            (writer.out_dir / "sft.jsonl").unlink(missing_ok=True)

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        for it in super().items(ctx, source):
            if not self._references(it):
                field = (
                    "the source's chosen field (source.fields.chosen)"
                    if self.cfg.reference == "chosen"
                    else repr(self.cfg.reference)
                )
                raise SourceError(
                    f"item {it.id}: no reference answer in {field}; point pipeline.reference or "
                    "source.fields.chosen at the answer column"
                )
            yield it

    def _references(self, it: SourceItem) -> list[str]:
        if self.cfg.reference == "chosen":
            return [it.chosen[-1].content.strip()] if it.chosen and it.chosen[-1].content.strip() else []
        raw = it.meta.get(self.cfg.reference)
        values = raw if isinstance(raw, list) else [raw]
        return [str(v).strip() for v in values if v is not None and str(v).strip()]

    def _probe_text(self, it: SourceItem) -> str:
        return self.cfg.probe_template.format(question=it.prompt_text)

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        if self.cfg.method == "uncertain":
            return self._process_uncertain(items, ctx, state)
        calls = [Call(it.id, [user(self._probe_text(it))]) for it in items]
        results = run_calls(ctx, state, "probe", "policy", calls, self.cfg.probe.params())
        model = ctx.llm("policy").model
        for it, samples in zip(items, results, strict=True):
            if it.category:
                state.count(f"category/{it.category}")
            refs = self._references(it)
            answer = probe_answer(samples[0].text, self.cfg.cut_at)
            certain = matches(answer, refs, self.cfg.match)
            state.count("knowledge/certain" if certain else "knowledge/uncertain")
            state.emit(
                "sft",
                SFTRecord(
                    id=stable_id(it.id, "r_tuning", self.cfg.method),
                    messages=self._messages(it, refs[0], certain, ctx),
                    method=f"r_tuning_{self.cfg.method}",
                    category=it.category,
                    meta={
                        "certain": certain,
                        "probe_answer": answer,
                        "references": refs,
                        "match": self.cfg.match,
                        "probe_model": model,
                        "source_meta": it.meta,
                    },
                    provenance=Provenance(generator_model=model, sampling=self.cfg.probe.model_dump()),
                ),
            )

    def _process_uncertain(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        u = self.cfg.uncertain
        calls = [Call(it.id, [user(self._probe_text(it))]) for it in items]
        results = run_calls(ctx, state, "probe", "policy", calls, u.sampling.params(n=u.samples))
        model = ctx.llm("policy").model
        for it, samples in zip(items, results, strict=True):
            if it.category:
                state.count(f"category/{it.category}")
            answers = [probe_answer(x.text, self.cfg.cut_at) for x in samples]
            refs = self._references(it)
            state.emit(
                "probes",
                {
                    "id": it.id,
                    "entropy": answer_entropy(answers),
                    "answers": answers,
                    "references": refs,
                    "prompt": [m.model_dump() for m in self._prompt(it)],
                    "category": it.category,
                    "probe_model": model,
                    "source_meta": it.meta,
                },
            )

    def _prompt(self, it: SourceItem) -> list[Message]:
        return (
            [Message(role="user", content=self._probe_text(it))] if self.cfg.sft_prompt == "probe" else list(it.prompt)
        )

    def _messages(self, it: SourceItem, gold: str, certain: bool, ctx: Context) -> list[Message]:
        cfg = self.cfg
        prompt = self._prompt(it)
        if cfg.method == "unknown":
            answer = with_period(gold) if certain else ctx.rng(it.id, "refusal").choice(cfg.refusals)
            return prompt + [Message(role="assistant", content=answer)]
        verdict = cfg.sure if certain else cfg.unsure
        if cfg.target_format == "two_turn":
            return prompt + [
                Message(role="assistant", content=with_period(gold)),
                Message(role="user", content=cfg.certainty_question),
                Message(role="assistant", content=verdict),
            ]
        return prompt + [Message(role="assistant", content=f"{with_period(gold)} {cfg.certainty_question} {verdict}")]

    def _verdict_messages(self, prompt: list[Message], gold: str, sure: bool) -> list[Message]:
        cfg = self.cfg
        verdict = cfg.sure if sure else cfg.unsure
        if cfg.target_format == "two_turn":
            return prompt + [
                Message(role="assistant", content=with_period(gold)),
                Message(role="user", content=cfg.certainty_question),
                Message(role="assistant", content=verdict),
            ]
        return prompt + [Message(role="assistant", content=f"{with_period(gold)} {cfg.certainty_question} {verdict}")]

    def _finalize_uncertain(self, out_dir: Path) -> dict[str, Any]:
        """sft.jsonl from every committed probe: sorted by entropy (stable: ties keep input order), the
        first floor(N * sure_fraction) are "sure" (R-Tuning-U's split of the repository)."""
        probes = read_jsonl(out_dir / "probes.jsonl")
        order = sorted(range(len(probes)), key=lambda i: probes[i]["entropy"])
        n_sure = math.floor(len(probes) * self.cfg.uncertain.sure_fraction)
        sure = set(order[:n_sure])
        threshold = probes[order[n_sure - 1]]["entropy"] if n_sure else None
        rows = []
        for i, p in enumerate(probes):
            prompt = [Message.model_validate(m) for m in p["prompt"]]
            rows.append(
                SFTRecord(
                    id=stable_id(p["id"], "r_tuning", "uncertain"),
                    messages=self._verdict_messages(prompt, p["references"][0], i in sure),
                    method="r_tuning_uncertain",
                    category=p.get("category"),
                    meta={
                        "certain": i in sure,
                        "entropy": p["entropy"],
                        "probe_answers": p["answers"],
                        "references": p["references"],
                        "probe_model": p["probe_model"],
                        "source_meta": p["source_meta"],
                    },
                    provenance=Provenance(
                        generator_model=p["probe_model"], sampling=self.cfg.uncertain.sampling.model_dump()
                    ),
                ).to_json()
            )
        write_text_atomic(out_dir / "sft.jsonl", "".join(r + "\n" for r in rows))
        ent = sorted(p["entropy"] for p in probes)
        return {
            "r_tuning": {
                "method": "uncertain",
                "samples_per_question": self.cfg.uncertain.samples,
                "certain": n_sure,
                "uncertain": len(probes) - n_sure,
                "certain_rate": round(n_sure / len(probes), 4) if probes else None,
                "entropy_split_at": threshold,
                "entropy_median": ent[len(ent) // 2] if ent else None,
                "all_agree": sum(e == 0 for e in ent),
                "sft_rows": len(rows),
            }
        }

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        if self.cfg.method == "uncertain":
            return self._finalize_uncertain(out_dir)
        rows = read_jsonl(out_dir / "sft.jsonl")
        certain = sum(bool(r["meta"]["certain"]) for r in rows)
        return {
            "r_tuning": {
                "method": self.cfg.method,
                "match": self.cfg.match,
                "certain": certain,
                "uncertain": len(rows) - certain,
                "certain_rate": round(certain / len(rows), 4) if rows else None,
            }
        }
