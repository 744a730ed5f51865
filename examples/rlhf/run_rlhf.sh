#!/usr/bin/env bash
# The seed's PPO launcher: bash run_rlhf.sh GPU_LIST [CONFIG]
# (python -m megatron_patch.rlhf under torchrun, one process per listed GPU).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=../common/distributed.sh
source "$root/examples/common/distributed.sh"
USAGE="usage: run_rlhf.sh GPU_LIST [CONFIG]
  GPU_LIST  the GPUs of this node, e.g. 0,1,2,3: one process each, every role on all of them
            (colocated); on a machine without GPUs, that many CPU processes (gloo)
  CONFIG    the run's rlhf.yaml (default: $here/configs/tiny/ppo.yaml; also
            configs/tiny/grpo.yaml, configs/llama-7b/rlhf.yaml)
environment:
  TP                          the tiny configs' tensor-parallel size (default 1)
  EPISODES, RLHF_SAVE         the tiny configs' episodes (16) and output directory
  TINY_RLHF_DIR               the tiny models (default /tmp/megatron_patch_tiny_rlhf; built by
                              make_tiny.py when missing)
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
                              multi-node: torchrun's static rendezvous (every node runs this
                              script with its NODE_RANK); NUM_DEVICE is set to the total
  PYTHON                      the interpreter (default python3)"
(( $# >= 1 && $# <= 2 )) || usage_error "expected 1 or 2 arguments, got $#"
gpu_list=$1
[[ $gpu_list =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "GPU_LIST must be GPU numbers separated" \
  "by commas (e.g. 0,1,2,3), got '$gpu_list'"
config=${2:-$here/configs/tiny/ppo.yaml}
[[ -f $config ]] || usage_error "CONFIG '$config': no such file"
nproc=$(tr ',' '\n' <<<"$gpu_list" | wc -l)
nnodes=${NNODES:-1}
require_int nnodes 1 100000
export NUM_DEVICE=$((nproc * 10#$nnodes))
if (( $(visible_gpu_count) > 0 )); then
  export CUDA_VISIBLE_DEVICES=$gpu_list
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
case "$(cd "$(dirname "$config")" && pwd)" in
  "$here/configs/tiny")
    export TINY_RLHF_DIR=${TINY_RLHF_DIR:-/tmp/megatron_patch_tiny_rlhf}
    if [[ ! -d $TINY_RLHF_DIR/sft || ! -d $TINY_RLHF_DIR/rm ]]; then
      echo "[run_rlhf] building the tiny models in $TINY_RLHF_DIR (examples/rlhf/make_tiny.py)"
      "$python" "$here/make_tiny.py" "$TINY_RLHF_DIR"
    fi
    ;;
esac
if (( 10#$nnodes > 1 )); then
  for name in NODE_RANK MASTER_ADDR MASTER_PORT; do
    [[ -n "${!name:-}" ]] || usage_error "NNODES=$nnodes needs NODE_RANK, MASTER_ADDR and" \
      "MASTER_PORT (node 0's address and a free port on it); $name is not set"
  done
  rendezvous=(--nnodes "$nnodes" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
              --master-port "$MASTER_PORT")
else
  rendezvous=(--nnodes 1 --node-rank 0 --master-addr localhost --master-port "$(free_port)")
fi
echo "[run_rlhf] $NUM_DEVICE processes ($nproc on this node, GPUs $gpu_list): $config"
exec "$python" -m torch.distributed.run --nproc-per-node "$nproc" "${rendezvous[@]}" \
  -m megatron_patch.rlhf --config "$config"
