"""Client class for array nodes carrying the ``sb-array`` spec: fast remote slicing.

Users do not import this: ``tiled.client.from_uri`` picks it for any node whose
specs include ``sb-array`` (entry point ``tiled.special_client``, see
pyproject.toml). It is Tiled's ``ArrayClient`` with the read path replaced:

* reads go to the server's lean route ``/api/v1/sb/frames/<path>`` (see
  :mod:`scatterbroker.server.fastpath`), which returns raw bytes with their shape and
  dtype in headers; the bytes are received straight into the result array;
* a large read is split along its leading axis into blocks of about
  ``SCATTERBROKER_BLOCK_BYTES`` (default 32 MB; smaller for medium reads so
  every thread has work), aligned to the HDF5 chunk
  shape when the file has one, and fetched by a small thread pool over
  keep-alive connections;
* the codec is negotiated per read: whole frames stored as Bitshuffle-LZ4
  chunks in HDF5 (when hdf5plugin is installed) or as byte-offset CBF files
  (:mod:`scatterbroker.adapters.byte_offset`) are sent as stored and decoded here, one
  request per frame; otherwise
  raw bytes on loopback and ``SCATTERBROKER_CODEC`` (default ``blosc2``,
  shuffle + LZ4 at level 1) to other hosts;
* a server without the route (plain Tiled, an older scatterbroker) is detected
  once per server and the standard ``/array/full`` endpoints are used.

Indexing follows numpy: negative indices and steps, ``...``, out-of-range
slice bounds clipped; the result has exactly the dtype (byte order included)
and shape h5py/fabio would return for the same selection.

Examples
--------
>>> from tiled.client import from_uri                        # doctest: +SKIP
>>> frames = from_uri("http://host:8000", api_key=KEY)["raw/p1/s1/frames"]
>>> type(frames).__name__, frames[10].shape                   # doctest: +SKIP
('FastArrayClient', (1679, 1475))
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import os
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tiled.client.array import ArrayClient
from tiled.structures.core import Spec

from scatterbroker import _wire
from scatterbroker.adapters import byte_offset
from scatterbroker.environment import env_flag

__all__ = ["FastArrayClient", "SPEC", "CLIENT_THREADS", "BLOCK_BYTES"]

#: the spec that selects this client
SPEC = Spec("sb-array")
#: bytes per block request when a read is split
BLOCK_BYTES = int(os.environ.get("SCATTERBROKER_BLOCK_BYTES") or 32 << 20)
#: ... but reads of medium size are split into blocks down to this size so
#: that every thread has work
BLOCK_MIN = 4 << 20
#: concurrent block requests per process
CLIENT_THREADS = int(os.environ.get("SCATTERBROKER_CLIENT_THREADS") or 4)
#: codec for non-loopback servers: none, lz4, zstd or blosc2 ("auto": blosc2)
CODEC = os.environ.get("SCATTERBROKER_CODEC", "auto")
#: accept frames as stored (Bitshuffle-LZ4 chunks, CBF byte-offset) and decode them here
#: (0: let the server decode)
DIRECT_CHUNKS = env_flag("SCATTERBROKER_DIRECT_CHUNKS", True)
#: seconds to wait on the server for one block
TIMEOUT = float(os.environ.get("SCATTERBROKER_TIMEOUT") or 60)

#: sha256 of ``inspect.getsource`` of what keeps the TLS setting in a Tiled context's private
#: ``_verify`` (Tiled 0.2.20), read by :class:`_Transport` for https. The same values as
#: ``scatterbroker.server.tiled_compat.CLIENT_VERIFY_FINGERPRINTS`` (the seam; a client cannot
#: import the server, tests/test_tiled_compat.py checks that they agree). Another source: https
#: goes through the context's own httpx client, which Tiled configured itself.
VERIFY_FINGERPRINTS = {
    "tiled.client.context.Context.__init__":
        "2b7075186e781428b760d74a5c51652237cb8ca4962d72369c5c39ecfcd6bc06",
    "tiled.client.context.Context.__setstate__":
        "d107854e1bb82a4db1a4b29ba45cdaf530ddd529620355192cd7544fcbf2b8d9",
}
_verify_known: bool | None = None

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_probes: dict[str, bool] = {}  # base URL -> server has the fast route
_local = threading.local()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="sb-client")
        return _pool


def context_verify_known() -> bool:
    """Whether Tiled's context keeps its TLS ``verify`` the way :class:`_Transport` reads it
    (:data:`VERIFY_FINGERPRINTS`); checked once per process, logged once if not."""
    global _verify_known
    if _verify_known is None:
        import hashlib
        import inspect
        import logging

        from tiled.client.context import Context

        found = {}
        for dotted in VERIFY_FINGERPRINTS:
            try:
                source = inspect.getsource(getattr(Context, dotted.rsplit(".", 1)[1]))
                found[dotted] = hashlib.sha256(source.encode()).hexdigest()
            except (AttributeError, OSError, TypeError):
                found[dotted] = None
        changed = [d for d, v in found.items() if v != VERIFY_FINGERPRINTS[d]]
        _verify_known = not changed
        if changed:
            logging.getLogger(__name__).warning(
                "Tiled seam piece 'client-tls-verify' (scatterbroker.clients.fast_array) does not match the "
                "installed Tiled: %s changed; falling back to stock behaviour (https through the context's "
                "httpx client)", ", ".join(changed))
    return _verify_known


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Transport:
    """Where and how to send block requests for one node.

    Plain ``http.client`` keep-alive connections (one per thread) when the
    Tiled context talks to a real server with an API key or anonymously:
    ``HTTPResponse.readinto`` fills the destination array with no
    intermediate copy. Otherwise (token auth with refresh, in-process ASGI
    app, a proxy from the environment) the context's own httpx client.
    """

    def __init__(self, context: Any, url: str) -> None:
        self.context = context
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "", parts.port
        self.target = urllib.parse.urlunsplit(("", "", parts.path, "", ""))
        client = context.http_client
        self.headers = {}
        auth = client.headers.get("authorization")
        if auth:
            self.headers["Authorization"] = auth
        self.headers["User-Agent"] = "scatterbroker-client"
        proxied = bool(urllib.request.getproxies()) and not urllib.request.proxy_bypass(self.host)
        self.raw = (
            self.scheme in ("http", "https") and client.auth is None
            and getattr(client, "app", None) is None and not type(client).__name__ == "TestClient"
            and not proxied
        )
        self.loopback = _is_loopback(self.host)
        self._ssl = None
        if self.raw and self.scheme == "https" and not context_verify_known():
            self.raw = False  # stock: the context's httpx client, with Tiled's own TLS settings
        if self.raw and self.scheme == "https":
            verify = getattr(context, "_verify", True)  # the seam's one client-side private read
            if isinstance(verify, ssl.SSLContext):
                self._ssl = verify
            elif verify is False:
                self._ssl = ssl._create_unverified_context()
            elif isinstance(verify, str):
                self._ssl = ssl.create_default_context(cafile=verify)
            else:
                self._ssl = ssl.create_default_context()

    def _connection(self) -> http.client.HTTPConnection:
        conns = getattr(_local, "conns", None)
        if conns is None:
            conns = _local.conns = {}
        key = (self.scheme, self.host, self.port)
        conn = conns.get(key)
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.loopback:  # fewer, larger recv calls (elsewhere: leave TCP autotuning alone)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            conns[key] = conn
        return conn

    def _drop(self) -> None:
        conns = getattr(_local, "conns", {})
        conn = conns.pop((self.scheme, self.host, self.port), None)
        if conn is not None:
            conn.close()

    def get(self, query: dict[str, str], out: np.ndarray) -> tuple[str, dict[str, str], Any]:
        """GET with ``query``; raw bodies land in ``out``. Returns (codec, headers, body or None)."""
        if not self.raw:
            return self._get_httpx(query, out)
        path = self.target + "?" + urllib.parse.urlencode(query)
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("GET", path, headers=self.headers)
                resp = conn.getresponse()
            except (http.client.HTTPException, OSError):
                self._drop()  # a kept-alive connection the server closed: retry once
                if attempt:
                    raise
                continue
            try:
                return self._receive(resp, out, path)
            except BaseException:
                self._drop()
                raise
        raise AssertionError("unreachable")

    def _receive(self, resp: http.client.HTTPResponse, out: np.ndarray, path: str):
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status >= 400:
            _raise(resp.status, headers, resp.read(), self.scheme + "://" + f"{self.host}:{self.port}" + path)
        codec = headers.get(_wire.H_CODEC, "none")
        length = int(headers.get("content-length", "-1"))
        if codec == "none" and length == out.nbytes and out.flags.c_contiguous:
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < length:
                n = resp.readinto(view[got:])
                if not n:
                    raise OSError(f"connection closed after {got} of {length} bytes")
                got += n
            resp.read()  # consume the end of the message, keep the connection
            return codec, headers, None
        body = resp.read()
        if length >= 0 and len(body) != length:
            raise OSError(f"received {len(body)} of {length} bytes")
        return codec, headers, body

    def _get_httpx(self, query: dict[str, str], out: np.ndarray):
        from tiled.client.utils import handle_error

        response = handle_error(self.context.http_client.get(self.url, params=query))
        headers = {k.lower(): v for k, v in response.headers.items()}
        return headers.get(_wire.H_CODEC, "none"), headers, response.content


def _raise(status: int, headers: dict[str, str], body: bytes, url: str) -> None:
    import httpx
    from tiled.client.utils import handle_error

    response = httpx.Response(status, headers=headers, content=body, request=httpx.Request("GET", url))
    handle_error(response)
    raise RuntimeError(f"HTTP {status} from {url}")  # handle_error raised for >= 400


class FastArrayClient(ArrayClient):
    """Tiled ``ArrayClient`` reading through scatterbroker's fast data route."""

    #: codec override for this node ("auto", "none", "lz4", "zstd", "blosc2")
    codec: str = CODEC
    #: take stored Bitshuffle-LZ4 chunks undecoded (decoded here, in parallel)
    direct_chunks: bool = DIRECT_CHUNKS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transport: _Transport | None = None
        self._info: dict | None = None

    # -- plumbing

    def _fast_url(self) -> str | None:
        full = self.item["links"].get("full")
        if not full or "/array/full/" not in full:
            return None
        return full.replace("/array/full/", "/sb/frames/", 1).split("?", 1)[0]

    def _fast(self) -> _Transport | None:
        """The transport, or None when this server has no fast route."""
        if self._transport is not None:
            return self._transport
        url = self._fast_url()
        if url is None:
            return None
        base = url.split("/sb/frames/", 1)[0]
        if base not in _probes:
            try:
                r = self.context.http_client.get(base + "/sb/version")
                _probes[base] = r.status_code == 200 and r.json().get("version") == 1
            except Exception:
                return None  # not cached: maybe a transient failure
        if not _probes[base]:
            return None
        self._transport = _Transport(self.context, url)
        return self._transport

    def _facts(self) -> dict:
        """The server's ``/sb/info`` for this node, asked once ({} if it cannot tell)."""
        if self._info is None:
            try:
                from tiled.client.utils import handle_error

                url = self._fast_url().replace("/sb/frames/", "/sb/info/", 1)
                self._info = handle_error(self.context.http_client.get(url)).json()
            except Exception:
                self._info = {}
        return self._info

    def _storage_chunk0(self) -> int:
        """Items per HDF5 chunk along axis 0 (1 when unknown or unchunked)."""
        chunks = ((self._facts().get("storage") or {}).get("chunk_shape")) or [1]
        return max(1, int(chunks[0]))

    def _stored_codecs(self) -> list[str]:
        """Codecs in which the server can send this node's frames as stored, that this process decodes."""
        if not self.direct_chunks:
            return []
        offered = self._facts().get("codecs") or []
        return [c for c in _wire.STORED if c in offered and c in _wire.available_codecs()]

    def _codec(self, transport: _Transport) -> str:
        codec = self.codec
        if codec == "auto":
            codec = "none" if transport.loopback else "blosc2"
        if codec not in _wire.available_codecs():
            codec = "none"
        return codec

    # -- reading

    def read(self, slice: Any = None) -> np.ndarray:  # noqa: A002 (Tiled's name)
        """The whole array, or ``slice`` of it (numpy semantics), as a numpy array."""
        transport = self._fast()
        if transport is None:
            return super().read(slice)
        shape, dtype = tuple(self.shape), self.dtype
        key, post = _wire.normalize(slice, shape)
        out_shape = _wire.key_shape(key)
        out = np.empty(out_shape, dtype=dtype)
        if out.size:
            # Whole frames the server can send as stored (a quarter of their bytes
            # or less) are not cut into rows, which it would decode and send raw.
            stored = self._stored_codecs() if _wire.whole_frames(key, shape) else []
            blocks = self._split(key, out_shape, dtype.itemsize, whole=bool(stored))
            codec = ",".join([*stored, self._codec(transport)])
            if len(blocks) == 1:
                self._fetch(transport, key, out, codec)
            else:
                jobs = [_executor().submit(self._fetch, transport, sub, out[region], codec)
                        for sub, region in blocks]
                for job in jobs:
                    job.result()
        if any(p != slice_all for p in post):
            out = out[post]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.read(key)

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        return self.read().__array__(*args, **kwargs)

    def read_block(self, block: Any, slice: Any = None) -> np.ndarray:  # noqa: A002
        """One block of the chunk grid (``self.chunks``), optionally sub-sliced."""
        if self._fast() is None:
            return super().read_block(block, slice)
        block = tuple(block) if isinstance(block, (tuple, list)) else (block,)
        if len(block) != len(self.chunks):
            raise IndexError(f"block {block} does not match {len(self.chunks)} dimensions")
        region = []
        for i, sizes in zip(block, self.chunks):
            if not 0 <= i < len(sizes):
                raise IndexError(f"Block index {block} out of range")
            start = sum(sizes[:i])
            region.append(slice_(start, start + sizes[i]))
        data = self.read(tuple(region))
        return data[slice] if slice is not None else data

    def _split(self, key: _wire.Key, out_shape: tuple[int, ...], itemsize: int,
               limit: int | None = None, *, whole: bool = False) -> list:
        """Block requests of at most ``limit`` bytes, each filling a contiguous region of the result.

        ``limit`` is BLOCK_BYTES for large reads and smaller (down to BLOCK_MIN)
        for medium ones, so that 2 blocks per thread exist. ``whole``: never
        split one item of the leading axis (a frame sent as stored).
        """
        total = math.prod(out_shape) * itemsize
        if limit is None:
            limit = max(min(BLOCK_MIN, BLOCK_BYTES), min(BLOCK_BYTES, -(-total // (2 * CLIENT_THREADS))))
        if total <= limit or not out_shape or (whole and isinstance(key[0], int)):
            return [(key, ())]
        axis = next(i for i, k in enumerate(key) if isinstance(k, slice))
        k = key[axis]
        n = out_shape[0]
        per_item = total // n
        if per_item > limit and len(out_shape) > 1 and not whole:
            # one item of the leading axis is itself large: split each further
            blocks = []
            for j, i in enumerate(range(k.start, k.stop, k.step)):
                sub = key[:axis] + (i,) + key[axis + 1:]
                for subkey, region in self._split(sub, out_shape[1:], itemsize, limit):
                    blocks.append((subkey, (j, *region)))
            return blocks
        step = max(1, limit // per_item)
        c0 = self._storage_chunk0() if axis == 0 and k.step == 1 else 1
        if c0 > 1:
            step = max(c0, step // c0 * c0)
        blocks = []
        j = 0
        while j < n:
            i0 = k.start + j * k.step
            stop = j + step
            if c0 > 1:  # end on a chunk boundary (absolute frame index)
                stop = min(n, (((i0 + step) // c0) * c0) - k.start)
                if stop <= j:
                    stop = min(n, j + step)
            stop = min(n, stop)
            sub = slice_(i0, k.start + (stop - 1) * k.step + 1, k.step)
            blocks.append((key[:axis] + (sub,) + key[axis + 1:], (slice_(j, stop),)))
            j = stop
        return blocks

    def _fetch(self, transport: _Transport, key: _wire.Key, out: np.ndarray, codec: str) -> None:
        """One request for ``key``, landing in ``out`` (C-contiguous, the key's shape);
        ``codec`` is the preference list sent."""
        query = {
            "slice": _wire.format_slice(key),
            "codec": codec,
            "shape": ",".join(map(str, self.shape)),  # the server re-reads a node that changed shape
        }
        got, headers, body = transport.get(query, out)
        shape = tuple(int(s) for s in headers.get(_wire.H_SHAPE, "").split(",") if s)
        if shape != out.shape:
            raise ValueError(f"server sent shape {shape}, expected {out.shape}")
        if np.dtype(headers.get(_wire.H_DTYPE, out.dtype.str)).itemsize != out.dtype.itemsize:
            raise ValueError(f"server sent dtype {headers.get(_wire.H_DTYPE)}, expected {out.dtype.str}")
        if body is not None:
            decode_body(got, body, headers, out, one_item=isinstance(key[0], int))


slice_ = slice
slice_all = slice(None)


def decode_body(codec: str, body: bytes, headers: dict[str, str], out: np.ndarray, *, one_item: bool) -> None:
    """Decode a fast-route answer packed with ``codec`` into ``out`` (C-contiguous, the
    selection's shape; ``one_item``: the selection took one item of the leading axis by index)."""
    if codec in _wire.STORED and one_item:
        out = out[np.newaxis]  # one stored frame
    if codec == "bslz4":
        _decode_chunks(body, headers, out)
    elif codec == "cbf":
        _decode_cbf(body, headers, out)
    else:
        _wire.decode_into(codec, body, memoryview(out.reshape(-1).view(np.uint8)))


def _decode_chunks(body: bytes, headers: dict[str, str], out: np.ndarray) -> None:
    sizes = [int(s) for s in headers[_wire.H_CHUNKS].split(",") if s]
    counts = [int(s) for s in headers[_wire.H_CHUNK_FRAMES].split(",") if s]
    if sum(counts) != out.shape[0] or sum(sizes) != len(body):
        raise ValueError("server sent chunks that do not add up to the request")
    frame = out[0].nbytes if out.shape[0] else 0
    view = memoryview(body)
    src = np.frombuffer(body, dtype=np.uint8)
    pos = k = 0
    for size, count in zip(sizes, counts):
        chunk = src[pos:pos + size]
        stored = _wire.bslz4_size(view[pos:pos + 12])
        if stored == count * frame:
            _wire.bslz4_decode_into(chunk, out[k:k + count], out.dtype.itemsize)
        else:  # last chunk of the dataset: decodes to more frames than exist
            tmp = np.empty(stored // out.dtype.itemsize, dtype=out.dtype)
            _wire.bslz4_decode_into(chunk, tmp, out.dtype.itemsize)
            out[k:k + count] = tmp[: count * (frame // out.dtype.itemsize)].reshape(out[k:k + count].shape)
        pos += size
        k += count


def _decode_cbf(body: bytes, headers: dict[str, str], out: np.ndarray) -> None:
    """Decode the CBF byte-offset sections of whole frames (codec ``cbf``) into ``out``."""
    sizes = [int(s) for s in headers[_wire.H_CHUNKS].split(",") if s]
    frames = out.reshape((-1, *out.shape[-2:]))
    if len(sizes) != len(frames) or sum(sizes) != len(body):
        raise ValueError("server sent CBF frames that do not add up to the request")
    view = memoryview(body)
    pos = 0
    for i, size in enumerate(sizes):
        try:
            frames[i] = byte_offset.decode(view[pos:pos + size], frames.shape[1:], out.dtype)
        except ValueError as err:
            raise ValueError(f"frame {i} of the answer: corrupt CBF data ({err})") from None
        pos += size


# ------------------------------------------------------------------ benchmark


def bench(node: Any, *, frames: int = 20, max_bytes: int = 1 << 30, compare: bool = True,
          seed: int = 0) -> dict[str, Any]:
    """Measure what a user gets from their server for one array node.

    Reads ``frames`` random single items of the leading axis one after the
    other (latency: first, median, 90th percentile), then one slab of leading
    items of at most ``max_bytes`` (throughput), and -- with ``compare`` -- a
    few single items through Tiled's standard endpoint, for reference.

    Examples
    --------
    >>> bench(from_uri(url, api_key=key)["raw/p1/s1/frames"])["frame_ms_median"]  # doctest: +SKIP
    3.1
    """
    import random
    import time

    shape, dtype = tuple(node.shape), np.dtype(node.dtype)
    if not shape:
        raise ValueError("bench needs an array with at least one axis")
    rng = random.Random(seed)
    fast = isinstance(node, FastArrayClient) and node._fast() is not None
    out: dict[str, Any] = {
        "client": type(node).__name__,
        "fast_route": fast,
        "shape": list(shape),
        "dtype": dtype.str,
    }
    if fast:
        transport = node._fast()
        out["transport"] = "http.client" if transport.raw else "httpx"
        out["codec"] = node._codec(transport) + (" (bslz4 where stored so)" if _wire.bslz4_available() else "")
    item_bytes = math.prod(shape[1:]) * dtype.itemsize
    out["frame_bytes"] = item_bytes

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out["first_frame_ms"] = timed(lambda: node[0]) * 1e3
    times = sorted(timed(lambda i=rng.randrange(shape[0]): node[i]) for _ in range(max(1, frames)))
    median = times[len(times) // 2]
    out["frame_ms_median"] = median * 1e3
    out["frame_ms_p90"] = times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3
    out["frame_MBps"] = item_bytes / median / 1e6 if median else None
    k = max(1, min(shape[0], max_bytes // max(1, item_bytes)))
    # twice: the first large read in a process also pays the OS for fresh memory
    # (as a local read would); the second shows the transfer itself
    t1 = timed(lambda: node[:k])
    t2 = timed(lambda: node[:k])
    out["slab"] = {"items": k, "MB": k * item_bytes / 1e6, "s": t2, "MBps": k * item_bytes / t2 / 1e6,
                   "first_s": t1, "first_MBps": k * item_bytes / t1 / 1e6}
    if compare:
        plain = [timed(lambda i=rng.randrange(shape[0]): ArrayClient.read(node, i)) for _ in range(5)]
        out["tiled_frame_ms_median"] = sorted(plain)[2] * 1e3
    return out
