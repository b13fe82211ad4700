#!/usr/bin/env bash
# Prompt tuning vs deep prompt vs LoRA vs full fine-tuning on SST-2, measured side by side.
#
# Budget: the training default (800 steps x batch 16) for every method, seeds 0,1,2, each method at
# compare's default learning rate (prompts: softprompt train's; LoRA and full fine-tuning: what
# bench/quality_sst2.py's screen chose); accuracy after the last step on the 700 validation
# sentences that chose nothing (bench/common.split_validation). On 2 CPU cores this is hours
# (about 2 s per step, bench/results/quality_sst2_cpu_speed.json): run it on a GPU, or lower
# MAX_STEPS and SEEDS for a smaller, clearly labelled budget.
# Results land in bench/results/compare_sst2.{json,md,png}; paste the .md table into the README.
#
#   bench/compare_sst2.sh                                   # the committed benchmark
#   RESULTS=/tmp/smoke SEEDS=0 MAX_STEPS=3 bench/compare_sst2.sh --max-eval-examples 32   # smoke run
#
#   JOBS=12 bench/compare_sst2.sh                           # on a GPU: every (method, seed) its own process
#
# Environment: SHARED (folder holding data/sst2, default ../shared beside the repo), MODEL,
# MAX_STEPS, BATCH, SEEDS, METHODS, OUT (run folder), RESULTS (where the results are copied),
# PYTHON, JOBS (how many compare processes run at once: 1 = one `softprompt compare` for all;
# more = one per (method, seed), joined by softprompt.training.compare.merge_results; their speed and memory
# columns then include the others' load). Extra arguments go to `softprompt compare`.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
MODEL=${MODEL:-default}
MAX_STEPS=${MAX_STEPS:-800}
BATCH=${BATCH:-16}
SEEDS=${SEEDS:-0,1,2}
METHODS=${METHODS:-prompt,deep_prompt,lora,full}
JOBS=${JOBS:-1}
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

compare() {  # compare METHODS SEEDS OUTPUT_DIR [extra arguments]
    "$PYTHON" -m softprompt compare \
        --model "$MODEL" \
        --data "$DATA/train.jsonl" \
        --eval-data "$OUT/report.jsonl" \
        --template 'Review: {text}\nSentiment:' \
        --labels negative,positive \
        --methods "$1" \
        --max-steps "$MAX_STEPS" \
        --per-device-train-batch-size "$BATCH" \
        --seeds "$2" \
        --output-dir "$3" \
        "${@:4}"
}

start=$(date +%s)
if [[ "$JOBS" -le 1 ]]; then
    compare "$METHODS" "$SEEDS" "$OUT" "$@"
else
    parts=()
    mkdir -p "$OUT/parts"
    for seed in ${SEEDS//,/ }; do
        for method in ${METHODS//,/ }; do
            while [[ $(jobs -rp | wc -l) -ge "$JOBS" ]]; do wait -n || true; done
            part="$OUT/parts/$method-$seed"
            parts+=("$part")
            compare "$method" "$seed" "$part" "$@" >"$part.log" 2>&1 &
        done
    done
    wait
    "$PYTHON" - "$OUT" "${parts[@]}" <<'PY'
import json, sys
from pathlib import Path
from softprompt.training.compare import merge_results, write_outputs
out, parts = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
missing = [str(p) for p in parts if not (p / "compare.json").is_file()]
if missing:
    sys.exit(f"these runs wrote no compare.json (see their .log beside them): {', '.join(missing)}")
write_outputs(merge_results([json.loads((p / "compare.json").read_text()) for p in parts]), out)
PY
fi
mkdir -p "$RESULTS"
# the result file names the command that made it
"$PYTHON" - "$OUT/compare.json" "$RESULTS/compare_sst2.json" \
    "SEEDS=$SEEDS METHODS=$METHODS MAX_STEPS=$MAX_STEPS BATCH=$BATCH JOBS=$JOBS bash bench/compare_sst2.sh $*" <<'PY'
import json, sys
from softprompt.atomic import write_file
results = json.loads(open(sys.argv[1]).read())
write_file(sys.argv[2], json.dumps({"command": sys.argv[3], **results}, indent=2) + "\n")
PY
cp "$OUT/compare.md" "$RESULTS/compare_sst2.md"
cp "$OUT/compare.png" "$RESULTS/compare_sst2.png"
echo "done in $(( $(date +%s) - start )) s; results in $RESULTS/compare_sst2.{json,md,png}" >&2
