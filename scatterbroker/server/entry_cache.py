"""Nodes Tiled's ``get_entry`` found, reused by the same principal until a write touches them.

Every read route of Tiled starts by walking the catalog from the root to the
node: for each path segment one ``SELECT`` of the child (with the access
policy's condition) and two more loading its data sources and structure, each
a round trip to the database through the one event-loop thread. A frame of
``scans/p1/s1/scan/entry/data/data`` costs ~15 statements before a byte is
read; under 32 clients each round trip waits behind every other request's
(docs/performance.md, "Load"). The walk's result -- the node's adapter -- is
the same for the next request of the same principal as long as nothing was
written on the way, so :class:`EntryCache` keeps it:

* **Same identity only.** An entry is reused for the same path, the same
  required scopes and structure families, and the same principal, access
  tags, scopes and session state (:func:`who`): the
  access policy's decisions at every segment are the ones taken for it. The
  principal itself is authenticated afresh by Tiled on every request, before
  the route asks for the entry.
* **Reads only.** Only walks asking for read scopes (``read:metadata``,
  ``read:data``) are cached; every write route walks as Tiled does.
* **Until a write.** An entry is dropped when, after its walk started, a
  write changed the node's catalog row, or a write at one of its ancestors
  may have changed what lies below it (:class:`scatterbroker.server.write_log.WriteLog`,
  ``reach="entry"``: a table row appended to the node, or anything written
  further down, say a frame appended to a child, leaves the node's own row
  as it was, and the routes query a container's children afresh anyway). A
  walk that overlapped a write is not kept. A new walk starts from the
  deepest ancestor still kept for the same identity (Tiled's ``get_entry``
  with that node as its root), and concurrent walks of one node with no
  write between them are one walk.
* **Until a file changes.** Nodes inside a file (the groups and datasets of a
  registered NeXus file) are found by opening it; such an entry is reused
  only while every file opened for it stats the same (device, inode, size,
  mtime). Reading data from a catalog node still opens its files, confined
  and checked, on every request; the reader Tiled's ``get_adapter`` builds
  for a kept catalog node is reused while the files it confined stat the
  same.
* **Bounded.** At most ``size`` (4096) entries, least recently used first
  out, each for at most ``SCATTERBROKER_RESPONSE_CACHE_TTL`` seconds (10).

:func:`install` sets it up for one app; Tiled's routes call ``get_entry`` by
the name their module imported, which :func:`install` points at
:func:`get_entry` here. For an app without a cache that is Tiled's own walk.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import tiled.server.dependencies
import tiled.server.router
from starlette.exceptions import HTTPException as StarletteHTTPException

from scatterbroker.adapters.roots import files_read, one_stamp_each, unchanged
from scatterbroker.server import tiled_compat
from scatterbroker.server.write_log import WriteLog, ancestors, cache_ttl, forget_expired, node_path

__all__ = ["EntryCache", "install", "get_entry", "cache_for", "who"]

#: what Tiled's own walk is (kept before the router's name is pointed here)
tiled_get_entry = tiled.server.dependencies.get_entry
#: scopes a cached walk may ask for: those of Tiled's read routes
READ_SCOPES = frozenset({"read:metadata", "read:data"})
#: the cache of each app's catalog tree (weakly: a tree and its entries go with their app)
_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def who(principal: Any, access_tags: Any, scopes: Any, session_state: Any) -> tuple:
    """A hashable key of a request's identity: principal, access tags, scopes, session state."""
    ident = None if principal is None else (
        str(getattr(principal, "uuid", None) or repr(principal)), str(getattr(principal, "type", "")))
    tags = None if access_tags is None else tuple(sorted(map(str, access_tags)))
    scope_key = tuple(sorted(map(str, scopes or ())))
    state = None if not session_state else json.dumps(session_state, sort_keys=True, default=str)
    return ident, tags, scope_key, state


@dataclass
class _Kept:
    start: int  # the write tick when its walk started
    born: float  # time.monotonic() when kept
    entry: Any
    files: tuple[tuple[str, tuple[int, ...]], ...]  # (path, stamp) of each file opened by the walk


