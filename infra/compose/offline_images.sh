#!/bin/sh
# Build every image infra/compose runs, on this machine and without a registry, and print the
# compose variables that name them:
#
#   sh infra/compose/offline_images.sh >> infra/compose/.env
#
#   kiln-postgres:<major>  infra/compose/postgres.Dockerfile FROM kiln-postgres-base:<major>,
#                          a busybox rootfs with Debian's PostgreSQL (installed here:
#                          apt-get install postgresql), its share files, the time zone data
#                          and every library its binaries load (ldd)
#   kiln-s3:latest         infra/compose/s3.Dockerfile FROM kiln-python-base:3.11: moto's S3
#                          server behind MinIO's command line (minio server, mc), for both the
#                          minio and minio-setup services; wheels of moto[server] from pip's
#                          cache or the package index
#   kiln-sandbox:latest    worker_image/build_images.sh
#   kiln-worker:latest     worker_image/service_images.sh (which makes kiln-python-base:3.11)
#   kiln-api:latest
#
# Idempotent: the PostgreSQL base and the S3 image carry a label with a hash of their inputs
# and are rebuilt only when it changes; the other builds are cached by the engine.
#
# Options: --no-kiln (only PostgreSQL and S3; kiln-sandbox, kiln-worker and kiln-api are
# built elsewhere). Environment: PYTHON (a CPython 3.11 with pip; default .venv/bin/python),
# PG_MAJOR (default: the newest /usr/lib/postgresql/<major>), POSTGRES_IMAGE (default
# kiln-postgres:<major>), S3_IMAGE (default kiln-s3:latest), MOTO_VERSION (default: the moto
# PYTHON has installed), BUSYBOX, DOCKER_BUILDKIT (default 0), and those of the scripts above.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$(dirname "$here")")"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

kiln=1
for arg in "$@"; do
    case "$arg" in
        --no-kiln) kiln=0 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "offline_images.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { echo "offline_images: $*" >&2; }
stamp_of() { sha256sum | cut -c1-16; }
label_of() { docker image inspect --format "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
    log "no Docker Engine answers (is dockerd running, and may this user use it?)"
    exit 1
}
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export PYTHON="$python"
busybox="${BUSYBOX:-$(command -v busybox || true)}"

# -- PostgreSQL ---------------------------------------------------------------------------

major="${PG_MAJOR:-$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1)}"
pg="/usr/lib/postgresql/$major"
[ -n "$major" ] && [ -x "$pg/bin/postgres" ] && [ -x "$pg/bin/pg_isready" ] || {
    log "no Debian PostgreSQL here (/usr/lib/postgresql/<major>/bin/postgres): apt-get install postgresql"
    exit 1
}
share="/usr/share/postgresql/$major"
[ -f "$share/postgres.bki" ] || { log "$share/postgres.bki is missing"; exit 1; }
[ -n "$busybox" ] || { log "busybox not found: install busybox-static (or set BUSYBOX)"; exit 1; }
postgres_image="${POSTGRES_IMAGE:-kiln-postgres:$major}"
postgres_base="kiln-postgres-base:$major"

pg_version="$(dpkg-query -W -f='${Version}' "postgresql-$major" 2>/dev/null || "$pg/bin/postgres" --version)"
base_stamp="$( { echo "$pg_version"; "$busybox" 2>&1 | head -n 1; cat "$0"; } | stamp_of)"

# the PostgreSQL binaries and modules, without the JIT (it alone would add LLVM, ~100 MB;
# without it postgres runs with jit unavailable)
pg_objects() {
    find "$pg/bin" "$pg/lib" -type f ! -name 'llvmjit*' ! -path '*/bitcode/*'
}

if [ "$(label_of "$postgres_base" dev.kiln.postgres.stamp)" = "$base_stamp" ]; then
    log "$postgres_base is up to date"
