#!/usr/bin/env bash
# Shared body of examples/<family>/run_train_reward_model_<family>.sh: the SFT launcher's 22
# arguments, preference pairs for data, checked and translated by
# megatron_patch.training.launcher_check and run by launch_training (run_pretrain.sh) as
# python -m megatron_patch.reward_model. Usage: run_train_reward_model.sh FAMILY ARGS...
set -euo pipefail
# shellcheck source=run_pretrain.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_pretrain.sh"
USAGE="usage: run_train_reward_model_${FAMILY}.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH \\
         MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP \\
         TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
$HELP_SETUP
  BATCH_SIZE                preference pairs per micro-batch per GPU (each is two sequences);
                            global batch = BATCH_SIZE x data-parallel size
  LR, MIN_LR                peak and final learning rate (cosine decay)
  SEQ_LEN                   maximum sequence length
  PAD_LEN                   both sides of a pair are cut / padded to this many tokens (<= SEQ_LEN)
  EXTRA_VOCAB_SIZE          extra embedding rows
$HELP_PARALLEL
  TRAIN_DATASET_PATH        JSON / JSONL pairs {prompt, chosen, rejected} or chat
                            {chosen: [messages], rejected: [messages]}
  VALID_DATASET_PATH        the same format (or none): loss, accuracy and margin
  PRETRAIN_CHECKPOINT_PATH  Megatron checkpoint with its tokenizer: an SFT model (its trunk; the
                            scalar head starts from the init) or a converted HF reward model
  EPOCH                     passes over TRAIN_DATASET_PATH
$HELP_OUTPUT"
launch_training reward_model "$FAMILY" 22 "${@:2}"
