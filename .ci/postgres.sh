#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster for the sweep tests: a temporary folder, a free local port, stopped on exit.
#
#   source .ci/postgres.sh && pg_start      # exports HESS_TEST_POSTGRES_URL (postgresql://postgres@127.0.0.1:PORT/hess_test)
#   pg_stop                                 # stops the server and deletes its folder (pg_start installs a trap for it)
#
# Installs the Debian packages (postgresql-15) when the binaries are missing.  PostgreSQL refuses to run as
# root, so under root every server command runs as the postgres user (runuser -u postgres --).
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
    if [ ! -x "$PG_BIN/initdb" ]; then
        echo "postgres: $PG_BIN/initdb missing, installing postgresql-15" >&2
        apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >&2
    fi
    PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/hess-pg.XXXXXX")"
    [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
    PG_PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    trap pg_stop EXIT
    _pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$PG_DIR/initdb.log" 2>&1 \
        || { cat "$PG_DIR/initdb.log" >&2; return 1; }
    _pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100" start >/dev/null \
        || { cat "$PG_DIR/server.log" >&2; return 1; }
    _pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres hess_test
    export HESS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PG_PORT/hess_test"
    echo "postgres: throwaway server at $HESS_TEST_POSTGRES_URL (data in $PG_DIR)" >&2
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
        _pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
        echo "postgres: stopped, $PG_DIR removed" >&2
    fi
    PG_DIR=""
}
