#!/usr/bin/env bash
# The main job, end to end on a CPU machine with no network. Two variants:
#
#   bash scripts/demo.sh            (or DEMO=stand-in) the plumbing on model=tiny, what CI runs:
#     red-team prompts over the 33 categories of constitution=safety_zh -> target answers + safety verdicts
#     -> critique-revision (SL-CAI) of the unsafe answers -> preferences.jsonl -> DPO on the tiny model
#     -> evaluate before/after. The synth stages talk HTTP to scripts/demo_server.py, a scripted stand-in
#     for a served model (see its docstring); the training stage trains the real (tiny, random-weight)
#     model. Outputs: outputs/demo/.
#   bash scripts/demo.sh local      (or DEMO=local; `smollm2` is the same) one safety round on
#     SmolLM2-135M-Instruct in-process (MODEL=smollm2-135m, llm=hf, preset=small, constitution=safety_en),
#     no server: red teaming ->
#     critique-revision of the answers judged unsafe -> DPO (LoRA) -> evaluate before/after on held-out
#     HH red-team prompts (split from the seeds by prompt) and XSTest's prompts (string-match refusal rate, length, KL to the start
#     model). Each stage's wall time and peak RSS go to $OUT/stages.jsonl; the last lines print the table
#     ($OUT/main_job.md). Outputs: outputs/main-smollm2/.
# Rerunning resumes: finished stages return at once without backend calls.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_NO_VENV:-0}" = 1 ] || source scripts/setup-venv.sh   # DEMO_NO_VENV=1: use the active environment (tests)
DEMO=${1:-${DEMO:-stand-in}}
case "$DEMO" in stand-in|local|smollm2) ;; *) echo "usage: bash scripts/demo.sh [stand-in|local]" >&2; exit 2;; esac

if [ "$DEMO" != stand-in ]; then
  MODEL=${MODEL:-smollm2-135m}                # a conf/model preset; the tests run this variant on MODEL=tiny
  OUT=${OUT:-outputs/main-$MODEL}
  mkdir -p "$OUT"
  DATA=${DATA:-../shared/data}   # hh-rlhf harmless-base test split and XSTest (see its README for licences)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread: two spin against other processes on a shared box (README)
  STAGE="python scripts/stage.py"; LOG="$OUT/stages.jsonl"
  POLICY="llm=hf model=$MODEL"
  CATEGORIES=${CATEGORIES:-[]}                # [] = all 15 taxonomy categories of safety_en
  FAMILIES=${FAMILIES:-[direct,role_play]}   # 15 categories x 2 attack families = 30 attacker requests
  DPO_STEPS=${DPO_STEPS:-16}
  N_EVAL=${N_EVAL:-60}                        # held-out prompts per suite
  # RED_TEAM=seeds (default): the attack prompts are HH red-team first turns (a 135M attacker writes
  # off-topic text, see README); half of the HH file is held out for evaluation, split by prompt.
  # RED_TEAM=taxonomy: the model writes the attacks over safety_en's 15 categories x FAMILIES.
  RED_TEAM=${RED_TEAM:-seeds}
  N_SEEDS=${N_SEEDS:-48}
  python scripts/split_hh.py "$DATA/hh-rlhf-harmless-base-test.jsonl.gz" "$OUT/hh_split"
  if [ "$RED_TEAM" = seeds ]; then
    echo "== 1/4 red team ($N_SEEDS HH red-team seed prompts, answered and judged by $MODEL; constitution safety_en)"
    ATTACK="pipeline.seeds=true source=hh_rlhf source.path=$OUT/hh_split/seeds.jsonl source.limit=$N_SEEDS"
  else
    echo "== 1/4 red team (safety_en: categories $CATEGORIES x $FAMILIES, $MODEL as attacker, target and judge)"
    ATTACK="pipeline.categories=$CATEGORIES pipeline.families=$FAMILIES"
  fi
  $STAGE red_team "$LOG" -- synth pipeline=red_team constitution=safety_en $POLICY preset=small $ATTACK \
    output_dir="$OUT/red_team" ${RED_TEAM_EXTRA:-}
  if [ ! -s "$OUT/red_team/unsafe.jsonl" ]; then
    echo "no answer was judged unsafe, so there is nothing to revise; try more FAMILIES or CATEGORIES" >&2; exit 1
  fi
  echo "== 2/4 critique-revision of the answers judged unsafe (r0 = that answer)"
  $STAGE critique_revision "$LOG" -- synth pipeline=critique_revision constitution=safety_en $POLICY preset=small \
    source=jsonl source.path="$OUT/red_team/unsafe.jsonl" output_dir="$OUT/critique_revision" ${CAI_EXTRA:-}
  echo "== 3/4 DPO (LoRA r=16) on the preference pairs"
  $STAGE dpo "$LOG" -- train loop=preference loss=dpo model=$MODEL lora.enabled=true \
    data.path="$OUT/critique_revision/preferences.jsonl" data.eval_split=0.1 data.max_length=384 \
    optim.max_steps=$DPO_STEPS optim.lr=2e-4 optim.batch_size=${DPO_BATCH:-2} optim.warmup_steps=2 checkpoint.every_steps=0 \
    resume=true output_dir="$OUT/dpo"
  echo "== 4/4 evaluate before / after on held-out prompts (never trained on; string-match refusal, KL to the start model)"
  START=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name_or_path'])" "conf/model/$MODEL.yaml")
  EV="$POLICY judges.harm=false judges.refusal=false judges.strongreject=false judges.pairwise=false
      sampling.temperature=1.0 sampling.top_p=1.0 sampling.max_new_tokens=${EVAL_TOKENS:-64} suite.limit=$N_EVAL"
  HH="suite=hh_redteam suite.path=$OUT/hh_split/heldout.jsonl"   # never a red-team seed
  XS="suite=xstest suite.path=$DATA/eval/xstest_prompts.csv suite.gold_limit=0"
  AFTER="llm.adapter=$OUT/dpo/final scores.reference=$START"
  $STAGE eval_hh_before "$LOG" -- evaluate $EV $HH output_dir="$OUT/eval/hh/before"
  $STAGE eval_hh_after "$LOG" -- evaluate $EV $HH $AFTER baseline="$OUT/eval/hh/before" output_dir="$OUT/eval/hh/after"
  $STAGE eval_xstest_before "$LOG" -- evaluate $EV $XS output_dir="$OUT/eval/xstest/before"
  $STAGE eval_xstest_after "$LOG" -- evaluate $EV $XS $AFTER baseline="$OUT/eval/xstest/before" output_dir="$OUT/eval/xstest/after"
  python scripts/main_job_report.py "$OUT"
  exit 0
fi

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
