"""CBF byte-offset decoding that lets other threads run (numba, ``nogil``).

The byte-offset compression of CBF files (Pilatus, Eiger miniCBF) stores each
pixel as the difference to the one before, in one byte, or after an escape
byte ``0x80`` in two, or after ``0x8000`` in four, or after ``0x80000000`` in
eight (little-endian, signed). fabio decodes it in Cython while holding the
GIL: 2-3 ms per Pilatus 2M frame during which a server's event loop cannot run
(docs/performance.md, "Load"). :func:`decode` is the same arithmetic compiled
by numba with the GIL released; ``tests/test_byte_offset.py`` checks it
against fabio's codec on frames with every escape width.

The section is hostile input (anyone who can write a file into a readable root
can craft one), and numba compiles without bounds checks. The kernel therefore
checks every index itself: it reads ``src[i]`` only for ``i < src.size``
(an escape whose wider difference would run past the end stops the decode)
and writes ``out[k]`` only for ``k < out.size`` (a section holding more
pixels than the frame stops it). The output is allocated from the *declared*
frame shape only after that size is checked against
:data:`scatterbroker.limits.MAX_CHUNK_BYTES`, so a header claiming a huge frame
costs nothing. ``tests/test_hostile_images.py`` feeds crafted sections to it.
fabio's own Cython decoder (``fabio.ext.byte_offset.dec_cbf``) does read past
the end of its input for a section ending in an escape (``b"\\x80"`` decodes to
bytes that are not in it; docs/security.md): the server never calls it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from scatterbroker import limits
from scatterbroker.errors import RequestTooLarge, UnreadableFile

__all__ = ["decode", "CorruptSection"]


class CorruptSection(UnreadableFile, ValueError):
    """A byte-offset section that does not decode to exactly the declared frame (HTTP 422).

    Also a ValueError: callers outside a server (the client's codec ``cbf``)
    catch it as one.
    """


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True)
    def run(src: np.ndarray, out: np.ndarray) -> int:
        """Decode ``src`` (the section as int8) into ``out``; the count of pixels decoded,
        or -1 if ``src`` ends inside a value, -2 if it holds more pixels than ``out``.

        Every read of ``src`` is at an index < ``src.size`` and every write of
        ``out`` at an index < ``out.size``, checked here (numba does not)."""
        n, m = src.size, out.size
        i = k = 0
        value = 0
        while i < n:
            delta = np.int64(src[i])
            i += 1
            width = 1
            # escape (the smallest value of its width): a difference twice as wide follows
            while width < 8 and delta == -(1 << (8 * width - 1)):
                width *= 2
                if i + width > n:  # the wider difference would run past the end
                    return -1
                delta = np.int64(src[i + width - 1])  # the top byte signed, then the lower ones
                for j in range(width - 2, -1, -1):
                    delta = (delta << 8) | (np.int64(src[i + j]) & 0xFF)
                i += width
            value += delta
            if k >= m:
                return -2
            out[k] = value
            k += 1
        return k

    return run


def decode(section: bytes | memoryview, shape: tuple[int, ...], dtype: Any, *,
           name: str = "CBF section") -> np.ndarray:
    """Decode a CBF byte-offset section to a new ``shape`` (ny, nx) array of ``dtype``.

    ``name`` (a file name, never a server path) starts the error messages.

    Raises
    ------
    RequestTooLarge
        The declared frame (``prod(shape) * itemsize`` bytes) or the section is
        larger than :data:`scatterbroker.limits.MAX_CHUNK_BYTES`; checked
        before anything is allocated or decoded.
    CorruptSection
        Unless the whole section decodes to exactly ``prod(shape)`` pixels (a
        section cut short, ending inside an escape, or too long for the frame),
        or the shape or dtype cannot be a frame.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf" or not dtype.isnative:
        raise CorruptSection(f"{name}: byte-offset data cannot decode to pixel type {dtype}")
    if any(not isinstance(s, (int, np.integer)) or s < 0 for s in shape):
        raise CorruptSection(f"{name}: impossible frame shape {shape}")
    pixels = 1
    for s in shape:
        pixels *= int(s)
    nbytes = pixels * dtype.itemsize
    src = np.frombuffer(section, dtype=np.int8)
    for what, size in (("decodes to", nbytes), ("stores", src.size)):
        if size > limits.MAX_CHUNK_BYTES:
            raise RequestTooLarge(
                f"{name}: its byte-offset section {what} {size} bytes, more than the "
                f"server decodes in one piece (SCATTERBROKER_MAX_CHUNK_BYTES = "
                f"{limits.MAX_CHUNK_BYTES})")
    out = np.empty(pixels, dtype=dtype)
    got = _kernel()(src, out)
    if got != pixels:
        what = ("ends inside a pixel value" if got == -1 else
                "holds more pixels than that" if got == -2 else f"decodes to {got} pixels")
        raise CorruptSection(f"{name}: corrupt CBF data: its {src.size} bytes of byte-offset data {what}; "
                             f"the frame is {' x '.join(map(str, shape[::-1]))} = {pixels} pixels")
    return out.reshape(shape)
