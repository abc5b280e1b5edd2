"""Decoded detector frames kept in memory, keyed by their file as it was when read.

A frame file is decoded whole even when a client asks for a 64 x 64 region of
it (CBF byte-offset data can only be decoded from its start), and a live
display, a region-of-interest plot and a user paging back and forth ask for the
same few frames again and again. :data:`frames` keeps the last decoded frames
of frame sequences (:class:`scatterbroker.adapters.sequence.FrameSequenceAdapter`)
up to ``SCATTERBROKER_FRAME_CACHE_BYTES`` (256 MiB; 0 turns it off), least
recently used first out, like HDF5's chunk cache. A frame is found again only
under the same path *and* the same device, inode, size and modification time
(:func:`scatterbroker.adapters.roots.file_stamp`), so a file replaced or
rewritten is decoded afresh; kept frames are read-only arrays.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np

from scatterbroker.caches import LRU
from scatterbroker.environment import env_number

__all__ = ["FrameCache", "frames"]


class FrameCache:
    """Decoded frames (numpy arrays) kept up to ``max_bytes`` in all, least recently used
    first out (:class:`scatterbroker.caches.LRU` bounded by ``nbytes``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._frames: LRU[np.ndarray] = LRU(self.max_bytes, sizeof=lambda a: a.nbytes)
        self.stats = self._frames.stats

    def get(self, key: Hashable) -> np.ndarray | None:
        """The frame kept under ``key`` (read-only), or None."""
        return self._frames.get(key)

    def put(self, key: Hashable, frame: np.ndarray) -> np.ndarray:
        """Keep ``frame`` (made read-only) under ``key`` if it fits; return it."""
        frame.setflags(write=False)
        self._frames.put(key, frame)
        return frame


#: the process's cache of decoded frames
frames = FrameCache(int(env_number("SCATTERBROKER_FRAME_CACHE_BYTES", 256 << 20)))
