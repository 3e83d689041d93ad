"""The import layering the code tree promises: steps never import pipelines (they share run-time types
through synth.runtime)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def offenders(folder: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    return [
        f"{p.relative_to(ROOT)}: {m}"
        for p in files
        for m in sorted(imported_modules(p))
        if m == forbidden or m.startswith(forbidden + ".")
    ]


def test_steps_do_not_import_pipelines():
    assert offenders("synth/steps", "synth.pipelines") == []
