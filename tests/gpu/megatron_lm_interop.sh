#!/usr/bin/env bash
# Megatron-LM as an independent check of the converter, on a machine with a GPU:
#   (a) a tiny random HF llama -> Megatron with megatron_patch's converter,
#   (b) 3 iterations of Megatron-LM's own pretrain_gpt.py on it (--transformer-impl local,
#       mock data, NullTokenizer), in --ckpt-format torch and torch_dist,
#   (c) Megatron-LM's saved checkpoint -> HF with megatron_patch's converter,
#   (d) transformers loads the result, its tensors equal those in Megatron-LM's checkpoint bit
#       for bit (read without the converter: tests/gpu/megatron_lm_interop.py), and training
#       changed them; Megatron-LM's strict load of (a) did not fall back to a non-strict one.
# One PASS or FAIL line per step; exit status 1 when any failed.
#
# usage: bash tests/gpu/megatron_lm_interop.sh MEGATRON_LM_DIR [WORK_DIR]
#   MEGATRON_LM_DIR  a Megatron-LM checkout at core_v0.16.1 (pretrain_gpt.py, megatron/)
#   WORK_DIR         where checkpoints and logs go (default: a new temporary directory)
# environment: TP, PP (default 1 and 1: TP x PP GPUs), PYTHON (default python3),
#   MASTER_PORT (default 29531). Needs torch with CUDA, transformers, megatron-core 0.16.x and
#   what Megatron-LM's training imports (pydantic; einops, six, sentencepiece, regex, ...).
set -u

usage() {
    echo "usage: bash tests/gpu/megatron_lm_interop.sh MEGATRON_LM_DIR [WORK_DIR]" >&2
    echo "  MEGATRON_LM_DIR: a Megatron-LM checkout at core_v0.16.1; TP, PP: parallel sizes" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
if [ ! -f "$1/pretrain_gpt.py" ] || [ ! -d "$1/megatron/training" ]; then
    echo "error: $1/pretrain_gpt.py or $1/megatron/training not found: MEGATRON_LM_DIR must be" \
         "a Megatron-LM checkout (core_v0.16.1)" >&2
    exit 2
fi
MLM=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${2:-$(mktemp -d -t megatron_lm_interop.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-python3}
TP=${TP:-1}
PP=${PP:-1}
VOCAB=300  # NullTokenizer --vocab-size 299: 300 tokens (end-of-document last), 384 rows at TP1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
FAILS=0

# shellcheck source=../interop/steps.sh
source "$REPO/tests/interop/steps.sh"

# Megatron-LM's pretrain_gpt.py, run from its checkout (its megatron/ comes first), on the
# tiny llama's shape: FORMAT LOAD SAVE.
pretrain() (
    cd "$MLM" && "$PY" -m torch.distributed.run --nproc-per-node $((TP * PP)) \
        --master-port "${MASTER_PORT:-29531}" pretrain_gpt.py \
        --use-mcore-models --transformer-impl local \
        --num-layers 2 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4 \
        --group-query-attention --num-query-groups 2 --kv-channels 16 \
        --seq-length 64 --max-position-embeddings 128 \
        --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear \
        --position-embedding-type rope --rotary-base 10000 \
        --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 \
        --no-persist-layer-norm --no-gradient-accumulation-fusion --no-masked-softmax-fusion \
        --no-bias-swiglu-fusion --no-rope-fusion \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
        --micro-batch-size 2 --global-batch-size 4 --train-iters 3 \
        --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --clip-grad 1.0 --seed 1234 \
        --mock-data --tokenizer-type NullTokenizer --vocab-size $((VOCAB - 1)) \
        --load "$2" --save "$3" --ckpt-format "$1" --save-interval 3 \
        --eval-interval 1000 --eval-iters 1 --log-interval 1
)

# Megatron-LM falls back to a non-strict load (and prints load_return) when names differ.
loaded_strictly() {
    ! grep -q "load_return" "$1" && grep -q "successfully saved checkpoint from iteration *3" "$1"
}

cd "$REPO" || exit 2
echo "Megatron-LM: $MLM; TP=$TP PP=$PP; work: $WORK"
step make_hf "a tiny HF llama (vocab $VOCAB)" \
    "$PY" tests/gpu/megatron_lm_interop.py make-hf "$WORK/hf" --vocab-size "$VOCAB" || exit 1
for FMT in torch torch_dist; do
    D="$WORK/$FMT"
    rm -rf "$D" && mkdir -p "$D"
    step "${FMT}_convert" "$FMT: HF -> Megatron with megatron_patch (TP=$TP PP=$PP)" \
        "$PY" -m megatron_patch.convert --load "$WORK/hf" --save "$D/converted" \
        --ckpt-format "$FMT" --target-tensor-model-parallel-size "$TP" \
        --target-pipeline-model-parallel-size "$PP" --no-progress || continue
    step "${FMT}_pretrain" "$FMT: Megatron-LM's pretrain_gpt.py loads it and trains 3 iterations" \
        pretrain "$FMT" "$D/converted" "$D/trained" || continue
    step "${FMT}_strict" "$FMT: Megatron-LM loaded it strictly and saved iteration 3" \
        loaded_strictly "$WORK/${FMT}_pretrain.log"
    step "${FMT}_back" "$FMT: Megatron-LM's checkpoint -> HF with megatron_patch" \
        "$PY" -m megatron_patch.convert --megatron-to-hf --load "$D/trained" \
        --save "$D/hf_back" --model-family llama --no-progress || continue
    grep "^converted" "$WORK/${FMT}_back.log" | sed 's/^/    /'
    "$PY" tests/gpu/megatron_lm_interop.py compare --hf "$D/hf_back" --megatron "$D/trained" \
        --original "$WORK/hf" 2>"$WORK/${FMT}_compare.log" | sed "s/^\(PASS\|FAIL\) /\1 $FMT: /"
    [ "${PIPESTATUS[0]}" = 0 ] || FAILS=$((FAILS + 1))
done
if [ "$FAILS" = 0 ]; then
    echo "PASS megatron_lm_interop: every step passed (logs in $WORK)"
else
    echo "FAIL megatron_lm_interop: $FAILS step(s) failed (logs in $WORK)"
fi
[ "$FAILS" = 0 ]
