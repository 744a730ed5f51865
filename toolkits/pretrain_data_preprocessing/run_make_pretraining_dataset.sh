#!/usr/bin/env bash
# JSON lines -> Megatron indexed dataset, with the seed's arguments:
#   MEGATRON_PATH MEGATRON_PATCH_PATH input_data_dir tokenizer output_data_dir [tokenizer_path]
# Translates them into `python -m megatron_patch.data.preprocess` flags; nothing else.
set -euo pipefail
usage() {
  cat >&2 <<USAGE
usage: run_make_pretraining_dataset.sh MEGATRON_PATH MEGATRON_PATCH_PATH input_data_dir tokenizer output_data_dir [tokenizer_path]
  MEGATRON_PATH        Megatron-LM checkout whose megatron/core is used (put first on PYTHONPATH);
                       any other value (e.g. none) uses the installed megatron-core
  MEGATRON_PATCH_PATH  this repository (put on PYTHONPATH)
  input_data_dir       JSON lines: a directory (searched for *.jsonl *.json *.zst *.gz), a file or a glob
  tokenizer            bloombpe | llamabpe | falconbpe | galacticabpe | chatglm | glm130b |
                       HuggingFaceTokenizer | SentencePieceTokenizer
  output_data_dir      gets wudao_\${tokenizer}_text_document.bin / .idx
  tokenizer_path       the tokenizer's files: HF tokenizer directory or SentencePiece .model;
                       default: the TOKENIZER_PATH environment variable (nothing is downloaded)
  environment: TOKENIZER_PATH, WORKERS (default: all CPUs), JSON_KEYS (default: text)
USAGE
  [[ -n "${1:-}" ]] && echo "error: $1" >&2
  exit 2
}
[[ $# -eq 5 || $# -eq 6 ]] || usage "expected 5 or 6 arguments, got $#"
MEGATRON_PATH=$1; MEGATRON_PATCH_PATH=$2; input_data_dir=$3; tokenizer=$4; output_data_dir=$5
tokenizer_path=${6:-${TOKENIZER_PATH:-}}
[[ -d "$MEGATRON_PATCH_PATH/megatron_patch" ]] || usage "MEGATRON_PATCH_PATH '$MEGATRON_PATCH_PATH' holds no megatron_patch package"
[[ -n $tokenizer_path ]] || usage "no tokenizer files: give tokenizer_path or set TOKENIZER_PATH"
[[ -e $tokenizer_path ]] || usage "tokenizer_path '$tokenizer_path' does not exist"

PYTHONPATH="$MEGATRON_PATCH_PATH${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d "$MEGATRON_PATH/megatron/core" ]]; then
  PYTHONPATH="$MEGATRON_PATH:$PYTHONPATH"
fi
export PYTHONPATH
# JSON_KEYS is a space-separated list, split on purpose.
# shellcheck disable=SC2086
exec "${PYTHON:-python3}" -m megatron_patch.data.preprocess \
  --input "$input_data_dir" \
  --output-prefix "${output_data_dir}/wudao_${tokenizer}" \
  --json-keys ${JSON_KEYS:-text} \
  --tokenizer-type "$tokenizer" \
  --tokenizer-model "$tokenizer_path" \
  --append-eod \
  --workers "${WORKERS:-$(nproc)}"
