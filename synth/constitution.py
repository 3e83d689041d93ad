"""Load, validate and sample constitutions (Constitutional AI, Bai et al. 2022,
arXiv 2212.08073; the red-team taxonomy's categories feed attack prompts).

A constitution is a data file (`constitutions/<name>.yaml`, schema in `constitutions/README.md`):
critique/revision principle pairs for SL-CAI, optional comparison questions ("judge") for RL-CAI /
RLAIF, optional few-shot critique/revision demonstrations, and an optional two-level harm taxonomy
that the red-team pipeline walks. A user's own file is selected by path (`constitution=/x/y.yaml`).

Every user mistake raises one `ConstitutionError` that names the file, the YAML line where it can,
and the offending field path (`principles[3].revision: field required`), so the fix is obvious.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from synth.errors import ConstitutionError

__all__ = [
    "Constitution",
    "ConstitutionError",
    "FewShotExample",
    "Principle",
    "TaxonomyCategory",
    "TaxonomyGroup",
    "constitutions_dir",
    "list_constitutions",
    "load_constitution",
]

_DATA_PACKAGE = "rlaif_forge_constitutions"  # how constitutions/ ships inside the wheel (pyproject)
_SUFFIXES = (".yaml", ".yml")


class _Strict(BaseModel):
    # Unknown keys are typos; empty strings are never a usable principle text.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, str_min_length=1)


class Principle(_Strict):
    """One critique/revision pair (SL-CAI) with an optional comparison question (RL-CAI / RLAIF)."""

    id: str
    category: str  # free text without a taxonomy; "L1/L2" naming a taxonomy category with one
    critique: str  # critique request: what to look for in the last answer
    revision: str  # revision request: how to rewrite it
    judge: str | None = None  # "Which of these responses is ...?" for multiple-choice AI feedback


class FewShotExample(_Strict):
    """A critique/revision demonstration. Examples with `needs_change: false` teach the model that
    a good answer is left alone (two of the five few-shot transcripts in anthropics/ConstitutionalHarmlessnessPaper,
    prompts/CritiqueRevisionFewShotPrompts.json, show no change; without them the model always rewrites)."""

    prompt: str
    response: str
    principle_id: str
    critique: str
    revision: str
    needs_change: bool


class TaxonomyCategory(_Strict):
    """A second-level (L2) harm category."""

    name: str
    description: str
    red_team: str  # abstract guidance for an attacker model writing prompts in this category


class TaxonomyGroup(_Strict):
    """A top-level (L1) harm category and its L2 categories."""

    name: str
    categories: list[TaxonomyCategory] = Field(min_length=1)


class _CrossFieldErrors(ValueError):
    """Several (field path, message) problems found by `Constitution`'s cross-field checks."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


