#!/bin/sh
# Assemble the offline Python base of Kiln's service images: `kiln-python-base:3.11`.
#
# Production images build FROM python:3.11-slim. Where no registry can be reached (tests,
# air-gapped hosts) this script makes a stand-in without one, and prints its tag:
#
#   busybox               /bin/sh and the usual tools (RUN lines need a shell)
#   this machine's        the interpreter of $PYTHON (its sys.base_prefix), without tests,
#   CPython 3.11          tkinter or site-packages, at /usr/local like the official image
#   shared libraries      every library the interpreter and its extension modules load (ldd),
#                         and the manylinux baseline (glibc, libgcc_s, libstdc++) wheels use
#   a wheelhouse          wheels of Kiln's dependencies (and setuptools) in /opt/kiln-wheels,
#                         with an /etc/pip.conf that installs from there and never from an
#                         index: an unchanged `pip install .` works offline
#
# Idempotent: the image carries a label with a hash of the interpreter version and of
# pyproject.toml's dependencies; it is rebuilt only when that changes (or with --force).
#
# Environment: PYTHON (a CPython 3.11; default .venv/bin/python), PYTHON_BASE_IMAGE (the
# tag; default kiln-python-base:3.11), BUSYBOX (default: from PATH).
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
tag="${PYTHON_BASE_IMAGE:-kiln-python-base:3.11}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "python_base.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { echo "python_base: $*" >&2; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$version" = 3.11 ] || { log "$python is Python $version; a CPython 3.11 is needed (set PYTHON)"; exit 1; }
prefix="$("$python" -c 'import sys; print(sys.base_prefix)')"
full="$("$python" -c 'import platform; print(platform.python_version())')"
interpreter="$prefix/bin/python3.11"
[ -x "$interpreter" ] || { log "$interpreter is missing"; exit 1; }

# what the wheelhouse must hold: the build backend and the project's dependencies
requirements="$("$python" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
print("\n".join(project["build-system"]["requires"] + ["wheel"] + project["project"]["dependencies"]))
EOF
)"
stamp="$(printf '%s\n%s\n' "$full" "$requirements" | sha256sum | cut -c1-16)"

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 || {
    log "no Docker Engine answers (is dockerd running, and may this user use it?)"
    exit 1
}
if [ "$force" = 0 ] && [ "$(docker image inspect --format '{{index .Config.Labels "dev.kiln.python.stamp"}}' "$tag" 2>/dev/null || true)" = "$stamp" ]; then
    log "$tag is up to date"
    echo "$tag"
    exit 0
fi

busybox="${BUSYBOX:-$(command -v busybox || true)}"
[ -n "$busybox" ] || { log "busybox not found: install busybox-static (or set BUSYBOX)"; exit 1; }
ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/kiln-python-base.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT INT TERM
log "assembling $tag (CPython $full from $prefix) in $rootfs"

mkdir -p "$rootfs/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/root" "$rootfs/dev" \
    "$rootfs/proc" "$rootfs/sys" "$rootfs/usr/local/bin" "$rootfs/usr/local/lib" \
    "$rootfs/usr/lib/ssl" "$rootfs/opt/kiln-wheels" "$rootfs/var/tmp"
chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
chmod 0700 "$rootfs/root"
cp "$busybox" "$rootfs/bin/busybox"
chmod 0755 "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done

# the interpreter, relocated to /usr/local (CPython finds its stdlib relative to itself)
cp "$interpreter" "$rootfs/usr/local/bin/python3.11"
ln -s python3.11 "$rootfs/usr/local/bin/python3"
ln -s python3.11 "$rootfs/usr/local/bin/python"
cp -L "$prefix/lib/libpython3.11.so.1.0" "$rootfs/usr/local/lib/"
ln -s libpython3.11.so.1.0 "$rootfs/usr/local/lib/libpython3.11.so"
tar -C "$prefix/lib" \
    --exclude='python3.11/test' --exclude='python3.11/*/tests' --exclude='python3.11/*/test' \
    --exclude='python3.11/site-packages/*' --exclude='python3.11/tkinter' \
    --exclude='python3.11/idlelib' --exclude='python3.11/turtledemo' \
    --exclude='python3.11/lib-dynload/_tkinter*' --exclude='python3.11/config-3.11-*' \
    --exclude='__pycache__' \
    -cf - python3.11 | tar -C "$rootfs/usr/local/lib" -xf -

