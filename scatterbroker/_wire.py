"""Wire format of the fast data route, shared by the server (:mod:`.fastpath`)
and the client (:mod:`.client`).

A response body is the selected array in C order, in the byte order the file
stores it (``X-SB-Dtype`` is numpy's ``dtype.str``, e.g. ``"<u4"`` or ``">i2"``),
of shape ``X-SB-Shape``. ``X-SB-Codec`` says how the body is packed:

``none``
    raw bytes;
``lz4`` / ``zstd`` / ``blosc2``
    one compressed frame of the raw bytes (lz4: ``lz4.block`` with the size
    stored in front; zstd: a zstd frame; blosc2: a blosc2 chunk);
``bslz4``
    the HDF5 chunks exactly as stored (Bitshuffle-LZ4 filter, 12-byte
    bitshuffle header each), concatenated; ``X-SB-Chunks`` lists their byte
    sizes and ``X-SB-Chunk-Frames`` how many leading-axis items each holds
    once decoded. Nothing was decompressed on the server.
``cbf``
    the byte-offset sections of CBF frame files exactly as stored (after
    their headers were checked), concatenated, one per leading-axis item;
    ``X-SB-Chunks`` lists their byte sizes (``X-SB-Chunk-Frames``: 1 each).
    A quarter of a Pilatus frame's raw bytes, nothing decoded on the server;
    the client decodes them (:mod:`scatterbroker.adapters.byte_offset`).

Only the standard library and numpy are imported at module level: the client
side must not need the server's dependencies.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Any

import numpy as np

from . import bitshuffle

MEDIA_TYPE = "application/x-scatterbroker-array"
H_SHAPE = "x-sb-shape"
H_DTYPE = "x-sb-dtype"
H_CODEC = "x-sb-codec"
H_CHUNKS = "x-sb-chunks"
H_CHUNK_FRAMES = "x-sb-chunk-frames"
#: codecs every server speaks; the STORED ones are offered per node (bytes as stored)
CODECS = ("none", "lz4", "zstd", "blosc2")
#: codecs that send a node's bytes as its files store them, decoded by the client
STORED = ("bslz4", "cbf")
MAX_SLICE_TEXT = 2000

_INT = r"-?\d{1,19}"
_DIM = re.compile(rf"^(?:(?P<int>{_INT})|(?P<start>{_INT})?:(?P<stop>{_INT})?(?::(?P<step>{_INT})?)?)$")

Key = tuple  # of int | slice (normalized: 0 <= start <= stop <= n, step >= 1)


class BadSlice(ValueError):
    """A slice string that is malformed or does not fit the array's shape."""


def parse_slice(text: str, shape: tuple[int, ...]) -> Key:
    """Parse ``"0:10:2,5,..."`` strictly against ``shape``.

    Returns one item per axis: an ``int`` in ``[0, n)`` or a ``slice`` with
    ``0 <= start <= stop <= n`` and ``step >= 1``. Negative indices count from
    the end as in numpy; anything else numpy would clip or reverse is refused:
    the fast route is for programs, which should ask for what exists.

    Raises
    ------
    BadSlice
        With a message naming the offending item.

    Examples
    --------
    >>> parse_slice("1:3,...", (4, 5, 6))
    (slice(1, 3, 1), slice(0, 5, 1), slice(0, 6, 1))
    """
    text = (text or "").strip()
    if len(text) > MAX_SLICE_TEXT:
        raise BadSlice(f"slice string longer than {MAX_SLICE_TEXT} characters")
    items = [t.strip() for t in text.split(",")] if text else []
    if items.count("...") > 1:
        raise BadSlice("at most one '...' is allowed in a slice")
    if "..." in items:
        i = items.index("...")
        fill = len(shape) - (len(items) - 1)
        if fill < 0:
            raise BadSlice(f"too many indices ({len(items) - 1}) for an array of {len(shape)} dimensions")
        items = items[:i] + [":"] * fill + items[i + 1:]
    if len(items) > len(shape):
        raise BadSlice(f"too many indices ({len(items)}) for an array of {len(shape)} dimensions {tuple(shape)}")
    items += [":"] * (len(shape) - len(items))
    key: list[Any] = []
    for axis, (item, n) in enumerate(zip(items, shape)):
        m = _DIM.match(item)
        if m is None:
            raise BadSlice(f"malformed index {item!r} on axis {axis}: use i, start:stop or start:stop:step")
        if m["int"] is not None:
            i = int(m["int"])
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise BadSlice(f"index {i} is out of range for axis {axis} with size {n}")
            key.append(j)
            continue
        step = int(m["step"]) if m["step"] else 1
        if step <= 0:
            raise BadSlice(
                f"step {step} on axis {axis}: only positive steps are served "
                "(read with a positive step and reverse locally)"
            )
        bounds = []
        for name, default in (("start", 0), ("stop", n)):
            raw = m[name]
            if raw is None:
                bounds.append(default)
                continue
            v = int(raw)
            w = v + n if v < 0 else v
            if not 0 <= w <= n:
                raise BadSlice(f"{name} {v} is out of range for axis {axis} with size {n}")
            bounds.append(w)
        start, stop = bounds
        if stop < start:
            raise BadSlice(f"slice {item!r} on axis {axis} has stop before start")
        key.append(slice(start, stop, step))
    return tuple(key)


