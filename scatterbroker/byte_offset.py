"""CBF byte-offset decoding that lets other threads run (numba, ``nogil``).

The byte-offset compression of CBF files (Pilatus, Eiger miniCBF) stores each
pixel as the difference to the one before, in one byte, or after an escape
byte ``0x80`` in two, or after ``0x8000`` in four, or after ``0x80000000`` in
eight (little-endian, signed). fabio decodes it in Cython while holding the
GIL: 2-3 ms per Pilatus 2M frame during which a server's event loop cannot run
(docs/performance.md, "Load"). :func:`decode` is the same arithmetic compiled
by numba with the GIL released; ``tests/test_byte_offset.py`` checks it
against fabio's codec on frames with every escape width.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["decode"]


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True)
    def run(src: np.ndarray, out: np.ndarray) -> int:
        """Decode ``src`` (the section as int8) into ``out``; the count of pixels decoded,
        or -1 if ``src`` ends inside a value, -2 if it holds more pixels than ``out``."""
        n, m = src.size, out.size
        i = k = 0
        value = 0
        while i < n:
            delta = src[i]
            i += 1
            if delta != -128:
                value += delta
            else:  # escape: a 16-bit difference follows
                if i + 2 > n:
                    return -1
                delta16 = (src[i] & 0xFF) | (np.int32(src[i + 1]) << 8)  # the high byte signed
                i += 2
                if delta16 != -32768:
                    value += delta16
                else:  # escape: a 32-bit difference follows
                    if i + 4 > n:
                        return -1
                    delta32 = ((np.int64(src[i]) & 0xFF) | ((np.int64(src[i + 1]) & 0xFF) << 8)
                               | ((np.int64(src[i + 2]) & 0xFF) << 16) | (np.int64(src[i + 3]) << 24))
                    i += 4
                    if delta32 != -2147483648:
                        value += delta32
                    else:  # escape: a 64-bit difference follows
                        if i + 8 > n:
                            return -1
                        delta64 = np.int64(0)
                        for j in range(8):
                            delta64 |= (np.int64(src[i + j]) & 0xFF) << (8 * j)
                        i += 8
                        value += delta64
            if k >= m:
                return -2
            out[k] = value
            k += 1
        return k

    return run


def decode(section: bytes | memoryview, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Decode a CBF byte-offset section to a new ``shape`` (ny, nx) array of ``dtype``.

    Raises ValueError unless the whole section decodes to exactly ny * nx
    pixels (a section cut short, or too long for the frame, is refused).
    """
    out = np.empty(shape, dtype=dtype)
    src = np.frombuffer(section, dtype=np.int8)
    got = _kernel()(src, out.reshape(-1))
    if got != out.size:
        what = ("ends inside a pixel value" if got == -1 else
                "holds more pixels than that" if got == -2 else f"decodes to {got} pixels")
        raise ValueError(f"its {src.size} bytes of byte-offset data {what}; "
                         f"the frame is {' x '.join(map(str, shape[::-1]))} = {out.size} pixels")
    return out
