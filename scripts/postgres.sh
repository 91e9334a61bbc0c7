#!/usr/bin/env bash
# Start a throwaway PostgreSQL (Debian's packages) for the tests, listening on 127.0.0.1 only,
# and print its URL. Idempotent: a running one is reused.
#   scripts/postgres.sh start | stop
# QMR_PG_DIR (default /tmp/qmr-pg) holds the cluster; QMR_PG_PORT (default 15432: below the
# kernel's ephemeral ports, 32768-60999 on Linux, which any connection or port-0 server may hold).
set -euo pipefail
dir=${QMR_PG_DIR:-/tmp/qmr-pg}
port=${QMR_PG_PORT:-15432}
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$pgbin" ]; then
  echo "postgres.sh: PostgreSQL is not installed: scripts/setup.sh --postgres (apt-get install postgresql)" >&2
  exit 1
fi
as_owner() {
  # PostgreSQL refuses to run as root: run it as the postgres user then.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "${1:-start}" in
  start)
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir"
      [ "$(id -u)" = 0 ] && chown postgres: "$dir"
      as_owner "$pgbin/initdb" -D "$dir" -A trust -U qmr -E UTF8 >/dev/null
    fi
    if ! as_owner "$pgbin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      if ! as_owner "$pgbin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null; then
        echo "postgres.sh: PostgreSQL did not start on 127.0.0.1:$port; its log ($dir/server.log) ends:" >&2
        tail -n 5 "$dir/server.log" | sed 's/^/  /' >&2
        echo "postgres.sh: if the port is taken, choose another: QMR_PG_PORT=NNNNN $0 start" >&2
        exit 1
      fi
    fi
    echo "postgresql://qmr@127.0.0.1:$port/postgres"
    ;;
  stop)
    as_owner "$pgbin/pg_ctl" -D "$dir" -m fast stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: postgres.sh start|stop" >&2; exit 2 ;;
esac
