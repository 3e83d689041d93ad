#!/usr/bin/env bash
# The opt-in GPU checks, written for a machine with one CUDA GPU and no network that receives at most 64 MiB
# per call and runs a call for at most 10 minutes (the device machine: an H200 with torch 2.11.0+cu130,
# transformers, peft, accelerate, pytest preinstalled). Four modes:
#
#   bash scripts/gpu-check.sh prepare   HERE, where PyPI answers: the wheels the device lacks into .whl/
#                                       (about 7 MiB: hydra, omegaconf, pydantic, datasets, openai, trl, ...),
#                                       and vLLM ${VLLM_VERSION} with the dependencies its offline engine
#                                       imports, repacked into one .tar.xz split into .whl-vllm/part-NN of
#                                       PART_MIB (50) MiB. It prints the sizes and the calls to make.
#   bash scripts/gpu-check.sh cuda      (default) the gpu-marked tests that need no vllm, then DPO and GRPO
#                                       against TRL on CUDA
#   bash scripts/gpu-check.sh receive   a call that only carries a part: lists the parts there so far
#   bash scripts/gpu-check.sh vllm      vLLM from the parts, a short GRPO run with the colocated engine in
#                                       float32 and in bfloat16 whose probe and log-prob diffs it prints,
#                                       then the vllm-marked tests, one process per case; without all the
#                                       parts it runs the CUDA-only tests instead
#
# Why parts: vllm 0.25.1's wheel alone is 250,100,306 bytes (238.5 MiB; 0.33.0's is 336 MB), four times what
# one call carries. Its CUDA kernels compress far better with xz than with the wheel's deflate (the
# FlashAttention-3 library: 38.4 MB in the wheel, 10.7 MB with xz -6), so `prepare` stores each wheel
# uncompressed and xz-compresses them together; the device unpacks with Python's lzma, no xz needed.
# vLLM 0.25.1 is the newest release built for torch 2.11 but one (the device's; 0.26.0 too, 0.27+ need torch
# 2.13, 0.33 torch 2.14) and inside TRL 1.16's range (0.22-0.31); its source is what train/vllm_colocate.py
# was checked against. Parts left on a machine from earlier calls are kept only while it stays warm
# (about 30 s after each call), so the calls must follow one another at once:
#   run(command="bash scripts/gpu-check.sh receive", carry=[".whl", ".whl-vllm/part-01", ".whl-vllm/SHA256SUMS"])
#   ...   (one call per part but the last)
#   run(command="bash scripts/gpu-check.sh vllm", carry=[".whl", ".whl-vllm/part-NN", ".whl-vllm/SHA256SUMS"],
#       timeout_s=600)
# .whl/ and .whl-vllm/ are git-ignored. OUT (the device sets it) collects the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-cuda}
OUT=${OUT:-outputs/gpu-check}
PY=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.25.1}
PART_MIB=${PART_MIB:-50}
BUDGET_S=${BUDGET_S:-540} # the vllm mode starts no new check past this many seconds (a call gets 600)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

# the wheels the device image lacks, at the versions of this checkout's .venv where it has them
PROJECT_DEPS="hydra-core omegaconf pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess
openai jiter distro sniffio trl"
# what vLLM's offline engine (LLM, the V1 engine core, the GPU worker, the Llama model, the sampler, LoRA,
# structured outputs) imports and the device image lacks; found by importing those modules from the unpacked
# 0.25.1 wheel until nothing was missing. Versions: vllm's own pins.
VLLM_DEPS="cbor2 msgspec pyzmq openai-harmony pybase64 llguidance fastapi starlette opentelemetry-api
importlib-metadata partial-json-parser xgrammar apache-tvm-ffi"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
  --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

