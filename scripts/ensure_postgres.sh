#!/usr/bin/env bash
# Find or start the PostgreSQL the demo and tests use (default postgresql://postgres@127.0.0.1:5432/postgres).
# 1) already answering -> done; 2) a Debian cluster is installed but stopped -> start it;
# 3) root on Debian/Ubuntu with nothing installed -> apt-get install postgresql, start it, trust 127.0.0.1;
# otherwise print exactly what to do and fail.
set -euo pipefail
URL="${BACKFILL_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
PY="${PYTHON:-python3}"

ready() {
  "$PY" - "$URL" <<'PYEOF' >/dev/null 2>&1
import sys
try:
    import psycopg2
    psycopg2.connect(sys.argv[1], connect_timeout=3).close()
except ImportError:  # no driver yet: fall back to a TCP probe
    import socket
    socket.create_connection(("127.0.0.1", 5432), timeout=3).close()
PYEOF
}

if ready; then echo "PostgreSQL: answering at $URL"; exit 0; fi

start_cluster() {
  local ver
  ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)"
  [ -n "$ver" ] && command -v pg_ctlcluster >/dev/null || return 1
  echo "PostgreSQL: starting cluster $ver/main"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 30); do ready && return 0; sleep 1; done
  return 1
}

if start_cluster; then echo "PostgreSQL: started, answering at $URL"; exit 0; fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null && [ ! -d /etc/postgresql ]; then
  echo "PostgreSQL: not installed; installing Debian's postgresql package"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  ver="$(ls /etc/postgresql | sort -V | tail -1)"
  # local development server only: trust connections from this machine, like the test default URL expects
  sed -i 's/^\(host\s\+all\s\+all\s\+127.0.0.1\/32\s\+\)\S\+/\1trust/' "/etc/postgresql/$ver/main/pg_hba.conf"
  if start_cluster; then echo "PostgreSQL: installed and answering at $URL"; exit 0; fi
fi

cat >&2 <<MSG
PostgreSQL is not reachable at $URL and could not be started here.
Do one of:
  - start your server so that: psql "$URL" -c 'select 1'  works (user postgres, trust auth on 127.0.0.1), or
  - point the project at another server: export BACKFILL_TEST_PG_URL=postgresql://user:pass@host:5432/postgres
    (the user must be allowed to CREATE DATABASE), or
  - on Debian/Ubuntu as root: apt-get install -y postgresql && pg_ctlcluster <version> main start
MSG
exit 1
