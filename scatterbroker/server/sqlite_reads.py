"""The SQLite catalog's reads run on the event loop, not behind aiosqlite's worker thread.

Tiled reaches an SQLite catalog through SQLAlchemy's ``aiosqlite`` dialect.
aiosqlite gives each connection a worker thread and sends it every call --
``cursor()``, ``execute``, ``fetchall``, ``close``, ``rollback`` -- through a
queue, and the answer comes back as a callback on the event loop. One catalog
listing of 50 children is 80 such calls, a node's metadata about 46 (counted
with the entry cache off). Under ``benchmarks/load.py`` (32 clients, one
process) each call waited ~2.5 ms on average for the busy loop to run its
callback, so a listing that costs ~6 ms of CPU took ~300 ms, and every request
waiting for the same answer waited as long.

:func:`install` runs on the loop, directly, the calls that cannot wait for
another connection: a ``SELECT`` (or ``WITH ... SELECT``), fetching rows, making and closing a cursor,
and a rollback. Everything else -- ``INSERT``/``UPDATE``/``DELETE``, commits,
pragmas, scripts, opening and closing the connection -- stays on the worker
thread as before. This holds only for a database in WAL mode (Tiled sets it
when it creates a catalog), checked once per connection when it opens: in WAL
mode a reader never waits for a writer, so the loop never waits for a lock
(:func:`enable_wal` puts the catalog in WAL mode, as Tiled means to). A
writer may wait (another connection's transaction holds the write lock,
across ``await``\\ s), and that wait stays on its thread where it cannot stop
the loop from finishing the transaction it waits for (a connection that
switches the journal mode is checked again). Other journal modes and
in-memory databases keep every call on the thread. Each call still runs on one
connection at a time (SQLAlchemy awaits each before the next); SQLAlchemy
opens file databases with ``check_same_thread=False``, and a connection opened
otherwise falls back to its thread.

The cost: a slow ``SELECT`` now holds the loop for its duration (SQLite
releases the GIL, so other threads go on). Catalog queries are indexed lookups
of well under a millisecond; a deployment whose SQLite catalog has very large
containers and slow searches can turn this off with
``SCATTERBROKER_SQLITE_READS_ON_LOOP=0`` (or use PostgreSQL, whose driver is
asynchronous and has no worker thread). ``tests/test_sqlite_reads.py`` checks
on which thread each kind of statement runs and that a waiting writer does not
stop the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
from typing import Any

from scatterbroker.environment import env_flag
from scatterbroker.server import tiled_compat

#: sqlite3 methods run on the loop, by the class they are bound to (execute: reads only)
ON_LOOP = {sqlite3.Cursor: {"execute", "fetchone", "fetchmany", "fetchall", "close"},
           sqlite3.Connection: {"execute", "cursor", "rollback"}}

#: a read: SELECT, or a WITH (common table expression) ... SELECT, naming no writing statement
_READ = re.compile(r"\s*(SELECT|WITH)\b", re.IGNORECASE)
_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE|UPSERT)\b", re.IGNORECASE)

_installed = False
logger = logging.getLogger(__name__)


def reads_on_loop(fn: Any, args: tuple) -> bool:
    """Whether aiosqlite's call ``fn(*args)`` may run on the loop (of a WAL connection)."""
    owner = getattr(fn, "__self__", None)
    names = ON_LOOP.get(type(owner))
    name = getattr(fn, "__name__", "")
    if names is None or name not in names:
        return False
    if name != "execute":
        return True
    return bool(args) and isinstance(args[0], str) and _READ.match(args[0]) is not None \
        and _WRITE.search(args[0]) is None


def sets_journal_mode(fn: Any, args: tuple) -> bool:
    """Whether aiosqlite's call ``fn(*args)`` is a ``PRAGMA journal_mode=...`` statement."""
    return (getattr(fn, "__name__", "") in ("execute", "executescript") and bool(args)
            and isinstance(args[0], str) and "journal_mode" in args[0].lower() and "=" in args[0])


def _journal_mode(connection: sqlite3.Connection) -> str:
    return str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()


def enable_wal(uri: str) -> str | None:
    """Put the SQLite catalog file of ``uri`` in WAL mode; its journal mode after (None: not an
    SQLite file).

    Tiled's ``initialize_database`` means to (``PRAGMA journal_mode=WAL``), but runs the
    pragma inside the transaction that created the catalog, where SQLite ignores it: its
    catalogs stay in rollback-journal mode, where a reader waits while a writer commits.
    WAL persists in the file, so this is needed once; until then (or if another process
    holds the file and the switch fails) the catalog's reads stay on aiosqlite's thread.
    """
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    database = url.database
    if not url.drivername.startswith("sqlite") or not database or database == ":memory:" \
            or url.query.get("mode") == "memory" or not os.path.exists(database):
        return None
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as db:
            return str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
    except sqlite3.Error as err:
        logger.warning("SQLite catalog %s left in its journal mode: %s", database, err)
        return None


def install() -> bool:
    """Patch aiosqlite's connections (idempotent); False if aiosqlite is absent or not the
    version this was written for (:mod:`scatterbroker.server.tiled_compat`: it logs, and
    every call stays on the thread). Whether a connection's reads run on the loop is
    decided when it opens (WAL mode, and ``SCATTERBROKER_SQLITE_READS_ON_LOOP`` not off)."""
    if _installed:
        return True
    try:
        import aiosqlite.core  # noqa: F401
    except ImportError:
        return False
    return tiled_compat.install("sqlite-reads", _patch)


def _patch() -> None:
    global _installed
    from aiosqlite.core import Connection

    threaded_execute = tiled_compat.private(Connection, "_execute")
    threaded_connect = tiled_compat.private(Connection, "_connect")

    async def check(self: Any) -> None:
        self._sb_reads_on_loop = env_flag("SCATTERBROKER_SQLITE_READS_ON_LOOP", True) and (
            await threaded_execute(self, _journal_mode, tiled_compat.private(self, "_connection")) == "wal")

    async def _connect(self: Any) -> Any:
        result = await threaded_connect(self)
        if getattr(self, "_sb_reads_on_loop", None) is None and tiled_compat.private(self, "_connection") is not None:
            await check(self)
        return result

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_sb_reads_on_loop", False) and reads_on_loop(fn, args):
            if not tiled_compat.private(self, "_running") or not tiled_compat.private(self, "_connection"):
                raise ValueError("Connection closed")  # as aiosqlite says it
            try:
                return fn(*args, **kwargs)
            except sqlite3.ProgrammingError as err:  # opened with check_same_thread: its thread only
                if "thread" not in str(err):
                    raise
                self._sb_reads_on_loop = False
        result = await threaded_execute(self, fn, *args, **kwargs)
        if sets_journal_mode(fn, args):  # e.g. Tiled's catalog creation switching to WAL
            await check(self)
        return result

    _connect.__wrapped__ = threaded_connect  # type: ignore[attr-defined]
    _execute.__wrapped__ = threaded_execute  # type: ignore[attr-defined]
    tiled_compat.set_private(Connection, "_connect", _connect)
    tiled_compat.set_private(Connection, "_execute", _execute)
    _installed = True
