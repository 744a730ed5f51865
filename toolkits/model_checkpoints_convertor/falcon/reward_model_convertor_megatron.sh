#!/usr/bin/env bash
# HF <-> Megatron conversion of a falcon reward model (HF *ForSequenceClassification, one label), with
# the seed's arguments:
#   MEGATRON_PATH SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP MG2HF(true|false) [EXTRA_VOCAB_SIZE]
# environment: CKPT_FORMAT=torch|torch_dist, OVERWRITE=1 to replace a non-empty TARGET_CKPT_PATH
MODEL_TYPE=reward SCRIPT_NAME=$(basename "$0") \
  exec bash "$(dirname "${BASH_SOURCE[0]}")/../convert_checkpoint.sh" falcon "$@"
