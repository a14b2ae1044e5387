#!/bin/sh
# Build Kiln's service images on this machine, offline: `make images-service`.
#
#   kiln-python-base:3.11  worker_image/python_base.sh (skipped when PYTHON_IMAGE is set)
#   kiln-worker:latest     worker_image/worker.Dockerfile
#   kiln-api:latest        worker_image/api.Dockerfile (also runs the janitor)
#
# PYTHON_IMAGE=python:3.11-slim builds FROM the official image instead (needs a registry).
# The sandbox image the worker starts is built by worker_image/build_images.sh (make images).
#
# Environment: PYTHON_IMAGE, WORKER_IMAGE (default kiln-worker:latest), API_IMAGE
# (default kiln-api:latest), and those of python_base.sh. Prints the two image ids.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
worker_image="${WORKER_IMAGE:-kiln-worker:latest}"
api_image="${API_IMAGE:-kiln-api:latest}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

case "${1:-}" in
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    "") ;;
    *) echo "service_images.sh: unknown argument $1" >&2; exit 2 ;;
esac

log() { echo "service_images: $*" >&2; }

python_image="${PYTHON_IMAGE:-}"
[ -n "$python_image" ] || python_image="$(sh "$here/python_base.sh")"

# a context of just what the images need (the repository holds .venv and var/)
context() {
    (cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml kiln functions migrations \
        worker_image/worker.Dockerfile worker_image/api.Dockerfile $(ls README* 2>/dev/null))
}

for pair in "$worker_image=worker_image/worker.Dockerfile" "$api_image=worker_image/api.Dockerfile"; do
    image="${pair%%=*}"
    dockerfile="${pair#*=}"
    log "building $image FROM $python_image"
    context | docker build -q --build-arg "PYTHON_IMAGE=$python_image" -f "$dockerfile" \
        -t "$image" - >/dev/null
done

docker image inspect --format '{{.Id}}' "$worker_image" "$api_image"