prepare() {
  local venv_py=.venv/bin/python pins=() stage
  [ -x "$venv_py" ] || venv_py=$PY
  mkdir -p .whl .whl-vllm && rm -f .whl/*.whl .whl-vllm/part-* .whl-vllm/SHA256SUMS
  for d in $PROJECT_DEPS; do
    v=$("$venv_py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$d" 2>/dev/null)
    pins+=("$d${v:+==$v}")
  done
  "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${pins[@]}" || return 1
  # omegaconf needs antlr4-python3-runtime 4.9.*, published as a source archive only (pure Python)
  "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || return 1
  stage=$(mktemp -d)
  "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$stage/in" "vllm==$VLLM_VERSION" || return 1
  mapfile -t vpins < <("$PY" - "$stage/in" $VLLM_DEPS <<'EOF'
import re, sys, zipfile
from pathlib import Path
wheel = next(Path(sys.argv[1]).glob("vllm-*.whl"))
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
reqs = {}
for line in meta.splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        spec = line.split(":", 1)[1].split(";")[0].strip()
        name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)
        reqs[re.sub(r"[-_.]+", "-", name).lower()] = re.sub(r"\[.*?\]", "", spec).replace(" ", "")
for want in sys.argv[2:]:
    print(reqs.get(want, want))
EOF
  )
  "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$stage/in" "${vpins[@]}" || return 1
  # each wheel re-stored uncompressed (same files), then all of them in one tar, xz-compressed
  "$PY" - "$stage/in" "$stage/stored" <<'EOF' || return 1
import sys, zipfile
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
EOF
  tar -C "$stage/stored" -cf - . | xz -T0 -6 -c > "$stage/vllm.tar.xz" || return 1
  split -b "${PART_MIB}M" -a 2 --numeric-suffixes=1 "$stage/vllm.tar.xz" .whl-vllm/part-
  (cd .whl-vllm && sha256sum part-* > SHA256SUMS)
  echo "wheels for the device in .whl/ ($(du -sb .whl | cut -f1) bytes):"
  ls -l .whl | awk 'NR > 1 {print "  " $5, $9}'
  echo "vLLM $VLLM_VERSION and its missing dependencies: $(du -cb "$stage"/in/*.whl | tail -1 | cut -f1) bytes as wheels," \
    "$(stat -c %s "$stage/vllm.tar.xz") bytes repacked, in $(ls .whl-vllm/part-* | wc -l) part(s) of ${PART_MIB} MiB:"
  ls -l "$stage"/in | awk 'NR > 1 {print "  " $5, $9}'
  echo "tracked + untracked files of this checkout: $(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes"
  rm -rf "$stage"
  local parts=(.whl-vllm/part-*) n
  n=${#parts[@]}
  echo "calls to make, one right after the other (the machine keeps the parts only while warm):"
  for ((k = 0; k < n - 1; k++)); do
    echo "  run(command=\"bash scripts/gpu-check.sh receive\", carry=[\".whl\", \"${parts[k]}\", \".whl-vllm/SHA256SUMS\"], timeout_s=60)"
  done
  echo "  run(command=\"bash scripts/gpu-check.sh vllm\", carry=[\".whl\", \"${parts[n - 1]}\", \".whl-vllm/SHA256SUMS\"], timeout_s=600)"
}

install_wheels() { # .whl/*.whl and the wheels given into /tmp/site, with this checkout on PYTHONPATH
  local wheels=()
  shopt -s nullglob
  wheels=(.whl/*.whl "$@")
  shopt -u nullglob
  if ((${#wheels[@]})); then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${wheels[@]}" || return 1
    # the project itself from this checkout: its data folders under their installed package names
    ln -sfn "$PWD/conf" /tmp/site/rlaif_forge_conf && ln -sfn "$PWD/constitutions" /tmp/site/rlaif_forge_constitutions
    export PYTHONPATH="$PWD:/tmp/site"
  fi
}

parts_complete() { # every part listed in SHA256SUMS is here and intact
  [ -f .whl-vllm/SHA256SUMS ] && (cd .whl-vllm && sha256sum --quiet -c SHA256SUMS)
}

gpu_header() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
}

cuda_checks() {
  local status=0
  gpu_header
  [ -n "${SKIP_TESTS:-}" ] || $PY -m pytest -q -p no:cacheprovider -m "gpu and not vllm" -o addopts="" -rs tests 2>&1 |
    tee "$OUT/pytest-gpu.log" || status=1
  [ -n "${SKIP_BENCH:-}" ] || {
    timeout 240 $PY bench/dpo_vs_trl.py --device cuda --size 135m --data synthetic --pairs 256 --batch-size 16 \
      2>&1 | tee "$OUT/dpo_vs_trl.log" || status=1
    timeout 300 $PY bench/grpo_vs_trl.py --device cuda --size 135m --data synthetic --steps 6 --prompts 64 \
      --prompts-per-step 16 --group 8 --max-new-tokens 128 2>&1 | tee "$OUT/grpo_vs_trl.log" || status=1
  }
  return $status
}

grpo_vllm() { # name, extra overrides: a 4-step GRPO run through the colocated engine, then its per-step metrics
  local name=$1 data=$OUT/prompts.jsonl
  shift
  $PY -c "
import json, sys
w = 'bread flour water salt honest fox river stone cloud maple ember quiet lantern'.split()
with open(sys.argv[1], 'w') as f:
    for i in range(32):
        f.write(json.dumps({'prompt': f'{w[i % 13]} {w[(i * 5) % 13]} {i}'}) + '\n')" "$data"
  timeout 240 $PY -m train loop=grpo model=tiny "data.path=$data" "output_dir=$OUT/$name" progress=false \
    log.plot=false log.tensorboard=false checkpoint.every_steps=0 checkpoint.final=false optim.max_steps=4 \
    optim.lr=2e-2 optim.scheduler=constant optim.warmup_ratio=0 loop.prompts_per_step=8 \
    loop.reward.function=train.scorers:even_token_fraction loop.generation.backend=vllm \
    loop.generation.max_new_tokens=16 "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  $PY - "$OUT/$name/metrics.jsonl" "$name" <<'EOF'
import json, sys
from pathlib import Path
path, name = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
keys = ["vllm/probe_mean_abs_diff", "vllm/probe_abs_diff", "rollout/abs_logp_diff", "rollout/is_weight_mean",
        "rollout/is_masked_frac", "reward/mean"]
print(f"== {name}: {len(rows)} step(s); probe = |log p_vllm - log p_trainer| on the probe after each sync, "
      "abs_logp_diff = the same on the sampled tokens")
print("step " + " ".join(f"{k.split('/')[-1] if k.startswith(('vllm', 'rollout')) else k:>22}" for k in keys))
for r in rows:
    print(f"{r['step']:>4} " + " ".join(f"{r.get(k, float('nan')):>22.3e}" for k in keys))
EOF
  return "$rc"
}

vllm_checks() {
  local status=0 t0=$SECONDS stage
  if ! parts_complete; then
    echo "vLLM parts missing or damaged ($(ls .whl-vllm/part-* 2>/dev/null | wc -l) here; see SHA256SUMS):" \
      "running the CUDA-only tests instead"
    install_wheels && SKIP_BENCH=1 cuda_checks
    return 1
  fi
  stage=$(mktemp -d)
  cat .whl-vllm/part-* | $PY -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='data')" \
    "$stage" || return 1
  install_wheels "$stage"/*.whl || return 1
  rm -rf "$stage"
  echo "installed in $((SECONDS - t0)) s"
  gpu_header
  if ! $PY -c "import vllm, torch; from vllm import LLM; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"; then
    echo "vllm does not import (a dependency missing from VLLM_DEPS? see above): running the CUDA-only tests instead"
    SKIP_BENCH=1 cuda_checks
    return 1
  fi
  # 1. the default engine (torch.compile, CUDA graphs), float32: the probe must agree to 1e-3
  grpo_vllm grpo-vllm-fp32 || status=1
  # 2. bfloat16 with a tolerance that cannot stop the run: the measured diffs are what probe_tol=0.05 guesses
  ((SECONDS - t0 < BUDGET_S)) && { grpo_vllm grpo-vllm-bf16 optim.dtype=bfloat16 loop.generation.probe_tol=10 \
    loop.generation.enforce_eager=true || status=1; }
  # 3. the vllm-marked tests, one process per case (vLLM's sleep-mode allocator serves one engine per process)
  for case in full lora-merged lora-adapter; do
    ((SECONDS - t0 < BUDGET_S)) || { echo "skipped $case: past BUDGET_S=$BUDGET_S"; status=1; continue; }
    timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/train/test_online_vllm.py -k "$case" 2>&1 |
      tee "$OUT/pytest-vllm-$case.log" || status=1
  done
  echo "vllm checks: $((SECONDS - t0)) s, status $status"
  return $status
}

case "$MODE" in
  prepare) prepare ;;
  receive)
    echo "parts here: $(ls .whl-vllm/part-* 2>/dev/null | tr '\n' ' ')"
    parts_complete && echo "all parts present" || echo "(not all parts yet)"
    ;;
  cuda)
    mkdir -p "$OUT" && install_wheels && cuda_checks
    ;;
  vllm)
    mkdir -p "$OUT" && vllm_checks
    ;;
  *)
    echo "usage: bash scripts/gpu-check.sh [prepare|cuda|receive|vllm]" >&2
    exit 2
    ;;
esac
