#!/usr/bin/env bash
# Builds the native module once with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only)
# and runs the native-kernel tests under it, for every CPU ISA this machine supports
# (QENGINE_CPU_ISA); any sanitizer report fails the script.
#
# Run from an environment that has torch, numpy, pytest, hypothesis and safetensors (the CI
# venv). The instrumented build goes to build/asan and is installed into a throwaway venv that
# sees the current one's packages, so the caller's own qengine install is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

SANITIZE="${QENGINE_SANITIZE:-address,undefined}"
BUILD_DIR="${QENGINE_SANITIZE_BUILD_DIR:-build/asan}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/qengine-asan.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

# ---- build (CUDA off: the sanitizers instrument the host C++ only)
QENGINE_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  python -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/wheel" \
  -C build-dir="$BUILD_DIR" -C cmake.build-type=RelWithDebInfo \
  -C cmake.define.QENGINE_CUDA=OFF -C cmake.define.QENGINE_SANITIZE="$SANITIZE" .
echo "sanitize: build took $((SECONDS - start)) s"

# ---- throwaway venv: the instrumented qengine first, then the caller's packages (a path
# line in a .pth file: that directory's own .pth hooks, e.g. an editable qengine, stay off).
python -m venv --without-pip "$WORK/venv"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/_caller_site.pth"
"$WORK/venv/bin/python" -m zipfile -e "$WORK"/wheel/qengine-*.whl "$SITE"
PY="$WORK/venv/bin/python"

LIBASAN="$(g++ -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "sanitize: libasan.so not found ($LIBASAN)"; exit 1; }
export LD_PRELOAD="$LIBASAN"
# Leaks of the interpreter and of torch are not ours; everything else aborts with a report.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# Fewer kernel threads than cores keeps the instrumented run fast and still multithreaded.
export QENGINE_NUM_THREADS="${QENGINE_NUM_THREADS:-2}"

"$PY" - "$SITE" <<'EOF'
import sys, qengine
so = qengine._C.__file__
assert so.startswith(sys.argv[1]), f"not the instrumented build: {so}"
print("sanitize: using", so, qengine.build_info())
EOF
ISAS="$("$PY" -c 'import qengine; print(" ".join(qengine.build_info()["supported_cpu_isas"]))')"

# Every native entry point, once, at the best ISA (test_isa.py switches through all ISAs
# itself and compares each with the scalar kernels byte for byte).
run_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -x "$@"
}
run_tests tests/test_functional.py tests/test_matmul.py tests/test_double_quant.py tests/test_bad_input.py \
  tests/test_tensor.py tests/test_isa.py tests/test_edges.py tests/test_corrupt.py tests/test_threads.py \
  -k "not compile and not opcheck"
# Then the sizes that end mid-vector and mid-block, and the matmul paths, at each ISA chosen
# the way users choose it: the environment override read when the module loads.
for isa in $ISAS; do
  echo "sanitize: QENGINE_CPU_ISA=$isa"
  QENGINE_CPU_ISA="$isa" "$PY" -c 'import os, qengine; assert qengine.build_info()["cpu_isa"] == os.environ["QENGINE_CPU_ISA"]'
  QENGINE_CPU_ISA="$isa" run_tests tests/test_edges.py -k "env_isa"
done
echo "sanitize: clean ($((SECONDS - start)) s in all)"
