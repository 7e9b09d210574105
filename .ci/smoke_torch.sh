#!/usr/bin/env bash
# Installs a built qengine wheel next to another torch release in a fresh virtual environment
# with no compiler on PATH, and runs .ci/smoke.py (quantize, matmul and QuantLinear forward and
# backward on the CPU). Usage: .ci/smoke_torch.sh WHEEL [WORKDIR]
# QENGINE_SMOKE_TORCH picks the torch (default torch==2.14.1, a CUDA build: ~5.5 GB installed).
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh

WHEEL=$(realpath "${1:?usage: smoke_torch.sh WHEEL [WORKDIR]}")
WORK=$(realpath -m "${2:-.ci-work}")
TORCH=${QENGINE_SMOKE_TORCH:-torch==2.14.1}
VENV="$WORK/smoke-venv"
start=$(date +%s)
fresh_venv "$VENV"
export PATH="$VENV/bin:$(no_compiler_path "$WORK/nocc-bin")"
assert_no_compiler
python -m pip install --quiet --only-binary=:all: "$TORCH"
python -m pip install --quiet --only-binary=:all: "$WHEEL"
echo "installed $TORCH and $(basename "$WHEEL") in $(( $(date +%s) - start )) s"
qengine info
python .ci/smoke.py
deactivate
rm -rf "$VENV"   # several GB of CUDA libraries
echo "smoke test under $TORCH: $(( $(date +%s) - start )) s in all"
