#!/bin/sh
# Create the cluster on first start (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB), then run the server.
# Arguments are passed to postgres (for example `-c max_connections=200`).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: set POSTGRES_PASSWORD to create the cluster" >&2
        exit 1
    fi
    echo "postgres: creating the cluster in $PGDATA for user $user, database $database"
    password_file=$(mktemp)
    trap 'rm -f "$password_file"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$password_file" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    # Other containers reach it by address; every connection but the local socket needs the password.
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$database" != "postgres" ]; then
        # Single-user mode runs as the bootstrap superuser, which is $user.
        escaped_database=$(printf '%s' "$database" | sed 's/"/""/g')
        escaped_user=$(printf '%s' "$user" | sed 's/"/""/g')
        echo "CREATE DATABASE \"$escaped_database\" OWNER \"$escaped_user\"" |
            postgres --single -D "$PGDATA" postgres >/dev/null
    fi
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
