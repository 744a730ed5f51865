#!/usr/bin/env bash
# bash run_text_generation_glm130b.sh ENV MEGATRON_PATH MEGATRON_PATCH_PATH TOKENIZER CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY
# environment: PROMPT_FORMAT=raw|alpaca|chat (default: the checkpoint's recorded format), BF16=1, INFERENCE_BACKEND
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/run_text_generation.sh" glm130b "$@"
