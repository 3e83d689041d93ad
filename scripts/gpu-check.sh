#!/usr/bin/env bash
# The opt-in GPU checks in one run: the `gpu`-marked tests, then DPO and GRPO against TRL on CUDA.
#
#   bash scripts/gpu-check.sh            # on a machine with a CUDA GPU and the project installed
#   OUT=/some/dir bash scripts/gpu-check.sh
#
# On a machine without network access, put the missing wheels (`pip download --no-deps`) in .whl/ first:
# they are installed into /tmp/site with --no-deps and put on PYTHONPATH with this checkout.
# The vllm-marked tests need the vllm package; without it they skip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  # the project itself from this checkout: its data folders under their installed package names
  ln -sfn "$PWD/conf" /tmp/site/rlaif_forge_conf && ln -sfn "$PWD/constitutions" /tmp/site/rlaif_forge_constitutions
  export PYTHONPATH="$PWD:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" | tee -a "$OUT/gpu.txt"

status=0
[ -n "${SKIP_TESTS:-}" ] || $PY -m pytest -q -p no:cacheprovider -m gpu -o addopts="" -rs tests 2>&1 | tee "$OUT/pytest-gpu.log" || status=1
timeout 240 $PY bench/dpo_vs_trl.py --device cuda --size 135m --data synthetic --pairs 256 --batch-size 16 \
  2>&1 | tee "$OUT/dpo_vs_trl.log" || status=1
timeout 300 $PY bench/grpo_vs_trl.py --device cuda --size 135m --data synthetic --steps 6 --prompts 64 \
  --prompts-per-step 16 --group 8 --max-new-tokens 128 2>&1 | tee "$OUT/grpo_vs_trl.log" || status=1
exit $status
