"""Tiled's in-process streaming cache, bounded by bytes.

Tiled publishes a message on every write a websocket subscriber may follow (a
child created, metadata updated, a data source put, table rows appended) and
keeps it so that a subscriber can replay what it missed. Its in-memory
datastore keeps the last 1000 messages for 30 days, whatever their size, and
a ``table-data`` message carries the appended rows themselves (the request
body: 12 KiB for one 31-column row). A watcher appending one ``headers`` row
per frame thus grew the server by ~20 KiB per frame, +11.5 MB/min at 5
frames/s with almost no reads (``benchmarks/load.py --clients 1 --think 1``;
+0.1 MB/min with this bound), and +20-28 MB/min under the full load.

Kept messages cost more than their bytes: each one kept for long among the
short-lived allocations of the requests around it pins heap pages. With a 4
MiB bound the full load still grew +16 MB/min over 180 s, with 100 kB +0.8.
:class:`BoundedMemoryDatastore` is the same datastore with its messages
bounded by their total bytes (``max_bytes``, ``SCATTERBROKER_STREAM_CACHE_BYTES``,
256 KiB: ~180 messages of that 5 frames/s scan, its last ~13 s) and kept
``data_ttl`` seconds (3600, Tiled's default for Redis), oldest first out. It
is a replay buffer for subscribers that reconnect, not a history: one that
falls further behind misses the messages in between, as with Redis's TTL,
and one message larger than the whole bound is announced but not kept (the
subscriber skips it, as it skips an expired one). :func:`memory_config`
turns the ``{"uri": "memory"}`` that :func:`scatterbroker.server.app.catalog`
defaults to into this datastore; Redis configs are left as they are.
"""

from __future__ import annotations

import logging
from typing import Any

import cachetools
from tiled.server.streaming import TTLCacheDatastore, register_datastore, safe_json_dump

from scatterbroker.environment import env_number
from scatterbroker.server import tiled_compat

__all__ = ["DATASTORE", "BoundedMemoryDatastore", "memory_config", "message_bytes"]

#: the name this datastore is registered under in Tiled's streaming-cache registry
DATASTORE = "scatterbroker-memory"
#: bytes a kept message costs besides its content: its dict, key and TTL link
BOOKKEEPING = 512

logger = logging.getLogger(__name__)


def message_bytes(mapping: dict[str, Any]) -> int:
    """Bytes a kept message holds: its JSON metadata, its payload if any, and :data:`BOOKKEEPING`."""
    return len(mapping.get("metadata") or b"") + len(mapping.get("payload") or b"") + BOOKKEEPING


@register_datastore(DATASTORE)
class BoundedMemoryDatastore(TTLCacheDatastore):
    """Tiled's ``TTLCacheDatastore`` with messages bounded by bytes (see the module docstring).

    ``settings``: ``max_bytes`` (all kept messages), ``data_ttl`` (s a message
    is kept), ``seq_ttl`` (s a node's sequence counter is kept) and ``maxsize``
    (nodes whose counters are kept, 10000).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__({"maxsize": 10_000, "seq_ttl": 2_592_000, **settings})
        self.max_bytes = int(settings.get("max_bytes")
                             or env_number("SCATTERBROKER_STREAM_CACHE_BYTES", 256 << 10))
        tiled_compat.set_private(self, "_data_cache", cachetools.TTLCache(
            maxsize=self.max_bytes, ttl=float(settings.get("data_ttl", 3600)), getsizeof=message_bytes))
        self.not_kept = 0  # messages larger than max_bytes

    @property
    def kept_bytes(self) -> int:
        """Bytes of the messages kept now."""
        return int(tiled_compat.private(self, "_data_cache").currsize)

    async def set(self, node_id: str, sequence: int, metadata: Any, payload: bytes | None = None) -> None:
        mapping: dict[str, Any] = {"sequence": sequence, "metadata": safe_json_dump(metadata)}
        if payload:
            mapping["payload"] = payload
        size = message_bytes(mapping)
        if size > self.max_bytes:
            self.not_kept += 1
            logger.warning("streaming message %s of node %s is %d bytes, more than the %d kept in all: "
                           "announced, not kept", sequence, node_id, size, self.max_bytes)
        else:
            async with tiled_compat.private(self, "_lock"):
                tiled_compat.private(self, "_data_cache")[f"data:{node_id}:{sequence}"] = mapping
        await tiled_compat.private(self, "_pubsub").publish(f"notify:{node_id}", sequence)


def memory_config(cache_config: dict[str, Any] | None) -> dict[str, Any]:
    """Tiled's ``cache_config`` for a tree: ``None`` or an in-memory one (``uri: memory``) becomes
    :class:`BoundedMemoryDatastore` (other keys kept); anything else (Redis) is returned as is.
    Only on the Tiled whose datastore it extends (:mod:`scatterbroker.server.tiled_compat`, piece
    ``bounded-stream-cache``): else Tiled's own memory datastore, and one line in the log."""
    config = dict(cache_config or {"uri": "memory"})
    uri = str(config.get("uri") or "")
    if uri.startswith("memory") and not config.get("sentinels") \
            and tiled_compat.install("bounded-stream-cache", lambda: None):
        # Tiled picks its own memory datastore for a "memory" URI; with no URI it takes ours.
        config.pop("uri")
        config["datastore"] = DATASTORE
    return config
