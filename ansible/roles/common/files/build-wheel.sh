#!/usr/bin/env bash
# Build PINK's wheel on the control host from the checkout's files (tracked,
# or untracked but not ignored: a working tree is deployable before commit),
# copied to a clean directory so no stale build/ output leaks in. Prints the
# wheel's path.
#
# The copy has no .git, so PINK's version (git's, through setuptools-scm:
# pyproject.toml) is read here in the checkout and passed in. The wheel is
# reproducible: SOURCE_DATE_EPOCH (default 1980-01-01) fixes its timestamps
# and the date a modified tree's version carries, so the same sources give
# the same bytes, and a second deploy installs and restarts nothing.
# usage: build-wheel.sh SOURCE_DIR OUT_DIR PYTHON
set -euo pipefail
src=$1 out=$2 python=$3
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# setuptools-scm from PYTHON's environment (`.[deploy]` has it), else a
# private copy for this build (pip fetches it as it does the build's own).
scm_version() {
    if ! "$python" -c 'import setuptools_scm' 2>/dev/null; then
        "$python" -m pip install -q --target "$tmp/scm" 'setuptools-scm>=8' >&2
        export PYTHONPATH="$tmp/scm${PYTHONPATH:+:$PYTHONPATH}"
    fi
    (cd "$src" && "$python" -m setuptools_scm)
}

version=$(scm_version)
mkdir -p "$out" "$tmp/src"
(cd "$src" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' f; do [[ -e "$src/$f" ]] && printf '%s\0' "$f"; done |
    tar -C "$src" --null -T - -cf - | tar -C "$tmp/src" -xf -
SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PINK=$version \
    "$python" -m pip wheel -q --no-deps --wheel-dir "$tmp/dist" "$tmp/src" >&2
wheel=$(ls "$tmp"/dist/*.whl)
cp "$wheel" "$out/"
# Each commit's wheel has its own name (its version): keep the newest only.
find "$out" -maxdepth 1 -name 'pink-*.whl' ! -name "$(basename "$wheel")" -delete
echo "$out/$(basename "$wheel")"
