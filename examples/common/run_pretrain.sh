#!/usr/bin/env bash
# Shared body of examples/<family>/run_pretrain_megatron_<family>.sh, and (through
# launch_training and the help lines) of run_finetune.sh. The seed's positional arguments are
# checked and translated into trainer flags by megatron_patch.training.launcher_check; this script
# only puts the code on PYTHONPATH, builds the torchrun rendezvous (distributed.sh) and tees the
# output to the log. Usage: run_pretrain.sh FAMILY ARGS...
set -euo pipefail
# shellcheck source=distributed.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/distributed.sh"
FAMILY=${1:-}

# Help lines for the arguments both launchers share.
HELP_SETUP="  ENV                       dsw (this machine: every visible GPU, or TP x PP CPU
                            processes) or dlc (PAI-DLC multi-node, the same command on every
                            node: WORLD_SIZE nodes, RANK this node's rank, MASTER_ADDR and
                            MASTER_PORT of node 0, GPUS_PER_NODE (default 8) processes each,
                            RDZV_TIMEOUT seconds to wait for every node (default 600))
  MEGATRON_PATH             Megatron-LM checkout put first on PYTHONPATH (any other value, e.g.
                            none: the installed megatron-core)
  MEGATRON_PATCH_PATH       this repository (holds megatron_patch/), put on PYTHONPATH
  MODEL_SIZE                a ${FAMILY} size (7B, 13B, ..., tiny); the shape of a checkpoint
                            comes from its metadata"
HELP_PARALLEL="  PR                        fp16, bf16 or fp32         TP, PP  tensor / pipeline size
  AC                        activation recomputation: full, sel (selective) or none
  DO, FL, SP                true|false: distributed optimizer (ZeRO-1), flash attention,
                            sequence parallelism"
HELP_OUTPUT="  OUTPUT_BASEPATH           gets checkpoint/NAME, tensorboard/NAME, log/NAME.log and
                            metrics/NAME.jsonl; a relaunch resumes from checkpoint/NAME; dlc:
                            shared by the nodes, node R > 0 logs to log/NAME.nodeR.log
  environment: PYTHON (default python3), EXTRA_TRAIN_ARGS (more trainer flags, appended)"

# launch_training pretrain|finetune FAMILY COUNT ARGS...   (USAGE set by the caller)
# ARGS start with ENV MEGATRON_PATH MEGATRON_PATCH_PATH in both launchers.
launch_training() {
  local kind=$1 family=$2 count=$3 plan py=${PYTHON:-python3} flags cmd log
  shift 3
  [[ $# -eq $count ]] || usage_error "expected $count arguments, got $#"
  [[ -d $3/megatron_patch ]] || usage_error "MEGATRON_PATCH_PATH '$3' has no megatron_patch/"
  [[ $1 != dlc ]] || check_dlc_env  # before any work, as the positional arguments are
  put_megatron_first "$2"
  export PYTHONPATH="$3${PYTHONPATH:+:$PYTHONPATH}"
  # Answer: processes a CPU-only machine needs (TP x PP), the log file, then the trainer's flags.
  plan=$("$py" -m megatron_patch.training.launcher_check "$kind" "$family" "$@") \
    || usage_error "$plan"
  mapfile -t flags <<<"$plan"
  torchrun_args "$1" "${flags[0]}"
  cmd=("$py" -m torch.distributed.run "${TORCHRUN_ARGS[@]}" -m "megatron_patch.$kind"
       "${flags[@]:2}")
  log=${flags[1]}
  # The nodes of a dlc run share OUTPUT_BASEPATH (NFS): each tees its own log, node 0 NAME.log,
  # node R NAME.nodeR.log (concurrent appends to one file over NFS interleave or overwrite).
  if [[ $1 == dlc ]] && (( 10#$RANK > 0 )); then
    log=${log%.log}.node$((10#$RANK)).log
  fi
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  printf '[launcher] %s\n' "${cmd[*]}" | tee -a "$log"
  "${cmd[@]}" 2>&1 | tee -a "$log"  # pipefail: the script exits with torchrun's status
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  USAGE="usage: run_pretrain_megatron_${FAMILY}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH \\
         MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN EXTRA_VOCAB_SIZE PR TP PP \\
         AC DO FL SP SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS \\
         WARMUP_TOKENS OUTPUT_BASEPATH
$HELP_SETUP
  BATCH_SIZE                micro-batch per GPU        GLOBAL_BATCH_SIZE  samples per iteration
  LR, MIN_LR                peak and final learning rate (cosine decay)
  SEQ_LEN                   sequence length            EXTRA_VOCAB_SIZE   extra embedding rows
$HELP_PARALLEL
  SAVE_INTERVAL             iterations between checkpoints
  DATASET_PATH              mmap prefix (or 'W1 P1 W2 P2 ...') from megatron_patch.data.preprocess
  PRETRAIN_CHECKPOINT_PATH  Megatron checkpoint to start from, or none for random weights
  TRAIN_TOKENS              tokens to train on (iterations = tokens / (global batch x SEQ_LEN))
  WARMUP_TOKENS             learning-rate warm-up tokens
$HELP_OUTPUT"
  launch_training pretrain "$FAMILY" 23 "${@:2}"
fi
