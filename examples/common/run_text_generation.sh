#!/usr/bin/env bash
# Shared body of examples/<family>/run_text_generation_<family>.sh: the seed's 17 positional
# arguments are checked and translated into `python -m megatron_patch.generate` flags by
# megatron_patch.generation.launcher_check; this script only puts the code on PYTHONPATH, builds
# the torchrun rendezvous (distributed.sh) and execs torchrun, as launch_training (run_pretrain.sh)
# does. Usage: run_text_generation.sh FAMILY ARGS...
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
  INPUT_FILE           one prompt per line, or .jsonl with a 'query' field (and 'input' for
                       PROMPT_FORMAT=alpaca, or 'messages' instead for PROMPT_FORMAT=chat)
  OUTPUT_FILE          JSON lines: prompt, prompt_format, completion, completion_ids,
                       finish_reason
  TEMPERATURE (> 0), REPETITION_PENALTY (> 0; 1 = off)
  environment: PYTHON (default python3), BF16=1 for bf16 weights,
               INFERENCE_BACKEND (auto|mcore|static|graph|graph-compiled|uncached),
               PROMPT_FORMAT (raw|alpaca|chat: wrap prompts as SFT formatted them; unset: the
               checkpoint's recorded format, an SFT checkpoint's, else raw)"

[[ $# -eq 17 ]] || usage_error "expected 17 arguments, got $#"
[[ -d $3/megatron_patch ]] || usage_error "MEGATRON_PATCH_PATH '$3' has no megatron_patch/ package"
put_megatron_first "$2"
export PYTHONPATH="$3${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
# Answer: processes a CPU-only machine needs (TP), then the generator's flags.
plan=$("$py" -m megatron_patch.generation.launcher_check "$FAMILY" "$@") || usage_error "$plan"
mapfile -t flags <<<"$plan"
torchrun_args "$1" "${flags[0]}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "$py" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m megatron_patch.generate "${flags[@]:1}"
