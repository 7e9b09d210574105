#!/usr/bin/env bash
# Shell helpers shared by the .ci scripts (sourced, not run).

# A fresh virtual environment at $1 with an up-to-date pip; activates it.
fresh_venv() {
  rm -rf "$1"
  python3 -m venv "$1"
  # shellcheck disable=SC1091
  . "$1/bin/activate"
  python -m pip install --quiet --upgrade pip
}

# Prints a PATH (one folder, $1, filled with links) holding every program of the usual
# folders except compilers and build tools, so that a step run under it proves it needs none.
# The assembler and linker stay: torch.compile's inductor, given a compiler through CXX,
# calls them by name.
no_compiler_path() {
  local dir=$1 d f name
  rm -rf "$dir"
  mkdir -p "$dir"
  for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
      name=${f##*/}
      case "$name" in
        cc|c++|c89|c99|cpp|gcc|g++|gcc-*|g++-*|cpp-*|*-gcc|*-gcc-*|*-g++|*-g++-*|*-cpp|*-cpp-*) continue ;;
        clang|clang++|clang-*|clang++-*|nvcc|gfortran*|*-gfortran*|tcc|icx|icpx|cmake|ninja|make|gmake) continue ;;
      esac
      [ -e "$dir/$name" ] || ln -s "$f" "$dir/$name"
    done
  done
  echo "$dir"
}

# Fails when any compiler or build tool can be found on the current PATH.
assert_no_compiler() {
  local tool found=0
  for tool in cc c++ gcc g++ cpp clang clang++ nvcc cmake ninja make; do
    if command -v "$tool" >/dev/null 2>&1; then
      echo "error: $tool is on PATH ($(command -v "$tool"))" >&2
      found=1
    fi
  done
  return "$found"
}
