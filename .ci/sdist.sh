#!/usr/bin/env bash
# Builds the sdist, installs it (compiling the native module, CUDA kernels included when nvcc
# is found) into a fresh virtual environment with torch 2.13.0, and runs .ci/smoke.py there.
# Not part of .ci/run (it compiles the module a second time). Usage: .ci/sdist.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh

WORK=$(realpath -m "${1:-.ci-work}")
start=$(date +%s)
fresh_venv "$WORK/sdist-build-venv"
python -m pip install --quiet build
rm -rf "$WORK/sdist"
python -m build --sdist --outdir "$WORK/sdist" .
SDIST=$(ls "$WORK"/sdist/torch_qengine-*.tar.gz)
echo "== $(basename "$SDIST"): $(du -k "$SDIST" | cut -f1) KiB, $(tar tzf "$SDIST" | wc -l) files"
deactivate
fresh_venv "$WORK/sdist-venv"
python -m pip install --quiet torch==2.13.0
# Build isolation fetches scikit-build-core and pybind11; CMake, Ninja and nvcc come from PATH.
python -m pip install --quiet "$SDIST"
qengine info
(cd "$WORK" && python -c "import qengine, sys; print('qengine from', qengine.__file__)")
python .ci/smoke.py
deactivate
echo "sdist built, installed and smoke-tested in $(( $(date +%s) - start )) s"
