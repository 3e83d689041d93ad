#!/usr/bin/env bash
# The main job, end to end on a CPU machine with no network:
#   red-team prompts over the 33 categories of constitution=safety_zh -> target answers + safety verdicts
#   -> critique-revision (SL-CAI) of the unsafe ones -> preferences.jsonl -> DPO on the tiny model.
# The synth stages talk HTTP to scripts/demo_server.py, a scripted stand-in for a served model (see its
# docstring); the training stage trains the real (tiny, random-weight) model. Outputs: outputs/demo/.
# Rerunning resumes: finished stages return at once without backend calls.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
OUT=${OUT:-outputs/demo}
mkdir -p "$OUT"

python scripts/demo_server.py > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q READY "$OUT/server.log" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^READY //p' "$OUT/server.log")
[ -n "$URL" ] || { echo "demo server did not start: $(cat "$OUT/server.log")" >&2; exit 1; }
LLM="llm=openai llm.base_url=$URL model.name_or_path=stand-in"

echo "== 1/4 red team (safety_zh: 33 categories x 5 attack families, 4 decoding settings)"
synth pipeline=red_team constitution=safety_zh $LLM pipeline.prompts_per_item=1 output_dir="$OUT/red_team"

echo "== 2/4 critique-revision of the prompts that drew an unsafe answer"
synth pipeline=critique_revision constitution=safety_zh $LLM pipeline.rounds=2 \
  source=jsonl source.path="$OUT/red_team/unsafe.jsonl" output_dir="$OUT/critique_revision"

echo "== 3/4 DPO on the preference pairs (tiny model, CPU)"
train loop=preference loss=dpo model=tiny data.path="$OUT/critique_revision/preferences.jsonl" \
  data.eval_split=0.1 optim.max_steps=30 optim.lr=1e-4 optim.batch_size=8 data.max_length=256 \
  resume=true output_dir="$OUT/dpo"

echo "== 4/4 evaluate before and after on held-out red-team prompts (never trained on)"
EVAL="suite=redteam_heldout suite.path=$OUT/red_team/prompts.jsonl suite.exclude=[$OUT/critique_revision/preferences.jsonl]
  suite.limit=40 sampling.max_new_tokens=48 judge=openai judge.llm.base_url=$URL judge.model.name_or_path=stand-in"
evaluate $EVAL model=tiny output_dir="$OUT/eval/before"
evaluate $EVAL model=tiny model.name_or_path="$OUT/dpo/final" baseline="$OUT/eval/before" output_dir="$OUT/eval/after"

echo "Done. Data: $OUT/critique_revision/{sft,preferences}.jsonl  Model: $OUT/dpo/final  Report: $OUT/eval/after/report.md"