class Constitution(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    language: str = Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # "en", "zh", "zh-Hans"
    description: str
    principles: list[Principle] = Field(min_length=1)
    few_shot: list[FewShotExample] = Field(default_factory=list)
    taxonomy: list[TaxonomyGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_references(self) -> Constitution:
        problems = _taxonomy_problems(self.taxonomy)
        paths = {f"{l1}/{l2}" for l1, l2 in self.categories()}
        first_at: dict[str, int] = {}
        for i, p in enumerate(self.principles):
            if p.id in first_at:
                msg = f"duplicate id {p.id!r} (first used by principles[{first_at[p.id]}])"
                problems.append((f"principles[{i}].id", msg))
            first_at.setdefault(p.id, i)
            if self.taxonomy and p.category not in paths:
                problems.append((f"principles[{i}].category", _unknown_category_msg(p.category, paths)))
        for i, ex in enumerate(self.few_shot):
            if ex.principle_id not in first_at:
                hint = _did_you_mean(ex.principle_id, first_at)
                problems.append((f"few_shot[{i}].principle_id", f"no principle has id {ex.principle_id!r}{hint}"))
        if problems:
            raise _CrossFieldErrors(problems)
        return self

    # -- lookups -------------------------------------------------------------------------------

    def categories(self) -> list[tuple[str, str]]:
        """Taxonomy categories as (L1, L2) in file order; empty without a taxonomy."""
        return [(g.name, c.name) for g in self.taxonomy for c in g.categories]

    def principle(self, principle_id: str) -> Principle:
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise ConstitutionError(f"constitution {self.name!r} has no principle {principle_id!r}")

    def judge_principles(self) -> list[Principle]:
        """Principles that carry a comparison question, for RL-CAI / RLAIF feedback."""
        return [p for p in self.principles if p.judge]

    def principles_for(self, category: str) -> list[Principle]:
        """Principles of one category: an exact category ("L1/L2" or free text), or every L2 under an
        L1 when `category` is an L1 name. Unknown categories give []. L2 names alone are ambiguous
        (健康 is an L1 and an L2 under 歧视), so an L2 is always addressed by its "L1/L2" path."""
        return [p for p in self.principles if _in_category(p, category)]

    def taxonomy_category(self, l2_path: str) -> TaxonomyCategory:
        """The L2 entry (description, red-team guidance) for an "L1/L2" path."""
        l1, _, l2 = l2_path.partition("/")
        for g in self.taxonomy:
            if g.name == l1:
                for c in g.categories:
                    if c.name == l2:
                        return c
        paths = {f"{a}/{b}" for a, b in self.categories()}
        raise ConstitutionError(f"constitution {self.name!r}: {_unknown_category_msg(l2_path, paths)}")

    def l1_of(self, l2_path: str) -> str:
        """The L1 name of an "L1/L2" taxonomy path (validated against the taxonomy)."""
        self.taxonomy_category(l2_path)
        return l2_path.partition("/")[0]

    def digest(self) -> str:
        """Stable content hash, for provenance and cache keys."""
        return hashlib.sha256(self.model_dump_json().encode("utf-8")).hexdigest()[:16]

    # -- sampling ------------------------------------------------------------------------------

    def sample_principle(self, rng: random.Random, category: str | None = None, with_judge: bool = False) -> Principle:
        """Draw one principle uniformly (a fresh draw per revision round and per comparison,
        as in Bai et al. 2022, arXiv 2212.08073, §3.1 and §4.1).

        `category` restricts the pool to an "L1/L2" path, an L1 name or a free-text category; when
        that pool is empty (unknown or uncovered category) the draw falls back to all principles,
        so a source's odd category label never stops a run. `with_judge` keeps only principles with
        a comparison question. Deterministic for a seeded `rng` (pool in file order)."""
        pool = self.judge_principles() if with_judge else list(self.principles)
        if not pool:
            raise ConstitutionError(
                f"constitution {self.name!r} has no principle with a `judge` question; add `judge:` "
                "to its principles to use it for AI-feedback comparisons"
            )
        if category is not None:
            pool = [p for p in pool if _in_category(p, category)] or pool
        return rng.choice(pool)


# -- validation helpers ------------------------------------------------------------------------


def _in_category(p: Principle, category: str) -> bool:
    """`category` is the principle's own category, or an ancestor of it ("歧视" for "歧视/健康")."""
    return p.category == category or p.category.startswith(category + "/")


def _taxonomy_problems(taxonomy: list[TaxonomyGroup]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    seen_l1: set[str] = set()
    for i, g in enumerate(taxonomy):
        if "/" in g.name:
            problems.append((f"taxonomy[{i}].name", f"{g.name!r} contains '/', which separates L1/L2 paths"))
        if g.name in seen_l1:
            problems.append((f"taxonomy[{i}].name", f"duplicate L1 category {g.name!r}"))
        seen_l1.add(g.name)
        seen_l2: set[str] = set()
        for j, c in enumerate(g.categories):
            where = f"taxonomy[{i}].categories[{j}].name"
            if "/" in c.name:
                problems.append((where, f"{c.name!r} contains '/', which separates L1/L2 paths"))
            if c.name in seen_l2:
                problems.append((where, f"duplicate L2 category {c.name!r} under {g.name!r}"))
            seen_l2.add(c.name)
    return problems


def _did_you_mean(value: str, valid: Any) -> str:
    close = difflib.get_close_matches(value, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_category_msg(category: str, paths: set[str]) -> str:
    hint = _did_you_mean(category, paths)
    if not hint:
        hint = f"; expected an 'L1/L2' path from the taxonomy, e.g. {sorted(paths)[0]!r}" if paths else ""
    return f"category {category!r} is not in the taxonomy{hint}"


# -- locating shipped files --------------------------------------------------------------------


def constitutions_dir() -> Path:
    """The folder of shipped constitutions: the `rlaif_forge_constitutions` data package of an
    installed wheel, else `constitutions/` at the root of a source checkout."""
    try:
        root = resources.files(_DATA_PACKAGE)
    except (ModuleNotFoundError, TypeError):
        root = None
    if root is not None:
        if isinstance(root, Path) and root.is_dir():
            return root
        # A namespace package (no __init__.py) gives a MultiplexedPath; its children are real Paths.
        for child in root.iterdir():
            if isinstance(child, Path) and child.suffix in _SUFFIXES:
                return child.parent
    return Path(__file__).resolve().parents[1] / "constitutions"


def list_constitutions() -> list[str]:
    """Names of the shipped constitutions (file stems), sorted."""
    d = constitutions_dir()
    return sorted(p.stem for p in d.iterdir() if p.suffix in _SUFFIXES) if d.is_dir() else []


def load_constitution(name_or_path: str | os.PathLike[str]) -> Constitution:
    """Load a shipped constitution by name (`hhh_en`) or a user's YAML file by path."""
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ConstitutionError(_unknown_name_msg(text))
    looks_like_path = isinstance(name_or_path, os.PathLike) or "/" in text or os.sep in text or text.endswith(_SUFFIXES)
    if not looks_like_path:
        shipped = {p.stem: p for p in constitutions_dir().glob("*") if p.suffix in _SUFFIXES}
        if text in shipped:
            c = _load_file(shipped[text])
            if c.name != text:
                raise ConstitutionError(f"{shipped[text]}: name: {c.name!r} must equal the file stem {text!r}")
            return c
        if not Path(text).is_file():
            raise ConstitutionError(_unknown_name_msg(text))
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConstitutionError(
            f"constitution file not found: {path} (cwd: {Path.cwd()}); shipped names: {', '.join(list_constitutions())}"
        )
    return _load_file(path)


def _unknown_name_msg(name: str) -> str:
    names = list_constitutions()
    return (
        f"unknown constitution {name!r}{_did_you_mean(name, names)}; "
        f"valid names: {', '.join(names) or '(none found)'}"
        " (or pass a path to your own .yaml file, e.g. constitution=/path/to/mine.yaml)"
    )


# -- reading one file --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # unhashable key: let the base class raise its own error
                pass
        return super().construct_mapping(node, deep)


def _load_file(path: Path) -> Constitution:
    try:
        source = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConstitutionError(f"{path}: cannot read constitution: {e}") from e
    loader = _StrictLoader(source)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConstitutionError(f"{where}: invalid YAML: {problem}") from e
    finally:
        loader.dispose()
    if data is None:
        raise ConstitutionError(f"{path}: the file is empty; see constitutions/README.md for the schema")
    if not isinstance(data, dict):
        raise ConstitutionError(
            f"{path}: the top level must be a mapping with keys {', '.join(Constitution.model_fields)}"
            f" (got {type(data).__name__})"
        )
    try:
        return Constitution.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}:{_line_of(node, loc)}: {field}: {msg}" for loc, field, msg in _problems(e)]
        head = f"invalid constitution {path} ({len(lines)} problem{'s' if len(lines) > 1 else ''}):"
        raise ConstitutionError("\n  ".join([head, *lines])) from None


# Which model validates the mapping at a location (integer indices removed) -> for "allowed keys".
_MODEL_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Constitution,
    ("principles",): Principle,
    ("few_shot",): FewShotExample,
    ("taxonomy",): TaxonomyGroup,
    ("taxonomy", "categories"): TaxonomyCategory,
}


def _problems(err: ValidationError) -> list[tuple[tuple[Any, ...], str, str]]:
    """(loc, "principles[3].revision", message) for every pydantic error, cross-field ones expanded."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _CrossFieldErrors):
            out.extend((_parse_loc(p), p, m) for p, m in cause.problems)
            continue
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "field required"
        elif e["type"] == "extra_forbidden":
            model = _MODEL_AT.get(tuple(k for k in loc[:-1] if isinstance(k, str)))
            allowed = list(model.model_fields) if model else []
            msg = f"unknown key{_did_you_mean(str(loc[-1]), allowed)}; allowed keys: {', '.join(allowed)}"
        elif e["type"] == "string_type":
            msg += f" (got {type(e['input']).__name__} {e['input']!r}; quote it in YAML)"
        out.append((loc, _format_loc(loc) or "(top level)", msg))
    return out


def _format_loc(loc: tuple[Any, ...]) -> str:
    s = ""
    for k in loc:
        s += f"[{k}]" if isinstance(k, int) else (f".{k}" if s else str(k))
    return s


def _parse_loc(path: str) -> tuple[Any, ...]:
    """Inverse of _format_loc for the simple paths the cross-field checks write."""
    out: list[Any] = []
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            out.append(int(part[1:-1]))
        elif part:
            out.append(part)
    return tuple(out)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """1-based line of the deepest YAML node that `loc` reaches (the parent when a key is missing)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == key), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]  # the key's line: values may start below
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
