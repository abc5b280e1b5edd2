"""Per-proposal keys and revocation on every channel, not only on reads (issue #18, item 7).

``test_keys.py`` covers reads, listings and deep search of the other proposal
(404 / left out), a read key creating a node or registering, a write key
creating or deleting in the other proposal, jobs filed against the other
proposal's data, another proposal's job record, and a revoked key reading
metadata. This module adds what was not tested there, on the same shipped
facility profile (its own server process, SQLite and PostgreSQL):

- websocket subscriptions (``/stream/single``) and closing a stream
  (``DELETE /stream/close``);
- search with a query and ``/distinct`` (metadata values of another proposal);
- a revoked key on every channel: listing, search, distinct, jobs (list,
  status, submit), websocket;
- a read key on every write route of its own proposal, and a write key on
  every write route of the other proposal (replace/patch metadata, register,
  replace a data source, close a stream).

Pipelines do not exist yet: nothing to test.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import httpx
import numpy as np
import pytest
from conftest import FRAME_SHAPE
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

# The facility profile as shipped, one server process per module and backend,
# keys issued with the CLI and both proposals registered (see test_keys.py).
from test_keys import Facility, facility, keys  # noqa: F401  (fixtures)

FRAMES = "raw/{p}/s1/scan1/frames"


def ws_url(facility: Facility, path: str) -> str:
    return facility.url.replace("http://", "ws://", 1) + f"/api/v1/stream/single/{path}"


def subscribe(facility: Facility, key: str, path: str) -> str:
    """Open a websocket subscription to ``path`` with ``key``: "accepted" if the
    server accepted it, else the refusal (an HTTP status, or a close code)."""
    try:
        with connect(ws_url(facility, path), additional_headers={"Authorization": f"Apikey {key}"},
                     open_timeout=30, close_timeout=5) as ws:
            try:  # accepted; a refusal after accepting arrives as a close
                ws.recv(timeout=1)
            except TimeoutError:
                return "accepted"
            except WebSocketException as err:
                return f"closed: {err}"
            return "accepted"
    except InvalidStatus as err:
        return f"HTTP {err.response.status_code}"


@pytest.fixture(scope="module")
def marked(facility, keys):
    """Metadata that tells the two proposals apart, written by the admin:
    ``marker`` on ``raw/p1`` and ``raw/p2`` (what search and distinct look at)."""
    with facility.http(keys["admin"]) as http:
        for proposal in ("p1", "p2"):
            r = http.patch(f"metadata/raw/{proposal}", json={
                "metadata": [{"op": "add", "path": "/marker", "value": f"{proposal}marker"}],
                "content-type": "application/json-patch+json", "specs": None})
            assert r.status_code == 200, r.text
    return keys


@pytest.fixture(scope="module")
def revoked(facility, keys):
    """A p1 read key and a p1 write key, each shown to work, then revoked."""
    from scatterbroker.server.keys import issue_key, revoke_key

    issued = {access: issue_key(facility.url, keys["admin"], access, ["p1"]) for access in ("read", "write")}
    for key in issued.values():
        with facility.http(key.secret) as http:
            assert http.get("search/raw").status_code == 200
            assert http.get("jobs").status_code == 200
        assert subscribe(facility, key.secret, FRAMES.format(p="p1")) == "accepted"
    for key in issued.values():
        revoke_key(facility.url, keys["admin"], key.principal, key.first_eight)
    return {access: key.secret for access, key in issued.items()}


# ------------------------------------------------------------------ websocket subscriptions


def test_a_proposal_key_subscribes_only_to_its_proposal(facility, keys):
    for access in ("read", "write"):
        key = keys[f"p1-{access}"]
        assert subscribe(facility, key, FRAMES.format(p="p1")) == "accepted"
        for path in ("raw/p2", "raw/p2/s1/scan1", FRAMES.format(p="p2"), "raw/p2/s1/scan1/headers"):
            answer = subscribe(facility, key, path)
            assert answer != "accepted", (access, path)
    # the other proposal's own key is accepted there: the refusal is the key's, not the node's
    assert subscribe(facility, keys["p2-read"], FRAMES.format(p="p2")) == "accepted"


def test_closing_a_stream_needs_write_access_to_its_proposal(facility, keys):
    with facility.http(keys["p1-read"]) as http:
        r = http.delete(f"stream/close/{FRAMES.format(p='p1')}")
        assert r.status_code in (401, 403), r.text
    with facility.http(keys["p1-write"]) as http:
        r = http.delete(f"stream/close/{FRAMES.format(p='p2')}")
        assert r.status_code == 404, r.text


# ------------------------------------------------------------------ search and distinct


def _eq(key: str, value: str) -> dict:
    return {"filter[eq][condition][key]": key, "filter[eq][condition][value]": json.dumps(value)}


def _fulltext(text: str) -> dict:
    # (one word: Tiled passes the text to SQLite's FTS5 unescaped, and answers 500
    # to "p2-marker", which FTS5 reads as a column filter)
    return {"filter[fulltext][condition][text]": text}


def test_search_and_distinct_never_show_another_proposal(facility, marked):
    with facility.http(marked["admin"]) as http:  # the data is there to be found
        found = http.get("search/raw", params=_eq("marker", "p2marker")).json()["data"]
        assert [d["id"] for d in found] == ["p2"]
        found = http.get("search/raw", params=_fulltext("p2marker")).json()["data"]
        assert [d["id"] for d in found] == ["p2"]
        values = http.get("distinct/raw", params={"metadata": "marker", "counts": True}).json()
        assert {v["value"] for v in values["metadata"]["marker"]} == {"p1marker", "p2marker"}
    for key in (marked["p1-read"], marked["p1-write"]):
        with facility.http(key) as http:
            r = http.get("search/raw", params=_eq("marker", "p2marker"))
            assert r.status_code == 200 and r.json()["data"] == [], r.text
            r = http.get("search/raw", params=_eq("marker", "p1marker"))
            assert [d["id"] for d in r.json()["data"]] == ["p1"], r.text
            r = http.get("search/raw", params=_fulltext("p2marker"))
            assert r.status_code == 200 and r.json()["data"] == [], r.text
            values = http.get("distinct/raw", params={"metadata": "marker", "counts": True,
                                                      "structure_families": True}).json()
            assert values["metadata"]["marker"] == [{"value": "p1marker", "count": 1}], values
            assert sum(f["count"] for f in values["structure_families"]) == 1, values
            r = http.get("distinct/raw/p2", params={"metadata": "marker"})
            assert r.status_code == 404, r.text


# ------------------------------------------------------------------ revoked keys


@pytest.mark.parametrize("channel", [
    "listing", "search", "distinct", "jobs-list", "jobs-status", "jobs-submit", "websocket",
])
def test_a_revoked_key_is_refused_on_every_channel(facility, revoked, channel):
    scan = f"{facility.url}/api/v1/metadata/raw/p1/s1/scan1"
    for access, key in revoked.items():
        if channel == "websocket":
            answer = subscribe(facility, key, FRAMES.format(p="p1"))
            assert answer != "accepted", (access, answer)
            continue
        with facility.http(key) as http:
            r = {
                "listing": lambda: http.get("search/raw"),
                "search": lambda: http.get("search/raw", params=_eq("marker", "p1marker")),
                "distinct": lambda: http.get("distinct/raw", params={"metadata": "marker"}),
                "jobs-list": lambda: http.get("jobs"),
                "jobs-status": lambda: http.get("jobs/no-such-job"),
                "jobs-submit": lambda: http.post("jobs", json={
                    "operation": "project", "inputs": [scan], "parameters": {"kind": "sum", "axis": 0}}),
            }[channel]()
            assert r.status_code == 401, (access, r.status_code, r.text)


# ------------------------------------------------------------------ writes: read keys, other proposals


def _write(http: httpx.Client, route: str, node: str, facility: Facility):
    """One write request of kind ``route`` at ``node`` (a proposal's scan)."""
    frame = facility.raw / node.split("/")[1] / "s1" / "scan1_00001.cbf"
    if route == "replace-metadata":
        return http.put(f"metadata/{node}", json={"metadata": {"defaced": True}})
    if route == "patch-metadata":
        return http.patch(f"metadata/{node}", json={
            "metadata": [{"op": "add", "path": "/defaced", "value": True}],
            "content-type": "application/json-patch+json", "specs": None})
    if route == "register":  # one of the proposal's own frames: allowed to a write key of it
        shape = FRAME_SHAPE
        source = DataSource(
            structure_family=StructureFamily.array, mimetype="image/x-cbf", parameters={},
            management=Management.external,
            structure=ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(np.dtype("<i4")),
                                     shape=shape, chunks=tuple((n,) for n in shape)),
            assets=[Asset(data_uri=frame.as_uri(), is_directory=False, parameter="data_uri")])
        return http.post(f"register/{node}", json={"id": "planted", "structure_family": "array",
                                                   "metadata": {}, "specs": [],
                                                   "data_sources": [asdict(source)]})
    if route == "replace-data-source":
        attrs = http.get(f"metadata/{node}/frames", params={"include_data_sources": True})
        if attrs.status_code != 200:  # another proposal's node: not even its data source is visible
            source = {"id": 1, "structure_family": "array", "mimetype": "image/x-cbf", "parameters": {},
                      "management": "external", "structure": None, "assets": []}
        else:
            (source,) = attrs.json()["data"]["attributes"]["data_sources"]
            source["parameters"] = {**source["parameters"], "ranges": [[1, 1]]}
        return http.put(f"data_source/{node}/frames", json={"data_source": source})
    if route == "close-stream":
        return http.delete(f"stream/close/{node}/frames")
    raise AssertionError(route)


