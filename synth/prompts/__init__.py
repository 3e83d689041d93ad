"""Prompt templates are data: one Jinja file per step and language, `<name>.<lang>.j2`.

`render("critique", "zh", ...)` renders `critique.zh.j2`. There is no silent fallback to English: a
Chinese constitution must get Chinese prompts, so a missing template raises. `template_ref` gives the
id and content hash that go into each record's provenance.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent


@cache
def _env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,  # a missing variable is a bug, not an empty string
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def template_file(name: str, language: str) -> str:
    fname = f"{name}.{language}.j2"
    if not (TEMPLATE_DIR / fname).exists():
        have = sorted(p.name for p in TEMPLATE_DIR.glob(f"{name}.*.j2"))
        raise FileNotFoundError(f"no prompt template {fname!r} in {TEMPLATE_DIR}; available for {name!r}: {have}")
    return fname


def render(name: str, language: str, **variables: Any) -> str:
    return _env().get_template(template_file(name, language)).render(**variables).strip()


def template_ref(name: str, language: str) -> dict[str, str]:
    fname = template_file(name, language)
    digest = hashlib.sha256((TEMPLATE_DIR / fname).read_bytes()).hexdigest()[:12]
    return {"template_id": fname, "template_hash": digest}
