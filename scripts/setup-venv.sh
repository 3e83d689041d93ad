# Sourced by scripts/demo.sh and .ci/run: make (or reuse) .venv with the project installed.
# torch is pinned to 2.13.0 here because that CPU wheel is on disk on CI machines (any other version
# downloads gigabytes of CUDA packages); the project itself declares a range (pyproject.toml).
# CI (CI=true) or FRESH=1 always starts from an empty environment.
PY=${PYTHON:-python3}
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)"
if [ "${CI:-}" = "true" ] || [ "${FRESH:-0}" = "1" ] || [ ! -f "$stamp" ]; then
  "$PY" -m venv --clear .venv
  . .venv/bin/activate
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet "torch==2.13.0"
  python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
else
  . .venv/bin/activate
fi
