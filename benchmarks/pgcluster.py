"""A private PostgreSQL cluster for the source, on its own port: source and destination on separate servers.

``initdb`` into an ignored folder of the project (``.bench_pg/<name>``), started with ``pg_ctl`` as an
unprivileged user (initdb refuses root: ``runuser -u postgres`` when we are root), trust auth on
127.0.0.1 only, and stopped (and its folder removed) on exit. Nothing of the shared server is touched.

    with PrivateCluster() as pc:
        url = pc.create_database("bench_src")
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import psycopg2
from psycopg2 import sql

from benchmarks import cpuset

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / ".bench_pg"
PG_BINDIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def pg_bin(name: str) -> str:
    """A PostgreSQL program (initdb, pg_ctl, pgbench): from PG_BINDIR, the Debian folders, or PATH."""
    dirs = [os.environ["PG_BINDIR"]] if os.environ.get("PG_BINDIR") else []
    for d in (*dirs, *PG_BINDIRS):
        p = Path(d) / name
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found in {', '.join(PG_BINDIRS)} or PATH: install the PostgreSQL server package "
            "(apt-get install postgresql-15) or set PG_BINDIR"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """initdb + pg_ctl start on a free port; :meth:`stop` stops it and removes its data folder."""

    def __init__(
        self,
        *,
        user: str = "postgres",
        settings: dict[str, str] | None = None,
        keep: bool = False,
        cpus: tuple[int, ...] | None = None,
    ):
        """``cpus``: start the server pinned to these cores (``taskset -c``: the postmaster and every backend
        it forks inherit them)."""
        self.run_as = user if os.geteuid() == 0 else None
        self.cpus = cpus
        self.port = free_port()
        self.dir = ROOT / f"src_{uuid.uuid4().hex[:8]}"
        self.keep = keep
        # small and fast to start; fsync on (production-like commit cost); no background noise
        self.settings = {
            "shared_buffers": "128MB",
            "max_connections": "60",
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "logging_collector": "off",
            **(settings or {}),
        }
        self.started = False

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else list(argv)

    def _run(self, *argv: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self) -> "PrivateCluster":
        ROOT.mkdir(exist_ok=True)
        self.dir.mkdir()
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            timeout=300,
        )
        with open(self.dir / "postgresql.conf", "a") as f:
            f.write("\n# bench: private source cluster\n")
            f.write(f"port = {self.port}\n")
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        self._run(
            *cpuset.prefix(self.cpus),
            pg_bin("pg_ctl"),
            "-D",
            str(self.dir),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "120",
            "start",
            timeout=180,
        )
        self.started = True
        return self

    @property
    def postmaster_pid(self) -> int:
        return int((self.dir / "postmaster.pid").read_text().split()[0])

    def pin(self, cpus) -> int:
        """Pin the running server (postmaster, every backend, background processes) to ``cpus``."""
        return cpuset.pin_tree(self.postmaster_pid, cpus)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        conn = psycopg2.connect(self.admin_url, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            try:
                self._run(pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
            finally:
                self.started = False
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrivateCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