async def _noting_files(make: Callable[[], Awaitable[Any]]) -> tuple[Any, list]:
    """``await make()``, and the ``(path, stamp)`` of every file it confined or opened."""
    files: list = []
    token = files_read.set(files)
    try:
        result = await make()
    finally:
        files_read.reset(token)
    return result, files


def _pass_on(files: Any) -> None:
    """Tell the response cache (if it is keeping this answer) which files the answer depends on."""
    outer = files_read.get()
    if outer is not None:
        outer.extend(files)


class EntryCache:
    """The entries of one catalog tree; see the module docstring."""

    def __init__(self, log: WriteLog, ttl: float | None = None, size: int = 4096) -> None:
        self.log = log
        self.ttl = cache_ttl() if ttl is None else float(ttl)
        self.size = size
        self._kept: OrderedDict[tuple, _Kept] = OrderedDict()
        self._flights: dict[tuple, tuple[int, asyncio.Future]] = {}
        self._by_node: dict[tuple, _Kept] = {}  # (node, identity) -> the last entry kept for it
        self.stats = {"hit": 0, "joined": 0, "miss": 0, "partial": 0}

    def __len__(self) -> int:
        """How many entries are kept."""
        return len(self._kept)

    def _fresh(self, node: str, kept: _Kept) -> bool:
        return (time.monotonic() - kept.born <= self.ttl
                and not self.log.changed_since(node, kept.start, reach="entry")
                and unchanged(kept.files))

    def _forget(self, key: tuple) -> None:
        kept = self._kept.pop(key)
        node, identity = key[0], key[-1]
        if self._by_node.get((node, identity)) is kept:
            del self._by_node[(node, identity)]

    def _nearest(self, node: str, identity: tuple) -> tuple[str, _Kept] | None:
        """The deepest strict ancestor of ``node`` with a fresh entry kept for ``identity``."""
        for above in reversed(ancestors(node)[1:]):  # not the root: it is never kept
            kept = self._by_node.get((above, identity))
            if kept is not None and self._fresh(above, kept):
                return above, kept
        return None

    async def get_entry(self, path: str, security_scopes: list[str], principal: Any,
                        authn_access_tags: Any, authn_scopes: Any, root_tree: Any,
                        session_state: dict, metrics: dict, structure_families: Any = None,
                        access_policy: Any = None) -> Any:
        """Tiled's ``get_entry`` (same arguments, same result, same errors), reused when fresh."""
        node = node_path(path)
        identity = who(principal, authn_access_tags, authn_scopes, session_state)

        async def walk() -> Any:
            entry = None
            nearest = self._nearest(node, identity)
            if nearest is not None:
                # Walk on from the deepest kept ancestor: Tiled's get_entry with it as the root.
                above, kept = nearest
                _pass_on(kept.files)
                try:
                    entry = await tiled_get_entry(
                        node[len(above) + 1:], security_scopes, principal, authn_access_tags, authn_scopes,
                        kept.entry, session_state, metrics, structure_families, access_policy)
                    self.stats["partial"] += 1
                except StarletteHTTPException:
                    entry = None  # 404, 410, 403: walk from the root, for Tiled's own message
            if entry is None:
                entry = await tiled_get_entry(
                    path, security_scopes, principal, authn_access_tags, authn_scopes, root_tree,
                    session_state, metrics, structure_families, access_policy)
            if hasattr(entry, "get_adapter") and getattr(getattr(entry, "node", None), "data_sources", None):
                _reuse_io_adapter(entry)
            return entry

        if not node:  # the root needs no walk (and, kept, would keep its app alive)
            return await walk()
        key = (node, tuple(security_scopes),
               None if structure_families is None else frozenset(structure_families), identity)
        kept = self._kept.get(key)
        if kept is not None:
            if self._fresh(node, kept):
                self._kept.move_to_end(key)
                self.stats["hit"] += 1
                _pass_on(kept.files)
                return kept.entry
            self._forget(key)
        flight = self._flights.get(key)
        if flight is not None and flight[0] == self.log.tick:
            # The same walk is under way and nothing was written since it started:
            # its result is the one this request would find.
            try:
                kept = await asyncio.shield(flight[1])
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and getattr(task, "cancelling", lambda: 0)():
                    raise  # this request was cancelled, not the walk
                kept = None  # the walking request went away: walk here
            except Exception:  # the walk failed: walk again, meet the error first hand
                kept = None
            if kept is not None:
                self.stats["joined"] += 1
                _pass_on(kept.files)
                return kept.entry
        return await self._walk(key, node, walk)

    async def _walk(self, key: tuple, node: str, walk: Callable[[], Awaitable[Any]]) -> Any:
        self.stats["miss"] += 1
        start = self.log.tick
        future = asyncio.get_running_loop().create_future()
        self._flights[key] = (start, future)
        try:
            entry, files = await _noting_files(walk)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(err)
                future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            flight = self._flights.get(key)
            if flight is not None and flight[1] is future:  # not a later walk's
                del self._flights[key]
        _pass_on(files)
        stamps = one_stamp_each(files)
        kept = _Kept(start, time.monotonic(), entry, stamps or ())
        future.set_result(kept)
        # Not kept if a write overlapped the walk or a file changed while it was opened.
        if stamps is not None and self._fresh(node, kept):
            forget_expired(self._kept, self.ttl, self._forget)
            self._kept[key] = kept
            self._by_node[(node, key[-1])] = kept
            while len(self._kept) > self.size:
                self._forget(next(iter(self._kept)))
        return entry


