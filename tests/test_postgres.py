"""PostgreSQL catalogs: the same tree gives the same catalog as on SQLite (the
facility profile on PostgreSQL, with its key database, is in test_keys.py).

This is what docs/postgresql.md promises for moving a catalog: registering the
raw directories again into a PostgreSQL catalog gives identical node paths,
metadata, structures and tables, and a second run changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, SQLITE, Backend, start_server, write_tree


def catalog_dump(url: str) -> dict:
    """Every node the server lists, recursively: path -> what a client sees of it.

    Database-assigned ids (assets, revisions) are left out: they may differ.
    """
    out: dict = {}
    with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                      headers={"Authorization": f"Apikey {API_KEY}"}) as http:
        def visit(path: str) -> None:
            r = http.get(f"/metadata/{path}")
            assert r.status_code == 200, (path, r.text)
            attrs = r.json()["data"]["attributes"]
            structure = attrs["structure"]
            if attrs["structure_family"] == "container":
                structure = {"count": structure["count"]}
            out[path] = (attrs["structure_family"], attrs["specs"], attrs["metadata"],
                         structure)
            if attrs["structure_family"] == "table":
                r = http.get(f"/table/full/{path}", headers={"Accept": "application/json"})
                assert r.status_code == 200, (path, r.text)
                out[path + "#rows"] = r.json()
            if attrs["structure_family"] != "container":
                return
            offset = 0
            while True:
                r = http.get(f"/search/{path}", params={"page[offset]": offset,
                                                        "page[limit]": 100, "fields": ""})
                assert r.status_code == 200, (path, r.text)
                items = r.json()["data"]
                for item in items:
                    visit(f"{path}/{item['id']}".lstrip("/"))
                if len(items) < 100:
                    break
                offset += 100

        visit("")
    return out


def register_tree(url: str, root: Path) -> dict:
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    client = from_uri(url, api_key=API_KEY)
    return {d: register(client, root / d, prefix=d) for d in ("raw", "scans", "wrappers")}


def test_same_tree_gives_the_same_catalog_on_sqlite_and_postgresql(tmp_path, postgres):
    """Moving a catalog = registering the raw directories again: identical paths,
    metadata, structures and table rows; a second run is a no-op."""
    root = tmp_path / "beamline"
    root.mkdir()
    write_tree(root)
    dirs = [root / "raw", root / "scans", root / "wrappers"]
    dumps, reports = {}, {}
    for backend in (SQLITE, Backend("postgresql", postgres)):
        with start_server(tmp_path / f"db-{backend}", dirs, backend=backend) as url:
            reports[backend.name] = register_tree(url, root)
            dumps[backend.name] = catalog_dump(url)
            if backend.name == "postgresql":
                again = register_tree(url, root)
                assert all(not r.created and not r.updated for r in again.values()), again
                assert catalog_dump(url) == dumps["postgresql"]
    sqlite, pg = dumps["sqlite"], dumps["postgresql"]
    assert "raw/p1/s1/scan1/frames" in sqlite and "scans/s1/scan1/entry/data/data" in sqlite
    assert sorted(sqlite) == sorted(pg)
    for path in sqlite:
        assert sqlite[path] == pg[path], path
    for d in ("raw", "scans", "wrappers"):
        a, b = reports["sqlite"][d], reports["postgresql"][d]
        assert (sorted(a.created), sorted(a.failed)) == (sorted(b.created), sorted(b.failed))


def test_postgres_fixture_gives_each_server_its_own_databases(postgres):
    a = Backend("postgresql", postgres).config(Path("/tmp/sb-unused-a"), [])
    b = Backend("postgresql", postgres).config(Path("/tmp/sb-unused-b"), [])
    uri = lambda c: c["trees"][0]["args"]["uri"]  # noqa: E731
    assert uri(a) != uri(b) and uri(a).startswith("postgresql+asyncpg://")
    tables = [c["trees"][0]["args"]["writable_storage"][-1] for c in (a, b)]
    assert tables[0] != tables[1] and all(t.startswith("postgresql://") for t in tables)


@pytest.mark.parametrize("variable", ["CI"])
def test_missing_postgresql_fails_under_ci_and_skips_otherwise(pytester, variable, monkeypatch):
    """Without initdb/pg_ctl: a skip with a reason locally, a failure when CI is set."""
    conftest = Path(__file__).with_name("conftest.py").read_text()
    pytester.makeconftest(conftest)
    pytester.makepyfile(postgres=Path(__file__).with_name("postgres.py").read_text()
                        .replace("def find_bindir() -> Path | None:",
                                 "def find_bindir() -> Path | None:\n    return None\n\n\n"
                                 "def _unused() -> Path | None:"))
    pytester.makepyfile(test_it="def test_pg(backend):\n    assert backend.name\n")
    monkeypatch.delenv(variable, raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*PostgreSQL catalog tests skipped*initdb*"])
    monkeypatch.setenv(variable, "1")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*CI is set but PostgreSQL server binaries*"])