# the shared libraries they load, at the paths the host has them
libraries() {
    for object in "$interpreter" "$prefix/lib/libpython3.11.so.1.0" \
            "$rootfs"/usr/local/lib/python3.11/lib-dynload/*.so; do
        ldd "$object" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }'
    done | grep -v "^$prefix/" | sort -u
}
# manylinux wheels (psycopg-binary, pydantic-core, ...) may load any library of the
# manylinux baseline: glibc's, libgcc_s and libstdc++
baseline() {
    for name in libc.so.6 libm.so.6 libdl.so.2 librt.so.1 libpthread.so.0 libutil.so.1 \
            libcrypt.so.1 libresolv.so.2 libanl.so.1 libgcc_s.so.1 libstdc++.so.6; do
        "$ldconfig" -p | awk -v name="$name" '$1 == name && $0 ~ /x86-64|AArch64/ { print $NF; exit }'
    done
}
for library in $(libraries) $(baseline); do
    mkdir -p "$rootfs$(dirname "$library")"
    cp -L "$library" "$rootfs$library"
done

printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' \
    > "$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$rootfs/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' > "$rootfs/etc/nsswitch.conf"
for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -f "$bundle" ]; then cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"; break; fi
done
# where Debian's OpenSSL (and so the ssl module) looks for CAs
ln -s /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/lib/ssl/cert.pem"
ln -s /etc/ssl/certs "$rootfs/usr/lib/ssl/certs"
printf '%s\n' /usr/local/lib /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib/aarch64-linux-gnu \
    /usr/lib/aarch64-linux-gnu > "$rootfs/etc/ld.so.conf"
"$ldconfig" -r "$rootfs"

# pip installs from the wheelhouse only
log "collecting wheels of Kiln's dependencies"
printf '%s\n' "$requirements" > "$rootfs/opt/kiln-wheels/requirements.txt"
"$python" -m pip wheel -q --disable-pip-version-check -w "$rootfs/opt/kiln-wheels" \
    -r "$rootfs/opt/kiln-wheels/requirements.txt" >"$rootfs/pip.log" 2>&1 || {
    cat "$rootfs/pip.log" >&2
    log "cannot collect the wheels (is a package index reachable, or are they in pip's cache?)"
    exit 1
}
rm "$rootfs/pip.log"
printf '%s\n' '[global]' 'no-index = true' 'find-links = /opt/kiln-wheels' \
    'disable-pip-version-check = true' > "$rootfs/etc/pip.conf"

raw="kiln-python-rootfs:$stamp"
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . | docker import \
    --change "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PYTHON_VERSION=$full" \
    --change 'CMD ["python3"]' \
    --message "Kiln offline Python base: busybox + CPython $full" \
    - "$raw" >/dev/null
rm -rf "$rootfs"
trap - EXIT INT TERM

# pip itself, from the interpreter's bundled wheel; then prove the base can install
printf '%s\n' "FROM $raw" \
    'RUN python3 -m ensurepip --default-pip >/dev/null && python3 -m pip --version \' \
    ' && python3 -c "import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, hashlib" \' \
    ' && pip install -q --target /tmp/check -r /opt/kiln-wheels/requirements.txt \' \
    ' && PYTHONPATH=/tmp/check python3 -c "import psycopg, pydantic, falcon, yaml, docker, boto3" \' \
    ' && rm -rf /tmp/check' \
    "LABEL dev.kiln.image=\"python-base\" dev.kiln.python.stamp=\"$stamp\" dev.kiln.python.version=\"$full\"" \
    | docker build -q -t "$tag" - >/dev/null
docker image rm "$raw" >/dev/null 2>&1 || true
log "built $tag"
echo "$tag"
