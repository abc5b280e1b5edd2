"""A real, throwaway PostgreSQL server for the test session.

``PostgresServer.start()`` runs ``initdb`` and ``pg_ctl start`` on a free
loopback port with the data directory, log and Unix socket in one fresh
temporary directory; ``stop()`` runs ``pg_ctl stop -m fast`` and removes it.
``create_database()`` makes one empty database per server instance a test
needs, so catalogs are never shared between servers.

PostgreSQL refuses to run as root, so under root both ``initdb`` and
``pg_ctl`` run as an unprivileged user (``runuser -u nobody``) that owns the
directory. Authentication is ``trust`` for the superuser ``sb``, on
127.0.0.1 only.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

USER = "sb"  # the database superuser initdb creates
RUN_AS = os.environ.get("SCATTERBROKER_TEST_PG_USER", "nobody")  # OS user when we are root


def find_bindir() -> Path | None:
    """Directory holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's layout."""
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            bindir = Path(os.path.realpath(found)).parent
            if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
                return bindir
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
    )
    for bindir in reversed(candidates):  # newest version first
        if Path(bindir, "initdb").exists() and Path(bindir, "pg_ctl").exists():
            return Path(bindir)
    return None


def free_port() -> int:
    """A loopback port nobody listens on now (the tests' servers bind it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresError(RuntimeError):
    pass


class PostgresServer:
    """One PostgreSQL cluster: ``start()``, ``create_database()``, ``stop()``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = Path(bindir)
        self.dir: Path | None = None
        self.port: int | None = None
        self._counter = 0

    # -- processes

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a server-side PostgreSQL binary (as the unprivileged user under root)."""
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        # cwd: a directory the unprivileged user can enter (not root's home).
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    @property
    def log(self) -> Path:
        assert self.dir is not None
        return self.dir / "server.log"

    def start(self) -> PostgresServer:
        # Not under pytest's tmp dirs: those are 0700 root, which the unprivileged
        # user cannot traverse. A short path also keeps the socket path short.
        self.dir = Path(tempfile.mkdtemp(prefix="sb-pg-"))
        if self._as_root:
            shutil.chown(self.dir, user=RUN_AS)
        out = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER,
                        "-E", "UTF8", "--no-locale", "--no-sync")
        if out.returncode:
            self._cleanup()
            raise PostgresError(f"initdb failed:\n{out.stdout}\n{out.stderr}")
        last = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                       "-c max_connections=200")
            out = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                            "-w", "-t", "60", "start")
            if out.returncode == 0:
                return self
            last = f"{out.stdout}\n{out.stderr}\n{self._log_text()}"
        self._cleanup()
        raise PostgresError(f"pg_ctl start failed:\n{last}")

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _log_text(self) -> str:
        try:
            return self.log.read_text()[-4000:]
        except OSError:
            return ""

    # -- databases

    def uri(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy/Tiled URI of ``database``; ``driver="postgresql"`` for Tiled's
        SQL table storage (ADBC)."""
        return f"{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "catalog") -> str:
        """Create a new empty database; return its name."""
        self._counter += 1
        name = f"{prefix}_{self._counter}_{uuid.uuid4().hex[:8]}"
        # createdb is a client: it connects over TCP, so it runs as any user.
        out = subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", USER, name],
            capture_output=True, text=True, timeout=60,
        )
        if out.returncode:
            raise PostgresError(f"createdb {name} failed: {out.stderr}\n{self._log_text()}")
        return name

    def psql(self, database: str, sql: str) -> str:
        """Run ``sql`` with psql; return its unaligned, tuples-only output."""
        out = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
             "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, timeout=60,
        )
        if out.returncode:
            raise PostgresError(f"psql failed: {out.stderr}")
        return out.stdout
