#!/usr/bin/env bash
# Shared launcher helpers, sourced (not run) by examples/<family>/*.sh and examples/common/*.sh:
#
#   usage_error MESSAGE           print "$USAGE" (set by the launcher) and "error: MESSAGE", exit 2
#   put_megatron_first PATH       PATH/megatron/core exists: put PATH first on PYTHONPATH;
#                                 otherwise say that the installed megatron-core is used
#   torchrun_args ENV NPROC_MIN   fill the array TORCHRUN_ARGS for `python -m torch.distributed.run`:
#     dsw  this machine: one process per visible GPU (nvidia-smi -L, honouring
#          CUDA_VISIBLE_DEVICES), or NPROC_MIN processes on the CPU (gloo) when there is no GPU
#     dlc  PAI-DLC multi-node: --nnodes $WORLD_SIZE --node-rank $RANK --master-addr $MASTER_ADDR
#          --master-port $MASTER_PORT, ${GPUS_PER_NODE:-${KUBERNETES_CONTAINER_RESOURCE_GPU:-8}}
#          processes per node, a rendezvous timeout of ${RDZV_TIMEOUT:-600} seconds
#   check_dlc_env                 the dlc variables above, each checked (usage_error naming it);
#                                 torchrun_args calls it, launchers may call it before any work
#   visible_gpu_count             number of GPUs this process may use (0 without nvidia-smi)

usage_error() {
  [[ -n "${USAGE:-}" ]] && printf '%s\n' "$USAGE" >&2
  echo "error: $*" >&2
  exit 2
}

put_megatron_first() {
  if [[ -d "$1/megatron/core" ]]; then
    export MEGATRON_PATH="$1"
    export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "note: '$1' has no megatron/core; using the installed megatron-core" >&2
  fi
}

visible_gpu_count() {
  local listed=0 visible
  if command -v nvidia-smi >/dev/null 2>&1; then
    listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    # An empty CUDA_VISIBLE_DEVICES hides every GPU; otherwise count the listed ones.
    visible=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
    (( visible < listed )) && listed=$visible
  fi
  echo "$listed"
}

free_port() {
  "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# require_int NAME MIN MAX: $NAME is a decimal integer from MIN to MAX (leading zeros allowed).
require_int() {
  local name=$1 min=$2 max=$3 value=${!1}
  [[ $value =~ ^[0-9]{1,9}$ ]] && (( 10#$value >= min && 10#$value <= max )) \
    || usage_error "$name must be an integer from $min to $max, got '$value'"
}

check_dlc_env() {
  local name missing=() gpus_name=GPUS_PER_NODE
  for name in WORLD_SIZE RANK MASTER_ADDR MASTER_PORT; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  (( ${#missing[@]} == 0 )) || usage_error "ENV=dlc needs the PAI-DLC variables WORLD_SIZE" \
    "(number of nodes), RANK (this node's rank), MASTER_ADDR and MASTER_PORT (node 0's" \
    "address and a free port on it); not set: ${missing[*]}"
  require_int WORLD_SIZE 1 100000
  require_int RANK 0 100000
  (( 10#$RANK < 10#$WORLD_SIZE )) || usage_error "RANK ($RANK, this node's rank) must be below" \
    "WORLD_SIZE ($WORLD_SIZE, the number of nodes)"
  require_int MASTER_PORT 1 65535
  [[ -z "${RDZV_TIMEOUT:-}" ]] || require_int RDZV_TIMEOUT 1 86400
  # The processes per node: GPUS_PER_NODE, else DLC's KUBERNETES_CONTAINER_RESOURCE_GPU, else 8.
  [[ -n "${GPUS_PER_NODE:-}" ]] || gpus_name=KUBERNETES_CONTAINER_RESOURCE_GPU
  [[ -z "${!gpus_name:-}" ]] || require_int "$gpus_name" 1 1024
}

torchrun_args() {
  local env=$1 nproc_min=$2 gpus
  case "$env" in
    dsw)
      gpus=$(visible_gpu_count)
      (( gpus > 0 )) || gpus=$nproc_min
      TORCHRUN_ARGS=(--nproc-per-node "$gpus" --nnodes 1 --node-rank 0
                     --master-addr localhost --master-port "$(free_port)")
      ;;
    dlc)
      check_dlc_env
      gpus=${GPUS_PER_NODE:-${KUBERNETES_CONTAINER_RESOURCE_GPU:-8}}
      # The static rendezvous waits RDZV_TIMEOUT seconds (torchrun's default 600) for every
      # node, then fails: a node that never comes is an error, not a hang.
      TORCHRUN_ARGS=(--nnodes "$((10#$WORLD_SIZE))" --node-rank "$((10#$RANK))"
                     --master-addr "$MASTER_ADDR" --master-port "$((10#$MASTER_PORT))"
                     --nproc-per-node "$((10#$gpus))"
                     --rdzv-conf "timeout=${RDZV_TIMEOUT:-600}")
      ;;
    *) usage_error "ENV must be dsw (this machine) or dlc (PAI-DLC multi-node), got '$env'" ;;
  esac
}
