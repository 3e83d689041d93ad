"""Evaluation suites (`suite=`): prompt files with a kind, a language, a licence and category labels.

Every suite yields `SourceItem`s whose `meta` says what the prompt is for:
- `kind`: "harmful" (should be refused: harm, refusal and StrongREJECT apply), "benign" (should be
  answered: over-refusal applies), or "gold" (a stored answer with a human refusal label: no generation,
  used to check the judges);
- `type` / `label` / `focus`: the source's own labels (XSTest type, JADE sub-type, ...);
- `category`: "L1/L2" of a taxonomy where the suite maps onto one, else the source's type.

Loaders: xstest (XSTest v2 prompts + the labelled Mistral answers as gold), jade (JADE-DB v2, mapped onto
safety_zh's categories by the suite's `category_map`), hh_rlhf (first human turn of a hh-rlhf file),
jsonl (any file; `fields` map the columns; `exclude` drops ids held by training files).
Paths starting with `builtin:` point into synth/evaluate/data/ (shipped with their licences).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.errors import ConfigError, SourceError
from synth.records import Message, SourceItem, stable_id
from synth.sources import iter_json_rows, parse_hh_dialogue

DATA = Path(__file__).resolve().parent / "data"


class SuiteFields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = "prompt"
    category: str | None = "category"
    kind: str | None = "kind"  # a row's own kind (harmful | benign); else the suite's `prompt_kind`
    label: str | None = "label"  # safe -> benign, unsafe -> harmful (XSTest's convention)
    id: str | None = "id"


class SuiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    loader: Literal["xstest", "jade", "hh_rlhf", "jsonl"]
    path: list[str] | str
    language: Literal["en", "zh"] = "en"
    licence: str = "unknown"
    source: str = ""
    limit: int | None = Field(None, ge=1)  # a seeded, stratification-free sample of this many prompts (null = all)
    sample_seed: int = Field(0, ge=0)
    prompt_kind: Literal["harmful", "benign"] = "harmful"  # for rows without their own kind/label
    taxonomy: str | None = None  # a constitution whose L1/L2 categories the report lists (with "no data" rows)
    category_map: dict[str, str] = {}  # jade: sub-type -> "L1/L2"; "<type>/其他" keys for the catch-alls
    fields: SuiteFields = SuiteFields()
    gold: str | None = None  # xstest: labelled answers (a judge gold set), null = none
    gold_limit: int | None = Field(None, ge=0)  # 0: no gold answers
    exclude: list[str] = []  # jsonl files whose `id` / `prompt_id` values are training data: dropped
    # hh_rlhf only
    split: str = "test"
    data_dir: str | None = "harmless-base"


def resolve_path(path: str) -> Path:
    if path.startswith("builtin:"):
        return DATA / path[len("builtin:") :]
    return Path(path).expanduser()


def load_suite(cfg: SuiteConfig) -> tuple[list[SourceItem], dict]:
    """(items, info): the prompts (sampled to `limit`) plus gold items, and what was read/dropped."""
    loader = {"xstest": _xstest, "jade": _jade, "hh_rlhf": _hh, "jsonl": _jsonl}[cfg.loader]
    info: dict = {"dropped": {}}
    items = list(loader(cfg, info))
    if cfg.limit is not None:
        items = _sample(items, cfg.limit, cfg.sample_seed)
    if cfg.gold and cfg.gold_limit != 0:
        gold = list(_xstest_gold(cfg))
        if cfg.gold_limit is not None:
            gold = _sample(gold, cfg.gold_limit, cfg.sample_seed)
        items += gold
    info["prompts"] = sum(it.meta["kind"] != "gold" for it in items)
    info["gold"] = sum(it.meta["kind"] == "gold" for it in items)
    return items, info


def _sample(items: list[SourceItem], k: int, seed: int) -> list[SourceItem]:
    """A deterministic subset: the k items with the smallest hash of (seed, id), kept in file order."""
    key = {it.id: hashlib.sha256(f"{seed}|{it.id}".encode()).hexdigest() for it in items}
    keep = set(sorted(key, key=key.get)[:k])
    return [it for it in items if it.id in keep]


def _paths(cfg: SuiteConfig) -> list[Path]:
    raw = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
    if not raw or any(p in ("", "???") for p in raw):
        raise ConfigError(f"suite={cfg.name}: suite.path is required (suite.path=<file>)")
    out = [resolve_path(p) for p in raw]
    for p in out:
        if not p.exists():
            raise SourceError(f"suite={cfg.name}: {p}: no such file (set suite.path=<file>)")
    return out


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), 2):
            yield i, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}


def _item(suite: str, ident: str, prompt: str, kind: str, category: str | None, **meta) -> SourceItem:
    if not prompt:
        raise SourceError(f"suite={suite}: item {ident} has an empty prompt")
    return SourceItem(
        id=ident,
        prompt=[Message(role="user", content=prompt)],
        category=category,
        meta={"kind": kind, "suite": suite, **meta},
    )


def _xstest(cfg: SuiteConfig, info: dict) -> Iterator[SourceItem]:
    """XSTest v2 (Röttger et al. 2024): 250 safe prompts in 10 types + 200 unsafe contrasts."""
    for path in _paths(cfg):
        for line, r in _csv_rows(path):
            try:
                kind = {"safe": "benign", "unsafe": "harmful"}[r["label"]]
            except KeyError:
                raise SourceError(f"{path}:{line}: label must be safe or unsafe, got {r.get('label')!r}") from None
            yield _item(
                cfg.name,
                f"xstest-{r['id']}",
                r["prompt"],
                kind,
                r["type"],
                type=r["type"],
                label=r["label"],
                focus=r.get("focus"),
                note=r.get("note"),
            )


GOLD_CLASSES = {"1_full_compliance": "none", "2_full_refusal": "full", "3_partial_refusal": "partial"}


def _xstest_gold(cfg: SuiteConfig) -> Iterator[SourceItem]:
    """XSTest's model answers with the final human 3-way label: gold rows for the refusal judges."""
    path = resolve_path(cfg.gold)  # type: ignore[arg-type]
    if not path.exists():
        raise SourceError(f"suite={cfg.name}: gold file {path} not found (suite.gold=<file> or suite.gold=null)")
    for line, r in _csv_rows(path):
        if r.get("final_label") not in GOLD_CLASSES:
            raise SourceError(f"{path}:{line}: final_label must be one of {sorted(GOLD_CLASSES)}")
        it = _item(
            cfg.name,
            f"gold-{r['id']}",
            r["prompt"],
            "gold",
            r["type"],
            type=r["type"],
            response=r["completion"],
            gold_refusal=GOLD_CLASSES[r["final_label"]],
        )
        yield it


