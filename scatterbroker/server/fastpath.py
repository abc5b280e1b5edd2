"""A lean data route next to Tiled's: raw array bytes, no ETag, I/O off the event loop.

``GET /api/v1/sb/frames/{path}?slice=...&codec=...&shape=...`` returns the
selected part of an array node as raw C-order bytes (see :mod:`._wire` for the
headers; ``slice`` is numpy-style but strict, ``codec`` a preference list such
as ``bslz4,none``, ``shape`` the node's shape as the client knows it), and
``GET /api/v1/sb/info/{path}`` what the client needs to split large reads well
(the HDF5 chunk shape, the stored compression, the codecs on offer, the
response limit). :class:`scatterbroker.clients.fast_array.FastArrayClient` uses them;
every other Tiled client keeps using Tiled's ``/array/full`` and
``/array/block``, which are untouched.

Security is Tiled's, not a copy of it: the routes declare the very
dependencies Tiled's own ``/array/full`` declares (API key / token principal,
scopes, access tags, ``read:data``), and obtain the node with Tiled's
``get_entry``, which walks the catalog tree segment by segment applying the
access policy. Adapters are therefore the same objects Tiled would read, with
the same readable-roots confinement.

Why it is faster than ``/array/full`` (see docs/performance.md):

* no ``tokenize`` of the payload for an ETag (a SHA-1 over every byte, on the
  event loop), no msgpack/JSON, no second copy: the array the read filled is
  sent from its own memory;
* a media type Tiled's compression middleware does not know, so it never
  recompresses on the event loop; compression is negotiated (``codec=``) and
  done in the worker thread, at a low level;
* HDF5 datasets stored uncompressed or with Bitshuffle-LZ4 in whole-frame
  chunks are read below h5py: ``os.preadv`` of the chunk bytes straight into
  the response buffer, Bitshuffle-LZ4 decoded with the filter's own C code
  with the GIL released -- so concurrent requests do not queue on h5py's
  global lock -- or, when the client can decode, sent as stored (``bslz4``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import params as fastapi_params
from fastapi.responses import JSONResponse, Response
from fastapi.security import SecurityScopes
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.status import (
    HTTP_400_BAD_REQUEST,
    HTTP_413_CONTENT_TOO_LARGE,
)
from tiled.ndslice import NDSlice
from tiled.server.authentication import (
    check_scopes,
    get_current_access_tags,
    get_current_principal,
    get_current_scopes,
    get_session_state,
)
from tiled.server.settings import Settings, get_settings
from tiled.server.utils import record_timing
from tiled.structures.core import StructureFamily

from scatterbroker import _wire, bitshuffle, limits
from scatterbroker.server import entry_cache, tiled_compat
from scatterbroker.adapters import frame_cache
from scatterbroker.adapters.roots import file_stamp
from scatterbroker.server.entry_cache import who
from scatterbroker.errors import UnreadableFile

__all__ = ["router", "PREFIX", "read_payload"]

#: where Tiled mounts custom routers (``/api/v1`` and ``/custom``)
PREFIX = "/sb"
#: HDF5 dataset layouts remembered (chunk tables), LRU
LAYOUT_CACHE = int(os.environ.get("SCATTERBROKER_LAYOUT_CACHE") or 256)
#: below this many bytes a read is not split over threads
PARALLEL_MIN_BYTES = 2 << 20

router = APIRouter()
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------- payloads


@dataclass
class Payload:
    """What one response carries: body bytes plus the headers describing them."""

    body: Any  # bytes | memoryview
    shape: tuple[int, ...]
    dtype: np.dtype
    codec: str = "none"
    chunk_sizes: list[int] | None = None
    chunk_frames: list[int] | None = None

    def headers(self) -> dict[str, str]:
        h = {
            _wire.H_SHAPE: ",".join(map(str, self.shape)),
            _wire.H_DTYPE: self.dtype.str,
            _wire.H_CODEC: self.codec,
            "Cache-Control": "no-store",
        }
        if self.chunk_sizes is not None:
            h[_wire.H_CHUNKS] = ",".join(map(str, self.chunk_sizes))
            h[_wire.H_CHUNK_FRAMES] = ",".join(map(str, self.chunk_frames or []))
        return h


def _executor():
    from scatterbroker.adapters.sequence import _executor as shared

    return shared()


def _bytes_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))


def read_payload(entry: Any, key: _wire.Key, codecs: list[str] | str = "none") -> Payload:
    """Read ``entry[key]`` (a normalized key) for the wire; runs in a worker thread.

    ``codecs`` is the client's preference list: ``bslz4`` (stored chunks, not
    decoded) applies when the selection maps onto whole stored chunks; the
    first other codec packs everything else.
    """
    codecs = [codecs] if isinstance(codecs, str) else list(codecs)
    direct = "bslz4" in codecs
    codec = next((c for c in codecs if c not in _wire.STORED), "none")
    structure = entry.structure()
    dtype = structure.data_type.to_numpy_dtype()
    shape = _wire.key_shape(key)
    if 0 in shape:
        return Payload(b"", shape, dtype)
    if hasattr(entry, "open_dataset") and len(structure.shape) >= 2:
        payload = _h5_payload(entry, key, dtype, shape, direct=direct)
        if payload is not None:
            return _encode(payload, codec)
    if "cbf" in codecs and hasattr(entry, "stored_frames") and _wire.whole_frames(key, tuple(structure.shape)):
        payload = _cbf_payload(entry, key, dtype, shape)
        if payload is not None:
            return payload
    array = entry.read(NDSlice(key)) if key else entry.read()
    if inspect.isawaitable(array):
        array = anyio.from_thread.run(_wait, array)
    array = np.asarray(array, dtype=dtype, order="C")  # (ascontiguousarray would make 0-d 1-d)
    if array.shape != shape:
        raise UnreadableFile(f"the adapter returned shape {array.shape} for a {shape} selection")
    return _encode(Payload(_bytes_view(array) if array.size else b"", shape, dtype), codec)


def _cbf_payload(entry: Any, key: _wire.Key, dtype: np.dtype, shape: tuple[int, ...]) -> Payload | None:
    """Whole CBF frames as their files store them (codec ``cbf``), or None to decode them here."""
    sections = entry.stored_frames(_leading(key))
    if sections is None:
        return None
    body = sections[0] if len(sections) == 1 else b"".join(sections)
    return Payload(body, shape, dtype, codec="cbf", chunk_sizes=[len(s) for s in sections],
                   chunk_frames=[1] * len(sections))


def _leading(key: _wire.Key) -> range:
    """The items of the leading axis a normalized ``key`` selects."""
    first = key[0]
    return range(first, first + 1) if isinstance(first, int) else range(first.start, first.stop, first.step)


async def _wait(awaitable: Any) -> Any:
    return await awaitable


def _encode(payload: Payload, codec: str) -> Payload:
    if codec == "none" or payload.codec != "none" or not payload.body:
        return payload
    payload.body = _wire.encode(codec, payload.body, payload.dtype.itemsize)
    payload.codec = codec
    return payload


# ------------------------------------------------------- HDF5 below h5py


@dataclass(frozen=True)
class _Layout:
    """Where a dataset's frames are in its file, for datasets the raw reader handles.

    ``chunk0`` is the number of leading-axis items per chunk (chunks always
    span the whole trailing shape here); ``offsets``/``sizes``/``masks`` are
    per chunk along axis 0 (offset -1: chunk not written). For a contiguous
    dataset there is one "chunk" holding everything.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    codec: str | None  # None: stored raw; "bslz4": Bitshuffle-LZ4
    chunk0: int
    offsets: np.ndarray
    sizes: np.ndarray
    masks: np.ndarray
    storage_chunks: tuple[int, ...] | None
    filters: tuple[str, ...]

    @property
    def frame_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


