#!/usr/bin/env bash
# Shared body of toolkits/model_checkpoints_convertor/<family>/model_convertor_huggingface_megatron.sh:
# translates the seed's positional arguments into `python -m megatron_patch.convert` flags.
# reward_model_convertor_megatron.sh runs it with MODEL_TYPE=reward (the source must be a reward
# model: HF *ForSequenceClassification with one label, or a Megatron one with a scalar head).
set -euo pipefail
FAMILY=$1; shift
usage() {
  cat >&2 <<USAGE
usage: ${SCRIPT_NAME:-model_convertor_huggingface_megatron.sh} MEGATRON_PATH SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP MG2HF [EXTRA_VOCAB_SIZE]
  MEGATRON_PATH      Megatron-LM checkout whose megatron/core is used (put first on PYTHONPATH);
                     any other value (e.g. none) uses the installed megatron-core
  SOURCE_CKPT_PATH   HF directory (MG2HF=false) or Megatron checkpoint / its release dir (MG2HF=true)
  TARGET_CKPT_PATH   output directory (must not exist or be empty, unless OVERWRITE=1)
  TP, PP             target tensor / pipeline parallel sizes (positive integers; ignored for MG2HF=true)
  MG2HF              false: HF -> Megatron;  true: Megatron -> HF
  EXTRA_VOCAB_SIZE   extra embedding rows (default 0)
  environment: CKPT_FORMAT=torch|torch_dist (default torch)
               MODEL_TYPE=gpt|reward: what SOURCE_CKPT_PATH must hold (default: either)
               OVERWRITE=1 replaces a non-empty TARGET_CKPT_PATH (default 0: refuse it)
USAGE
  [[ -n "${1:-}" ]] && echo "error: $1" >&2
  exit 2
}
[[ $# -eq 6 || $# -eq 7 ]] || usage "expected 6 or 7 arguments, got $#"
MEGATRON_PATH=$1; SOURCE_CKPT_PATH=$2; TARGET_CKPT_PATH=$3; TP=$4; PP=$5; MG2HF=$6
EXTRA_VOCAB_SIZE=${7:-0}
[[ $TP =~ ^[1-9][0-9]*$ ]] || usage "TP must be a positive integer, got '$TP'"
[[ $PP =~ ^[1-9][0-9]*$ ]] || usage "PP must be a positive integer, got '$PP'"
[[ $MG2HF == true || $MG2HF == false ]] || usage "MG2HF must be true or false, got '$MG2HF'"
[[ $EXTRA_VOCAB_SIZE =~ ^[0-9]+$ ]] || usage "EXTRA_VOCAB_SIZE must be a non-negative integer, got '$EXTRA_VOCAB_SIZE'"
[[ -e $SOURCE_CKPT_PATH ]] || usage "SOURCE_CKPT_PATH '$SOURCE_CKPT_PATH' does not exist"
OVERWRITE=${OVERWRITE:-0}
[[ $OVERWRITE == 0 || $OVERWRITE == 1 ]] || usage "OVERWRITE must be 0 or 1, got '$OVERWRITE'"
# Checked here so that the message names what works with this script (the CLI's says --overwrite).
if [[ $OVERWRITE == 0 && -d $TARGET_CKPT_PATH && -n $(ls -A "$TARGET_CKPT_PATH") ]]; then
  usage "TARGET_CKPT_PATH '$TARGET_CKPT_PATH' exists and is not empty; remove it, or run with OVERWRITE=1 to replace it"
fi

if [[ -d "$MEGATRON_PATH/megatron/core" ]]; then
  export MEGATRON_PATH
  export PYTHONPATH="$MEGATRON_PATH${PYTHONPATH:+:$PYTHONPATH}"
fi
flags=(--model-family "$FAMILY" --load "$SOURCE_CKPT_PATH" --save "$TARGET_CKPT_PATH")
if [[ $OVERWRITE == 1 ]]; then
  flags+=(--overwrite)
fi
if [[ -n ${MODEL_TYPE:-} ]]; then
  [[ $MODEL_TYPE == gpt || $MODEL_TYPE == reward ]] || usage "MODEL_TYPE must be gpt or reward, got '$MODEL_TYPE'"
  flags+=(--model-type "$MODEL_TYPE")
fi
if [[ $MG2HF == true ]]; then
  flags+=(--megatron-to-hf)
else
  flags+=(--target-tensor-model-parallel-size "$TP" --target-pipeline-model-parallel-size "$PP"
          --extra-vocab-size "$EXTRA_VOCAB_SIZE" --ckpt-format "${CKPT_FORMAT:-torch}")
fi
exec "${PYTHON:-python3}" -m megatron_patch.convert "${flags[@]}"
