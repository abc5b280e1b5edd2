"""Answers of Tiled's read routes, replayed to the same principal until a write touches their node.

A catalog under many clients is read far more often than it is written: live
displays poll a scan's ``frames`` metadata and ``headers`` table, browsers list
the same containers. Each such answer costs Tiled 15-50 ms of CPU in the one
event-loop thread that runs its SQLAlchemy ORM (docs/performance.md, "Load"),
so 32 clients saturate a server at ~30 requests/s. :class:`ResponseCache` is an
ASGI middleware in front of Tiled's app that keeps the bodies of successful
``GET`` answers of the node routes (``/metadata``, ``/search``,
``/array/full``, ``/table/full``, ...) and replays one when the same request
comes again:

* **Per principal.** Every request, hit or miss, first runs Tiled's own
  authentication dependencies (:func:`scatterbroker.server.fastpath._authorize`: API
  key or token, scopes, access tags; a revoked key is refused at once). An
  answer is replayed only to a request with the same principal, scopes, access
  tags and session state, for the same URL and the same request headers
  (``Accept``, ``Accept-Encoding``, ``Host``, ...; not ``Authorization``,
  ``Cookie``), so the access policy's decision is the one taken for it.
* **Invalidated by writes.** Every other method (``POST``, ``PUT``,
  ``PATCH``, ``DELETE``) that passes through marks its node path when it
  arrives and again when it has answered (:mod:`scatterbroker.server.write_log`,
  whose log the entry cache reads too; a ``DELETE`` of a node marks its
  parent too). An answer about node *Q*, stored from a request that started
  before such a mark, is dropped if the write was exactly at *Q* or at an
  ancestor of *Q* (metadata, structure and access; a child created is marked
  at *Q*; a deleted subtree), or of unknown node (``/jobs``, ``/auth``, ...:
  everything is dropped), and further by route:

  - a listing (``/search``) also on a write exactly at a child of *Q*: it
    shows each child's metadata, structure (an array's shape) and count of
    children, and nothing deeper. A frame appended to ``live/scan/frames``
    drops the listing of ``live/scan``, not those of ``live`` or the root;
  - ``/container/full`` and ``/node/full`` on a write anywhere under *Q*;
  - the other routes (``/metadata``, arrays, tables) on nothing more.

  A read that overlapped a write is therefore never kept.
* **One answer for identical requests in flight.** A request identical to
  one Tiled is answering (same key as a replay), arriving when nothing it
  shows has been written since that one arrived, waits for its answer and
  gets it as a replay instead of asking Tiled again: 32 live displays polling
  one scan's ``headers`` cost one query. If that answer cannot be kept (too
  large, not 200, a file changed while it was read), the waiters ask Tiled
  themselves, and later requests for that key stop waiting for each other.
* **Files unchanged.** Answers that came from files (frames, the groups and
  datasets inside a registered HDF5/NeXus file) depend on more than the
  catalog: the adapters record each file they confine or open, with its
  device, inode, size and modification time taken before reading it
  (:data:`scatterbroker.adapters.roots.files_read`), and an answer is replayed
  only while every one of them still stats the same. A file replaced or
  grown on disk is read afresh at once.
* **One process.** Only writes through this process are seen, so the cache
  is on for ``scatterbroker serve`` and :func:`scatterbroker.server.app.build_app`
  (one process) and off in :func:`scatterbroker.server.app.app_factory` (several
  workers), unless ``SCATTERBROKER_RESPONSE_CACHE`` says otherwise. Answers
  are also forgotten after ``SCATTERBROKER_RESPONSE_CACHE_TTL`` seconds (10):
  the bound on staleness if something writes the catalog database around
  the server.
* **Not cached**: conditional requests (``If-None-Match`` etc.: Tiled answers
  304 itself), ``Cache-Control: no-cache``, browser requests (``Origin``:
  CORS), ``HEAD``, answers other than 200, answers setting cookies (but
  Tiled's CSRF cookie, which a replay sets afresh, as Tiled does, to a
  request without one), and bodies larger than
  ``SCATTERBROKER_RESPONSE_CACHE_ITEM`` bytes (1 MiB: a 2M frame is 10 MB
  raw and is not kept; one Tiled compressed below 1 MiB is).
  The whole cache holds at most ``SCATTERBROKER_RESPONSE_CACHE_BYTES`` (64
  MiB), least recently used first out.

A replayed answer is the stored one, byte for byte (status, headers, body),
without Tiled's ``Server-Timing``, with a request id of its own
(``X-Tiled-Request-ID``) and with ``X-SB-Cache: hit``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from tiled.server.app import CSRF_COOKIE_NAME

from scatterbroker.adapters.roots import files_read, one_stamp_each, unchanged
from scatterbroker.environment import env_number
from scatterbroker.server.fastpath import _authorize, _who
from scatterbroker.server.write_log import WriteLog, cache_ttl, enabled_by_default, forget_expired, split_node_route

__all__ = ["ResponseCache", "enabled_by_default"]

#: GET routes whose answers are kept: the scopes Tiled requires for them, and how
#: far below their node a write may change them (WriteLog.changed_since's ``reach``)
READ_ROUTES = {
    "metadata": (["read:metadata"], "node"),
    "search": (["read:metadata"], "children"),
    "array/full": (["read:data"], "node"),
    "array/block": (["read:data"], "node"),
    "table/full": (["read:data"], "node"),
    "table/partition": (["read:data"], "node"),
    "container/full": (["read:data"], "subtree"),
    "node/full": (["read:data"], "subtree"),
}
#: request headers that do not enter the key (the principal stands for the first two)
UNKEYED = {b"authorization", b"cookie", b"connection", b"keep-alive", b"x-tiled-request-id"}
#: request headers that make a request bypass the cache
BYPASS = {b"origin", b"if-none-match", b"if-modified-since", b"if-match", b"range"}
#: response headers not replayed (the request id is the new request's, as Tiled makes it)
REQUEST_ID = b"x-tiled-request-id"
UNREPLAYED = {b"server-timing", REQUEST_ID, b"set-cookie"}
#: keys remembered as not worth waiting for (their answers were too large or not 200)
MAX_SOLO = 4096


def _csrf_cookie() -> tuple[bytes, bytes]:
    """A new CSRF cookie header, made as Tiled's ``double_submit_cookie_csrf_protection`` makes it."""
    response = Response()
    response.set_cookie(key=CSRF_COOKIE_NAME, value=secrets.token_urlsafe(32), httponly=True, samesite="lax")
    return response.raw_headers[-1]


