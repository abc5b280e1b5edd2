"""Answers of Tiled's read routes are replayed (scatterbroker.server.response_cache), never stale,
never to another principal, and never past a refused key.

A real server on loopback, written to through Tiled's client; every read that
follows a write must see the write. (Per-proposal keys: test_keys's
``test_a_proposal_key_sees_only_its_proposal`` lists the same container with
two keys that see different children, against a server with the cache on.)
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pyarrow as pa
import pytest

from conftest import API_KEY, change_files, files_that_change, five_scans_read_once, make_frames, start_server

from scatterbroker.server.response_cache import ResponseCache, enabled_by_default
from scatterbroker.server.app import build_app, local_config, serve_in_thread

HIT = "x-sb-cache"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return build_app(local_config(tmp_path_factory.mktemp("cache") / "data", [], api_key=API_KEY))


@pytest.fixture(scope="module")
def server(app):
    with serve_in_thread(app) as url:
        yield url


def cache_of(app) -> ResponseCache:
    """The app's ResponseCache instance (Starlette builds its middleware on the first request)."""
    layer = app.middleware_stack
    while not isinstance(layer, ResponseCache):
        layer = layer.app
    return layer


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as c:
        yield c


@pytest.fixture
def top(server, request):
    from tiled.client import from_uri

    return from_uri(server, api_key=API_KEY).create_container(request.node.name.replace("[", "_")[:40])


def twice(http: httpx.Client, path: str, **kw) -> httpx.Response:
    """Read ``path`` twice; the second must be a replay of the first, byte for byte."""
    first = http.get(path, **kw)
    second = http.get(path, **kw)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert second.headers.get(HIT) == "hit", (path, dict(second.headers))
    assert second.content == first.content
    for name in ("content-type", "etag", "content-encoding"):
        assert second.headers.get(name) == first.headers.get(name), name
    assert second.headers["x-tiled-request-id"] != first.headers["x-tiled-request-id"]
    return second


def test_a_repeated_read_is_replayed_as_it_was(http, top):
    top.create_container("a", metadata={"sample": "Si", "temperature_K": 300})
    name = top.item["id"]
    assert HIT not in http.get(f"metadata/{name}/a").headers  # a new answer: the write dropped it
    assert twice(http, f"metadata/{name}/a").json()["data"]["attributes"]["metadata"]["sample"] == "Si"
    listing = twice(http, f"search/{name}", params={"page[limit]": 10})
    assert [d["id"] for d in listing.json()["data"]] == ["a"]
    # msgpack and JSON are different answers to different Accept headers
    packed = twice(http, f"metadata/{name}/a", headers={"Accept": "application/x-msgpack"})
    assert packed.headers["content-type"].startswith("application/x-msgpack")


def test_every_write_is_seen_by_the_next_read(http, top):
    name = top.item["id"]
    twice(http, f"search/{name}")
    # a child created: the parent's listing shows it
    child = top.create_container("new", metadata={"n": 1})
    listing = http.get(f"search/{name}")
    assert HIT not in listing.headers and [d["id"] for d in listing.json()["data"]] == ["new"]
    # the child's metadata changed: its own metadata and the parent's listing show it
    twice(http, f"metadata/{name}/new")
    twice(http, f"search/{name}")
    child.update_metadata(metadata={"n": 2})
    assert http.get(f"metadata/{name}/new").json()["data"]["attributes"]["metadata"]["n"] == 2
    assert http.get(f"search/{name}").json()["data"][0]["attributes"]["metadata"]["n"] == 2
    # a subtree deleted from above: what was read below it is gone
    child.create_container("deep").create_container("deeper")
    twice(http, f"metadata/{name}/new/deep/deeper")
    child.delete(recursive=True)  # DELETE at new: deep and deeper go with it
    assert http.get(f"metadata/{name}/new/deep/deeper").status_code == 404
    assert http.get(f"search/{name}").json()["data"] == []


def count_of(listing: httpx.Response, child: str) -> int:
    """The count of children a listing shows for ``child``."""
    (entry,) = [d for d in listing.json()["data"] if d["id"] == child]
    return entry["attributes"]["structure"]["count"]


