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
PY="$WORK/venv/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/_caller_site.pth"
"$PY" -m zipfile -e "$WORK"/wheel/torch_qengine-*.whl "$SITE"

LIBASAN="$(g++ -print-file-name=libasan.so)"
[ -f "$LIBASAN" ] || { echo "sanitize: libasan.so not found ($LIBASAN)"; exit 1; }
# libstdc++ too: python is a C program, and without it preloaded ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts at the first C++ exception (e.g. a
# ValueError raised through torch's dispatcher).
export LD_PRELOAD="$LIBASAN $(g++ -print-file-name=libstdc++.so)"
# Leaks of the interpreter and of torch are not ours; everything else aborts with a report.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:handle_abort=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export QENGINE_NUM_THREADS="${QENGINE_NUM_THREADS:-2}"

"$PY" - "$SITE" <<'PYEOF'
import sys, qengine
so = qengine._C.__file__
assert so.startswith(sys.argv[1]), f"not the instrumented build: {so}"
print("sanitize: using", so, qengine.build_info())
PYEOF

# The sanitizer must be live: a native read past a buffer (the Python checks bypassed) has to
# abort with a report, or a clean run below would prove nothing.
if "$PY" - 2> "$WORK/canary.txt" <<'PYEOF'
import torch, qengine
from qengine import _C
from qengine.ops.weight import native_weight
packed, out, scales = torch.zeros(8, dtype=torch.uint8), torch.empty(4096), torch.ones(64)
table = qengine.get_format("nf4").kernel_tables()[0]
weight = list(native_weight(packed, table, scales, None, None, 4, 64))
weight[1] = 2048  # the WeightRef claims the 2048 bytes of 4096 codes; the buffer holds 8
_C.dequantize_cpu(tuple(weight), 4096, out.data_ptr(), 0, False)
PYEOF
then
  echo "sanitize: an out-of-bounds read went unreported; the sanitizer is not active"; exit 1
fi
grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$WORK/canary.txt" || {
  cat "$WORK/canary.txt"; echo "sanitize: the canary failed without an ASan report"; exit 1; }
echo "sanitize: the canary's overflow was reported, as it must be"

ISAS="$("$PY" -c 'import qengine; print(" ".join(qengine.build_info()["supported_cpu_isas"]))')"
run_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -x "$@"
}
# Every native entry point once, at the best ISA. Deselected for time: compile/opcheck (no new
# native paths) and the large-matrix / long byte-equality sweeps (the same kernels as the edge
# tests below, at sizes ASan makes slow).
run_tests tests/test_functional.py tests/test_matmul.py tests/test_double_quant.py tests/test_bad_input.py \
  tests/test_tensor.py tests/test_corrupt.py tests/test_threads.py tests/property/test_prop_quantize.py \
  tests/property/test_prop_matmul.py tests/test_moe_ops.py tests/test_gemm.py tests/test_gemm_amx.py tests/test_sparse24.py \
  -k "not compile and not opcheck and not large_matrix and not isas_match_scalar and not tiny_scales and not many_nested"
# The fused optimizer step: both state codes' search tables (gather-free and gather) and
# minifloat forms against the reference, the form check on malformed forms, non-finite blocks
# and every ISA's bytes against the scalar span.
run_tests tests/test_optim_encoder.py tests/test_optim_8bit.py tests/test_optim.py tests/test_optim_minifloat.py \
  -k "encoder or codes or non_finite or nan_or_inf or isa_bytes or own_simd_step or minifloat"
# Sizes that end mid-vector and mid-block, and every matmul path, at each ISA chosen the way
# users choose it: the environment override read when the module loads.
for isa in $ISAS; do
  echo "sanitize: QENGINE_CPU_ISA=$isa"
  QENGINE_CPU_ISA="$isa" run_tests tests/test_edges.py
done
echo "sanitize: clean ($((SECONDS - start)) s in all)"
