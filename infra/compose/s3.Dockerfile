# An S3 for infra/compose without a registry: moto's S3 server behind MinIO's command line
# (`minio server DIR`, and the `mc` commands the compose file runs), its state kept in DIR.
# Tests and air-gapped evaluation only: production runs MinIO itself (or AWS S3).
#
#   sh infra/compose/offline_images.sh     # builds this as kiln-s3:latest, among others
#
# The build context holds this file, s3_standin.py and wheels/ (moto[server] and what it
# needs, collected by offline_images.sh), so the install needs no index.
# checkov:skip=CKV_DOCKER_7:the base is an ARG whose default is a pinned tag; offline builds pass a local image (python:3.11-slim)
# checkov:skip=CKV_DOCKER_3:a stand-in for tests and air-gapped evaluation whose state is a root-owned volume; production runs MinIO itself
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG MOTO_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    S3_IGNORE_SUBDOMAIN_BUCKETNAME=true

COPY wheels /tmp/moto-wheels
RUN PIP_CONFIG_FILE=/dev/null pip install --no-cache-dir --no-index \
        --find-links /tmp/moto-wheels "moto[server]==${MOTO_VERSION}" \
    && rm -rf /tmp/moto-wheels \
    && python -c "import moto.s3, flask, werkzeug"

COPY s3_standin.py /usr/local/lib/kiln-s3/s3_standin.py
RUN chmod 0755 /usr/local/lib/kiln-s3/s3_standin.py \
    && ln -s /usr/local/lib/kiln-s3/s3_standin.py /usr/local/bin/minio \
    && ln -s /usr/local/lib/kiln-s3/s3_standin.py /usr/local/bin/mc \
    && mkdir -p /data

LABEL dev.kiln.image="s3-moto"
EXPOSE 9000
# what the compose file asks of MinIO, answered by the stand-in
HEALTHCHECK --interval=5s --timeout=5s --retries=20 CMD ["mc", "ready", "local"]
ENTRYPOINT ["minio"]
CMD ["server", "/data"]
