"""One bounded, thread-safe cache for every in-process cache of the project.

Each cache here keeps what it learnt from a file (an open handle, a decoded
frame, a verdict on a dataset's storage) only while the file is the same, by
one rule: an entry is stored with the file's stamp (device, inode, size,
modification time: :func:`scatterbroker.adapters.roots.file_stamp`) and found
again only under that stamp; any other stamp drops it. Caches of what came
from the catalog keep the write tick in their key instead
(``scatterbroker.server.write_log``).

:class:`LRU` is cachetools' ``LRUCache`` (bounded by count, or by a size
function such as ``ndarray.nbytes``) behind a lock, with what it evicts handed
back to the caller, so an evicted file handle is closed outside the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import cachetools

__all__ = ["LRU"]

V = TypeVar("V")
_MISSING = object()


class _Evicting(cachetools.LRUCache):
    """An LRUCache that records what it evicts (``popitem``) for its owner."""

    def __init__(self, maxsize: int, getsizeof: Callable[[Any], int] | None) -> None:
        super().__init__(maxsize, getsizeof=getsizeof)
        self.evicted: list[Any] = []

    def popitem(self) -> tuple[Any, Any]:
        key, value = super().popitem()
        self.evicted.append(value)
        return key, value


class LRU(Generic[V]):
    """A thread-safe least-recently-used map bounded by ``maxsize``.

    Parameters
    ----------
    maxsize
        Most entries, or with ``sizeof`` the largest total size (e.g. bytes).
    sizeof
        Size of one value; an entry larger than ``maxsize`` is not kept.

    ``get``/``put`` take an optional ``stamp``: a value put with a stamp is
    returned only to a ``get`` with the same stamp (and dropped on a
    mismatch), the one freshness rule for what came from a file.
    """

    def __init__(self, maxsize: int, *, sizeof: Callable[[V], int] | None = None) -> None:
        self.maxsize = max(1, int(maxsize)) if sizeof is None else max(0, int(maxsize))
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self._data = _Evicting(self.maxsize, (lambda e: sizeof(e[1])) if sizeof else None)
        self.stats = {"hit": 0, "miss": 0}

    def get(self, key: Hashable, default: Any = None, *, stamp: Any = None) -> V | Any:
        """The value kept under ``key`` (and ``stamp``), or ``default``."""
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING or entry[0] != stamp:
                if entry is not _MISSING:
                    del self._data[key]  # the file changed: what came from it is stale
                self.stats["miss"] += 1
                return default
            self.stats["hit"] += 1
            return entry[1]

    def put(self, key: Hashable, value: V, *, stamp: Any = None) -> list[V]:
        """Keep ``value`` under ``key``; return the values this displaced (evicted or
        replaced), for the caller to release outside the cache's lock."""
        if self._sizeof is not None and self._sizeof(value) > self.maxsize:
            return []
        with self._lock:
            old = self._data.pop(key, _MISSING)
            self._data[key] = (stamp, value)
            out = [e[1] for e in self._data.evicted] + ([] if old is _MISSING else [old[1]])
            self._data.evicted.clear()
        return [v for v in out if v is not value]

    def pop(self, key: Hashable, default: Any = None) -> V | Any:
        with self._lock:
            entry = self._data.pop(key, _MISSING)
        return default if entry is _MISSING else entry[1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    @property
    def size(self) -> int:
        """Entries kept, or with ``sizeof`` their total size."""
        with self._lock:
            return int(self._data.currsize)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data
