#!/usr/bin/env bash
# Prompt tuning vs deep prompt vs LoRA vs full fine-tuning on SST-2, measured side by side.
#
# Budget: the training default (800 steps x batch 16) for every method, seeds 0,1,2, each method at
# the learning rate bench/quality_sst2.py's screen chose for it; accuracy on the 700 validation
# sentences that chose nothing (bench/common.split_validation). On 2 CPU cores this is hours
# (about 2 s per step, bench/results/quality_sst2_cpu_speed.json): run it on a GPU, or lower
# MAX_STEPS and SEEDS for a smaller, clearly labelled budget.
# Results land in bench/results/compare_sst2.{json,md,png}; paste the .md table into the README.
#
#   bench/compare_sst2.sh                                   # the committed benchmark
#   RESULTS=/tmp/smoke SEEDS=0 bench/compare_sst2.sh --max-steps 3 --max-eval-examples 32   # smoke run
#
# Environment: SHARED (folder holding data/sst2, default ../shared beside the repo), MODEL,
# MAX_STEPS, BATCH, SEEDS, OUT (run folder), RESULTS (where the results are copied),
# PYTHON. Extra arguments go to `softprompt compare` and override the defaults above.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
MODEL=${MODEL:-default}
MAX_STEPS=${MAX_STEPS:-800}
BATCH=${BATCH:-16}
SEEDS=${SEEDS:-0,1,2}
OUT=${OUT:-runs/compare_sst2}
RESULTS=${RESULTS:-bench/results}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

DATA="$SHARED/data/sst2"
for split in train validation; do
    [[ -f "$DATA/$split.jsonl" ]] || { echo "missing $DATA/$split.jsonl (set SHARED)" >&2; exit 2; }
done

mkdir -p "$OUT"
SHARED="$SHARED" "$PYTHON" -c "import sys; sys.path.insert(0, 'bench')
from common import split_validation, write_jsonl
write_jsonl(split_validation('sst2')[1], __import__('pathlib').Path('$OUT/report.jsonl'))"

start=$(date +%s)
"$PYTHON" -m softprompt compare \
    --model "$MODEL" \
    --data "$DATA/train.jsonl" \
    --eval-data "$OUT/report.jsonl" \
    --template 'Review: {text}\nSentiment:' \
    --labels negative,positive \
    --methods prompt,deep_prompt,lora,full \
    --max-steps "$MAX_STEPS" \
    --per-device-train-batch-size "$BATCH" \
    --seeds "$SEEDS" \
    --output-dir "$OUT" \
    "$@"

mkdir -p "$RESULTS"
cp "$OUT/compare.json" "$RESULTS/compare_sst2.json"
cp "$OUT/compare.md" "$RESULTS/compare_sst2.md"
cp "$OUT/compare.png" "$RESULTS/compare_sst2.png"
echo "done in $(( $(date +%s) - start )) s; results in $RESULTS/compare_sst2.{json,md,png}" >&2
