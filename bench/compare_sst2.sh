#!/usr/bin/env bash
# Prompt tuning vs deep prompt vs LoRA vs full fine-tuning on SST-2, measured side by side.
#
# Budget: 250 steps x batch 8 per method and 500 validation examples, sized for about 30 minutes
# on 2 otherwise idle CPU cores with SmolLM2-135M (`--model default`): about 0.5-0.7 s per step for
# prompt, deep prompt and LoRA, 1.5-2 s for full fine-tuning, 5 x 1000 scored rows of evaluation.
# Shared, busy cores are many times slower (OpenMP threads spin): run it when the CPUs are free.
# Results land in bench/results/compare_sst2.{json,md,png}; paste the .md table into the README.
#
#   bench/compare_sst2.sh                                   # the committed benchmark
#   RESULTS=/tmp/smoke bench/compare_sst2.sh --max-steps 3 --max-eval-examples 32   # smoke run
#
# Environment: SHARED (folder holding data/sst2, default ../shared beside the repo), MODEL,
# MAX_STEPS, BATCH, MAX_EVAL_EXAMPLES, OUT (run folder), RESULTS (where the results are copied),
# PYTHON. Extra arguments go to `softprompt compare` and override the defaults above.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
MODEL=${MODEL:-default}
MAX_STEPS=${MAX_STEPS:-250}
BATCH=${BATCH:-8}
MAX_EVAL_EXAMPLES=${MAX_EVAL_EXAMPLES:-500}
OUT=${OUT:-runs/compare_sst2}
RESULTS=${RESULTS:-bench/results}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

DATA="$SHARED/data/sst2"
for split in train validation; do
    [[ -f "$DATA/$split.jsonl" ]] || { echo "missing $DATA/$split.jsonl (set SHARED)" >&2; exit 2; }
done

start=$(date +%s)
"$PYTHON" -m softprompt compare \
    --model "$MODEL" \
    --data "$DATA/train.jsonl" \
    --eval-data "$DATA/validation.jsonl" \
    --template 'Review: {text}\nSentiment:' \
    --labels negative,positive \
    --methods prompt,deep_prompt,lora,full \
    --max-steps "$MAX_STEPS" \
    --per-device-train-batch-size "$BATCH" \
    --max-eval-examples "$MAX_EVAL_EXAMPLES" \
    --output-dir "$OUT" \
    "$@"

mkdir -p "$RESULTS"
cp "$OUT/compare.json" "$RESULTS/compare_sst2.json"
cp "$OUT/compare.md" "$RESULTS/compare_sst2.md"
cp "$OUT/compare.png" "$RESULTS/compare_sst2.png"
echo "done in $(( $(date +%s) - start )) s; results in $RESULTS/compare_sst2.{json,md,png}" >&2
