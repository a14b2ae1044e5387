# The Kiln worker service: claims builds from PostgreSQL, runs their steps in sandbox
# containers, uploads the binaries.
#
#   docker build -f worker_image/worker.Dockerfile -t kiln-worker:latest .
#   (the build context is the repository root: the image installs the project)
#
# The worker starts the sandbox containers on the host's Docker Engine, not inside
# itself: run it with the engine's socket mounted, e.g.
#
#   docker run -v /var/run/docker.sock:/var/run/docker.sock \
#              -v /var/lib/kiln:/var/lib/kiln \
#              -e KILN_BUILD__CACHE_DIR=/var/lib/kiln/cache \
#              -e KILN_BUILD__WORK_DIR=/var/lib/kiln/work \
#              kiln-worker:latest
#
# Sandbox steps bind-mount the work and cache directories, and the engine resolves bind
# sources on the HOST: mount those directories at the same path inside the worker as on
# the host (as above), or the steps see empty directories. Access to docker.sock is root
# on the host; give it only to this container. The kiln-sandbox image must exist on the
# host (worker_image/build_images.sh, or pull it from your registry).
# checkov:skip=CKV_DOCKER_7:the base is an ARG whose default is a pinned tag; offline builds pass a local image (python:3.11-slim)
# checkov:skip=CKV_DOCKER_3:the worker must be root to chown the bind-mounted work directories to the sandbox user and to reach the engine socket; build steps never run as root
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# README* : the readme is optional for the image
COPY pyproject.toml README* ./
COPY kiln ./kiln
COPY functions ./functions
COPY migrations ./migrations
RUN pip install . && rm -rf /src

# The worker stays root inside its own container: it owns the bind-mounted directories
# and chowns them to the sandbox user (uid 1000) before each step; the build steps
# themselves never run as root.
WORKDIR /var/lib/kiln
# healthy only while it can build: its database (with Kiln's schema), its store and the
# engine it starts the sandboxes on (with the sandbox image) all answer (`kiln check`)
HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
    CMD ["kiln", "check", "--role", "worker"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "functions.worker"]
