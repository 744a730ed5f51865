#!/usr/bin/env bash
# Install what megatron_patch needs into the current Python, only what is missing.
# torch is pinned to 2.13.0 when absent (an unpinned torch pulls a multi-GB CUDA build);
# a torch that is already installed (a user's CUDA build) is kept.
# Usage: bash toolkits/install_requirements.sh [extra ...]   e.g. "test"
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
extras=$(IFS=,; echo "$*")

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch is missing: installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi

check='
import importlib, os, sys
mods = ["megatron.core", "transformers", "safetensors", "tokenizers", "sentencepiece", "psutil",
        "zstandard", "tqdm", "google.protobuf", "megatron_patch"] + sys.argv[2:]
for m in mods:
    importlib.import_module(m)
import megatron_patch
here = os.path.realpath(os.path.dirname(os.path.dirname(megatron_patch.__file__)))
sys.exit(0 if here == os.path.realpath(sys.argv[1]) else 1)
'
extra_mods=()
[[ ",$extras," == *",test,"* ]] && extra_mods+=(pytest pytest_timeout xdist matplotlib triton)
if ! (cd /tmp && "$PY" -W ignore -c "$check" "$root" "${extra_mods[@]}") >/dev/null 2>&1; then
  target="$root"
  [[ -n "$extras" ]] && target="$root[$extras]"
  echo "[install] installing megatron_patch and its requirements: pip install -e '$target'"
  "$PY" -m pip install -q -e "$target"
fi

# The GLM tests' references, pinned and without their dependencies (SAT's pull deepspeed and
# more, icetk's an old protobuf and torchvision; the tests use only their model and text code):
# ../shared/notes/glm_references.md.
if [[ ",$extras," == *",test,"* ]]; then
  version_of() { (cd /tmp && "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true); }
  if [[ "$(version_of swissarmytransformer)" != "0.4.12" || "$(version_of icetk)" != "0.0.7" ]]; then
    echo "[install] installing the GLM references: pip install --no-deps swissarmytransformer==0.4.12 icetk==0.0.7 (+ requests, einops, filelock)"
    "$PY" -m pip install -q requests einops filelock
    "$PY" -m pip install -q --no-deps "swissarmytransformer==0.4.12" "icetk==0.0.7"
  fi
fi
