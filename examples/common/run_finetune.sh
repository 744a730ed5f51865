#!/usr/bin/env bash
# Shared body of examples/<family>/run_finetune_megatron_<family>.sh: the seed's 22 SFT arguments,
# checked and translated by megatron_patch.training.launcher_check and run by launch_training
# (run_pretrain.sh). Usage: run_finetune.sh FAMILY ARGS...
set -euo pipefail
# shellcheck source=run_pretrain.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_pretrain.sh"
USAGE="usage: run_finetune_megatron_${FAMILY}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE \\
         BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP \\
         TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
$HELP_SETUP
  BATCH_SIZE                micro-batch per GPU; global batch = BATCH_SIZE x data-parallel size
  LR, MIN_LR                peak and final learning rate (cosine decay)
  SEQ_LEN                   maximum sequence length
  PAD_LEN                   samples are truncated / padded to this many tokens (<= SEQ_LEN)
  EXTRA_VOCAB_SIZE          extra embedding rows
$HELP_PARALLEL
  TRAIN_DATASET_PATH        instruction JSON / chat JSONL, or an sft_preprocess prefix
  VALID_DATASET_PATH        the same formats (or none)
  PRETRAIN_CHECKPOINT_PATH  Megatron checkpoint (converted or trained) with its tokenizer
  EPOCH                     passes over TRAIN_DATASET_PATH
$HELP_OUTPUT"
launch_training finetune "$FAMILY" 22 "${@:2}"
