"""Bitshuffle-LZ4 chunks (HDF5 filter 32008), decoded with every read bounded.

Stored chunks come from files the server did not write, so they are hostile
input. The bitshuffle library bundled with hdf5plugin (and the HDF5 filter
h5py uses) decodes each LZ4 block with the compressed size the block's own
4-byte header declares, never checked against the chunk's stored length
(upstream bitshuffle calls ``LZ4_decompress_fast``, told no input size at all;
the build in hdf5plugin 7.1 calls ``LZ4_decompress_safe`` with the declared
size, which bounds nothing when the file lies): a block claiming more bytes
than the chunk holds makes it copy bytes from beyond the chunk (the server's
heap) into the answer, or segfault. This module decodes the same format with
``LZ4_decompress_safe`` only after each block's declared size was checked
against what is left of the chunk, and only then bit-unshuffles the block with
the library's own (bounded: fixed sizes in, fixed sizes out)
``bshuf_bitunshuffle``.

The chunk format (bitshuffle's ``bshuf_h5filter.c``): 8-byte big-endian
decoded size in bytes, 4-byte big-endian block size in bytes, then per block
of ``block`` elements a 4-byte big-endian compressed size and an LZ4 block of
the bit-shuffled elements; the last partial block holds the remaining elements
rounded down to a multiple of 8, and the last ``n % 8`` elements follow as
they are.

Both C functions are called from a numba loop with the GIL released: one
Pilatus 2M frame (1679 x 1475 uint32) decodes in 3.3 ms, the library's
unchecked ``bshuf_decompress_lz4`` in 3.1 ms (same run, this machine); the
checks cost ~5 %. The two symbols are looked up in the library hdf5plugin
reports (``get_config().registered_filters["bshuf"]``); without them nothing
here decodes (:func:`available` is False, :func:`decode_into` refuses): there
is no unchecked fallback.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["available", "decoded_size", "decode_into", "BadChunk", "compress_lz4"]


class BadChunk(ValueError):
    """A stored Bitshuffle-LZ4 chunk whose framing or LZ4 data is inconsistent."""


_ERRORS = {
    -1: "shorter than its 12-byte header",
    -2: "declares a decoded size different from the chunk's shape",
    -3: "declares a block size that is not a positive multiple of 8 elements",
    -4: "ends inside a block header",
    -5: "declares a compressed block larger than the rest of the chunk",
    -6: "holds an LZ4 block that does not decode to exactly one block",
    -7: "could not be bit-unshuffled",
    -8: "ends before its last elements",
}


@functools.lru_cache(maxsize=1)
def _cdll() -> Any:
    """hdf5plugin's bitshuffle library (the path hdf5plugin reports), or None."""
    try:
        import hdf5plugin

        return ctypes.CDLL(hdf5plugin.get_config().registered_filters.get("bshuf"))
    except Exception:
        return None


@functools.lru_cache(maxsize=1)
def _library() -> tuple[Any, Any] | None:
    """``(LZ4_decompress_safe, bshuf_bitunshuffle)`` from hdf5plugin's bitshuffle, or None."""
    try:
        lib = _cdll()
        lz4, unshuffle = lib.LZ4_decompress_safe, lib.bshuf_bitunshuffle
    except Exception:  # no library, no symbol
        return None
    # Pointers are passed as size_t: numba hands an array's address over as an integer.
    ptr = ctypes.c_size_t
    lz4.restype, lz4.argtypes = ctypes.c_int, [ptr, ptr, ctypes.c_int, ctypes.c_int]
    unshuffle.restype, unshuffle.argtypes = ctypes.c_int64, [ptr, ptr, ptr, ptr, ptr]
    return lz4, unshuffle


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import numba

    lz4, unshuffle = _library()  # type: ignore[misc]

    # Not cached on disk: the C functions' addresses are compiled in as constants.
    # Not cached on disk: the C functions' addresses are compiled in as constants.
    @numba.njit(nogil=True)
    def run(src: np.ndarray, out: np.ndarray, tmp: np.ndarray, itemsize: int, block: int) -> int:
        """Decode the blocks of ``src`` (after its checked header) into ``out`` through ``tmp``
        (one block); all uint8. Bytes of ``src`` used, or an error code < 0. ``tmp`` is
        passed in, not allocated here: numba may free an array after its last use, and
        its address is used by the C calls after that."""
        size = src.size
        n = out.size // itemsize
        full, rest = n // block, n % block
        last = rest - rest % 8
        sp, op, tp = src.ctypes.data, out.ctypes.data, tmp.ctypes.data
        pos, off = 12, 0
        for b in range(full + (1 if last else 0)):
            count = block if b < full else last
            want = count * itemsize
            if pos + 4 > size:
                return -4
            used = (np.int64(src[pos]) << 24) | (np.int64(src[pos + 1]) << 16) | (
                np.int64(src[pos + 2]) << 8) | np.int64(src[pos + 3])
            pos += 4
            if used > size - pos:
                return -5
            if lz4(sp + pos, tp, used, want) != want:
                return -6
            if unshuffle(tp, op + off, count, itemsize, count) < 0:
                return -7
            pos += used
            off += want
        left = (n % 8) * itemsize
        if pos + left > size:
            return -8
        for i in range(left):
            out[off + i] = src[pos + i]
        return pos + left

    return run


