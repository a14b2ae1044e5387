#!/bin/sh
# Build OpenTofu, the command-compatible fork of terraform, from its Go module:
#   sh tests/install_tofu.sh VERSION DEST
# `go install …/cmd/tofu@vX` refuses a module whose go.mod has replace directives (OpenTofu
# replaces hcl with its fork), so the module is built as the main module of a copy. Uses the
# go command on PATH (or $GO) with the caller's GOMODCACHE/GOCACHE; `make tools` and
# tests/unit/test_infra.py put DEST in the shared test cache.
set -eu
version=$1
dest=$2
go=${GO:-go}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0

src=$("$go" mod download -json "github.com/opentofu/opentofu@v$version" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || { echo "install_tofu: no source for opentofu v$version" >&2; exit 1; }
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -R "$src/." "$work"
chmod -R u+w "$work"
mkdir -p "$(dirname "$dest")"
(cd "$work" && "$go" build -trimpath -o "$dest.tmp" \
    -ldflags "-s -w -X github.com/opentofu/opentofu/version.dev=no" ./cmd/tofu)
mv "$dest.tmp" "$dest"
"$dest" version
