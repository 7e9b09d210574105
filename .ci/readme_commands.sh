#!/usr/bin/env bash
# Runs the README's two setup commands exactly as written there (read from its marked
# two-commands block, never copied here) in a fresh clone and a fresh virtual environment with
# the pip that `python3 -m venv` ships, as a new user would, and checks that each command
# built the native module once. Usage: .ci/readme_commands.sh WORKDIR
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=$(realpath -m "${1:?usage: readme_commands.sh WORKDIR}")
CLONE="$WORK/readme-clone"
VENV="$WORK/readme-venv"

mapfile -t COMMANDS < <(awk '/<!-- two-commands:begin -->/{on=1; next} /<!-- two-commands:end -->/{on=0}
                             on && !/^```/ && NF' README.md)
if [ "${#COMMANDS[@]}" -ne 2 ]; then
  echo "error: README.md's two-commands block holds ${#COMMANDS[@]} commands, expected 2" >&2
  exit 1
fi

rm -rf "$CLONE" "$VENV"
git clone -q . "$CLONE"
python3 -m venv "$VENV"

n=0
for cmd in "${COMMANDS[@]}"; do
  n=$((n + 1))
  log="$WORK/readme-command-$n.log"
  echo "--- README command $n: $cmd"
  start=$(date +%s)
  # A user's shell: the venv activated, in the clone, nothing of CI's environment carried over.
  if ! (cd "$CLONE" && env -u QENGINE_EXPECT_INSTALLED -u VIRTUAL_ENV \
          PATH="$VENV/bin:$PATH" bash -euo pipefail -c "$cmd") >"$log" 2>&1; then
    tail -n 200 "$log"
    echo "error: README command $n failed (full output: $log)" >&2
    exit 1
  fi
  builds=$(grep -c "Created wheel for torch-qengine" "$log" || true)
  tail -n 15 "$log"
  echo "--- README command $n passed in $(( $(date +%s) - start )) s; native module builds: $builds"
  if [ "$builds" -ne 1 ]; then
    echo "error: README command $n built qengine's native module $builds times, expected once" >&2
    exit 1
  fi
done
