#!/usr/bin/env bash
# Build PINK's wheel on the control host from the checkout's files (tracked,
# or untracked but not ignored: a working tree is deployable before commit),
# copied to a clean directory so no stale build/ output leaks in. Prints the
# wheel's path. SOURCE_DATE_EPOCH makes the wheel reproducible.
# usage: build-wheel.sh SOURCE_DIR OUT_DIR PYTHON
set -euo pipefail
src=$1 out=$2 python=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
(cd "$src" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' f; do [[ -e "$src/$f" ]] && printf '%s\0' "$f"; done |
    tar -C "$src" --null -T - -cf - | tar -C "$tmp" -xf -
"$python" -m pip wheel -q --no-deps --wheel-dir "$tmp/dist" "$tmp" >&2
wheel=$(ls "$tmp"/dist/*.whl)
cp "$wheel" "$out/"
echo "$out/$(basename "$wheel")"
