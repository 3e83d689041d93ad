"""The wheel ships every package, the configs, the constitutions and the prompt templates, so `synth`
and `train` work from any directory after a plain `pip install .`."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def declared_packages() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_python_package_is_declared():
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("synth", "train")
        for p in (REPO / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found |= {f"rlaif_forge_conf.{d.name}" for d in (REPO / "conf").iterdir() if d.is_dir() and d.name != "__pycache__"}
    missing = found - declared_packages()
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_wheel_contains_configs_constitutions_and_templates(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("rlaif_forge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"rlaif_forge_conf/{c}" for c in conf} <= names
    consts = {p.name for p in (REPO / "constitutions").glob("*.yaml")}
    assert consts and {f"rlaif_forge_constitutions/{c}" for c in consts} <= names
    templates = {p.name for p in (REPO / "synth" / "prompts").glob("*.j2")}
    assert {f"synth/prompts/{t}" for t in templates} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "synth = synth.__main__:main" in text and "train = train.__main__:main" in text
    assert "evaluate = synth.evaluate.__main__:main" in text
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "synth" / "evaluate" / "data").rglob("*") if p.is_file()}
    assert data and data <= names  # suites' prompt files and licences ship