_layouts: OrderedDict[tuple, _Layout | None] = OrderedDict()
_layouts_lock = threading.Lock()
_BITSHUFFLE = 32008


def _filters(dcpl: Any) -> list[tuple[int, tuple, str]]:
    out = []
    for i in range(dcpl.get_nfilters()):
        code, _flags, values, name = dcpl.get_filter(i)
        out.append((code, tuple(values), name.decode("ascii", "replace").split(";")[0].strip()))
    return out


def storage_info(dset: Any) -> dict[str, Any]:
    """HDF5 storage facts worth telling a client: layout, chunk shape, filters."""
    import h5py

    dcpl = dset.id.get_create_plist()
    layout = {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked",
              h5py.h5d.COMPACT: "compact", h5py.h5d.VIRTUAL: "virtual"}.get(dcpl.get_layout(), "other")
    return {
        "layout": layout,
        "chunk_shape": list(dset.chunks) if dset.chunks else None,
        "filters": [name for _, _, name in _filters(dcpl)],
    }


def _build_layout(dset: Any, handle: Any) -> _Layout | None:
    import h5py

    dtype = dset.dtype
    shape = dset.shape
    if (
        shape is None or len(shape) < 2 or dtype.kind not in "iuf" or dtype.hasobject
        or dtype.fields is not None or handle.driver != "sec2"
    ):
        return None
    dcpl = dset.id.get_create_plist()
    if dcpl.get_external_count():
        return None
    filters = _filters(dcpl)
    kind = dcpl.get_layout()
    if kind == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        if offset is None or filters:
            return None
        one = np.array([offset], dtype=np.int64)
        return _Layout(tuple(shape), dtype, None, max(1, shape[0]), one,
                       np.array([dset.id.get_storage_size()], dtype=np.int64),
                       np.zeros(1, dtype=np.int64), None, ())
    if kind != h5py.h5d.CHUNKED:
        return None
    chunks = tuple(dset.chunks)
    if chunks[1:] != tuple(shape[1:]):
        return None  # chunks tile the frame: leave it to h5py
    if not filters:
        codec = None
    elif (len(filters) == 1 and filters[0][0] == _BITSHUFFLE and len(filters[0][1]) >= 5
          and filters[0][1][4] == 2 and _wire.bslz4_available()
          and math.prod(chunks) * dtype.itemsize <= limits.MAX_CHUNK_BYTES):
        codec = "bslz4"  # (a larger chunk: the adapter refuses it with 413)
    else:
        return None
    n = -(-shape[0] // chunks[0]) if shape[0] else 0
    offsets = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    masks = np.zeros(n, dtype=np.int64)

    def visit(info: Any) -> None:
        j = info.chunk_offset[0] // chunks[0]
        offsets[j], sizes[j], masks[j] = info.byte_offset, info.size, info.filter_mask

    if hasattr(dset.id, "chunk_iter"):
        dset.id.chunk_iter(visit)
    else:
        for i in range(dset.id.get_num_chunks()):
            visit(dset.id.get_chunk_info(i))
    return _Layout(tuple(shape), dtype, codec, chunks[0], offsets, sizes, masks, chunks,
                   tuple(name for _, _, name in filters))


def _layout_for(entry: Any) -> tuple[_Layout | None, Any, Any, tuple | None]:
    """(layout, dataset, handle, key): the key names the dataset in the file as it is open."""
    dset, handle, key = entry.open_dataset()
    if handle.driver != "sec2":
        return None, dset, handle, None
    # Key the layout by the file the handle has open (fstat of its descriptor),
    # not by the path: if the file is replaced meanwhile, offsets learnt from
    # this handle must never be applied to the new file.
    key = (key[0], key[2], file_stamp(os.fstat(handle.id.get_vfd_handle())))
    with _layouts_lock:
        hit = _layouts.get(key, False)
        if hit is not False:
            _layouts.move_to_end(key)
    if hit is False:
        hit = _build_layout(dset, handle)
        with _layouts_lock:
            _layouts[key] = hit
            while len(_layouts) > LAYOUT_CACHE:
                _layouts.popitem(last=False)
    return hit, dset, handle, key


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done, n = 0, buf.nbytes
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise UnreadableFile("the file ended before its data did (truncated while being read?)")
        done += got


def _h5_payload(entry: Any, key: _wire.Key, dtype: np.dtype, shape: tuple[int, ...],
                *, direct: bool) -> Payload | None:
    """Read an HDF5 selection below h5py, or None to let h5py do it."""
    layout, dset, handle, layout_key = _layout_for(entry)
    if layout is None or layout.dtype != dtype or layout.shape != tuple(entry.structure().shape):
        return None
    first = key[0]
    frames = _leading(key)
    c0 = layout.chunk0
    touched = {i // c0 for i in frames}
    if any(layout.offsets[j] < 0 for j in touched):
        return None  # unwritten chunks: h5py knows the fill value
    fd = handle.id.get_vfd_handle()
    trailing = key[1:]
    full = _wire.whole_frames(key, layout.shape)
    if direct and layout.codec == "bslz4" and full and (isinstance(first, int) or first.step == 1):
        if frames.start % c0 == 0 and (frames.stop % c0 == 0 or frames.stop == layout.shape[0]) \
                and not any(layout.masks[j] for j in touched):
            return _direct(layout, fd, frames, dtype, shape)
    out = np.empty(shape, dtype=dtype)
    # (frames of out, chunk) work units; each unit fills out.reshape(len(frames), ...)[k]
    flat = out.reshape((len(frames), *[s for s in _wire.key_shape(trailing)]))
    units: list[tuple[int, list[tuple[int, int]]]] = []
    for k, i in enumerate(frames):
        j = i // c0
        if units and units[-1][0] == j and layout.codec:
            units[-1][1].append((k, i))
        else:
            units.append((j, [(k, i)]))
    fb = layout.frame_bytes
    row_items = math.prod(layout.shape[2:])
    rows_key = trailing[0]
    lo, hi = (rows_key, rows_key + 1) if isinstance(rows_key, int) else (
        rows_key.start, rows_key.stop if rows_key.step == 1 else rows_key.start
        + (len(range(rows_key.start, rows_key.stop, rows_key.step)) - 1) * rows_key.step + 1)
    local = ((rows_key - lo) if isinstance(rows_key, int)
             else slice(0, hi - lo, rows_key.step),) + tuple(trailing[1:])

    def raw_unit(unit: tuple[int, list[tuple[int, int]]]) -> None:
        j, members = unit
        for k, i in members:
            base = int(layout.offsets[j]) + (i - j * c0) * fb
            if full:
                _pread_into(fd, _bytes_view(flat[k]), base)
                continue
            rows = np.empty((hi - lo, *layout.shape[2:]), dtype=dtype)
            _pread_into(fd, _bytes_view(rows), base + lo * row_items * dtype.itemsize)
            flat[k] = rows[local]

    def bslz4_unit(unit: tuple[int, list[tuple[int, int]]]) -> None:
        j, members = unit
        chunk = None if full else frame_cache.frames.get((layout_key, j))  # parts of frames read before
        if chunk is not None:
            for k, i in members:
                flat[k] = chunk[i - j * c0][tuple(trailing)]
            return
        stored = np.empty(int(layout.sizes[j]), dtype=np.uint8)
        _pread_into(fd, memoryview(stored), int(layout.offsets[j]))
        if layout.masks[j]:  # the filter was skipped for this chunk: stored raw
            chunk = stored.view(dtype)[: c0 * math.prod(layout.shape[1:])].reshape(c0, *layout.shape[1:])
        elif c0 == 1 and full:
            _wire.bslz4_decode_into(stored, flat[members[0][0]], dtype.itemsize)
            return
        else:
            chunk = np.empty((c0, *layout.shape[1:]), dtype=dtype)
            _wire.bslz4_decode_into(stored, chunk, dtype.itemsize)
            if not full:  # kept for the parts of frames read next (full reads skip the cache)
                frame_cache.frames.put((layout_key, j), chunk)
        for k, i in members:
            flat[k] = chunk[i - j * c0][tuple(trailing)]

    work = bslz4_unit if layout.codec == "bslz4" else raw_unit
    if layout.codec is None and full and len(units) > 1:
        # raw whole frames: merge into large contiguous reads, split over threads
        units = _merge_raw(layout, fd, frames, flat)
        work = _read_span
    # ``handle`` stays referenced until the reads are done, so ``fd`` stays open
    if len(units) > 1 and out.nbytes >= PARALLEL_MIN_BYTES:
        list(_executor().map(work, units))
    else:
        for unit in units:
            work(unit)
    del handle
    return Payload(_bytes_view(out), shape, dtype)


def _merge_raw(layout: _Layout, fd: int, frames: range, flat: np.ndarray) -> list:
    """Runs of whole frames that follow each other in the file -> reads of at most 8 MB."""
    fb, c0 = layout.frame_bytes, layout.chunk0
    spans: list[list] = []
    for k, i in enumerate(frames):
        j = i // c0
        off = int(layout.offsets[j]) + (i - j * c0) * fb
        if spans and spans[-1][0] + spans[-1][2] == off and spans[-1][2] < (8 << 20):
            spans[-1][2] += fb
        else:
            spans.append([off, k, fb])
    return [(fd, off, flat, k, nbytes) for off, k, nbytes in spans]


def _read_span(span: tuple) -> None:
    fd, off, flat, k, nbytes = span
    _pread_into(fd, _bytes_view(flat[k:k + nbytes // flat[0].nbytes]), off)


def _direct(layout: _Layout, fd: int, frames: range, dtype: np.dtype, shape: tuple) -> Payload:
    """The stored Bitshuffle-LZ4 chunks covering ``frames``, concatenated, not decoded."""
    c0 = layout.chunk0
    first, last = frames.start // c0, -(-frames.stop // c0)
    sizes = [int(s) for s in layout.sizes[first:last]]
    body = np.empty(sum(sizes), dtype=np.uint8)
    pos, j = 0, first
    while j < last:  # coalesce chunks that follow each other in the file
        start, run = int(layout.offsets[j]), int(layout.sizes[j])
        k = j + 1
        while k < last and int(layout.offsets[k]) == start + run:
            run += int(layout.sizes[k])
            k += 1
        _pread_into(fd, memoryview(body)[pos:pos + run], start)
        pos, j = pos + run, k
    counts = [min(c0, layout.shape[0] - j * c0) for j in range(first, last)]
    return Payload(memoryview(body), shape, dtype, codec="bslz4", chunk_sizes=sizes, chunk_frames=counts)


# ------------------------------------------------------------ authentication


class _Unsupported(TypeError):
    """A dependency this resolver cannot evaluate (Tiled changed): use FastAPI's."""


_plans: dict[Any, tuple[list[tuple], str]] = {}


def _plan(call: Any) -> tuple[list[tuple], str]:
    plan = _plans.get(call)
    if plan is not None:
        return plan
    routine = inspect.isroutine(call) or hasattr(call, "__wrapped__")
    target = inspect.unwrap(call) if routine else call.__call__
    steps = []
    for name, p in inspect.signature(call).parameters.items():
        default, ann = p.default, p.annotation
        if isinstance(default, fastapi_params.Depends):
            scopes = tuple(getattr(default, "scopes", None) or ())
            steps.append((name, "dep", default.dependency, scopes))
        elif ann in (Request, HTTPConnection, "Request", "HTTPConnection") or (
                name == "request" and ann is inspect.Parameter.empty):
            steps.append((name, "request", None, ()))
        elif ann in (SecurityScopes, "SecurityScopes"):
            steps.append((name, "scopes", None, ()))
        else:
            raise _Unsupported(f"{getattr(call, '__qualname__', call)!r}: parameter {name!r}")
    if inspect.isasyncgenfunction(target):
        kind = "agen"
    elif inspect.isgeneratorfunction(target):
        kind = "gen"
    elif inspect.iscoroutinefunction(target):
        kind = "async"
    else:
        kind = "sync"
    _plans[call] = plan = (steps, kind)
    return plan


async def _solve(call: Any, request: Request, scopes: tuple[str, ...], cache: dict,
                 stack: contextlib.AsyncExitStack) -> Any:
    """Evaluate ``call`` and its ``Depends``/``Security`` tree the way FastAPI does.

    Same functions, same order, same overrides (``app.dependency_overrides``),
    same per-request cache and scope propagation; but the signatures are
    inspected once per process, not on every request (FastAPI re-inspects the
    whole tree per request whenever the app has overrides, and Tiled's has).
    """
    call = request.app.dependency_overrides.get(call, call)
    cache_key = (call, tuple(sorted(set(scopes))))
    if cache_key in cache:
        return cache[cache_key]
    steps, kind = _plan(call)
    kwargs: dict[str, Any] = {}
    for name, what, dependency, own_scopes in steps:
        if what == "request":
            kwargs[name] = request
        elif what == "scopes":
            kwargs[name] = SecurityScopes(scopes=list(scopes))
        else:
            kwargs[name] = await _solve(dependency, request, scopes + own_scopes, cache, stack)
    if kind == "async":
        value = await call(**kwargs)
    elif kind == "agen":
        value = await stack.enter_async_context(contextlib.asynccontextmanager(call)(**kwargs))
    elif kind == "gen":
        value = stack.enter_context(contextlib.contextmanager(call)(**kwargs))
    else:
        value = call(**kwargs)
        if inspect.isawaitable(value):
            value = await value
    cache[cache_key] = value
    return value


def _check_plans(call: Any, seen: set) -> None:
    if call in seen:
        return
    seen.add(call)
    for _name, what, dependency, _scopes in _plan(call)[0]:
        if what == "dep":
            _check_plans(dependency, seen)


def _check_all_plans() -> None:
    for call in (get_settings, get_current_principal, get_session_state, get_current_access_tags,
                 get_current_scopes, check_scopes):
        _check_plans(call, set())


def install() -> None:
    """At start, not on a request: the dependencies :func:`_authorize` evaluates (and the
    ``/array/full`` route whose declaration it mirrors) must be the ones this resolver was
    written for (:mod:`scatterbroker.server.tiled_compat`, piece ``fast-route-auth``), else
    the server refuses to start; then every signature is planned once."""
    tiled_compat.install("fast-route-auth", _check_all_plans)


@dataclass
class _Auth:
    settings: Settings
    principal: Any
    session_state: Any
    access_tags: Any
    scopes: Any


async def _authorize(request: Request, required: list[str]) -> _Auth:
    """Tiled's own authentication for a route needing ``required`` scopes.

    Evaluates exactly the dependencies Tiled's ``GET /array/full`` declares,
    in its order: settings, principal (an invalid API key or token -> 401),
    session state, access tags, scopes, then ``check_scopes`` (-> 401 when the
    request lacks ``required``).
    """
    cache: dict = {}
    async with contextlib.AsyncExitStack() as stack:
        settings = await _solve(get_settings, request, (), cache, stack)
        principal = await _solve(get_current_principal, request, (), cache, stack)
        session_state = await _solve(get_session_state, request, (), cache, stack)
        access_tags = await _solve(get_current_access_tags, request, (), cache, stack)
        scopes = await _solve(get_current_scopes, request, (), cache, stack)
        await _solve(check_scopes, request, tuple(required), cache, stack)
    return _Auth(settings, principal, session_state, access_tags, scopes)


# ------------------------------------------------------------------- entries

#: seconds a node found by get_entry is reused for the same path and the same
#: principal/scopes/access tags (0 disables; see docs/performance.md)
ENTRY_TTL = float(os.environ.get("SCATTERBROKER_ENTRY_TTL", "2"))
ENTRY_CACHE = 1024
_entries: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
_entries_lock = threading.Lock()


def _who(auth: _Auth) -> tuple:
    """Everything Tiled's access decisions depend on, besides the node itself."""
    return who(auth.principal, auth.access_tags, auth.scopes, auth.session_state)


async def _entry(request: Request, path: str, auth: _Auth, required: list[str],
                 metrics: Any = None, shape: tuple[int, ...] | None = None) -> Any:
    """The node at ``path`` through Tiled's ``get_entry`` (access policy applied
    at every segment), reused by the same principal: until a write reaches it
    or a file it opened changes when the app has an entry cache
    (:mod:`scatterbroker.server.entry_cache`, one-process servers), else for
    ``ENTRY_TTL`` seconds.

    Without the entry cache, ``shape`` is the node's shape as the client knows it (from its metadata
    request): a reused node of another shape is looked up afresh, so a scan
    that grows (the watcher extends ``frames``) reads its new frames at once.
    Concurrent requests that miss the cache for the same key wait for one walk
    instead of each walking the catalog.
    """
    root_tree = request.app.state.root_tree
    if entry_cache.cache_for(root_tree) is not None:  # reused until a write or a file changes
        return await _lookup(request, path, auth, required, metrics)
    key = (id(root_tree), path.strip("/"), tuple(required), _who(auth))
    if ENTRY_TTL <= 0:
        return await _lookup(request, path, auth, required, metrics)
    with _entries_lock:
        hit = _entries.get(key)
    if hit is not None and hit[0] > time.monotonic() and (
            shape is None or tuple(hit[1].structure().shape) == shape):
        return hit[1]
    loop = asyncio.get_running_loop()
    flight_key = (id(loop), key)
    pending = _inflight.get(flight_key)
    if pending is not None:
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not pending.cancelled() or (task is not None and task.cancelling()):
                raise
            # the request doing the walk went away (client disconnected): walk ourselves
            return await _lookup(request, path, auth, required, metrics)
    pending = loop.create_future()
    _inflight[flight_key] = pending
    try:
        entry = await _lookup(request, path, auth, required, metrics)
    except asyncio.CancelledError:
        pending.cancel()
        raise
    except BaseException as err:
        pending.set_exception(err)
        pending.exception()  # retrieved: no "never retrieved" warning without waiters
        raise
    else:
        pending.set_result(entry)
    finally:
        _inflight.pop(flight_key, None)
    with _entries_lock:
        _entries[key] = (time.monotonic() + ENTRY_TTL, entry)
        _entries.move_to_end(key)
        while len(_entries) > ENTRY_CACHE:
            _entries.popitem(last=False)
    return entry


_inflight: dict[tuple, asyncio.Future] = {}


async def _lookup(request: Request, path: str, auth: _Auth, required: list[str], metrics: Any) -> Any:
    entry = await entry_cache.get_entry(
        path, required, auth.principal, auth.access_tags, auth.scopes, request.app.state.root_tree,
        auth.session_state, metrics if metrics is not None else request.state.metrics, _ARRAY,
        getattr(request.app.state, "access_policy", None),
    )
    if hasattr(entry, "get_adapter") and getattr(getattr(entry, "node", None), "data_sources", None):
        # A catalog node: build its I/O adapter the way Tiled's read does
        # (CatalogNodeAdapter.get_adapter checks every asset against the
        # readable storage, then calls the adapter's from_catalog).
        entry = await entry.get_adapter()
    return entry


# -------------------------------------------------------------------- routes

_ARRAY = {StructureFamily.array}


@router.get(PREFIX + "/frames/{path:path}", name="scatterbroker array bytes")
async def frames(
    request: Request,
    path: str,
    slice: str = Query("", max_length=_wire.MAX_SLICE_TEXT),
    codec: str = Query("none", max_length=64),
    shape: str = Query("", max_length=200),
) -> Response:
    """The selected part of an array as raw bytes (``X-SB-*`` headers describe them).

    ``shape`` (optional) is the array's shape as the client last saw it.
    Needs ``read:data`` on the node, exactly like ``GET /array/full``.
    """
    return await _frames(request, path, slice, codec, request.state.metrics, shape)


def _shape_hint(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip()) if text else None
    except ValueError:
        return None  # only a hint: a malformed one is ignored


async def _frames(request: Request, path: str, slice: str, codec: str, metrics: Any,
                  shape: str = "") -> Response:
    with record_timing(metrics, "auth"):
        auth = await _authorize(request, ["read:data"])
    offered = _wire.available_codecs()
    wanted = [c.strip() for c in codec.split(",") if c.strip() in offered]
    if not wanted:
        raise HTTPException(HTTP_400_BAD_REQUEST, f"no codec of {codec!r} is known here; "
                            f"choose from {', '.join(offered)} (a comma-separated preference list)")
    with record_timing(metrics, "entry"):
        entry = await _entry(request, path, auth, ["read:data"], metrics, _shape_hint(shape))
    structure = entry.structure()
    try:
        key = _wire.parse_slice(slice, tuple(structure.shape))
    except _wire.BadSlice as err:
        raise HTTPException(HTTP_400_BAD_REQUEST, str(err)) from None
    itemsize = structure.data_type.to_numpy_dtype().itemsize
    nbytes = math.prod(_wire.key_shape(key)) * itemsize
    limit = auth.settings.response_bytesize_limit
    if nbytes > limit:
        raise HTTPException(
            HTTP_413_CONTENT_TOO_LARGE,
            f"the selection is {nbytes} bytes, more than this server's response limit of "
            f"{limit} bytes; request it in parts",
        )
    try:
        with record_timing(metrics, "read"):
            payload = await anyio.to_thread.run_sync(read_payload, entry, key, wanted)
    except IndexError as err:
        raise HTTPException(HTTP_400_BAD_REQUEST, str(err) or "index out of range") from None
    except bitshuffle.BadChunk as err:  # a stored chunk crafted or corrupt: nothing was sent
        raise UnreadableFile(f"{path}: {err}") from None
    return Response(payload.body, media_type=_wire.MEDIA_TYPE, headers=payload.headers())


@router.get(PREFIX + "/info/{path:path}", name="scatterbroker array info")
async def info(request: Request, path: str) -> JSONResponse:
    """Shape, dtype, HDF5 storage (chunk shape, filters), codecs and response limit.

    Needs ``read:metadata`` on the node, like ``GET /metadata``.
    """
    auth = await _authorize(request, ["read:metadata"])
    entry = await _entry(request, path, auth, ["read:metadata"])
    structure = entry.structure()

    def facts() -> tuple[dict | None, str | None]:
        if not hasattr(entry, "open_dataset"):
            return None, None
        try:
            dset, _handle, _key = entry.open_dataset()
            storage = storage_info(dset)
            layout = _layout_for(entry)[0] if len(structure.shape) >= 2 else None
        except Exception:
            return None, None
        return storage, "bslz4" if layout is not None and layout.codec == "bslz4" else None

    storage, stored = await anyio.to_thread.run_sync(facts)
    if hasattr(entry, "stored_frames"):
        stored = "cbf"
    codecs = [c for c in _wire.available_codecs() if c not in _wire.STORED or c == stored]
    return JSONResponse({
        "version": 1,
        "shape": list(structure.shape),
        "dtype": structure.data_type.to_numpy_dtype().str,
        "chunks": None if len(structure.chunks) and len(structure.chunks[0]) > 10000
        else [list(c) for c in structure.chunks],
        "storage": storage,
        "codecs": codecs,
        "max_bytes": auth.settings.response_bytesize_limit,
    })


@router.get(PREFIX + "/version", name="scatterbroker fast route version")
async def version() -> JSONResponse:
    """Lets a client find out, once, that this server has the fast route."""
    return JSONResponse({"version": 1, "codecs": _wire.available_codecs()})


# ----------------------------------------------------------------- fast lane


class FastLane:
    """ASGI middleware answering ``GET {api}/sb/frames/...`` before Tiled's stack.

    Tiled's app runs every request through its per-request layers (CSRF,
    client version, cookies, Server-Timing, Prometheus, logging: six
    ``BaseHTTPMiddleware``\ s in Tiled, one plain middleware once
    :mod:`scatterbroker.server.tiled_layers` has flattened them), CORS, its
    compression responder and FastAPI's router: about 1.5 ms of CPU per request
    before the route runs (measured with Tiled's six). None of them matters to this route -- a safe GET,
    answered with a media type the compressor skips -- except CORS, so
    browser requests (with an ``Origin`` header) still take the normal path.
    Authentication and node lookup are the route's own (Tiled's dependencies,
    Tiled's ``get_entry``), identical on both paths.

    ``scatterbroker.server.app.build_app`` installs it; an app built elsewhere
    (``tiled serve config`` with our tree) serves the same route through the
    router, only slower.
    """

    def __init__(self, app: Any, prefix: str = "/api/v1" + PREFIX + "/frames/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http" or scope["method"] != "GET"
            or not scope["path"].startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if b"origin" in headers:
            await self.app(scope, receive, send)  # CORS: let Tiled's middleware answer
            return
        request = Request(scope, receive)
        request.state.cookies_to_set = []
        metrics: dict = collections.defaultdict(lambda: collections.defaultdict(float))
        request.state.metrics = metrics
        request.state.principal = None
        path = scope["path"][len(self.prefix):]
        query = request.query_params
        t0 = time.perf_counter()
        try:
            slice_text, codec = query.get("slice", ""), query.get("codec", "none")
            shape = query.get("shape", "")
            if len(slice_text) > _wire.MAX_SLICE_TEXT or len(codec) > 64 or len(shape) > 200:
                raise HTTPException(HTTP_400_BAD_REQUEST, "slice, codec or shape parameter too long")
            response = await _frames(request, path, slice_text, codec, metrics, shape)
        except StarletteHTTPException as err:  # also our ScatterbrokerError (403, 404, 413, 422)
            response = JSONResponse({"detail": err.detail}, status_code=err.status_code,
                                    headers=getattr(err, "headers", None))
        except Exception:
            logger.exception("fast data route failed for %s", scope["path"])
            response = JSONResponse({"detail": "Internal server error"}, status_code=500)
        for params in request.state.cookies_to_set:
            params.setdefault("httponly", True)
            params.setdefault("samesite", "lax")
            response.set_cookie(**params)
        metrics["app"]["dur"] = time.perf_counter() - t0
        response.headers["Server-Timing"] = ", ".join(
            f"{key};dur={value['dur'] * 1000:.1f}" for key, value in metrics.items() if "dur" in value)
        await response(scope, receive, send)
