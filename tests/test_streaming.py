"""Tiled's streaming cache in one process keeps its messages within a byte bound
(scatterbroker.server.streaming), where Tiled's own keeps the last 1000 of any size.

Subscribers hearing each new frame of a live scan through this datastore:
test_watch's ``test_frames_appear_one_by_one_and_subscribers_hear``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
from tiled.server.streaming import TTLCacheDatastore

from conftest import API_KEY

from scatterbroker.server.app import build_app, local_config, serve_in_thread
from scatterbroker.server.streaming import DATASTORE, BoundedMemoryDatastore, memory_config


def array_ref(n_assets: int) -> dict:
    """A message like Tiled's for a data source of a scan with ``n_assets`` frame files."""
    return {"type": "array-ref", "data_source": {"assets": [
        {"data_uri": f"file://localhost/raw/scan/frame_{i:05d}.cbf", "num": i} for i in range(n_assets)]}}


def kept(datastore, node: str, sequences) -> dict[int, int]:
    """Sequence -> JSON bytes of each message still there, read back as a subscriber would."""
    async def read():
        out = {}
        for s in sequences:
            (metadata,) = await datastore.get(f"data:{node}:{s}", "metadata")
            if metadata is not None:
                assert orjson.loads(metadata)["data_source"]["assets"][-1]["num"] == s - 1
                out[s] = len(metadata)
        return out
    return asyncio.run(read())


def append_scan(datastore, frames: int) -> None:
    """Publish the messages of a scan appended one frame at a time: each names every frame so far."""
    async def publish():
        for s in range(1, frames + 1):
            await datastore.set("scan", s, array_ref(s))
    asyncio.run(publish())


def test_a_live_scan_keeps_its_last_messages_within_the_bound():
    bounded = BoundedMemoryDatastore({"max_bytes": 200_000})
    append_scan(bounded, 300)
    found = kept(bounded, "scan", range(1, 301))
    assert sum(found.values()) <= 200_000
    assert 300 in found and 1 not in found
    assert sorted(found) == list(range(min(found), 301))  # the newest ones, oldest out first
    # Tiled's own keeps all 300 (3 MB here: it grows as the square of the scan's length)
    stock = TTLCacheDatastore({})
    append_scan(stock, 300)
    everything = kept(stock, "scan", range(1, 301))
    assert len(everything) == 300 and sum(everything.values()) > 10 * 200_000


def test_a_message_larger_than_the_bound_is_not_kept_and_the_next_one_is():
    datastore = BoundedMemoryDatastore({"max_bytes": 5_000})

    async def publish():
        await datastore.set("scan", 1, array_ref(500))  # ~35 kB
        await datastore.set("scan", 2, array_ref(2))
    asyncio.run(publish())
    assert datastore.not_kept == 1
    assert kept(datastore, "scan", [1, 2]).keys() == {2}


def test_appended_rows_count_toward_the_bound():
    """A ``table-data`` message carries the appended rows (the request body) as its payload."""
    datastore = BoundedMemoryDatastore({"max_bytes": 50_000})

    async def publish():
        for s in range(1, 11):
            await datastore.set("headers", s, {"type": "table-data", "append": True}, payload=b"r" * 12_000)
    asyncio.run(publish())

    async def payloads():
        return [(await datastore.get(f"data:headers:{s}", "payload"))[0] for s in range(1, 11)]
    found = [p for p in asyncio.run(payloads()) if p is not None]
    assert 1 <= len(found) <= 4 and found[-1] == b"r" * 12_000
    assert datastore.kept_bytes <= 50_000


def test_messages_older_than_data_ttl_go():
    datastore = BoundedMemoryDatastore({"max_bytes": 1 << 20, "data_ttl": 0.2})
    append_scan(datastore, 2)
    time.sleep(0.3)

    async def publish():
        await datastore.set("scan", 3, array_ref(3))
    asyncio.run(publish())
    assert kept(datastore, "scan", [1, 2, 3]).keys() == {3}


def test_memory_configs_become_bounded_and_redis_is_left_alone():
    assert memory_config(None) == {"datastore": DATASTORE}
    assert memory_config({"uri": "memory", "data_ttl": 60}) == {"datastore": DATASTORE, "data_ttl": 60}
    redis = {"uri": "redis://cache:6379", "data_ttl": 60}
    assert memory_config(redis) == redis


def test_the_server_streams_through_the_bounded_datastore(monkeypatch, tmp_path):
    monkeypatch.setenv("SCATTERBROKER_STREAM_CACHE_BYTES", "4000")
    app = build_app(local_config(tmp_path / "data", [], api_key=API_KEY))
    with serve_in_thread(app) as url:
        from tiled.client import from_uri

        client = from_uri(url, api_key=API_KEY)
        for i in range(30):  # each announces "container-child-created" (~300 bytes) at the root
            client.create_container(f"scan{i}", metadata={"sample": "Si", "n": i})
        datastore = app.state.root_tree.context.streaming_cache._datastore
        assert isinstance(datastore, BoundedMemoryDatastore)
        assert 0 < datastore.kept_bytes <= 4000
        assert httpx.get(f"{url}/api/v1/metadata/scan29", headers={"Authorization": f"Apikey {API_KEY}"}
                         ).status_code == 200
