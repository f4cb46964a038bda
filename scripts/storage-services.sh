#!/usr/bin/env bash
# A real S3-compatible server (moto) and a real PostgreSQL on 127.0.0.1, for the tests that run
# pier on S3 + PostgreSQL. Source it and call the functions, as scripts/test.sh does:
#
#   source scripts/storage-services.sh
#   storage_services_start      # installs what is missing, starts both, exports PIER_TEST_*
#   ...                         # cargo test ...
#   storage_services_stop
#
# or run it by hand: `scripts/storage-services.sh` starts both, prints the variables to export,
# and keeps them running until Ctrl-C.
#
# Exports: PIER_TEST_S3_ENDPOINT, PIER_TEST_S3_BUCKET (an empty bucket made here),
# PIER_TEST_PG_URL (a superuser's URL: tests create one database each), and AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY (moto takes any).

# moto's S3 server: pip installs it in seconds (an s3s-fs build takes minutes on two cores).
MOTO_VERSION=5.2.1

storage_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

storage_pg_bin() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x $d/postgres ]] && { echo "$d"; return; }
    done
    dirname "$(command -v postgres 2>/dev/null || echo /nonexistent/postgres)"
}

storage_services_install() {
    if ! command -v moto_server >/dev/null 2>&1; then
        echo "installing: moto[server]==$MOTO_VERSION"
        python3 -m pip install -q "moto[server]==$MOTO_VERSION"
    fi
    if [[ ! -x $(storage_pg_bin)/postgres ]]; then
        echo "installing: postgresql"
        if [[ $(id -u) -ne 0 ]]; then
            echo "error: need root to apt-get install postgresql" >&2
            return 1
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql >/dev/null
    fi
}

# Run a command as the user that owns the database files (root may not run postgres).
storage_as_pg() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

storage_services_start() {
    storage_services_install || return 1
    STORAGE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pier-storage.XXXXXX")
    chmod 755 "$STORAGE_DIR"
    local s3_port pg_port bin
    s3_port=$(storage_free_port)
    pg_port=$(storage_free_port)
    bin=$(storage_pg_bin)

    moto_server -H 127.0.0.1 -p "$s3_port" >"$STORAGE_DIR/moto.log" 2>&1 &
    STORAGE_MOTO_PID=$!

    mkdir -p "$STORAGE_DIR/pg" "$STORAGE_DIR/pg-socket"
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres "$STORAGE_DIR/pg" "$STORAGE_DIR/pg-socket"
    fi
    storage_as_pg "$bin/initdb" -D "$STORAGE_DIR/pg" -A trust -U pier -E UTF8 --no-sync \
        >"$STORAGE_DIR/initdb.log" 2>&1 || { cat "$STORAGE_DIR/initdb.log" >&2; return 1; }
    # fsync off: a test database that dies with the machine loses nothing anyone needs.
    storage_as_pg "$bin/pg_ctl" -D "$STORAGE_DIR/pg" -w -t 60 -l "$STORAGE_DIR/pg/server.log" \
        -o "-h 127.0.0.1 -p $pg_port -k $STORAGE_DIR/pg-socket -c fsync=off -c max_connections=400" \
        start >/dev/null || { cat "$STORAGE_DIR/pg/server.log" >&2; return 1; }
    STORAGE_PG_DATA=$STORAGE_DIR/pg

    local i
    for i in $(seq 1 120); do
        curl -s -o /dev/null "http://127.0.0.1:$s3_port/" && break
        sleep 0.5
    done
    curl -sf -X PUT -o /dev/null "http://127.0.0.1:$s3_port/pier-test" ||
        { echo "error: the S3 server did not start:" >&2; cat "$STORAGE_DIR/moto.log" >&2; return 1; }

    export PIER_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
    export PIER_TEST_S3_BUCKET=pier-test
    export PIER_TEST_PG_URL="postgres://pier@127.0.0.1:$pg_port/postgres"
    export AWS_ACCESS_KEY_ID=pier-test AWS_SECRET_ACCESS_KEY=pier-test
    echo "storage services: S3 at $PIER_TEST_S3_ENDPOINT, PostgreSQL at $PIER_TEST_PG_URL"
}

storage_services_stop() {
    if [[ -n ${STORAGE_MOTO_PID:-} ]]; then
        kill "$STORAGE_MOTO_PID" 2>/dev/null
        wait "$STORAGE_MOTO_PID" 2>/dev/null
        STORAGE_MOTO_PID=
    fi
    if [[ -n ${STORAGE_PG_DATA:-} ]]; then
        storage_as_pg "$(storage_pg_bin)/pg_ctl" -D "$STORAGE_PG_DATA" -m fast -w stop \
            >/dev/null 2>&1
        STORAGE_PG_DATA=
    fi
    if [[ -n ${STORAGE_DIR:-} ]]; then
        rm -rf "$STORAGE_DIR"
    fi
    STORAGE_DIR=
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    trap storage_services_stop EXIT
    storage_services_start
    echo "export PIER_TEST_S3_ENDPOINT=$PIER_TEST_S3_ENDPOINT PIER_TEST_S3_BUCKET=$PIER_TEST_S3_BUCKET" \
        "PIER_TEST_PG_URL=$PIER_TEST_PG_URL AWS_ACCESS_KEY_ID=pier-test AWS_SECRET_ACCESS_KEY=pier-test"
    echo "running; Ctrl-C stops both"
    while sleep 3600; do :; done
fi
