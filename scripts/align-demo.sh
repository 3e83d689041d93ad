#!/usr/bin/env bash
# The main job: `align recipe=cai_rounds preset=small`, 2 rounds on SmolLM2-135M-Instruct
# (model=smollm2-135m) on CPU, no server and no network; every role runs in-process on the hf backend.
# Round k red-teams round k-1's model (the previous round's LoRA adapter) with 16 HH red-team first turns
# that no earlier round saw, critiques and revises its answers (constitution safety_en),
# SFTs and then DPOs on the revisions, and evaluates on 32 XSTest prompts (string-match refusal rate on
# the unsafe ones, over-refusal on the safe ones, win rate vs the previous round, KL to the initial model).
# The model judges itself here (judge=policy, allow_self_judge=true): plumbing, not evidence; pass
# judge=openai judge.llm.base_url=... judge.model.name_or_path=... for a real judge.
# Every size is in conf/preset/recipe/small_cai_rounds.yaml (the recipe's own, conf/recipe/cai_rounds.yaml,
# is larger). Extra arguments go to align (e.g. rounds=3).
# Outputs: $OUT (default outputs/main): seeds/, rounds/<k>/<stage>/, ledger.json, report.md, plots/.
# Rerunning resumes: finished stages are skipped (no backend call, no training step).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_NO_VENV:-0}" = 1 ] || source scripts/setup-venv.sh   # DEMO_NO_VENV=1: use the active environment
OUT=${OUT:-outputs/main}
DATA=${DATA:-../shared/data}   # hh-rlhf harmless-base test split (see its README for the licence)
ROUNDS=${ROUNDS:-2}
SEEDS_PER_ROUND=${SEEDS_PER_ROUND:-16}
# one torch thread: on a shared 2-core box two OpenMP threads spin against other processes (a 12x
# slower decode was measured, README "The main job")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

python scripts/split_hh.py "$DATA/hh-rlhf-harmless-base-test.jsonl.gz" "$OUT/seeds" \
  --rounds "$ROUNDS" --per-round "$SEEDS_PER_ROUND"
align recipe=cai_rounds preset=small model=${MODEL:-smollm2-135m} rounds="$ROUNDS" output_dir="$OUT" "$@"

echo "Round report: $OUT/report.md   plots: $OUT/plots/   ledger: $OUT/ledger.json"
echo "Data: $OUT/rounds/<k>/red_team/unsafe.jsonl, $OUT/rounds/<k>/critique_revision/{sft,preferences}.jsonl"