def _check_header(src: np.ndarray, nbytes: int, itemsize: int) -> int:
    """0 if the 12-byte header fits a chunk of ``nbytes`` decoded bytes, else an error code."""
    if src.size < 12:
        return -1
    total = int.from_bytes(src[:8].tobytes(), "big")
    block_bytes = int.from_bytes(src[8:12].tobytes(), "big")
    if itemsize <= 0 or total != nbytes or total % itemsize:
        return -2
    if block_bytes <= 0 or block_bytes % itemsize or (block_bytes // itemsize) % 8:
        return -3
    return 0


def available() -> bool:
    """True if Bitshuffle-LZ4 chunks can be decoded (with the bounds checked)."""
    return _library() is not None


def decoded_size(chunk: bytes | memoryview | np.ndarray) -> int:
    """The decoded byte size a stored chunk's header declares (bytes 0-8, big endian).

    Declared by the file: check it against the dataset's chunk shape before
    allocating anything of that size.
    """
    head = bytes(memoryview(chunk).cast("B")[:8]) if not isinstance(chunk, np.ndarray) else \
        chunk.view(np.uint8)[:8].tobytes()
    return int.from_bytes(head, "big")


def decode_into(chunk: bytes | memoryview | np.ndarray, out: np.ndarray, itemsize: int) -> None:
    """Decode one stored Bitshuffle-LZ4 chunk into ``out``, reading only inside ``chunk``.

    Parameters
    ----------
    chunk
        The chunk's bytes exactly as stored (header included).
    out
        C-contiguous destination holding exactly the chunk's decoded size (its
        shape and dtype are the dataset's chunk's; only its bytes are written).
    itemsize
        Bytes per element (the shuffle works on elements of this size).

    Raises
    ------
    BadChunk
        The header disagrees with ``out``, a declared size runs past the chunk,
        or an LZ4 block does not decode to exactly its block: nothing beyond
        ``chunk`` was read and ``out`` holds no foreign bytes (it may be
        partly written).
    RuntimeError
        hdf5plugin's bitshuffle library (with ``LZ4_decompress_safe``) is missing.
    """
    if not available():
        raise RuntimeError("Bitshuffle-LZ4 decoding needs hdf5plugin's bitshuffle library")
    if not out.flags.c_contiguous:
        raise ValueError("Bitshuffle-LZ4: the destination must be C-contiguous")
    if isinstance(chunk, np.ndarray):
        src = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    else:
        src = np.frombuffer(chunk, dtype=np.uint8)
    dest = out.reshape(-1).view(np.uint8)
    code = _check_header(src, dest.size, int(itemsize))
    if code == 0:
        block_bytes = int.from_bytes(src[8:12].tobytes(), "big")
        tmp = np.empty(min(block_bytes, dest.size), dtype=np.uint8)  # a block, at most the chunk
        code = _kernel()(src, dest, tmp, int(itemsize), block_bytes // int(itemsize))
    if code < 0:
        raise BadChunk(f"corrupt Bitshuffle-LZ4 chunk: it {_ERRORS.get(code, f'failed ({code})')}")


# ------------------------------------------------------------------ compression


@functools.lru_cache(maxsize=1)
def _compressor() -> Any:
    """The library with ``bshuf_compress_lz4`` and its bound, or None."""
    try:
        lib = _cdll()
        lib.bshuf_compress_lz4.restype = ctypes.c_int64
        lib.bshuf_compress_lz4.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_size_t] * 3
        lib.bshuf_compress_lz4_bound.restype = ctypes.c_size_t
        lib.bshuf_compress_lz4_bound.argtypes = [ctypes.c_size_t] * 3
        lib.bshuf_default_block_size.restype = ctypes.c_size_t
        lib.bshuf_default_block_size.argtypes = [ctypes.c_size_t]
        return lib
    except Exception:  # no library, no symbol
        return None


_verdict: dict[str, bool] = {}
_verdict_lock = threading.Lock()
_scratch = threading.local()


def compress_lz4(frame: np.ndarray, probe: Callable[[np.ndarray], bytes]) -> bytes | None:
    """One frame as a stored Bitshuffle-LZ4 HDF5 chunk (header included), or None.

    ``probe(frame)`` must give the HDF5 filter's own chunk for a frame (the
    stacker passes an in-memory HDF5 write). The library is used only if its
    output is byte-identical to the filter's on probe frames of four dtypes,
    checked once per process, so a change inside hdf5plugin falls back to the
    (slower, always correct) filter path instead of writing bad chunks; None
    tells the caller to take that path.
    """
    lib = _compressor()
    if lib is None:
        return None
    with _verdict_lock:
        usable = _verdict.get("usable")
        if usable is None:
            rng = np.random.default_rng(0)
            usable = True
            for dtype in ("int32", "uint16", "float32", "int64"):
                sample = rng.poisson(1.0, (7, 1001)).astype(dtype)
                sample[3, 5] = 70000 if dtype != "uint16" else 60000
                if _compress(lib, sample) != probe(sample):
                    usable = False
                    break
            _verdict["usable"] = usable
    return _compress(lib, frame) if usable else None


def _compress(lib: Any, frame: np.ndarray) -> bytes:
    frame = np.ascontiguousarray(frame)
    size, itemsize = frame.size, frame.itemsize
    block = lib.bshuf_default_block_size(itemsize)
    need = 12 + lib.bshuf_compress_lz4_bound(size, itemsize, block)
    # One output buffer per thread, reused: a fresh one per frame made the heap
    # shrink and regrow, ~5,000 page faults (a third of the CPU time) per 6M frame.
    out = getattr(_scratch, "buffer", None)
    if out is None or out.size < need:
        out = _scratch.buffer = np.empty(need, dtype=np.uint8)
    n = lib.bshuf_compress_lz4(frame.ctypes.data, out.ctypes.data + 12, size, itemsize, block)
    if n < 0:
        raise RuntimeError(f"bitshuffle compression failed (error {n})")
    out[:12] = np.frombuffer(struct.pack(">QI", frame.nbytes, block * itemsize), dtype=np.uint8)
    return out[: 12 + n].tobytes()
