#!/bin/sh
# Build the zip of Kiln's Lambda functions: `sh infra/lambda/package.sh [OUT.zip]`.
#
# One package serves both handlers:
#   functions.api.lambda_handler.handler      the API (API Gateway or ALB events)
#   functions.janitor.lambda_handler.handler  the janitor (EventBridge schedule)
#
# Kiln and its dependencies (with the `lambda` extra) are installed as manylinux wheels for
# the python3.11 runtime, so the zip can be built on any machine with pip and network
# access to a package index (or a pip cache that holds the wheels).
#
# Environment: PYTHON (default .venv/bin/python or python3), LAMBDA_ARCH (x86_64 or
# aarch64; default x86_64: match the functions' architecture). Prints the zip's path.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/dist/kiln-lambda.zip}"
arch="${LAMBDA_ARCH:-x86_64}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
log() { echo "lambda package: $*" >&2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/kiln-lambda.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM

log "building Kiln's wheel"
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel" "$repo" >"$work/pip.log" 2>&1 || {
    # without build isolation the backend must be installed; retry with it
    "$python" -m pip wheel -q --no-deps -w "$work/wheel" "$repo" >"$work/pip.log" 2>&1 || {
        cat "$work/pip.log" >&2; exit 1; }
}
wheel="$(ls "$work"/wheel/kiln-*.whl)"

log "installing it with its dependencies for python3.11 manylinux $arch"
"$python" -m pip install -q --disable-pip-version-check --target "$work/package" \
    --platform "manylinux2014_$arch" --implementation cp --python-version 3.11 \
    --only-binary=:all: "$wheel[lambda]" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; exit 1; }

# what the runtime never uses
rm -rf "$work/package/bin"
find "$work/package" -name __pycache__ -type d -prune -exec rm -rf {} +

mkdir -p "$(dirname "$out")"
rm -f "$out"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
"$python" - "$work/package" "$out" <<'PY'
import os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            info = zipfile.ZipInfo.from_file(path, os.path.relpath(path, root))
            # fixed timestamps: the same inputs give the same zip (and no needless deploy)
            info.date_time = (1980, 1, 1, 0, 0, 0)
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                zf.writestr(info, f.read())
PY
log "wrote $out ($(du -h "$out" | cut -f1))"
echo "$out"