def test_a_listing_is_kept_past_writes_below_its_children(http, top):
    """A listing shows its children (metadata, structure, count of children), nothing deeper:
    a write two levels down keeps it, a write at a child or a deleted grandchild does not."""
    name = top.item["id"]
    a = top.create_container("a")
    b = a.create_container("b", metadata={"n": 1})
    twice(http, f"search/{name}")
    twice(http, f"search/{name}/a")
    b.update_metadata(metadata={"n": 2})  # a grandchild of the listed node
    assert http.get(f"search/{name}").headers.get(HIT) == "hit"
    below = http.get(f"search/{name}/a")
    assert HIT not in below.headers and below.json()["data"][0]["attributes"]["metadata"]["n"] == 2
    # an array two levels down grows (the watcher appending a frame)
    frames = b.write_array(np.zeros((1, 2, 2), dtype="int32"), key="frames")
    assert count_of(twice(http, f"search/{name}"), "a") == 1
    listing = twice(http, f"search/{name}/a/b")
    frames.patch(np.ones((1, 2, 2), dtype="int32"), offset=(1,), extend=True)
    assert http.get(f"search/{name}").headers.get(HIT) == "hit"
    shown = http.get(f"search/{name}/a/b")
    assert HIT not in shown.headers and shown.content != listing.content
    assert shown.json()["data"][0]["attributes"]["structure"]["shape"] == [2, 2, 2]
    # a grandchild deleted: the child's count in the listing, and the child's own metadata
    twice(http, f"metadata/{name}/a")
    gone = http.delete(f"metadata/{name}/a/b", params={"recursive": True, "external_only": False})
    assert gone.status_code == 200, gone.text
    assert count_of(http.get(f"search/{name}"), "a") == 0
    assert http.get(f"metadata/{name}/a").json()["data"]["attributes"]["structure"]["count"] == 0
    # and a write at the child itself
    twice(http, f"search/{name}")
    a.update_metadata(metadata={"sample": "Si"})
    listing = http.get(f"search/{name}")
    assert HIT not in listing.headers
    assert listing.json()["data"][0]["attributes"]["metadata"] == {"sample": "Si"}