def format_slice(key: Key) -> str:
    """The inverse of :func:`parse_slice` for a normalized key."""
    parts = []
    for k in key:
        if isinstance(k, slice):
            step = "" if k.step in (None, 1) else f":{k.step}"
            parts.append(f"{k.start}:{k.stop}{step}")
        else:
            parts.append(str(int(k)))
    return ",".join(parts)


def key_shape(key: Key) -> tuple[int, ...]:
    """Shape of ``array[key]`` for a normalized key."""
    return tuple(len(range(k.start, k.stop, k.step)) for k in key if isinstance(k, slice))


def whole_frames(key: Key, shape: tuple[int, ...]) -> bool:
    """Whether a normalized ``key`` selects whole items of the leading axis (every pixel of
    each): what a node can send as its files store them (the ``STORED`` codecs)."""
    return len(shape) > 1 and len(key) == len(shape) and all(
        isinstance(k, slice) and k.step == 1 and k.start == 0 and k.stop == n for k, n in zip(key[1:], shape[1:]))


def normalize(key: Any, shape: tuple[int, ...]) -> tuple[Key, tuple[Any, ...]]:
    """Numpy-style ``key`` -> (server key, local post-selection).

    The server key has positive steps and in-range bounds; the post-selection
    (applied to the server's answer) reverses axes that asked for negative
    steps. Raises IndexError like numpy for out-of-range integers.
    """
    if key is None or key is Ellipsis:
        key = ()
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key):
        raise TypeError("np.newaxis is not supported here; index the result instead")
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, but {len(key)} were indexed")
    key = key + (slice(None),) * (len(shape) - len(key))
    server, post = [], []
    for axis, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of bounds for axis {axis} with size {n}")
            server.append(i)
            continue
        if not isinstance(k, slice):
            raise TypeError(f"only integers, slices and '...' are supported, not {type(k).__name__}")
        r = range(*k.indices(n))
        if not r:
            server.append(slice(0, 0, 1))
            post.append(slice(None))
        elif r.step > 0:
            server.append(slice(r.start, r[-1] + 1, r.step))
            post.append(slice(None))
        else:
            server.append(slice(r[-1], r[0] + 1, -r.step))
            post.append(slice(None, None, -1))
    return tuple(server), tuple(post)


# ------------------------------------------------------------------ codecs


def available_codecs() -> list[str]:
    """Codecs this process can encode and decode (``none`` always)."""
    return list(_available())


@functools.lru_cache(maxsize=1)
def _available() -> tuple[str, ...]:
    out = ["none"]
    for name, module in (("lz4", "lz4.block"), ("zstd", "zstandard"), ("blosc2", "blosc2")):
        try:
            __import__(module)
        except Exception:
            continue
        out.append(name)
    if bslz4_available():
        out.append("bslz4")
    if importlib.util.find_spec("numba") is not None:  # scatterbroker.adapters.byte_offset decodes it
        out.append("cbf")
    return tuple(out)


def encode(codec: str, data: memoryview, itemsize: int) -> bytes | memoryview:
    """Pack the raw bytes ``data`` with ``codec`` (fast, low levels)."""
    if codec == "none":
        return data
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(data, mode="fast", acceleration=1, store_size=True)
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(data)
    if codec == "blosc2":
        import blosc2

        return blosc2.compress(data, typesize=itemsize, clevel=1, filter=blosc2.Filter.SHUFFLE, codec=blosc2.Codec.LZ4)
    raise ValueError(f"unknown codec {codec!r}")


def decode_into(codec: str, body: bytes | memoryview, out: memoryview) -> None:
    """Unpack ``body`` (packed with ``codec``) into the byte buffer ``out``."""
    n = out.nbytes
    if codec == "none":
        if len(body) != n:
            raise ValueError(f"expected {n} bytes, got {len(body)}")
        out[:] = body
        return
    if codec == "lz4":
        import lz4.block

        if len(body) < 4 or int.from_bytes(bytes(body[:4]), "little") != n:
            raise ValueError(f"lz4: the body does not declare the expected {n} bytes")
        raw = lz4.block.decompress(body)
    elif codec == "zstd":
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=n)
    elif codec == "blosc2":
        import blosc2

        # check the sizes the header declares before blosc allocates and reads by them
        if blosc2.get_cbuffer_sizes(body)[:2] != (n, len(body)):
            raise ValueError(f"blosc2: the body does not declare {n} bytes in {len(body)}")
        raw = blosc2.decompress(body)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if len(raw) != n:
        raise ValueError(f"{codec}: decoded {len(raw)} bytes, expected {n}")
    out[:] = raw


# ----------------------------------------------------------- Bitshuffle-LZ4


def bslz4_available() -> bool:
    return bitshuffle.available()


def bslz4_size(chunk: bytes | memoryview) -> int:
    """Decoded byte size stored in a Bitshuffle-LZ4 HDF5 chunk's header."""
    return bitshuffle.decoded_size(chunk)


def bslz4_decode_into(chunk: bytes | memoryview | np.ndarray, out: np.ndarray, itemsize: int) -> None:
    """Decode one stored Bitshuffle-LZ4 HDF5 chunk into the C-contiguous ``out``,
    reading only inside ``chunk`` (:func:`scatterbroker.bitshuffle.decode_into`).

    ``out`` must hold exactly the chunk's decoded size; raises ``ValueError``
    (:class:`~scatterbroker.bitshuffle.BadChunk`) on a chunk that is corrupt or
    crafted to read past its end.
    """
    bitshuffle.decode_into(chunk, out, itemsize)
