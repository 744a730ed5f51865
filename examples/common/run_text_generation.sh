#!/usr/bin/env bash
# Shared body of examples/<family>/run_text_generation_<family>.sh: validates the seed's 17
# positional arguments, translates them to `python -m megatron_patch.generate` flags and execs
# torchrun. Usage: run_text_generation.sh FAMILY ARGS...
set -euo pipefail
FAMILY=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=distributed.sh
source "$here/distributed.sh"
USAGE="usage: run_text_generation_${FAMILY}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH TOKENIZER \\
         CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN \\
         INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY
  ENV                  dsw (this machine: one process per GPU, TP processes on a CPU-only
                       machine) or dlc (PAI-DLC multi-node: WORLD_SIZE, RANK, MASTER_ADDR,
                       MASTER_PORT, GPUS_PER_NODE)
  MEGATRON_PATH        Megatron-LM checkout put first on PYTHONPATH (any other value, e.g. none:
                       the installed megatron-core)
  MEGATRON_PATCH_PATH  this repository (holds megatron_patch/)
  TOKENIZER            tokenizer name (llamabpe, ...: files from CHECKPOINT_PATH/tokenizer) or a
                       tokenizer directory
  CHECKPOINT_PATH      Megatron checkpoint (converted or trained)
  MODEL_SIZE           a ${FAMILY} size (7B, 13B, ...); only checked: the model shape comes
                       from the checkpoint's metadata
  TP                   tensor parallel size          BS  prompts per micro-batch
  SEQ_LEN              prompt + generated tokens
  TOP_K, TOP_P         top-k (1 = greedy) or top-p sampling: one of them must be 0
  INPUT_SEQ_LEN        longer prompts are truncated from the left to this many tokens
  OUTPUT_SEQ_LEN       new tokens per prompt (at most)
  INPUT_FILE           one prompt per line, or .jsonl with a 'query' field
  OUTPUT_FILE          JSON lines: prompt, completion, completion_ids, finish_reason
  TEMPERATURE (> 0), REPETITION_PENALTY (> 0; 1 = off)
  environment: PYTHON (default python3), BF16=1 for bf16 weights,
               INFERENCE_BACKEND (auto|mcore|static|graph|graph-compiled|uncached)"

[[ $# -eq 17 ]] || usage_error "expected 17 arguments, got $#"
ENV=$1; MEGATRON_PATH=$2; MEGATRON_PATCH_PATH=$3; TOKENIZER=$4; CHECKPOINT_PATH=$5
MODEL_SIZE=$6; TP=$7; BS=$8; SEQ_LEN=$9; TOP_K=${10}; INPUT_SEQ_LEN=${11}
OUTPUT_SEQ_LEN=${12}; INPUT_FILE=${13}; OUTPUT_FILE=${14}; TOP_P=${15}; TEMPERATURE=${16}
REPETITION_PENALTY=${17}
PY=${PYTHON:-python3}

positive='^[1-9][0-9]*$'
number='^([0-9]+\.?[0-9]*|\.[0-9]+)$'
for name in TP BS SEQ_LEN INPUT_SEQ_LEN OUTPUT_SEQ_LEN; do
  [[ ${!name} =~ $positive ]] || usage_error "$name must be a positive integer, got '${!name}'"
done
[[ $TOP_K =~ ^[0-9]+$ ]] || usage_error "TOP_K must be a non-negative integer, got '$TOP_K'"
for name in TOP_P TEMPERATURE REPETITION_PENALTY; do
  [[ ${!name} =~ $number ]] || usage_error "$name must be a non-negative number, got '${!name}'"
done
awk "BEGIN { exit !($TOP_P <= 1) }" || usage_error "TOP_P must be in [0, 1], got '$TOP_P'"
if (( TOP_K > 0 )) && awk "BEGIN { exit !($TOP_P > 0) }"; then
  usage_error "TOP_K=$TOP_K and TOP_P=$TOP_P: one of them must be 0 (top-k and top-p sampling cannot be combined)"
fi
for name in TEMPERATURE REPETITION_PENALTY; do
  awk "BEGIN { exit !(${!name} > 0) }" || usage_error "$name must be > 0, got '${!name}'"
done
(( OUTPUT_SEQ_LEN < SEQ_LEN )) || usage_error "OUTPUT_SEQ_LEN ($OUTPUT_SEQ_LEN) must be smaller than SEQ_LEN ($SEQ_LEN)"
[[ -d $MEGATRON_PATCH_PATH/megatron_patch ]] || usage_error "MEGATRON_PATCH_PATH '$MEGATRON_PATCH_PATH' has no megatron_patch/ package"
[[ -e $CHECKPOINT_PATH ]] || usage_error "CHECKPOINT_PATH '$CHECKPOINT_PATH' does not exist"
[[ -f $INPUT_FILE ]] || usage_error "INPUT_FILE '$INPUT_FILE' does not exist"
[[ -d $(dirname -- "$OUTPUT_FILE") ]] || usage_error "OUTPUT_FILE '$OUTPUT_FILE': its directory does not exist"
torchrun_args "$ENV" "$TP"

put_megatron_first "$MEGATRON_PATH"
export PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
# MODEL_SIZE and TOKENIZER are checked against the registry; the answer is the tokenizer flag
# and its value, one per line.
checked=$("$PY" -m megatron_patch.generation.launcher_check "$FAMILY" "$MODEL_SIZE" "$TOKENIZER") \
  || usage_error "$checked"
tokenizer_flag=("${checked%%$'\n'*}" "${checked#*$'\n'}")

flags=(--load "$CHECKPOINT_PATH" --input-file "$INPUT_FILE" --output-file "$OUTPUT_FILE"
       "${tokenizer_flag[@]}" --model-size "$MODEL_SIZE"
       --tensor-model-parallel-size "$TP" --micro-batch-size "$BS" --seq-length "$SEQ_LEN"
       --max-prompt-length "$INPUT_SEQ_LEN" --max-new-tokens "$OUTPUT_SEQ_LEN"
       --top-k "$TOP_K" --top-p "$TOP_P" --temperature "$TEMPERATURE"
       --repetition-penalty "$REPETITION_PENALTY"
       --inference-backend "${INFERENCE_BACKEND:-auto}")
[[ "${BF16:-0}" == 1 ]] && flags+=(--bf16)
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "$PY" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m megatron_patch.generate "${flags[@]}"
