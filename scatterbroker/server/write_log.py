"""Which catalog nodes this process has seen written, and when: the clock of its read caches.

The server keeps two things it would otherwise compute again on every read:
answers of Tiled's read routes (:mod:`scatterbroker.server.response_cache`) and the
nodes Tiled's ``get_entry`` found by walking the catalog
(:mod:`scatterbroker.server.entry_cache`). Both are right only until a write touches
what they hold. :class:`WriteMarks`, an ASGI middleware in front of Tiled's
app, marks the node path of every request that is not a ``GET``, ``HEAD`` or
``OPTIONS`` in a :class:`WriteLog`, once when it arrives and once when it
answers (it has committed by then: a read the client sends after the answer
must see it) or fails; a ``DELETE`` of a node marks its parent as well
(its count of children changed). A cached thing remembers the log's tick when the
request that made it started, and asks :meth:`WriteLog.changed_since`.

A write whose node cannot be told from its URL (``/jobs``, ``/auth``, ...)
counts as a write everywhere. Only writes through this process are seen: the
caches are for one-process servers (see :func:`scatterbroker.server.app.build_app`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

from scatterbroker.environment import env_flag, env_number

__all__ = ["API", "KINDS", "NODE_ROUTES", "REACHES", "WriteLog", "WriteMarks", "ancestors", "cache_ttl",
           "enabled_by_default", "forget_expired", "node_path", "split_node_route", "write_kind"]

API = "/api/v1/"
#: every Tiled route (any method) whose URL is ``{API}{route}/{node path}``, and ours
NODE_ROUTES = ("metadata", "search", "array/full", "array/block", "table/full", "table/partition",
               "container/full", "node/full", "search-deep", "distinct", "ragged/full", "ragged/block",
               "awkward/full", "awkward/buffers", "register", "data_source", "revisions",
               "asset/bytes", "asset/manifest", "asset", "stream/close", "sb/frames", "sb/info")
#: written paths remembered before the log says "everything changed" and forgets them
MAX_MARKS = 100_000


def cache_ttl() -> float:
    """Seconds a read cache keeps anything at most (``SCATTERBROKER_RESPONSE_CACHE_TTL``, 10):
    the bound on staleness if something writes the catalog database around the server."""
    return env_number("SCATTERBROKER_RESPONSE_CACHE_TTL", 10)


def forget_expired(kept: OrderedDict, ttl: float, forget: Callable[[Hashable], None]) -> None:
    """Forget the least recently used things in ``kept`` while they are older than ``ttl`` s.

    ``kept`` maps keys to things with a ``born`` (``time.monotonic()``) in
    least-recently-used order (a use moves its key to the end); ``forget(key)``
    removes one. A thing is born no later than its last use, so this leaves
    only what was used in the last ``ttl`` seconds. Without it, an expired
    thing is dropped only when its key is asked for again, and keys that are
    not (the URL of each new frame of a live scan, each listing page once
    its offset moved on) would stay until the size bound pushed them out:
    memory that grows for as long as a scan is ingested.
    """
    limit = time.monotonic() - ttl
    while kept:
        key, thing = next(iter(kept.items()))
        if thing.born >= limit:
            return
        forget(key)


def enabled_by_default(one_process: bool, variable: str = "SCATTERBROKER_RESPONSE_CACHE") -> bool:
    """The environment ``variable`` (:func:`~scatterbroker.environment.env_flag`) if set,
    else whether the server is one process."""
    return env_flag(variable, one_process)


def node_path(path: str) -> str:
    """A node path as Tiled walks it: its segments without the empty ones (``/a//b/`` is ``a/b``)."""
    return "/".join(segment for segment in path.split("/") if segment)


def split_node_route(path: str, routes: Any = NODE_ROUTES) -> tuple[str, str] | None:
    """(route, node path) of a URL path ``{API}{route}/{node}``, or None for any other URL.

    The node path is the one Tiled walks (:func:`node_path`).
    """
    if not path.startswith(API):
        return None
    rest = path[len(API):]
    for route in routes:
        if rest.startswith(route + "/") or rest == route:
            return route, node_path(rest[len(route) + 1:])
    return None


def ancestors(node: str) -> list[str]:
    """Strict ancestors of a node path (``"a/b/c"`` -> ``["", "a", "a/b"]``), the root first."""
    parts = node.split("/") if node else []
    return ["/".join(parts[:i]) for i in range(len(parts))]


#: what a read depends on, for :meth:`WriteLog.changed_since`: the node's catalog row
#: only ("entry"), its answers ("node"), a listing of its children, everything below it
REACHES = ("entry", "node", "children", "subtree")
#: what a write changes, for :meth:`WriteLog.mark`, from least to most
KINDS = ("data", "node", "tree")
#: (method, route) of writes that change a node's data only, not its catalog row
DATA_WRITES = {("PUT", "array/full"), ("PUT", "array/block"), ("PUT", "table/full"), ("PUT", "node/full"),
               ("PUT", "table/partition"), ("PATCH", "table/partition"), ("PUT", "awkward/full"),
               ("PUT", "ragged/full"), ("PUT", "ragged/block")}
#: (method, route) of writes that change a node's own row (metadata, shape, children) and
#: nothing below it; PATCH/PUT /metadata only when access does not follow metadata
NODE_WRITES = {("PATCH", "array/full"), ("PATCH", "ragged/full"), ("POST", "metadata"), ("POST", "register")}
METADATA_WRITES = {("PATCH", "metadata"), ("PUT", "metadata")}


class WriteLog:
    """Ticks of the writes seen, by node path and kind.

    ``tick`` counts marks. For a node path, the log keeps the last tick of a
    write exactly at it (any kind), of one that changed its catalog row, of
    one that may have changed what lies below it, of one exactly at one of its
    children, and of one at it or anywhere below it.
    """

    def __init__(self) -> None:
        self.tick = 0
        self._all = 0  # the last tick of a write of unknown node (or of forgetting)
        self._at: dict[str, int] = {}
        self._row: dict[str, int] = {}
        self._tree: dict[str, int] = {}
        self._kids: dict[str, int] = {}
        self._under: dict[str, int] = {}

    def mark(self, node: str | None, *, kind: str = "tree", removed: bool = False) -> None:
        """Record a write at ``node`` (``None``: a write that may have changed anything).

        ``kind`` (one of :data:`KINDS`) is what it may have changed: ``"data"``
        the node's data only (array elements, table rows), ``"node"`` also its
        catalog row (metadata, structure, data sources, children created under
        it), ``"tree"`` also anything below it (its access, its data sources
        that in-file children come from). ``removed``: the write deletes
        ``node`` (a ``"tree"`` write), so its parent's count of children
        changed too: the parent is marked with a ``"node"`` write.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.tick += 1
        if node is None or len(self._under) > MAX_MARKS:
            self._all = self.tick
            for marks in (self._at, self._row, self._tree, self._kids, self._under):
                marks.clear()
            return
        if removed:
            self._mark_at(node, "tree")
            if node:
                self._mark_at(ancestors(node)[-1], "node")  # its count of children
        else:
            self._mark_at(node, kind)

    def _mark_at(self, node: str, kind: str) -> None:
        lineage = ancestors(node)
        self._at[node] = self.tick
        if kind != "data":
            self._row[node] = self.tick
        if kind == "tree":
            self._tree[node] = self.tick
        if lineage:
            self._kids[lineage[-1]] = self.tick
        for path in (*lineage, node):
            self._under[path] = self.tick

    def changed_since(self, node: str, start: int, *, reach: str) -> bool:
        """Whether a write since tick ``start`` may have changed what was read of ``node``.

        Always: a ``"tree"`` write at one of its ancestors (their access, a
        deleted subtree, the file in-file nodes come from), or a write of
        unknown node. Then, by ``reach`` (one of :data:`REACHES`):

        * ``"entry"``: a write that changed its catalog row (metadata,
          structure, data sources; not its data: an appended table row);
        * ``"node"``: any write at it (its answers: metadata, structure, data;
          a child's creation is marked at ``node``, a child's deletion at its
          parent too);
        * ``"children"``: also a write exactly at one of its children (a
          listing shows each child's metadata, structure and count of children);
        * ``"subtree"``: also a write anywhere under it (what reads the data of
          every descendant).
        """
        if reach not in REACHES:
            raise ValueError(f"reach must be one of {REACHES}, not {reach!r}")
        if self._all > start or (self._row if reach == "entry" else self._at).get(node, 0) > start:
            return True
        if reach == "children" and self._kids.get(node, 0) > start:
            return True
        if reach == "subtree" and self._under.get(node, 0) > start:
            return True
        return any(self._tree.get(path, 0) > start for path in ancestors(node))


def write_kind(method: str, route: str, node: str, cascading_metadata: Any = ()) -> str:
    """What a write request may change (:data:`KINDS`), from its method and route.

    Metadata writes are ``"node"`` writes unless ``node`` lies in one of the
    top-level trees ``cascading_metadata`` names, or it is ``"*"`` (an access
    policy that may decide by metadata: the key's access below the node may
    change with it).
    """
    if (method, route) in DATA_WRITES:
        return "data"
    if (method, route) in NODE_WRITES:
        return "node"
    if (method, route) in METADATA_WRITES:
        top = node.split("/", 1)[0]
        return "tree" if "*" in cascading_metadata or top in cascading_metadata else "node"
    return "tree"


class WriteMarks:
    """ASGI middleware marking every write request's node in ``log`` (see the module docstring).

    ``cascading_metadata``: the top-level trees where a metadata write may
    change access below its node (``"*"``: everywhere), see :func:`write_kind`.
    """

    def __init__(self, app: Any, log: WriteLog, cascading_metadata: Any = ("*",)) -> None:
        self.app = app
        self.log = log
        self.cascading_metadata = tuple(cascading_metadata)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        split = split_node_route(scope["path"])
        node = None if split is None else split[1]
        removed = scope["method"] == "DELETE" and split is not None and split[0] == "metadata"
        kind = "tree" if split is None else write_kind(scope["method"], split[0], split[1],
                                                       self.cascading_metadata)
        answered = False

        def mark() -> None:
            self.log.mark(node, kind=kind, removed=removed)

        async def mark_on_answer(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                mark()
            await send(message)

        mark()
        try:
            await self.app(scope, receive, mark_on_answer)
        finally:
            if not answered:
                mark()