WRITES = ["replace-metadata", "patch-metadata", "register", "replace-data-source", "close-stream"]


def _unchanged(facility: Facility, admin: str, proposal: str) -> None:
    with facility.http(admin) as http:
        scan = http.get(f"metadata/raw/{proposal}/s1/scan1").json()["data"]["attributes"]
        assert "defaced" not in scan["metadata"]
        assert "planted" not in [d["id"] for d in http.get(f"search/raw/{proposal}/s1/scan1").json()["data"]]
        frames = http.get(f"metadata/raw/{proposal}/s1/scan1/frames").json()["data"]["attributes"]
        assert frames["structure"]["shape"][0] == 4  # the four frames registered, not one


@pytest.mark.parametrize("route", WRITES)
def test_a_read_key_writes_nothing_in_its_own_proposal(facility, keys, route):
    with facility.http(keys["p1-read"]) as http:
        r = _write(http, route, "raw/p1/s1/scan1", facility)
        assert r.status_code in (401, 403), (route, r.status_code, r.text)
    _unchanged(facility, keys["admin"], "p1")


@pytest.mark.parametrize("route", WRITES)
def test_a_write_key_writes_nothing_in_another_proposal(facility, keys, route):
    with facility.http(keys["p1-write"]) as http:
        r = _write(http, route, "raw/p2/s1/scan1", facility)
        assert r.status_code == 404, (route, r.status_code, r.text)
    _unchanged(facility, keys["admin"], "p2")