@dataclass
class _Answer:
    """A 200 answer kept (only those are)."""

    start: int  # the write tick when its request arrived
    born: float  # time.monotonic() when stored
    headers: list[tuple[bytes, bytes]]
    body: bytes
    node: str
    reach: str  # how far below node a write changes it (WriteLog.changed_since)
    files: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (path, stamp) of each file read


@dataclass
class _Flight:
    """A request being answered by Tiled, which identical requests arriving meanwhile may wait for."""

    start: int  # the write tick when it arrived
    done: asyncio.Event = field(default_factory=asyncio.Event)
    answer: _Answer | None = None  # set if its answer could be kept (fresh or not by then)


class ResponseCache:
    """ASGI middleware: see the module docstring.

    ``log`` is the :class:`~scatterbroker.server.write_log.WriteLog` that a
    :class:`~scatterbroker.server.write_log.WriteMarks` in front of this middleware
    fills with every write. ``max_bytes`` bounds the bodies kept,
    ``item_bytes`` one body, ``ttl`` the seconds an answer is kept at most.
    ``stats`` counts hits (replays of kept answers), joined (replays of an
    answer in flight), misses (answered by Tiled, kept if eligible) and
    passes (requests not eligible).
    """

    def __init__(self, app: Any, log: WriteLog, max_bytes: int | None = None,
                 item_bytes: int | None = None, ttl: float | None = None) -> None:
        self.app = app
        self.log = log
        self.max_bytes = int(max_bytes if max_bytes is not None
                             else env_number("SCATTERBROKER_RESPONSE_CACHE_BYTES", 64 << 20))
        self.item_bytes = int(item_bytes if item_bytes is not None
                              else env_number("SCATTERBROKER_RESPONSE_CACHE_ITEM", 1 << 20))
        self.ttl = float(ttl if ttl is not None else cache_ttl())
        self._answers: OrderedDict[tuple, _Answer] = OrderedDict()
        self._bytes = 0
        self._flights: dict[tuple, _Flight] = {}
        self._solo: OrderedDict[tuple, None] = OrderedDict()  # keys whose last answer was not kept
        self.stats = {"hit": 0, "joined": 0, "miss": 0, "pass": 0}

    def __len__(self) -> int:
        """How many answers are kept."""
        return len(self._answers)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            await self._read(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _stale(self, answer: _Answer) -> bool:
        if self.log.changed_since(answer.node, answer.start, reach=answer.reach):
            return True
        if time.monotonic() - answer.born > self.ttl:
            return True
        return not unchanged(answer.files)

    # -------------------------------------------------------------- reads

    async def _read(self, scope: dict, receive: Any, send: Any) -> None:
        split = split_node_route(scope["path"], READ_ROUTES)
        headers = scope.get("headers") or ()
        if split is None or any(name in BYPASS for name, _ in headers) or any(
                name == b"cache-control" and b"no-" in value.lower() for name, value in headers):
            self.stats["pass"] += 1
            await self.app(scope, receive, send)
            return
        route, node = split
        # Our own Request on a copy of the scope: what it puts in request.state
        # must not reach Tiled's app if the request goes on there.
        request = Request({**scope, "state": dict(scope.get("state") or {})}, receive)
        request.state.cookies_to_set = []
        request.state.principal = None
        try:
            auth = await _authorize(request, READ_ROUTES[route][0])
        except Exception:  # 401/403 and anything else: Tiled answers it, with its own message
            auth = None
        if auth is None or request.state.cookies_to_set:
            self.stats["pass"] += 1
            await self.app(scope, receive, send)
            return
        key = (scope["path"], scope.get("query_string", b""), _who(auth),
               tuple(sorted((n, v) for n, v in headers if n not in UNKEYED)))
        answer = self._answers.get(key)
        if answer is not None:
            if not self._stale(answer):
                self._answers.move_to_end(key)
                self.stats["hit"] += 1
                await self._replay(answer, headers, CSRF_COOKIE_NAME in request.cookies, send)
                return
            self._drop(key)
        flight = self._flights.get(key)
        if flight is not None and key not in self._solo and not self.log.changed_since(
                node, flight.start, reach=READ_ROUTES[route][1]):
            # The same request is being answered and nothing it shows was
            # written since it arrived: its answer is one this request may get.
            await flight.done.wait()
            answer = flight.answer
            if answer is not None and unchanged(answer.files):
                self.stats["joined"] += 1
                await self._replay(answer, headers, CSRF_COOKIE_NAME in request.cookies, send)
                return
        await self._fill(key, node, READ_ROUTES[route][1], scope, receive, send)

    async def _replay(self, answer: _Answer, request_headers: Any, has_csrf: bool, send: Any) -> None:
        ids = [v for n, v in request_headers if n == REQUEST_ID]
        out = [*answer.headers, (REQUEST_ID, ids[0] if ids else secrets.token_hex(8).encode()),
               (b"x-sb-cache", b"hit")]
        if not has_csrf:
            out.append(_csrf_cookie())
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    async def _fill(self, key: tuple, node: str, reach: str, scope: dict, receive: Any, send: Any) -> None:
        start = self.log.tick
        flight = self._flights[key] = _Flight(start)
        head: dict = {}
        parts: list[bytes] = []
        size = 0
        keep = True

        async def capture(message: dict) -> None:
            nonlocal size, keep
            if message["type"] == "http.response.start":
                head.update(message)
                cookies = [v for n, v in message.get("headers") or () if n.lower() == b"set-cookie"]
                keep = keep and message["status"] == 200 and all(
                    v.startswith(CSRF_COOKIE_NAME.encode() + b"=") for v in cookies)
            elif message["type"] == "http.response.body" and keep:
                body = message.get("body", b"")
                size += len(body)
                if size > self.item_bytes:
                    keep = False
                    parts.clear()
                else:
                    parts.append(bytes(body))
                if keep and not message.get("more_body", False):
                    stamps = one_stamp_each(files)
                    if stamps is not None:  # else a file changed while it was read
                        flight.answer = _Answer(
                            start, time.monotonic(),
                            [(n, v) for n, v in head.get("headers") or () if n.lower() not in UNREPLAYED],
                            b"".join(parts), node, reach, stamps)
                        self._store(key, flight.answer)
            await send(message)

        self.stats["miss"] += 1
        # The adapters add every file they confine or open (stamped before reading it).
        files: list = []
        token = files_read.set(files)
        try:
            await self.app(scope, receive, capture)
        finally:
            files_read.reset(token)
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
            self._note_solo(key, flight.answer is None)

    def _note_solo(self, key: tuple, solo: bool) -> None:
        """Remember (a bounded number of) keys whose answer could not be kept: requests for
        them do not wait for each other, since they would have to ask Tiled again anyway."""
        if not solo:
            self._solo.pop(key, None)
            return
        self._solo[key] = None
        self._solo.move_to_end(key)
        while len(self._solo) > MAX_SOLO:
            self._solo.popitem(last=False)

    def _store(self, key: tuple, answer: _Answer) -> None:
        if self._stale(answer):
            return  # a write overlapped this request: its answer may be either side of it
        self._drop(key)
        forget_expired(self._answers, self.ttl, self._drop)
        self._answers[key] = answer
        self._bytes += len(answer.body)
        while self._bytes > self.max_bytes and self._answers:
            self._drop(next(iter(self._answers)))

    def _drop(self, key: tuple) -> None:
        answer = self._answers.pop(key, None)
        if answer is not None:
            self._bytes -= len(answer.body)
