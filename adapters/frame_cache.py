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

import threading
from collections import OrderedDict
from typing import Hashable

import numpy as np

from scatterbroker.environment import env_number

__all__ = ["FrameCache", "frames"]


class FrameCache:
    """A thread-safe LRU of numpy arrays bounded by their total bytes (``max_bytes``)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._frames: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = {"hit": 0, "miss": 0}

    def get(self, key: Hashable) -> np.ndarray | None:
        """The frame kept under ``key`` (read-only), or None."""
        with self._lock:
            frame = self._frames.get(key)
            if frame is None:
                self.stats["miss"] += 1
                return None
            self._frames.move_to_end(key)
            self.stats["hit"] += 1
            return frame

    def put(self, key: Hashable, frame: np.ndarray) -> np.ndarray:
        """Keep ``frame`` (made read-only) under ``key`` if it fits; return it."""
        frame.setflags(write=False)
        if frame.nbytes > self.max_bytes:
            return frame
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._frames[key] = frame
            self._bytes += frame.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= dropped.nbytes
        return frame


#: the process's cache of decoded frames
frames = FrameCache(int(env_number("SCATTERBROKER_FRAME_CACHE_BYTES", 256 << 20)))
