#!/usr/bin/env bash
# Start a throwaway PostgreSQL for the gateway's tests and export its SQLAlchemy URL.
#
#   source .ci/postgres.sh      # exports LLAMA_LAB_TEST_PG_URL (also printed on the last line)
#   bash .ci/postgres.sh        # just prints the URL
#
# Idempotent: installs Debian's `postgresql` package only when no server binaries are found,
# reuses a server already running on the same data dir, and creates the role/database once.
# Settings: LLAMA_LAB_PG_DIR (default /tmp/llama-lab-pg), LLAMA_LAB_PG_PORT (default 55432).

_llama_lab_pg() {
    local dir="${LLAMA_LAB_PG_DIR:-/tmp/llama-lab-pg}"
    local port="${LLAMA_LAB_PG_PORT:-55432}"
    local bin
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        echo "postgres.sh: installing Debian's postgresql package" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2 || return 1
        apt-get install -y -qq --no-install-recommends postgresql >&2 || return 1
        bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    fi

    # initdb refuses to run as root: use the package's postgres user when we are root.
    local as=()
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        as=(runuser -u postgres --)
    fi

    if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        if [ ! -f "$dir/data/PG_VERSION" ]; then
            rm -rf "$dir"
            mkdir -p "$dir"
            [ "$(id -u)" = 0 ] && chown postgres: "$dir"
            "${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 >"$dir/initdb.log" 2>&1 \
                || { cat "$dir/initdb.log" >&2; return 1; }
        fi
        "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
            || { cat "$dir/server.log" >&2; return 1; }
    fi

    local psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA)
    "${psql[@]}" -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname='llama_lab'" | grep -q 1 \
        || "${psql[@]}" -d postgres -c "CREATE ROLE llama_lab LOGIN PASSWORD 'llama_lab' CREATEDB" || return 1
    "${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname='llama_lab_test'" | grep -q 1 \
        || "${psql[@]}" -d postgres -c "CREATE DATABASE llama_lab_test OWNER llama_lab" || return 1

    export LLAMA_LAB_TEST_PG_URL="postgresql+psycopg://llama_lab:llama_lab@127.0.0.1:${port}/llama_lab_test"
    echo "$LLAMA_LAB_TEST_PG_URL"
}

_llama_lab_pg
