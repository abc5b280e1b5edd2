"""What one request may cost the server: the bounds against hostile files.

Every bound here protects the server from a file (or a request) crafted to
make one read expensive: a decompression bomb, a dataset whose chunks are one
element each, a group that hard-links to itself, an object with 100,000
attributes. A read that would pass a bound is refused with
:class:`~scatterbroker.errors.RequestTooLarge` (HTTP 413) naming the bound and
its setting, before the expensive work starts; the rest of the catalog keeps
serving. ``docs/security.md`` (section "Hostile files") says what each one
protects.

Each value is read once, at import, from the environment variable named beside
it; the defaults fit a Pilatus 6M / Eiger 16M beamline.
"""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


#: Largest decoded size of one stored chunk (HDF5 chunk, TIFF strip/tile/page,
#: CBF binary section) the server decompresses, bytes. An Eiger 16M uint32
#: frame is 72.6 MB; a chunk declaring more is refused before it is decoded, so
#: a 1 MB chunk that inflates to 1 GiB costs nothing.
MAX_CHUNK_BYTES = _int("SCATTERBROKER_MAX_CHUNK_BYTES", 128 * 2**20)

#: Most stored chunks one read may touch. ``slice=::65536`` through a
#: ``(2**40,)`` dataset of 1-element chunks touches 16.7 million chunks, each a
#: separate HDF5 lookup under the library's global lock.
MAX_CHUNKS_PER_READ = _int("SCATTERBROKER_MAX_CHUNKS_PER_READ", 100_000)

#: Most attributes read from one HDF5 object into its metadata; an object with
#: more is served with its attributes omitted and an ``error`` saying so.
MAX_ATTRIBUTES = _int("SCATTERBROKER_MAX_ATTRIBUTES", 1000)

#: Most elements of a variable-length string dataset decoded while a node is
#: built (to learn the longest string); a larger one is served with an error.
MAX_VLEN_STRINGS = _int("SCATTERBROKER_MAX_VLEN_STRINGS", 100_000)

#: Most members of a group whose listing is inlined into its parent's metadata
#: answer; a larger group (or one reached through more than one hard link) is
#: listed on request only.
MAX_INLINED_MEMBERS = _int("SCATTERBROKER_MAX_INLINED_MEMBERS", 1000)

#: Bytes one plain (unfiltered) HDF5 read hands to the library in one call: a
#: larger read is split, so the library's global lock is released between the
#: pieces and other requests' reads run in between.
HDF5_READ_PIECE_BYTES = _int("SCATTERBROKER_HDF5_READ_PIECE_BYTES", 16 * 2**20)

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_CHUNKS_PER_READ",
    "MAX_ATTRIBUTES",
    "MAX_VLEN_STRINGS",
    "MAX_INLINED_MEMBERS",
    "HDF5_READ_PIECE_BYTES",
]
