# PostgreSQL for infra/compose without a registry: Debian's postgresql server and client
# binaries on a busybox base, with an entry point that honours the official postgres image's
# POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and PGDATA (the parts compose uses).
# Production runs the official image (postgres:16-alpine, the compose file's default).
#
#   sh infra/compose/offline_images.sh     # builds this as kiln-postgres:<major>, among others
#
# POSTGRES_BASE names the rootfs that script imports (kiln-postgres-base:<major>): busybox,
# /usr/lib/postgresql/<major>, /usr/share/postgresql/<major>, the time zone data and every
# shared library those binaries load, copied from this machine's Debian packages.
# checkov:skip=CKV_DOCKER_7:the base is an ARG whose default is a pinned tag; offline builds pass a local image (kiln-postgres-base:15)
# checkov:skip=CKV_DOCKER_3:as in the official image, the entry point starts as root to own a fresh PGDATA volume, then runs postgres as the postgres user
ARG POSTGRES_BASE=kiln-postgres-base:15
FROM ${POSTGRES_BASE}

ARG PG_MAJOR=15
ENV PG_MAJOR=${PG_MAJOR} \
    PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8 \
    TZ=UTC

COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 0755 /usr/local/bin/docker-entrypoint.sh \
    && grep -q '^postgres:' /etc/passwd \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql \
    && chmod 0700 "$PGDATA" \
    && postgres --version && initdb --version && pg_isready --version

LABEL dev.kiln.image="postgres"
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# accepting connections (compose asks more: its own check names the user and database)
HEALTHCHECK --interval=5s --timeout=5s --retries=20 CMD ["pg_isready", "-q"]
# fast shutdown: roll back open transactions, as the official image does
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
