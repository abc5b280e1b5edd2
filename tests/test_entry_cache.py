"""Nodes found by walking the catalog are reused (scatterbroker.server.entry_cache), never past a write
to them or above them, never past a change of the files they were found in.

A real server on loopback with the response cache *off*, so that every read is
answered by Tiled from the entry it gets; written through Tiled's client. The
cache's own counters (same process: the server runs in a thread) show that a
read was answered from a kept entry, so each check of freshness is a check of
a reused entry. (Per-proposal keys: test_keys's
``test_a_proposal_key_sees_only_its_proposal`` lists the same container with
two keys that see different children; with the key's identity left out of
the cache key, the second key would get the first's filtered container.)
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from conftest import API_KEY, change_files, files_that_change, five_scans_read_once, make_frames, write_cbf

from scatterbroker.server import entry_cache
from scatterbroker.server.app import build_app, local_config, serve_in_thread

OCTET = {"Accept": "application/octet-stream"}
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def served(tmp_path_factory, data):
    app = build_app(local_config(tmp_path_factory.mktemp("walks") / "data", [data], api_key=API_KEY),
                    response_cache=False)
    with serve_in_thread(app) as url:
        yield url, entry_cache.cache_for(app.state.root_tree)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[0] + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as c:
        yield c


@pytest.fixture
def cache(served):
    return served[1]


@pytest.fixture
def top(served, request):
    from tiled.client import from_uri

    return from_uri(served[0], api_key=API_KEY).create_container(request.node.name[:40])


def reused(cache: entry_cache.EntryCache, read):
    """``read()``'s result, asserting it was answered from a kept entry."""
    before = cache.stats["hit"]
    result = read()
    assert cache.stats["hit"] > before, "not answered from a kept entry"
    return result


def metadata(http: httpx.Client, path: str) -> dict:
    r = http.get(f"metadata/{path}")
    assert r.status_code == 200, r.text
    return r.json()["data"]["attributes"]


def test_off_unless_one_process(monkeypatch, tmp_path):
    app = build_app(local_config(tmp_path / "data", [], api_key=API_KEY), entry_cache=False)
    assert entry_cache.cache_for(app.state.root_tree) is None
    monkeypatch.setenv("SCATTERBROKER_ENTRY_CACHE", "0")
    app = build_app(local_config(tmp_path / "data2", [], api_key=API_KEY))
    assert entry_cache.cache_for(app.state.root_tree) is None


def test_entries_not_asked_for_again_within_the_ttl_are_forgotten(monkeypatch, tmp_path):
    """Each kept entry holds a node and its adapter (open files, parsed NeXus trees): entries of
    nodes nobody asked for within the TTL go when the next one is kept, not at the size bound."""
    with five_scans_read_once(monkeypatch, tmp_path / "data", response_cache=False) as (app, http):
        cache = entry_cache.cache_for(app.state.root_tree)
        assert len(cache) == 5
        time.sleep(0.7)
        metadata(http, "scan0")
        assert len(cache) == 1


def test_a_walk_is_reused_until_the_node_or_one_above_is_written(http, cache, top):
    name = top.item["id"]
    a = top.create_container("a", metadata={"n": 1})
    b = a.create_container("b", metadata={"m": 1})
    metadata(http, f"{name}/a/b")
    assert reused(cache, lambda: metadata(http, f"{name}/a/b"))["metadata"] == {"m": 1}
    # the node itself written
    b.update_metadata(metadata={"m": 2})
    assert metadata(http, f"{name}/a/b")["metadata"] == {"m": 2}
    assert reused(cache, lambda: metadata(http, f"{name}/a/b"))["metadata"] == {"m": 2}
    # an ancestor's metadata changed: its own entry is walked again, the one below is still good
    # (without an access policy deciding by metadata: see test_write_log)
    a.update_metadata(metadata={"n": 2})
    assert reused(cache, lambda: metadata(http, f"{name}/a/b"))["metadata"] == {"m": 2}
    assert metadata(http, f"{name}/a")["metadata"] == {"n": 2}
    # a child created (POST to the container's URL: a write at the container)
    http.get(f"search/{name}/a/b")
    reused(cache, lambda: http.get(f"search/{name}/a/b"))
    b.create_container("c")
    assert [d["id"] for d in http.get(f"search/{name}/a/b").json()["data"]] == ["c"]
    # a grandchild's metadata changed: the kept container is still good, its listing is queried afresh
    c = b["c"]
    d = c.create_container("d")
    http.get(f"search/{name}/a/b/c")
    d.update_metadata(metadata={"deep": True})
    listing = reused(cache, lambda: http.get(f"search/{name}/a/b/c").json()["data"])
    assert listing[0]["attributes"]["metadata"] == {"deep": True}
    # an ancestor deleted with its subtree: the kept entries below it are gone
    metadata(http, f"{name}/a/b/c")
    reused(cache, lambda: metadata(http, f"{name}/a/b/c"))
    a.delete(recursive=True)
    for path in (f"{name}/a/b/c", f"{name}/a/b", f"{name}/a"):
        assert http.get(f"metadata/{path}").status_code == 404, path
    # and re-created under the same names: the new nodes, not the old ones
    top.create_container("a").create_container("b", metadata={"m": "new"})
    assert metadata(http, f"{name}/a/b")["metadata"] == {"m": "new"}
    # a write spelled with empty segments is the same node to Tiled, and to the cache
    reused(cache, lambda: metadata(http, f"{name}/a/b"))
    patched = http.patch(f"metadata/{name}//a/b/", json={
        "content-type": "application/merge-patch+json", "metadata": {"m": "patched"}, "specs": None})
    assert patched.status_code == 200, patched.text
    assert metadata(http, f"{name}/a/b")["metadata"] == {"m": "patched"}


