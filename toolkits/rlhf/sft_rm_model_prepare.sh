#!/usr/bin/env bash
# The seed's PPO model preparation: bash sft_rm_model_prepare.sh SOURCE_RM_PATH SOURCE_SFT_PATH
# TARGET_RM_PATH TARGET_SFT_PATH writes TARGET_RM_PATH/{rw_pred,rw_train} and
# TARGET_SFT_PATH/{sft_pred,sft_train} (HF or Megatron sources; megatron_patch/rlhf/prepare.py).
# environment: TP, PP (the *_train layout, default 1), OVERWRITE=1, PYTHON (default python3)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m megatron_patch.rlhf.prepare "$@"
