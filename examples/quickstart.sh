#!/usr/bin/env bash
# The quickstart: installs what is missing, then runs megatron_patch's whole pipeline on an
# embedded corpus (no downloads): clean, shard, tokenizer, mmap dataset, a tiny llama converted
# to Megatron, pretrained with the seed launcher, converted back and sampled with transformers.
# Usage: bash examples/quickstart.sh [OUTPUT_DIR] [--fast] [--train-iters N]
#        (OUTPUT_DIR default ./quickstart_output; the stages are in examples/quickstart.py)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/toolkits/install_requirements.sh"
out=quickstart_output
if [[ $# -gt 0 && $1 != -* ]]; then out=$1; shift; fi
exec "${PYTHON:-python3}" "$root/examples/quickstart.py" --output-dir "$out" "$@"
