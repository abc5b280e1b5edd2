"""Blosc2 compression of Tiled's array answers, shuffled by the array's item size.

Tiled compresses an ``application/octet-stream`` answer with Blosc2 when the
client accepts it (Tiled's own Python client does), using the body's
``itemsize`` as Blosc's type size. Its array serializer hands over the array's
bytes as ``memoryview(array).cast("B")``, whose item size is 1, so the shuffle
filter does nothing: a Pilatus 2M frame (int32 counts) took 16 ms on the event
loop and came out at 1.9 MB, against 3 ms and 1.0 MB with type size 4
(docs/performance.md, "Load"). :class:`BloscBuffer` takes the item size of the
array behind the memoryview (``memoryview.obj``), and 1 for anything else
(streamed byte chunks, which Tiled's would refuse unless their length is a
multiple of 8). The output is an ordinary Blosc2 chunk: any Blosc2 decoder,
Tiled's client included, reads it. :func:`install` registers it in Tiled's
compression registry in place of Tiled's (same encoding name, same rank).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BloscBuffer", "install", "type_size"]


def type_size(body: Any) -> int:
    """Blosc's type size for a body: the item size of the array it views, else its own."""
    size = getattr(getattr(body, "obj", None), "itemsize", None) or getattr(body, "itemsize", 1)
    nbytes = getattr(body, "nbytes", None) or len(body)
    return size if size and nbytes % size == 0 else 1


class BloscBuffer:
    """Tiled's ``BloscBuffer`` (the ``gzip.GzipFile`` interface its compression middleware
    uses), with Blosc's type size from :func:`type_size`."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def write(self, body: Any) -> None:
        import blosc2

        self._file.write(blosc2.compress(body, typesize=type_size(body)))

    def close(self) -> None:
        pass


def install() -> bool:
    """Put :class:`BloscBuffer` in Tiled's compression registry for array answers
    (``application/octet-stream``); False if Tiled offers no Blosc2 (not installed)."""
    from tiled.media_type_registration import default_compression_registry

    try:
        default_compression_registry.dispatch("application/octet-stream", "blosc2")
    except ValueError:
        return False
    # only over the Tiled BloscBuffer it was written against (else Tiled's, and a line in the log)
    from scatterbroker.server import tiled_compat

    return tiled_compat.install("blosc-typesize", lambda: default_compression_registry.register(
        "application/octet-stream", "blosc2", BloscBuffer))
