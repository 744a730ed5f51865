#!/usr/bin/env bash
# Megatron-LM's own save_checkpoint as an independent writer, on the CPU (no GPU needed):
#   (a) tests/dist/megatron_lm_save.py, under torchrun with 4 processes (TP2 x PP2, bf16, gloo),
#       builds a tiny llama with Megatron-LM's parser and validate_args and saves it with
#       megatron.training.checkpointing.save_checkpoint, in --ckpt-format torch and torch_dist;
#   (b) megatron_patch's converter turns each into HF (--model-family llama: no metadata);
#   (c) transformers loads the result and its tensors equal Megatron-LM's files bit for bit
#       (read without the converter: tests/gpu/megatron_lm_interop.py compare).
# Not in tests/run.sh: CI has no Megatron-LM checkout (megatron.training is not on PyPI).
# One PASS or FAIL line per step; exit status 1 when any failed.
#
# usage: bash tests/interop/megatron_lm_save_cpu.sh MEGATRON_LM_DIR [WORK_DIR]
#   MEGATRON_LM_DIR  a Megatron-LM checkout at core_v0.16.1 (megatron/training)
#   WORK_DIR         where checkpoints and logs go (default: a new temporary directory)
# environment: PYTHON (default python3), MASTER_PORT (default 29533).
set -u

usage() {
    echo "usage: bash tests/interop/megatron_lm_save_cpu.sh MEGATRON_LM_DIR [WORK_DIR]" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
if [ ! -f "$1/megatron/training/checkpointing.py" ]; then
    echo "error: $1/megatron/training/checkpointing.py not found: MEGATRON_LM_DIR must be a" \
         "Megatron-LM checkout (core_v0.16.1)" >&2
    exit 2
fi
MLM=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${2:-$(mktemp -d -t megatron_lm_save_cpu.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FAILS=0

# shellcheck source=../interop/steps.sh
source "$REPO/tests/interop/steps.sh"

cd "$REPO" || exit 2
echo "Megatron-LM: $MLM; work: $WORK"
for FMT in torch torch_dist; do
    D="$WORK/$FMT"
    rm -rf "$D" && mkdir -p "$D"
    step "${FMT}_save" "$FMT: Megatron-LM's save_checkpoint writes a TP2 x PP2 bf16 llama" \
        "$PY" -m torch.distributed.run --nproc-per-node 4 --master-port "${MASTER_PORT:-29533}" \
        tests/dist/megatron_lm_save.py "$MLM" "$D/mlm" "$FMT" || continue
    step "${FMT}_to_hf" "$FMT: Megatron-LM's checkpoint -> HF with megatron_patch" \
        "$PY" -m megatron_patch.convert --megatron-to-hf --load "$D/mlm" --save "$D/hf" \
        --model-family llama --no-progress || continue
    grep "^converted" "$WORK/${FMT}_to_hf.log" | sed 's/^/    /'
    "$PY" tests/gpu/megatron_lm_interop.py compare --hf "$D/hf" --megatron "$D/mlm" \
        2>"$WORK/${FMT}_compare.log" | sed "s/^\(PASS\|FAIL\) /\1 $FMT: /"
    [ "${PIPESTATUS[0]}" = 0 ] || FAILS=$((FAILS + 1))
done
if [ "$FAILS" = 0 ]; then
    echo "PASS megatron_lm_save_cpu: every step passed (logs in $WORK)"
else
    echo "FAIL megatron_lm_save_cpu: $FAILS step(s) failed (logs in $WORK)"
fi
[ "$FAILS" = 0 ]