def test_arrays_and_tables_written_are_read_at_once(http, cache, top):
    name = top.item["id"]
    arr = top.write_array(np.arange(12, dtype="int32").reshape(3, 4), key="frames")
    http.get(f"array/full/{name}/frames", headers=OCTET)
    got = reused(cache, lambda: http.get(f"array/full/{name}/frames", headers=OCTET))
    assert np.array_equal(np.frombuffer(got.content, "int32"), np.arange(12))
    arr.write(np.full((3, 4), 7, dtype="int32"))  # new data, same node: the kept entry reads it
    got = reused(cache, lambda: http.get(f"array/full/{name}/frames", headers=OCTET))
    assert set(np.frombuffer(got.content, "int32")) == {7}
    # a live scan's frames grow: the next read knows the new shape and its rows
    metadata(http, f"{name}/frames")
    reused(cache, lambda: metadata(http, f"{name}/frames"))
    arr.patch(np.full((1, 4), 9, dtype="int32"), offset=(3,), extend=True)
    assert metadata(http, f"{name}/frames")["structure"]["shape"] == [4, 4]
    last = http.get(f"array/full/{name}/frames", params={"slice": "3"}, headers=OCTET)
    assert last.status_code == 200 and set(np.frombuffer(last.content, "int32")) == {9}
    # a scan's headers table with rows appended
    table = top.create_appendable_table(pa.schema([("frame", pa.int64())]), key="headers")
    table.append_partition(0, pa.table({"frame": [0, 1]}))
    http.get(f"table/full/{name}/headers", headers=JSON)
    assert reused(cache, lambda: http.get(f"table/full/{name}/headers", headers=JSON)).json() == {"frame": [0, 1]}
    table.append_partition(0, pa.table({"frame": [2]}))  # rows appended: the same node
    assert reused(cache, lambda: http.get(f"table/full/{name}/headers", headers=JSON)).json() == {
        "frame": [0, 1, 2]}


def test_files_changed_on_disk_are_found_afresh(served, http, cache, data):
    """Nodes inside a NeXus/HDF5 file are found by opening it, and a catalog node's reader is
    built from its files: both are reused only while those files stat the same."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = data / "onfile"
    d.mkdir()
    frames = make_frames(3, seed=11)
    files_that_change(d, frames)
    register(from_uri(served[0], api_key=API_KEY), d, prefix="onfile")
    assert metadata(http, "onfile/grow/data")["structure"]["shape"][0] == 2
    assert reused(cache, lambda: metadata(http, "onfile/grow/data"))["structure"]["shape"][0] == 2
    cbf = next(n for n in from_uri(served[0], api_key=API_KEY)["onfile"] if n != "grow")
    http.get(f"array/full/onfile/{cbf}", headers=OCTET)
    got = reused(cache, lambda: http.get(f"array/full/onfile/{cbf}", headers=OCTET))
    assert np.array_equal(np.frombuffer(got.content, "int32"), frames[0].ravel())
    change_files(d, frames)  # both replaced on disk, no catalog write
    assert metadata(http, "onfile/grow/data")["structure"]["shape"][0] == 3
    got = http.get(f"array/full/onfile/{cbf}", headers=OCTET)
    assert np.array_equal(np.frombuffer(got.content, "int32"), frames[2].ravel())
    # the fast route reads through the same kept entries
    fast = http.get("sb/frames/onfile/grow/data", params={"slice": "2"})
    assert fast.status_code == 200 and np.array_equal(np.frombuffer(fast.content, "int32"), frames[2].ravel())


def test_concurrent_first_reads_agree(served, cache, top):
    """Many requests for a node nobody has read yet: one walk or several, the same answer each."""
    name = top.item["id"]
    top.create_container("x").create_container("y", metadata={"k": "v"})

    async def read_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served[0] + "/api/v1/",
                                     headers={"Authorization": f"Apikey {API_KEY}"}) as c:
            return await asyncio.gather(*(c.get(f"metadata/{name}/x/y") for _ in range(16)))

    answers = asyncio.run(read_all())
    assert {r.status_code for r in answers} == {200}
    assert {str(r.json()["data"]["attributes"]["metadata"]) for r in answers} == {"{'k': 'v'}"}


def test_a_nodes_reader_is_rebuilt_when_a_file_it_opened_changes(tmp_path):
    """The reader a kept catalog node built (``get_adapter``) is reused only while the files
    it confined stat the same. Our adapters reopen their files anyway; this guards readers
    that keep what they read when built. The node here is a stand-in with Tiled's
    ``get_adapter`` protocol, confining a real file with the real ``confine``."""
    from scatterbroker.adapters.roots import confine, normalize_roots

    frame = tmp_path / "f.cbf"
    write_cbf(frame, make_frames(1, seed=1)[0])
    roots = normalize_roots([tmp_path])

    class Node:
        built = 0

        async def get_adapter(self):
            Node.built += 1
            return confine(frame, roots)

    async def twice_then_changed() -> list:
        node = Node()
        entry_cache._reuse_io_adapter(node)
        got = [await node.get_adapter(), await node.get_adapter()]
        write_cbf(tmp_path / ".f.tmp", make_frames(1, seed=2)[0])
        (tmp_path / ".f.tmp").replace(frame)
        return [*got, await node.get_adapter()]

    first, second, third = asyncio.run(twice_then_changed())
    assert Node.built == 2 and first == second == third
