#!/usr/bin/env bash
# `align recipe=cai_rounds`, 2 rounds, on SmolLM2-135M-Instruct (model=smollm2-135m) on CPU, no server and no
# network: every role runs in-process on the hf backend. Round k red-teams round k-1's model (the LoRA adapter
# of the previous round), critiques and revises its unsafe answers, SFTs and then DPOs on the revisions, and
# evaluates on XSTest (harm, over-refusal, win rate vs the previous round, KL to the initial model).
# The model judges itself here (judge=policy, allow_self_judge=true): plumbing, not evidence; pass
# judge=openai judge.llm.base_url=... judge.model.name_or_path=... for a real judge.
# Sizes are cut to fit a 2-core CPU; the recipe's own settings (conf/recipe/cai_rounds.yaml) are larger.
# Outputs: outputs/align-demo/ (rounds/<k>/<stage>/, ledger.json, report.md, plots/). Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
OUT=${OUT:-outputs/align-demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

RED="['pipeline=red_team','constitution=safety_zh',\"pipeline.categories=['歧视/地域','歧视/性别','健康/身体健康','违反社会主义价值观/违法违规']\",\
'pipeline.families=[direct]','pipeline.prompts_per_item=2','pipeline.attacker_sampling.max_new_tokens=64',\
'pipeline.decoding=[{name:greedy,temperature:0.0,max_new_tokens:48},{name:t1.0_p0.9,temperature:1.0,top_p:0.9,max_new_tokens:48}]',\
'pipeline.judge_sampling.max_new_tokens=48']"
CAI="['pipeline=critique_revision','constitution=safety_zh','pipeline.rounds=1','pipeline.few_shot=false',\
'pipeline.sampling.max_new_tokens=96']"
TRAIN_SFT="['loop=sft','optim.lr=1.0e-4','optim.batch_size=2','optim.max_steps=8','data.max_length=384']"
TRAIN_DPO="['loop=preference','loss=dpo','optim.lr=5.0e-5','optim.batch_size=2','optim.max_steps=8','data.max_length=384']"
EVAL="['suite=xstest','suite.limit=16','suite.gold_limit=0','sampling.temperature=1.0','sampling.top_p=1.0',\
'sampling.max_new_tokens=48','judges.strongreject=false','judges.sampling.max_new_tokens=48','allow_self_judge=true','bootstrap=200']"

time align recipe=cai_rounds rounds=2 model=smollm2-135m llm=hf llm.device=cpu llm.batch_size=16 \
  "recipe.stages.0.overrides=$RED" "recipe.stages.1.overrides=$CAI" "recipe.stages.2.overrides=$TRAIN_SFT" \
  "recipe.stages.3.overrides=$TRAIN_DPO" "recipe.stages.4.overrides=$EVAL" \
  "overrides.train=['lora.enabled=true','checkpoint.every_steps=4','log.tensorboard=false']" \
  stop.rule=none output_dir="$OUT"

echo "Round report: $OUT/report.md"
