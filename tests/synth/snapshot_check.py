"""Template snapshot check shared by the template tests: compare a rendering with
tests/synth/snapshots/<name>.<lang>.txt; UPDATE_SNAPSHOTS=1 rewrites the file first."""

import os
from pathlib import Path

SNAPSHOTS = Path(__file__).parent / "snapshots"


def assert_snapshot(name: str, lang: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.{lang}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing snapshot {path}; run with UPDATE_SNAPSHOTS=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{path} differs; if intended, rerun with UPDATE_SNAPSHOTS=1"
