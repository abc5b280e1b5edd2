"""Follow a growing frame stack: your function is called once per new frame, in order.

Tiled's subscription API gives the building blocks, with three traps for a
live display: its callback registry holds callbacks *weakly* (an inline
``lambda`` is collected at once and never called), one update may carry
several frames ``(k, ny, nx)`` during a burst, and an update can arrive late
or twice after a reconnect. :func:`follow` keeps its callback alive until
stopped, reads what each update announces through the node itself (the fast
route for scatterbroker arrays), and calls ``on_frame(index, frame)`` once per
frame index, in increasing order, never twice.

Examples
--------
>>> from tiled.client import from_uri                              # doctest: +SKIP
>>> from scatterbroker.clients import follow                       # doctest: +SKIP
>>> frames = from_uri(URL)["raw/proposal-42/sample1/scan1/frames"]   # doctest: +SKIP
>>> with follow(frames, lambda i, frame: print(i, frame.max())):   # doctest: +SKIP
...     input("following; press Enter to stop")
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["follow", "Follower"]

log = logging.getLogger(__name__)
#: followers not yet stopped: Tiled holds their callbacks weakly, so someone must hold them
_active: set[Follower] = set()
_active_lock = threading.Lock()


class Follower:
    """A running :func:`follow`; stop it with :meth:`stop` (or use it as a context manager).

    ``next_index`` is the index of the next frame ``on_frame`` will get;
    ``errors`` collects exceptions raised while reading or by ``on_frame``
    (they are logged too; following goes on).
    """

    def __init__(self, node: Any, on_frame: Callable[[int, np.ndarray], Any], start: int | None) -> None:
        self._node = node
        self._on_frame = on_frame
        self._lock = threading.Lock()
        self.next_index = int(node.shape[0]) if start is None else int(start)
        self.errors: list[BaseException] = []
        self._subscription = node.subscribe()
        self._subscription.new_data.add_callback(self._update)
        with _active_lock:
            _active.add(self)
        self._subscription.start_in_thread()

    def _announced_end(self, update: Any) -> int:
        patch = getattr(update, "patch", None)
        if patch is not None:
            return int(patch.offset[0]) + int(patch.shape[0])
        offset = getattr(update, "offset", None)
        if offset:
            return int(offset[0]) + int(update.shape[0])
        return int(update.shape[0])

    def _update(self, update: Any) -> None:
        try:
            self.deliver_until(self._announced_end(update))
        except Exception as err:  # keep following: a display must not die on one bad frame
            self.errors.append(err)
            log.warning("follow %s: %s", getattr(self._node, "uri", self._node), err)

    def deliver_until(self, end: int) -> None:
        """Call ``on_frame`` for every index from ``next_index`` up to ``end`` (exclusive)."""
        with self._lock:  # one update at a time, so frames go out in order
            if end <= self.next_index:
                return  # announced before, or again after a reconnect
            self._node.refresh()  # the node's shape as the server has it now
            end = min(end, int(self._node.shape[0]))
            if end <= self.next_index:
                return
            frames = self._node[self.next_index:end]  # one read for a burst
            for k in range(len(frames)):
                self._on_frame(self.next_index, frames[k])
                self.next_index += 1

    def stop(self) -> None:
        """Disconnect; ``on_frame`` is not called after this returns."""
        self._subscription.disconnect()
        with _active_lock:
            _active.discard(self)

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def follow(node: Any, on_frame: Callable[[int, np.ndarray], Any], *, start: int | None = None) -> Follower:
    """Call ``on_frame(index, frame)`` for every frame appended to ``node`` from now on.

    Parameters
    ----------
    node
        A Tiled array client of a frame stack, axes ``(frame, y, x)`` (e.g. a scan's
        ``frames`` while the watcher registers them).
    on_frame
        Called on the subscription's thread with the frame's index along axis 0
        and the frame ``(ny, nx)``, once per index, in increasing order.
    start
        First index to deliver; default: the stack's length now (only new frames).
        ``start=0`` first delivers the frames already there.

    Returns
    -------
    Follower
        Keeps following until :meth:`Follower.stop` (or the end of a ``with`` block).
    """
    follower = Follower(node, on_frame, start)
    follower.deliver_until(int(node.shape[0]))  # what is there already, from ``start`` on
    return follower
