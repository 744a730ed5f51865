#!/usr/bin/env bash
# bash run_train_reward_model_chatglm.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/run_train_reward_model.sh" chatglm "$@"