def _reuse_io_adapter(entry: Any) -> None:
    """Make a catalog node's ``get_adapter()`` return the adapter it built last, while the
    files that adapter confined or opened stat the same.

    Tiled's ``get_adapter`` queries the node's data sources and assets, checks
    them against the readable storage and builds the format's adapter
    (``from_catalog``: our adapters confine and stat every file there). The
    entry itself is dropped on a write to the node, so the data sources it
    would find are the ones it found; only the files can change under it.
    """
    build = entry.get_adapter
    last: list = []

    async def get_adapter() -> Any:
        if last and unchanged(last[0][1]):
            _pass_on(last[0][1])
            return last[0][0]
        adapter, files = await _noting_files(build)
        _pass_on(files)
        stamps = one_stamp_each(files)
        last[:] = [] if stamps is None else [(adapter, stamps)]
        return adapter

    entry.get_adapter = get_adapter


async def get_entry(path: str, security_scopes: list[str], principal: Any, authn_access_tags: Any,
                    authn_scopes: Any, root_tree: Any, session_state: dict, metrics: dict,
                    structure_families: Any = None, access_policy: Any = None) -> Any:
    """What Tiled's routes call: the cached walk for a read of a tree with a cache, else Tiled's."""
    cache = cache_for(root_tree)
    if cache is None or not READ_SCOPES.issuperset(security_scopes):
        return await tiled_get_entry(path, security_scopes, principal, authn_access_tags, authn_scopes,
                                     root_tree, session_state, metrics, structure_families, access_policy)
    return await cache.get_entry(path, security_scopes, principal, authn_access_tags, authn_scopes,
                                 root_tree, session_state, metrics, structure_families, access_policy)


def cache_for(root_tree: Any) -> EntryCache | None:
    """The entry cache :func:`install` set up for this catalog tree, if any."""
    try:
        return _caches.get(root_tree)
    except TypeError:  # a tree that cannot be weakly referenced or hashed has no cache
        return None


def install(app: Any, log: WriteLog) -> EntryCache | None:
    """Cache the walks of ``app``'s Tiled routes over its catalog tree, invalidated by ``log``.

    ``log`` must be filled by a :class:`~scatterbroker.server.write_log.WriteMarks`
    in front of the app. Points ``tiled.server.router.get_entry`` (the name
    Tiled's routes call) at :func:`get_entry` here, once per process. None (no
    cache, Tiled's own walk) where Tiled's ``get_entry`` or routes are not the ones
    this was written for (:mod:`scatterbroker.server.tiled_compat`, piece ``entry-cache``).
    """
    if not tiled_compat.install("entry-cache", _point_routes_here):
        return None
    cache = _caches[app.state.root_tree] = EntryCache(log)
    return cache


def _point_routes_here() -> None:
    if tiled.server.router.get_entry is not get_entry:
        if tiled.server.router.get_entry is not tiled_get_entry:
            raise RuntimeError("tiled.server.router.get_entry is not Tiled's own: "
                               "something else replaced it; not caching over it")
        tiled.server.router.get_entry = get_entry
