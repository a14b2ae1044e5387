# The Kiln API service: stateless HTTP (JSON API, caddyserver.com-compatible downloads).
# The same image runs the janitor: `python -m functions.janitor` (or `--once`).
#
#   docker build -f worker_image/api.Dockerfile -t kiln-api:latest .
#   (the build context is the repository root: the image installs the project)
#
# Production builds FROM python:3.11-slim. Offline (tests, air-gapped hosts),
# worker_image/service_images.sh builds FROM kiln-python-base:3.11, which
# worker_image/python_base.sh assembles from this machine's CPython without a registry.
#
# Configure with a file at CONFIG_PATH or KILN_<SECTION>__<FIELD> variables; at least
# KILN_DATABASE__URL, and the storage settings shared with the workers. gunicorn reads
# api.listen, api.processes and api.threads (functions/api/gunicorn_conf.py); extra flags
# go in GUNICORN_CMD_ARGS.
# checkov:skip=CKV_DOCKER_7:the base is an ARG whose default is a pinned tag; offline builds pass a local image (python:3.11-slim)
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# README* : pyproject.toml names the readme, so it must be there to install
COPY pyproject.toml README* ./
COPY kiln ./kiln
COPY functions ./functions
COPY migrations ./migrations
RUN pip install . && rm -rf /src

# an unprivileged user: the API needs no file system of its own
RUN grep -q '^kiln:' /etc/passwd || { \
        echo 'kiln:x:10001:10001:Kiln:/nonexistent:/bin/false' >> /etc/passwd; \
        echo 'kiln:x:10001:' >> /etc/group; }
USER 10001:10001
WORKDIR /tmp

# the HEALTHCHECK below asks this port
ENV KILN_API__LISTEN=0.0.0.0:8234
EXPOSE 8234
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8234/healthz', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "python:functions.api.gunicorn_conf"]