def test_identical_requests_in_flight_share_one_answer(app, http, top):
    """Clients polling one node at once are answered by one Tiled request; none of them gets
    an answer from before a write it follows."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    name = top.item["id"]
    for i in range(60):  # a listing Tiled takes a while to answer
        top.create_container(f"c{i:02}", metadata={"i": i, "note": "x" * 200})
    cache = cache_of(app)
    path, params = f"search/{name}", {"page[limit]": 100}
    gate = Barrier(16)

    def poll(_):
        gate.wait()
        return http.get(path, params=params)

    for round_ in range(3):
        top[f"c{round_:02}"].update_metadata(metadata={"i": -round_})  # nothing kept survives this
        before = dict(cache.stats)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(poll, range(16)))
        assert all(r.status_code == 200 for r in answers)
        assert len({r.content for r in answers}) == 1
        assert answers[0].json()["data"][round_]["attributes"]["metadata"]["i"] == -round_
        assert cache.stats["miss"] - before["miss"] < 16
    assert cache.stats["joined"] > 0


def test_array_and_table_writes_are_seen(http, top):
    name = top.item["id"]
    arr = top.write_array(np.arange(12, dtype="int32").reshape(3, 4), key="frames")
    octet = {"Accept": "application/octet-stream"}
    got = twice(http, f"array/full/{name}/frames", headers=octet)
    assert np.array_equal(np.frombuffer(got.content, "int32"), np.arange(12))
    arr.write(np.full((3, 4), 7, dtype="int32"))
    again = http.get(f"array/full/{name}/frames", headers=octet)
    assert HIT not in again.headers and set(np.frombuffer(again.content, "int32")) == {7}
    # an array that grows (the watcher extends a live scan's frames): new shape, new rows
    twice(http, f"metadata/{name}/frames")
    arr.patch(np.full((1, 4), 9, dtype="int32"), offset=(3,), extend=True)
    assert http.get(f"metadata/{name}/frames").json()["data"]["attributes"]["structure"]["shape"] == [4, 4]
    # a table with rows appended (a scan's headers, one row per frame)
    table = top.create_appendable_table(pa.schema([("frame", pa.int64())]), key="headers")
    table.append_partition(0, pa.table({"frame": [0, 1]}))
    assert twice(http, f"table/full/{name}/headers", headers={"Accept": "application/json"}).json() == {
        "frame": [0, 1]}
    table.append_partition(0, pa.table({"frame": [2]}))
    assert http.get(f"table/full/{name}/headers", headers={"Accept": "application/json"}).json() == {
        "frame": [0, 1, 2]}


def test_a_replayed_answer_needs_a_valid_key(server, http, top):
    name = top.item["id"]
    twice(http, f"metadata/{name}")
    assert httpx.get(f"{server}/api/v1/metadata/{name}").status_code == 401
    wrong = httpx.get(f"{server}/api/v1/metadata/{name}", headers={"Authorization": "Apikey " + "ab" * 16})
    assert wrong.status_code == 401
    assert http.get(f"metadata/{name}").headers.get(HIT) == "hit"


def test_conditional_requests_and_large_answers_go_to_tiled(http, top):
    name = top.item["id"]
    noise = np.random.default_rng(0).random((600, 600))  # 2.9 MB, incompressible: > 1 MiB sent
    top.write_array(noise, key="big")
    octet = {"Accept": "application/octet-stream"}
    for _ in range(2):
        r = http.get(f"array/full/{name}/big", headers=octet)
        assert r.status_code == 200 and HIT not in r.headers
    top.write_array(np.ones(4), key="small")
    first = twice(http, f"array/full/{name}/small", headers=octet)
    etag = first.headers["etag"]
    r = http.get(f"array/full/{name}/small", headers={**octet, "If-None-Match": etag})
    assert r.status_code == 304 and HIT not in r.headers
    r = http.get(f"array/full/{name}/small", headers={**octet, "Cache-Control": "no-cache"})
    assert r.status_code == 200 and HIT not in r.headers


def test_files_changed_on_disk_are_read_afresh(tmp_path):
    """Raw files should not change, but a file replaced or grown in place must not be
    answered from before: answers that came from files are replayed only while they stat the same."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = tmp_path / "d"
    d.mkdir()
    frames = make_frames(3, seed=7)
    files_that_change(d, frames)
    with start_server(tmp_path / "db", [d]) as url, httpx.Client(
            base_url=url + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as http:
        register(from_uri(url, api_key=API_KEY), d, prefix="d")
        octet = {"Accept": "application/octet-stream"}
        shape = twice(http, "metadata/d/grow/data").json()["data"]["attributes"]["structure"]["shape"]
        assert shape == [2, *frames.shape[1:]]
        cbf = sorted(n for n in from_uri(url, api_key=API_KEY)["d"] if n != "grow")[0]
        got = twice(http, f"array/full/d/{cbf}", headers=octet)
        assert np.array_equal(np.frombuffer(got.content, "int32"), frames[0].ravel())
        change_files(d, frames)  # both replaced on disk, no catalog write
        after = http.get("metadata/d/grow/data")
        assert HIT not in after.headers and after.json()["data"]["attributes"]["structure"]["shape"][0] == 3
        got = http.get(f"array/full/d/{cbf}", headers=octet)
        assert HIT not in got.headers and np.array_equal(np.frombuffer(got.content, "int32"), frames[2].ravel())


def test_answers_not_asked_for_again_within_the_ttl_are_forgotten(monkeypatch, tmp_path):
    """Keys read once (each new frame of a live scan, a listing page) do not pile up until the
    size bound: whatever was not used for the TTL goes when the next answer is kept."""
    with five_scans_read_once(monkeypatch, tmp_path / "data", entry_cache=False) as (app, http):
        cache = cache_of(app)
        assert len(cache) >= 5  # and the client's first read of the root
        time.sleep(0.7)
        http.get("metadata/scan0")
        assert len(cache) == 1


def test_off_for_several_workers_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("SCATTERBROKER_RESPONSE_CACHE", raising=False)
    assert enabled_by_default(one_process=True) and not enabled_by_default(one_process=False)
    monkeypatch.setenv("SCATTERBROKER_RESPONSE_CACHE", "0")
    assert not enabled_by_default(one_process=True)
    monkeypatch.setenv("SCATTERBROKER_RESPONSE_CACHE", "1")
    assert enabled_by_default(one_process=False)
    app = build_app(local_config(tmp_path / "data", [], api_key=API_KEY), response_cache=False)
    assert not any(m.cls is ResponseCache for m in app.user_middleware)
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as http:
        for _ in range(2):
            assert HIT not in http.get("metadata/").headers
