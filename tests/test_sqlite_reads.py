"""scatterbroker.server.sqlite_reads: which aiosqlite calls run on the event loop, and that writers never block it.

Each statement reports the thread that ran it through an SQL function
(``sqlite3.Connection.create_function``), on real SQLite files.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading

import aiosqlite
import pytest

from scatterbroker.server import sqlite_reads

sqlite_reads.install()


def make_db(path, mode: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA journal_mode={mode}")
        db.execute("CREATE TABLE t (x INTEGER)")
        db.execute("INSERT INTO t VALUES (1)")


@contextlib.asynccontextmanager
async def open_db(path, **kwargs):
    """An aiosqlite connection as SQLAlchemy opens a file database (``check_same_thread=False``),
    with ``thread()``: the ident of the thread running the statement."""
    async with aiosqlite.connect(path, check_same_thread=False, **kwargs) as conn:
        await conn.create_function("thread", 0, threading.get_ident)
        yield conn


def test_wal_reads_run_on_the_loop_and_writes_on_the_thread(tmp_path):
    make_db(tmp_path / "c.db", "wal")

    async def main():
        loop_thread = threading.get_ident()
        async with open_db(tmp_path / "c.db") as conn:
            async with conn.execute("SELECT thread(), x FROM t") as cursor:
                (read_by, x), = await cursor.fetchall()
            await conn.execute("INSERT INTO t VALUES (thread())")
            await conn.commit()
            async with conn.execute("  select max(x) from t") as cursor:
                (written_by,), = await cursor.fetchall()
        return loop_thread, read_by, x, written_by

    loop_thread, read_by, x, written_by = asyncio.run(main())
    assert x == 1
    assert read_by == loop_thread
    assert written_by != loop_thread


def read_on_loop(path) -> bool:
    """Whether a SELECT on a new connection to ``path`` ran on the event loop's thread."""

    async def main():
        async with open_db(path) as conn:
            async with conn.execute("SELECT thread() FROM t") as cursor:
                (read_by,), = await cursor.fetchall()
        return threading.get_ident() == read_by

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["delete", "truncate"])
def test_other_journal_modes_keep_reads_on_the_thread(tmp_path, mode):
    make_db(tmp_path / "c.db", mode)
    assert not read_on_loop(tmp_path / "c.db")


def test_the_switch_turns_it_off(tmp_path, monkeypatch):
    make_db(tmp_path / "c.db", "wal")
    assert read_on_loop(tmp_path / "c.db")
    monkeypatch.setenv("SCATTERBROKER_SQLITE_READS_ON_LOOP", "0")
    assert not read_on_loop(tmp_path / "c.db")


def test_a_connection_bound_to_its_thread_falls_back(tmp_path):
    make_db(tmp_path / "c.db", "wal")

    async def main():
        async with aiosqlite.connect(tmp_path / "c.db") as conn:  # check_same_thread=True
            async with conn.execute("SELECT x FROM t") as cursor:
                return await cursor.fetchall()

    assert asyncio.run(main()) == [(1,)]


def test_a_waiting_writer_does_not_stop_the_loop(tmp_path):
    """One connection holds the write lock across awaits, as an ORM transaction does; a
    second one's INSERT waits for it on its thread while the loop reads and finishes the first."""
    make_db(tmp_path / "c.db", "wal")

    async def main():
        async with open_db(tmp_path / "c.db") as holder, open_db(tmp_path / "c.db", timeout=20) as waiter:
            await holder.execute("BEGIN IMMEDIATE")
            await holder.execute("INSERT INTO t VALUES (2)")
            blocked = asyncio.ensure_future(waiter.execute("INSERT INTO t VALUES (3)"))
            ticks = 0
            for _ in range(20):  # the loop keeps turning, and reads are answered, while the writer waits
                await asyncio.sleep(0.01)
                async with holder.execute("SELECT count(*) FROM t") as cursor:
                    assert (await cursor.fetchall()) == [(2,)]
                ticks += 1
            assert not blocked.done()
            await holder.commit()  # needs the loop: the waiting writer must not be holding it
            await asyncio.wait_for(blocked, 10)
            await waiter.commit()
            async with waiter.execute("SELECT x FROM t ORDER BY x") as cursor:
                rows = await cursor.fetchall()
            return ticks, rows

    ticks, rows = asyncio.run(main())
    assert ticks == 20 and rows == [(1,), (2,), (3,)]


def test_the_catalog_reads_on_the_loop(tmp_path):
    """A real server: Tiled's catalog (WAL) answers listings with reads on the loop."""
    import httpx
    from tiled.client import from_uri

    from conftest import API_KEY
    from scatterbroker.server.app import build_app, local_config, serve_in_thread

    seen: list[bool] = []
    original = sqlite_reads.reads_on_loop

    def spy(fn, args):
        ran = original(fn, args)
        seen.append(ran)
        return ran

    sqlite_reads.reads_on_loop = spy
    try:
        app = build_app(local_config(tmp_path / "catalog", [], api_key=API_KEY),
                        response_cache=False, entry_cache=False)
        with serve_in_thread(app) as url, httpx.Client(
                base_url=url + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            from_uri(url, api_key=API_KEY).create_container("a")
            seen.clear()
            assert http.get("search/").json()["data"][0]["id"] == "a"
    finally:
        sqlite_reads.reads_on_loop = original
    assert seen and sum(seen) >= len(seen) // 2, seen


def test_statements_that_write_stay_on_the_thread():
    db = sqlite3.connect(":memory:", check_same_thread=False)
    cursor = db.cursor()
    reads = ["SELECT 1", "  select x from t", "WITH a AS (SELECT 1) SELECT * FROM a"]
    writes = ["INSERT INTO t VALUES (1)", "UPDATE t SET x = 1", "DELETE FROM t", "PRAGMA journal_mode=WAL",
              "WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", "REPLACE INTO t VALUES (1)",
              "BEGIN IMMEDIATE", "CREATE TABLE u (x)", "SELECTED"]
    for fn in (cursor.execute, db.execute):
        assert all(sqlite_reads.reads_on_loop(fn, (sql, ())) for sql in reads)
        assert not any(sqlite_reads.reads_on_loop(fn, (sql, ())) for sql in writes)
    assert sqlite_reads.reads_on_loop(cursor.fetchall, ()) and sqlite_reads.reads_on_loop(db.rollback, ())
    assert not sqlite_reads.reads_on_loop(db.commit, ()) and not sqlite_reads.reads_on_loop(db.close, ())
    assert not sqlite_reads.reads_on_loop(cursor.executemany, ("SELECT 1", []))
    assert not sqlite_reads.reads_on_loop(db.executescript, ("SELECT 1;",))


def test_the_served_catalog_is_in_wal_mode(tmp_path):
    """Tiled's catalog creation leaves SQLite in rollback-journal mode; build_app switches it."""
    from conftest import API_KEY
    from scatterbroker.server.app import build_app, local_config

    config = local_config(tmp_path / "catalog", [], api_key=API_KEY)
    build_app(config)
    with contextlib.closing(sqlite3.connect(tmp_path / "catalog" / "catalog.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite_reads.enable_wal("sqlite:///:memory:") is None
    assert sqlite_reads.enable_wal("sqlite://") is None
    assert sqlite_reads.enable_wal(f"sqlite:///{tmp_path / 'absent.db'}") is None
    assert not (tmp_path / "absent.db").exists()
    assert sqlite_reads.enable_wal("postgresql://u@localhost/db") is None
