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
            delta = np.int64(src[i])
            i += 1
            width = 1
            # escape (the smallest value of its width): a difference twice as wide follows
            while width < 8 and delta == -(1 << (8 * width - 1)):
                width *= 2
                if i + width > n:
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
