"""`pipeline=critique_revision`: SL-CAI (Bai et al. 2022, arXiv 2212.08073 §3) -> sft.jsonl, preferences.jsonl.

For each red-team prompt x (one batched call per stage for the whole chunk):
1. r0 is the answer the item carries (`initial: given`, the default): red_team's unsafe.jsonl holds
   the answer its judge found unsafe in `answer`, and SL-CAI revises the model's own harmful response
   to the red-team prompt (Bai et al. 2022, §3.1). An item without one, or `initial: generate`, has
   the policy answer x after the constitution's few-shot critique/revision transcripts (incl. the
   no-change ones) -> r0. Either way the few-shot transcripts (when on) precede x;
2. for k = 1..rounds, a principle is drawn AFRESH for this item and round (`ctx.rng(id, k)`; an
   item's category narrows the pool to that category's principles), the policy critiques its last
   reply (one call for all items) and revises it (one call) -> r_k; the transcript grows, so round k
   critiques r_{k-1} with the earlier rounds in context, as in the paper;
3. sft.jsonl: x -> r_K, with r0 and every (principle, critique, revision) in meta;
   preferences.jsonl: chosen r_K, rejected r0 (the open HF recipe's split; the paper's RL-CAI pairs
   are two policy samples judged by `pipeline=ai_feedback`), dropped when near-identical.

Helpfulness prompts ("2 samples per helpfulness prompt, no critique") are items flagged
`meta.helpful: true` (a `helpful` field in a jsonl source) or the items of `helpful_source`; they give
`helpful_samples` plain policy samples each, straight into sft.jsonl (method "cai_sl_helpful").

An item whose reply, critique or revision is empty or truncated in any round is dropped with the
reason `<step>_empty` / `<step>_truncated` (a revision is the training target; a critique feeds it).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synth.errors import ConstitutionError
from synth.io import read_jsonl
from synth.llm.base import SamplingParams
from synth.pipelines.base import ChunkState, Context, Pipeline, PipelineConfig
from synth.prompts import template_ref
from synth.records import (
    Message,
    PreferenceRecord,
    Provenance,
    SFTRecord,
    SourceItem,
    stable_id,
)
from synth.runtime import Sampling
from synth.sources import SourceConfig, iter_source
from synth.steps import critique as critique_step
from synth.steps import revision as revision_step
from synth.steps.base import Call, Sample, assistant, run_calls, user
from synth.steps.filters import similarity


class CritiqueRevisionConfig(PipelineConfig):
    name: str = "critique_revision"
    rounds: int = Field(4, ge=1, le=4)  # up to 4 sequential critique-revision rounds
    few_shot: bool = True  # the few-shot transcripts prevent perspective confusion
    # temperature 1; the HF recipe's 1500 max new tokens. Extra stop strings are added to
    # the step's own (transcript labels, invented turns).
    sampling: Sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=1500)
    # "given": r0 is the item's `answer_field` (red_team's unsafe.jsonl: the answer judged unsafe), and
    # items without one are answered by the policy; "generate": always a fresh policy answer.
    initial: Literal["given", "generate"] = "given"
    answer_field: str = Field("answer", min_length=1)
    near_identical: float = Field(0.9, gt=0, le=1)  # no preference pair when sim(r_K, r0) >= this
    helpful_source: SourceConfig | None = None  # helpfulness prompts, mixed into sft.jsonl
    helpful_samples: int = Field(2, ge=1)  # 2 samples per helpfulness prompt


@dataclass
class Conversation:
    """One red-team item on its way through the rounds."""

    item: SourceItem
    history: list[Message]  # the transcript sent to the model, ending with the current reply
    initial: str
    reply: str
    rounds: list[dict] = field(default_factory=list)
    initial_source: str = "generated"  # "given": r0 came with the item (red_team's unsafe answer)


def is_helpful(item: SourceItem) -> bool:
    return item.meta.get("helpful") is True


def with_prefix(prompt: Sequence[Message], prefix: Sequence[Message]) -> list[Message]:
    """The few-shot transcript goes after any system message of the item and before its turns."""
    system = [m for m in prompt if m.role == "system"]
    return [*system, *prefix, *(m for m in prompt if m.role != "system")]


def few_shot_prefix(constitution, language: str) -> list[Message]:
    """The constitution's demonstrations as chat turns: prompt, reply, critique request, critique,
    revision request, revision (the paper's CritiqueRevisionFewShotPrompts shape)."""
    out: list[Message] = []
    for ex in constitution.few_shot:
        p = constitution.principle(ex.principle_id)
        out += [
            user(ex.prompt),
            assistant(ex.response),
            user(critique_step.request(p, language)),
            assistant(ex.critique),
            user(revision_step.request(p, language)),
            assistant(ex.revision),
        ]
    return out


def drop_reason(step: str, sample: Sample) -> str:
    return f"{step}_truncated" if sample.completion.truncated else f"{step}_empty"


class CritiqueRevisionPipeline(Pipeline):
    Config = CritiqueRevisionConfig
    outputs = ("sft", "preferences")
    roles = ("policy",)

    def check_constitution(self, constitution) -> None:
        if constitution is None:
            raise ConstitutionError("pipeline=critique_revision needs a constitution (constitution=<name or path>)")

    def items(self, ctx: Context, source: Iterable[SourceItem] | None) -> Iterable[SourceItem]:
        self.check_constitution(ctx.constitution)
        base = super().items(ctx, source)
        if self.cfg.helpful_source is None:
            return base
        helpful = (
            it.model_copy(update={"id": stable_id("helpful", it.id), "meta": {**it.meta, "helpful": True}})
            for it in iter_source(self.cfg.helpful_source)
        )
        return itertools.chain(base, helpful)

    def estimate(self, n_items: int) -> dict[str, int]:
        """Per item: an initial answer (none when the item carries one) and a critique and a revision per
        round; a helpfulness item takes `helpful_samples` answers instead (upper bounds)."""
        per_item = max(1 + 2 * self.cfg.rounds, self.cfg.helpful_samples)
        return {"requests": n_items * per_item, "new_tokens": n_items * per_item * self.cfg.sampling.max_new_tokens}

    def params(self, language: str) -> SamplingParams:
        p = self.cfg.sampling.params()
        return p.replace(stop=(*p.stop, *critique_step.stops(language)))

    def process(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> None:
        convs = self.answer(items, ctx, state)
        for k in range(1, self.cfg.rounds + 1):
            convs = self.round(convs, k, ctx, state)
        for conv in convs:
            self.emit(conv, ctx, state)

    # ------------------------------------------------------------------ stages

    def given_answer(self, item: SourceItem) -> str | None:
        """The item's own initial answer (`initial: given`), or None when it must be generated."""
        if self.cfg.initial != "given" or is_helpful(item):
            return None
        text = item.meta.get(self.cfg.answer_field)
        return text.strip() if isinstance(text, str) and text.strip() else None

    def answer(self, items: Sequence[SourceItem], ctx: Context, state: ChunkState) -> list[Conversation]:
        """ONE call: the initial reply r0 of every red-team item that carries none (few-shot prefix,
        n=1) and the helpful-only samples of every helpfulness item (plain prompt, n=helpful_samples).
        Items that carry their answer start from it with no call."""
        prefix = few_shot_prefix(ctx.constitution, ctx.language) if self.cfg.few_shot else []
        base = self.params(ctx.language)
        convs: list[Conversation] = []
        todo, calls, params = [], [], []
        for it in items:
            helpful = is_helpful(it)
            msgs = list(it.prompt) if helpful else with_prefix(it.prompt, prefix)
            given = self.given_answer(it)
            if given is not None:
                convs.append(Conversation(it, [*msgs, assistant(given)], given, given, initial_source="given"))
                continue
            todo.append(it)
            calls.append(Call(it.id, msgs, {"kind": "helpful" if helpful else "red_team"}))
            params.append(base.replace(n=self.cfg.helpful_samples if helpful else 1))
        results = run_calls(ctx, state, "answer", "policy", calls, params, revision_step.parse_reply)
        for it, call, samples in zip(todo, calls, results, strict=True):
            if is_helpful(it):
                self.emit_helpful(it, samples, ctx, state)
            elif not samples[0].ok:
                state.drop(drop_reason("initial", samples[0]))
            else:
                r0 = samples[0].parsed_text
                convs.append(Conversation(it, [*call.messages, assistant(r0)], r0, r0))
        order = {it.id: i for i, it in enumerate(items)}
        return sorted(convs, key=lambda c: order[c.item.id])  # input order, given or generated

    def round(self, convs: list[Conversation], k: int, ctx: Context, state: ChunkState) -> list[Conversation]:
        """One critique call and one revision call for every surviving item (round k)."""
        params = self.params(ctx.language)
        crit_in = [
            critique_step.CritiqueInput(
                c.item.id,
                c.history,
                # A fresh principle per item AND round: seeded by both, so resumes redraw the same.
                ctx.constitution.sample_principle(ctx.rng(c.item.id, "cai_round", k), category=c.item.category),
            )
            for c in convs
        ]
        crits = critique_step.critique(ctx, state, crit_in, params, k)
        alive, rev_in = [], []
        for c, x, s in zip(convs, crit_in, crits, strict=True):
            if not s.ok:
                state.drop(drop_reason("critique", s))
                continue
            alive.append(c)
            rev_in.append(revision_step.RevisionInput(c.item.id, s.call.messages, s.parsed_text, x.principle))
        revs = revision_step.revise(ctx, state, rev_in, params, k)
        out = []
        for c, x, s in zip(alive, rev_in, revs, strict=True):
            if not s.ok:
                state.drop(drop_reason("revision", s))
                continue
            c.reply = s.parsed_text
            c.history = [*s.call.messages, assistant(c.reply)]
            c.rounds.append({"round": k, "principle_id": x.principle.id, "critique": x.critique, "revision": c.reply})
            out.append(c)
        return out

    # ------------------------------------------------------------------ rows

    def provenance(self, ctx: Context, n: int = 1) -> Provenance:
        refs = [template_ref(name, ctx.language) for name in ("cai_critique_request", "cai_revision_request")]
        return Provenance(
            generator_model=ctx.llm("policy").model,
            sampling={**self.cfg.sampling.model_dump(), "n": n},
            template_id="+".join(r["template_id"] for r in refs),
            template_hash="+".join(r["template_hash"] for r in refs),
        )

    def emit(self, conv: Conversation, ctx: Context, state: ChunkState) -> None:
        it, prov = conv.item, self.provenance(ctx)
        principle_ids = [r["principle_id"] for r in conv.rounds]
        state.emit(
            "sft",
            SFTRecord(
                id=stable_id(it.id, "cai_sl"),
                messages=[*it.prompt, assistant(conv.reply)],
                method="cai_sl",
                category=it.category,
                meta={"r0": conv.initial, "r0_source": conv.initial_source, "rounds": conv.rounds},
                provenance=prov,
            ),
        )
        if it.category:
            state.count(f"category/{it.category}")
        sim = similarity(conv.reply, conv.initial)
        if sim >= self.cfg.near_identical:  # no-change revisions are fine SFT targets, not preferences
            state.drop("preference_near_identical")
            return
        state.emit(
            "preferences",
            PreferenceRecord(
                id=stable_id(it.id, "cai_sl_pref"),
                prompt=it.prompt,
                chosen=[assistant(conv.reply)],
                rejected=[assistant(conv.initial)],
                method="cai_sl_revision",
                principle_ids=principle_ids,
                category=it.category,
                meta={"rounds": len(conv.rounds), "similarity": round(sim, 4), "rejected_source": conv.initial_source},
                provenance=prov,
            ),
        )

    def finalize(self, ctx: Context, out_dir: Path) -> dict[str, Any]:
        """Where each SFT row's r0 came from: given (red_team's unsafe answer) or generated here."""
        sources = Counter(
            r["meta"].get("r0_source", "generated")
            for r in read_jsonl(out_dir / "sft.jsonl")
            if r.get("method") == "cai_sl"
        )
        return {"initial_answers": dict(sorted(sources.items()))}

    def emit_helpful(self, it: SourceItem, samples: list[Sample], ctx: Context, state: ChunkState) -> None:
        seen: set[str] = set()
        prov = self.provenance(ctx, n=self.cfg.helpful_samples)
        for s in samples:
            if not s.ok:
                state.drop_part("helpful_sample", drop_reason("helpful", s))
                continue
            text = s.parsed_text
            if text in seen:
                state.drop_part("helpful_sample", "helpful_duplicate")
                continue
            seen.add(text)
            state.emit(
                "sft",
                SFTRecord(
                    id=stable_id(it.id, "cai_sl_helpful", s.index),
                    messages=[*it.prompt, assistant(text)],
                    method="cai_sl_helpful",
                    category=it.category,
                    meta={"sample": s.index},
                    provenance=prov,
                ),
            )
            if it.category:
                state.count(f"category/{it.category}")
