#!/usr/bin/env bash
# Checks a built qengine wheel: its manylinux tag (auditwheel show), that its native module
# needs only the C/C++ runtime (no libtorch, no CUDA runtime or libraries: readelf, ldd), that
# the driver's libcuda is reached through dlopen and not linked, that the CUDA device code
# covers the default architectures plus PTX (cuobjdump), and its size.
# Usage: .ci/check_wheel.sh WHEEL   (auditwheel and, for the device code, cuobjdump or the
# nvidia-cuda-cuobjdump package importable by `python`, on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=$(realpath "${1:?usage: check_wheel.sh WHEEL}")
MAX_GLIBC_MINOR=${QENGINE_MAX_GLIBC_MINOR:-35}   # manylinux_2_35: what this toolchain allows (README)
MAX_MB=50
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

echo "== $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"
size=$(stat -c %s "$WHEEL")
(( size <= MAX_MB * 1024 * 1024 )) || fail "wheel is $(( size / 1048576 )) MB, over $MAX_MB MB"

echo "== auditwheel show"
show=$(auditwheel show "$WHEEL" 2>&1) || fail "auditwheel show failed: $show"
echo "$show"
tag=$(basename "$WHEEL" .whl | awk -F- '{print $NF}')
[[ $tag =~ ^manylinux_2_([0-9]+)_x86_64$ ]] || fail "platform tag $tag is not a manylinux_2_x tag"
(( BASH_REMATCH[1] <= MAX_GLIBC_MINOR )) || fail "tag $tag needs glibc newer than 2.$MAX_GLIBC_MINOR"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m zipfile -e "$WHEEL" "$tmp"
mapfile -t libs < <(find "$tmp" -name '*.so*' -type f | sort)
[ "${#libs[@]}" -eq 1 ] || fail "expected one shared object (qengine/_C), found: ${libs[*]#"$tmp"/}"
[ ! -d "$tmp/qengine.libs" ] || fail "auditwheel grafted libraries: $(ls "$tmp/qengine.libs")"
so=${libs[0]}

echo "== DT_NEEDED of ${so#"$tmp"/}"
# Outputs are captured before grep -q: under pipefail an early grep exit fails the pipe.
dynamic=$(readelf -d "$so")
needed=$(sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' <<<"$dynamic")
echo "$needed"
# The C/C++ runtime only (libpthread/libdl/librt are separate on glibc < 2.34).
allowed=" libc.so.6 libm.so.6 libstdc++.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1 ld-linux-x86-64.so.2 "
for lib in $needed; do
  case "$lib" in
    libtorch*|libc10*|libcudart*|libcublas*|libcuda.so*|libnv*|libcu*) fail "the native module links $lib" ;;
  esac
  [[ $allowed == *" $lib "* ]] || fail "unexpected dependency $lib (allowed:$allowed)"
done
if grep -qE '\((RPATH|RUNPATH)\)' <<<"$dynamic"; then fail "RPATH/RUNPATH set: $(grep -E 'RPATH|RUNPATH' <<<"$dynamic")"; fi

echo "== ldd"
ldd_out=$(ldd "$so")
echo "$ldd_out"
if grep -q "not found" <<<"$ldd_out"; then fail "unresolved libraries"; fi
if grep -qiE 'libtorch|libc10|libcuda|libcublas' <<<"$ldd_out"; then fail "ldd shows a torch or CUDA library"; fi

# CUDA: the static runtime opens the driver with dlopen("libcuda.so.1") on the first CUDA call.
if grep -aq 'libcuda\.so\.1' "$so"; then
  echo "== CUDA kernels present: libcuda.so.1 is named in the module, not linked"
  syms=$(readelf --dyn-syms -W "$so")
  grep -qE ' UND +dlopen(@|$)' <<<"$syms" || fail "CUDA runtime present but dlopen is not imported"
  echo "dlopen imported: yes; libcuda in DT_NEEDED: no"
  cuobjdump=$(command -v cuobjdump || python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "cuobjdump"))' 2>/dev/null || true)
  if [ -n "$cuobjdump" ] && [ -x "$cuobjdump" ]; then
    archs=${QENGINE_CUDA_ARCHITECTURES:-$(python - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print(tomllib.load(f)["tool"]["scikit-build"]["cmake"]["define"]["QENGINE_CUDA_ARCHITECTURES"]["default"])
PY
)}
    elf=$("$cuobjdump" --list-elf "$so")
    ptx=$("$cuobjdump" --list-ptx "$so")
    echo "cuobjdump --list-elf:"; echo "$elf"
    echo "cuobjdump --list-ptx:"; echo "$ptx"
    IFS=';' read -ra arch_list <<<"$archs"
    for a in "${arch_list[@]}"; do
      grep -q "\.sm_${a}\.cubin" <<<"$elf" || fail "no sm_$a device code"
    done
    grep -q "\.sm_${arch_list[-1]}\.ptx" <<<"$ptx" || fail "no PTX for sm_${arch_list[-1]}"
    echo "device code: sm_${archs//;/, sm_} + PTX sm_${arch_list[-1]}"
  else
    echo "cuobjdump not found (pip install nvidia-cuda-cuobjdump): device code not listed"
  fi
elif command -v nvcc >/dev/null 2>&1 && [ "${QENGINE_CUDA:-AUTO}" != "OFF" ]; then
  fail "nvcc is on PATH but the wheel has no CUDA kernels"
else
  echo "== CPU-only wheel (built without nvcc)"
fi
echo "check_wheel: OK"