else
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/kiln-postgres-base.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT INT TERM
    log "assembling $postgres_base (PostgreSQL $pg_version) in $rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" "$rootfs/dev" \
        "$rootfs/proc" "$rootfs/sys" "$rootfs/var/lib/postgresql" "$rootfs/var/run/postgresql" \
        "$rootfs/usr/lib/postgresql" "$rootfs/usr/share/postgresql" "$rootfs/usr/share" \
        "$rootfs/usr/lib/locale"
    chmod 1777 "$rootfs/tmp"
    chmod 0700 "$rootfs/root"
    cp "$busybox" "$rootfs/bin/busybox"
    chmod 0755 "$rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    tar -C /usr/lib/postgresql --exclude='llvmjit*' --exclude=bitcode -cf - "$major" \
        | tar -C "$rootfs/usr/lib/postgresql" -xf -
    tar -C /usr/share/postgresql -cf - "$major" | tar -C "$rootfs/usr/share/postgresql" -xf -
    # Debian builds PostgreSQL with the system's time zone data
    [ -d /usr/share/zoneinfo ] && cp -a /usr/share/zoneinfo "$rootfs/usr/share/zoneinfo"
    [ -d /usr/lib/locale/C.utf8 ] && cp -a /usr/lib/locale/C.utf8 "$rootfs/usr/lib/locale/"
    for library in $(pg_objects | while read -r object; do
            ldd "$object" 2>/dev/null \
                | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }'
        done | sort -u); do
        mkdir -p "$rootfs$(dirname "$library")"
        cp -L "$library" "$rootfs$library"
    done
    # a module whose library is not installed here would fail only when loaded: refuse now
    missing="$(pg_objects | while read -r object; do ldd "$object" 2>&1; done | grep 'not found' | sort -u || true)"
    [ -z "$missing" ] || { log "libraries of PostgreSQL not found here:"; echo "$missing" >&2; exit 1; }
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' > "$rootfs/etc/passwd"
    printf '%s\n' 'root:x:0:' 'postgres:x:999:' 'nogroup:x:65534:' > "$rootfs/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' > "$rootfs/etc/nsswitch.conf"
    printf '%s\n' /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib/aarch64-linux-gnu \
        /usr/lib/aarch64-linux-gnu > "$rootfs/etc/ld.so.conf"
    ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
    "$ldconfig" -r "$rootfs"
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . | docker import \
        --change "ENV PATH=$pg/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "LABEL dev.kiln.postgres.stamp=$base_stamp dev.kiln.postgres.version=\"$pg_version\"" \
        --change 'CMD ["/bin/sh"]' \
        --message "Kiln offline PostgreSQL base: busybox + Debian's PostgreSQL $pg_version" \
        - "$postgres_base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT INT TERM
    log "imported $postgres_base"
fi

log "building $postgres_image FROM $postgres_base"
docker build -q --build-arg "POSTGRES_BASE=$postgres_base" --build-arg "PG_MAJOR=$major" \
    -f "$here/postgres.Dockerfile" -t "$postgres_image" "$here" >/dev/null

# -- S3 -----------------------------------------------------------------------------------

s3_image="${S3_IMAGE:-kiln-s3:latest}"
python_image="${PYTHON_IMAGE:-}"
[ -n "$python_image" ] || python_image="$(sh "$repo/worker_image/python_base.sh")"
moto_version="${MOTO_VERSION:-$("$python" -c 'from importlib.metadata import version; print(version("moto"))' 2>/dev/null || true)}"
[ -n "$moto_version" ] || {
    log "which moto? $python has none: set MOTO_VERSION (or pip install 'moto[server]')"
    exit 1
}
s3_stamp="$( { echo "$moto_version"; docker image inspect --format '{{.Id}}' "$python_image";
    cat "$here/s3.Dockerfile" "$here/s3_standin.py"; } | stamp_of)"

if [ "$(label_of "$s3_image" dev.kiln.s3.stamp)" = "$s3_stamp" ]; then
    log "$s3_image is up to date"
else
    context="$(mktemp -d "${TMPDIR:-/tmp}/kiln-s3.XXXXXX")"
    trap 'rm -rf "$context"' EXIT INT TERM
    log "collecting wheels of moto[server]==$moto_version"
    "$python" -m pip wheel -q --disable-pip-version-check -w "$context/wheels" \
        "moto[server]==$moto_version" >"$context/pip.log" 2>&1 || {
        cat "$context/pip.log" >&2
        log "cannot collect the wheels (is a package index reachable, or are they in pip's cache?)"
        exit 1
    }
    rm "$context/pip.log"
    cp "$here/s3.Dockerfile" "$here/s3_standin.py" "$context/"
    log "building $s3_image FROM $python_image"
    docker build -q --build-arg "PYTHON_IMAGE=$python_image" \
        --build-arg "MOTO_VERSION=$moto_version" --label "dev.kiln.s3.stamp=$s3_stamp" \
        -f "$context/s3.Dockerfile" -t "$s3_image" "$context" >/dev/null
    rm -rf "$context"
    trap - EXIT INT TERM
fi

# -- Kiln ---------------------------------------------------------------------------------

sandbox_image="${SANDBOX_IMAGE:-kiln-sandbox:latest}"
worker_image="${WORKER_IMAGE:-kiln-worker:latest}"
api_image="${API_IMAGE:-kiln-api:latest}"
if [ "$kiln" = 1 ]; then
    SANDBOX_IMAGE="$sandbox_image" sh "$repo/worker_image/build_images.sh" >/dev/null
    PYTHON_IMAGE="$python_image" WORKER_IMAGE="$worker_image" API_IMAGE="$api_image" \
        sh "$repo/worker_image/service_images.sh" >/dev/null
fi

printf '%s\n' \
    "KILN_POSTGRES_IMAGE=$postgres_image" \
    "KILN_MINIO_IMAGE=$s3_image" \
    "KILN_MC_IMAGE=$s3_image" \
    "KILN_API_IMAGE=$api_image" \
    "KILN_WORKER_IMAGE=$worker_image" \
    "KILN_SANDBOX_IMAGE=$sandbox_image"
