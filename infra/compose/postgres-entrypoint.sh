#!/bin/sh
# The entry point of the offline PostgreSQL image (infra/compose/postgres.Dockerfile): the part
# of the official postgres image's docker-entrypoint.sh that infra/compose relies on.
#
#   POSTGRES_USER      the superuser initdb creates (default postgres)
#   POSTGRES_PASSWORD  its password; TCP clients authenticate with scram-sha-256
#   POSTGRES_DB        a database created at first start (default POSTGRES_USER)
#   PGDATA             the cluster (default /var/lib/postgresql/data, a volume)
#
# At first start (no PG_VERSION in PGDATA) it runs initdb and creates the database with the
# server in single-user mode, so no client (nor the pg_isready health check) sees a server
# before it is ready. Then postgres runs as PID 1, as the postgres user, listening on all
# addresses. Arguments that start with '-' are passed to postgres.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
export PGDATA

if [ "${1:-}" = "" ] || [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    chmod 2775 /var/run/postgresql
    # busybox su execs the shell, which execs this script again: postgres stays PID 1
    exec su -s /bin/sh postgres -c 'exec "$0" "$@"' "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is empty; set it" >&2
        exit 1
    fi
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    locale=C
    [ -d /usr/lib/locale/C.utf8 ] && locale=C.UTF-8
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale="$locale" -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    printf '%s\n' "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\";" \
            | postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "postgres-entrypoint: initialized $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi

exec "$@" -c listen_addresses='*'