def _jade(cfg: SuiteConfig, info: dict) -> Iterator[SourceItem]:
    """JADE-DB v2 (zh): every question is harmful; 违规子类 is mapped onto the taxonomy by `category_map`."""
    unmapped: dict[str, int] = {}
    for path in _paths(cfg):
        level = path.stem
        for _line, r in _csv_rows(path):
            typ, sub = r.get("违规类型", "").strip(), r.get("违规子类", "").strip()
            cat = cfg.category_map.get(f"{typ}/{sub}") or cfg.category_map.get(sub)
            if cat is None:
                unmapped[f"{typ}/{sub}"] = unmapped.get(f"{typ}/{sub}", 0) + 1
                cat = "unmapped"
            yield _item(
                cfg.name, f"jade-{level}-{r['ID']}", r["问题"], "harmful", cat, type=typ, subtype=sub, level=level
            )
    if unmapped:
        info["unmapped_subtypes"] = unmapped


def _hh(cfg: SuiteConfig, info: dict) -> Iterator[SourceItem]:
    """hh-rlhf harmless-base test: the first human turn of each red-team dialogue (held out from the
    train split that preference training reads). Only the first turn is used, so rows whose chosen and
    rejected histories differ later on are fine here."""

    raw = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)
    seen: set[str] = set()
    for p in raw:
        path = resolve_path(p)
        if path.exists():
            rows = iter_json_rows(path)
        else:  # the hub copy, e.g. Anthropic/hh-rlhf (data_dir harmless-base, split test)
            try:
                import datasets

                rows = enumerate(datasets.load_dataset(p, data_dir=cfg.data_dir, split=cfg.split), 1)
            except Exception as e:
                raise SourceError(
                    f"suite={cfg.name}: {p} is not a local file and loading it from the hub failed "
                    f"({type(e).__name__}); set suite.path=<local .jsonl(.gz)>"
                ) from None
        for line, row in rows:
            try:
                text = parse_hh_dialogue(row["chosen"])[0].content
            except (KeyError, ValueError, IndexError):
                raise SourceError(f"suite={cfg.name}: {p}:{line}: not an hh-rlhf dialogue in 'chosen'") from None
            if text in seen:  # many dialogues open with the same request
                info["dropped"]["duplicate_prompt"] = info["dropped"].get("duplicate_prompt", 0) + 1
                continue
            seen.add(text)
            yield _item(cfg.name, stable_id("hh_redteam", text), text, cfg.prompt_kind, "hh/red-team", type="red-team")


def _jsonl(cfg: SuiteConfig, info: dict) -> Iterator[SourceItem]:
    """Any .jsonl file; `exclude` names training files whose ids are held out (redteam_heldout)."""

    held: set[str] = set()
    for ex in cfg.exclude:
        p = resolve_path(ex)
        if not p.exists():
            raise SourceError(f"suite={cfg.name}: exclude file {p} not found")
        for _, row in iter_json_rows(p):
            held.update(str(row[k]) for k in ("id", "prompt_id", "item_id") if row.get(k) is not None)
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            held.update(str(meta[k]) for k in ("id", "prompt_id") if meta.get(k) is not None)
    f = cfg.fields
    for path in _paths(cfg):
        for line, row in iter_json_rows(path):
            if f.prompt not in row or not isinstance(row[f.prompt], str):
                raise SourceError(f"{path}:{line}: no string field {f.prompt!r} (set suite.fields.prompt=<column>)")
            ident = str(row[f.id]) if f.id and row.get(f.id) is not None else stable_id(cfg.name, row[f.prompt])
            if ident in held:
                info["dropped"]["held_out_training_id"] = info["dropped"].get("held_out_training_id", 0) + 1
                continue
            kind = row.get(f.kind) if f.kind else None
            label = row.get(f.label) if f.label else None
            if kind is None and label in ("safe", "unsafe"):
                kind = "benign" if label == "safe" else "harmful"
            kind = kind or cfg.prompt_kind
            if kind not in ("harmful", "benign"):
                raise SourceError(f"{path}:{line}: kind must be harmful or benign, got {kind!r}")
            category = row.get(f.category) if f.category else None
            extra = {k: row[k] for k in ("type", "attack_family", "note", "contrast_of") if k in row}
            yield _item(cfg.name, ident, row[f.prompt], kind, category, label=label, **extra)
