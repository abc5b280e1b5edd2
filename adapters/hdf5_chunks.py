"""Reading HDF5 datasets from files the server did not write, with every cost bounded.

h5py hands compressed chunks to the HDF5 filter plug-ins, which trust the
file: hdf5plugin's Bitshuffle-LZ4 filter reads past a crafted chunk (the
answer then carries the server's heap), and the deflate, Zstd and LZ4 filters
grow their output to whatever the stream decodes to (a 1 MB chunk becomes
1 GiB). So the server never lets HDF5 run a decompressing filter. For a
filtered dataset, :func:`read` fetches each stored chunk the selection touches
with ``read_direct_chunk`` (bytes as stored, nothing decoded) and undoes the
filter pipeline here, each decoder told the stored length and stopped at the
chunk's declared size:

=================  ======  ====================================================
filter             id      decoded by
=================  ======  ====================================================
Bitshuffle-LZ4     32008   :mod:`scatterbroker.bitshuffle` (``LZ4_decompress_safe``)
deflate (gzip)     1       ``zlib`` with ``max_length`` = the chunk's size
Zstd               32015   ``zstandard`` stream reader, read at most chunk + 1 bytes
LZ4                32004   ``lz4.block`` per block, size given (``LZ4_decompress_safe``)
shuffle            2       numpy (a transpose of fixed size)
Fletcher32         3       its 4 checksum bytes are removed (not verified)
=================  ======  ====================================================

Any other filter (Blosc, Blosc2, bzip2, SZ, ZFP, szip, LZF, n-bit,
scale-offset, ...) is refused with 415 naming it. Before any chunk is read,
the selection's cost is checked: a chunk larger than
:data:`~scatterbroker.limits.MAX_CHUNK_BYTES` once decoded, or a selection
touching more than :data:`~scatterbroker.limits.MAX_CHUNKS_PER_READ` chunks,
is refused with 413. Chunks are read one ``read_direct_chunk`` call at a
time, so HDF5's global lock is held for one chunk's bytes, never for a whole
request; decoding runs outside it (Bitshuffle-LZ4 without the GIL).
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..bitshuffle import BadChunk, decode_into as _bslz4_decode_into
from ..errors import RequestTooLarge, ScatterbrokerError, UnreadableFile
from .. import limits

__all__ = ["Pipeline", "pipeline", "read", "check_cost", "UnsupportedFilter"]

DEFLATE, SHUFFLE, FLETCHER32 = 1, 2, 3
LZ4, BITSHUFFLE, ZSTD = 32004, 32008, 32015
_NAMES = {DEFLATE: "deflate", SHUFFLE: "shuffle", FLETCHER32: "fletcher32", 4: "szip",
          5: "nbit", 6: "scaleoffset", 307: "bzip2", 32000: "LZF", 32001: "Blosc",
          LZ4: "LZ4", BITSHUFFLE: "Bitshuffle", ZSTD: "Zstd", 32013: "ZFP", 32017: "SZ",
          32024: "SZ3", 32026: "Blosc2"}


class UnsupportedFilter(ScatterbrokerError):
    """A dataset compressed with a filter the server does not decode (415)."""

    status_code = 415


@dataclass(frozen=True)
class Pipeline:
    """A dataset's filters in the order they were applied when writing."""

    filters: tuple[tuple[int, tuple[int, ...]], ...]  # (filter id, client values)

    @property
    def names(self) -> list[str]:
        return [_NAMES.get(code, f"filter {code}") for code, _ in self.filters]


def pipeline(dset: h5py.Dataset, where: str) -> Pipeline | None:
    """The dataset's filter pipeline, or None when it has none (h5py may read it).

    Raises :class:`UnsupportedFilter` for a filter :func:`read` cannot decode
    with its output bounded; ``where`` names the dataset in the message.
    """
    dcpl = dset.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.CHUNKED or dcpl.get_nfilters() == 0:
        return None
    filters = []
    for i in range(dcpl.get_nfilters()):
        code, _flags, values, _name = dcpl.get_filter(i)
        values = tuple(int(v) for v in values)
        if code == BITSHUFFLE and (len(values) < 5 or values[4] != 2):
            raise UnsupportedFilter(
                f"{where}: Bitshuffle without LZ4 (compression {values[4] if len(values) > 4 else 0}) "
                "is not decoded by this server; only Bitshuffle-LZ4 is")
        if code not in (DEFLATE, SHUFFLE, FLETCHER32, LZ4, BITSHUFFLE, ZSTD):
            raise UnsupportedFilter(
                f"{where}: compressed with the HDF5 filter {_NAMES.get(code, code)!s} (id {code}), "
                "which this server does not decode: its decoder cannot be bounded by the "
                "stored chunk's size. Read the file where it is stored, or store it with "
                "Bitshuffle-LZ4, gzip, Zstd or LZ4")
        filters.append((int(code), values))
    return Pipeline(tuple(filters))


# ------------------------------------------------------------------ selection


def _axis_chunks(sel: int | slice, chunk: int) -> tuple[int, Any]:
    """How many chunks ``sel`` touches along one axis, and a function listing them."""
    if isinstance(sel, int):
        return 1, lambda: [sel // chunk]
    r = range(sel.start, sel.stop, sel.step)
    if not r:
        return 0, lambda: []
    first, last = r[0] // chunk, r[-1] // chunk
    if r.step <= chunk:  # consecutive picks are at most one chunk apart: every chunk between
        return last - first + 1, lambda: range(first, last + 1)
    return len(r), lambda: [i // chunk for i in r]  # each pick in a chunk of its own


def check_cost(dset: h5py.Dataset, h5sel: tuple, where: str) -> None:
    """Refuse (413) a read whose chunks are too big to decode or too many to visit.

    ``h5sel`` is a normalized selection: per axis an ``int`` in range or a
    ``slice`` with ``0 <= start``, ``stop <= n`` and ``step >= 1``.
    """
    chunks = dset.chunks
    if not chunks:
        return
    if pipeline_is_filtered(dset):
        nbytes = math.prod(chunks) * dset.dtype.itemsize
        if nbytes > limits.MAX_CHUNK_BYTES:
            raise RequestTooLarge(
                f"{where}: one stored chunk {tuple(chunks)} decodes to {nbytes / 2**20:.1f} MiB, "
                f"more than the server decodes per chunk ({limits.MAX_CHUNK_BYTES / 2**20:.0f} MiB, "
                "SCATTERBROKER_MAX_CHUNK_BYTES)")
    touched = math.prod(_axis_chunks(s, c)[0] for s, c in zip(h5sel, chunks))
    if touched > limits.MAX_CHUNKS_PER_READ:
        raise RequestTooLarge(
            f"{where}: the selection touches {touched:,} stored chunks of shape {tuple(chunks)}, "
            f"more than one read may ({limits.MAX_CHUNKS_PER_READ:,}, "
            "SCATTERBROKER_MAX_CHUNKS_PER_READ); request a smaller or denser slice")


def pipeline_is_filtered(dset: h5py.Dataset) -> bool:
    dcpl = dset.id.get_create_plist()
    return dcpl.get_layout() == h5py.h5d.CHUNKED and dcpl.get_nfilters() > 0


def _pieces(sel: int | slice, chunk: int, ci: int) -> tuple[Any, Any] | None:
    """For chunk ``ci`` of an axis: (index into the output, index into the chunk)."""
    lo, hi = ci * chunk, (ci + 1) * chunk
    if isinstance(sel, int):
        return (None, sel - lo) if lo <= sel < hi else None
    start, step = sel.start, sel.step
    n = len(range(sel.start, sel.stop, sel.step))
    k0 = max(0, -(-(lo - start) // step))
    k1 = min(n, -(-(hi - start) // step))
    if k0 >= k1:
        return None
    first = start + k0 * step - lo
    return slice(k0, k1), slice(first, first + (k1 - k0 - 1) * step + 1, step)


# ------------------------------------------------------------------- decoding


def _inflate(data: bytes, size: int) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size)
    except zlib.error as err:
        raise BadChunk(f"corrupt deflate chunk ({err})") from None
    if d.unconsumed_tail or not d.eof:
        if d.unconsumed_tail:
            raise BadChunk(f"deflate chunk inflates to more than its declared {size} bytes")
        raise BadChunk("deflate chunk ends before its stream does")
    return out


def _zstd(data: bytes, size: int) -> bytes:
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            out = reader.read(size + 1)
    except zstandard.ZstdError as err:
        raise BadChunk(f"corrupt Zstd chunk ({err})") from None
    if len(out) > size:
        raise BadChunk(f"Zstd chunk decodes to more than its declared {size} bytes")
    return out


def _lz4(data: bytes, size: int) -> bytes:
    """hdf5plugin's LZ4 filter: 8-byte BE total, 4-byte BE block size, then per block a
    4-byte BE compressed size and the block (stored as is when that equals the block)."""
    import lz4.block

    if len(data) < 12:
        raise BadChunk("LZ4 chunk shorter than its header")
    total, block = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:12], "big")
    if total != size or (block <= 0 and total):
        raise BadChunk(f"LZ4 chunk declares {total} bytes in blocks of {block}, expected {size}")
    out, pos = bytearray(), 12
    while len(out) < total:
        want = min(block, total - len(out))
        if pos + 4 > len(data):
            raise BadChunk("LZ4 chunk ends inside a block header")
        used = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if used > len(data) - pos:
            raise BadChunk("LZ4 chunk declares a block larger than the rest of the chunk")
        piece = data[pos:pos + used]
        if used != want:
            try:
                piece = lz4.block.decompress(piece, uncompressed_size=want)
            except lz4.block.LZ4BlockError as err:
                raise BadChunk(f"corrupt LZ4 block ({err})") from None
            if len(piece) != want:
                raise BadChunk("LZ4 block does not decode to its block size")
        out += piece
        pos += used
    return bytes(out)


def _unshuffle(data: bytes, size: int, itemsize: int) -> bytes:
    if len(data) != size:
        raise BadChunk(f"shuffled chunk holds {len(data)} bytes, expected {size}")
    if itemsize <= 1:
        return data
    n = size // itemsize
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(size, dtype=np.uint8)
    out[: n * itemsize] = src[: n * itemsize].reshape(itemsize, n).T.reshape(-1)
    out[n * itemsize:] = src[n * itemsize:]
    return out.tobytes()


def _decode_chunk(stored: bytes, mask: int, pipe: Pipeline, nbytes: int, dtype: np.dtype,
                  out: np.ndarray) -> None:
    """Undo ``pipe`` on one stored chunk into ``out`` (the chunk's shape, C order)."""
    # the size each filter was given when writing: the chunk, plus 4 per Fletcher32 below it
    sizes, size = [], nbytes
    for code, _ in pipe.filters:
        sizes.append(size)
        size += 4 if code == FLETCHER32 else 0
    data: bytes | None = stored
    for i in range(len(pipe.filters) - 1, -1, -1):
        if mask & (1 << i):
            continue  # this filter was skipped for this chunk
        code, values = pipe.filters[i]
        want = sizes[i]
        if code == BITSHUFFLE:
            if i == 0 and data is not None:  # the last step: decode straight into out
                _bslz4_decode_into(data, out, dtype.itemsize)
                data = None
                continue
            buf = np.empty(want, dtype=np.uint8)
            _bslz4_decode_into(data, buf, values[2] if len(values) > 2 and values[2] else dtype.itemsize)
            data = buf.tobytes()
        elif code == DEFLATE:
            data = _inflate(data, want)
        elif code == ZSTD:
            data = _zstd(data, want)
        elif code == LZ4:
            data = _lz4(data, want)
        elif code == SHUFFLE:
            data = _unshuffle(data, want, values[0] if values else dtype.itemsize)
        elif code == FLETCHER32:  # the checksum is appended to whatever came before it
            if len(data) < 4:
                raise BadChunk("Fletcher32 chunk shorter than its checksum")
            data = data[:-4]
    if data is None:
        return
    if len(data) != nbytes:
        raise BadChunk(f"chunk decodes to {len(data)} bytes, expected {nbytes}")
    out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)


def read(dset: h5py.Dataset, h5sel: tuple, out_shape: tuple[int, ...], dtype: np.dtype,
         pipe: Pipeline, where: str) -> np.ndarray:
    """Read the normalized selection ``h5sel`` of a filtered dataset, chunk by chunk.

    Returns an array of ``out_shape`` (integer-indexed axes dropped) and the
    dataset's own dtype. Chunks never written hold the dataset's fill value.
    Call :func:`check_cost` first.

    Raises
    ------
    UnreadableFile
        A chunk is corrupt or crafted (it would read past its end, or decode
        to another size than its shape): 422, naming the dataset.
    """
    chunks = tuple(dset.chunks)
    nbytes = math.prod(chunks) * dtype.itemsize
    out = np.empty(out_shape, dtype=dtype)
    fill = dset.fillvalue
    scratch = np.empty(chunks, dtype=dtype)
    lists = [_axis_chunks(s, c)[1]() for s, c in zip(h5sel, chunks)]
    for coord in itertools.product(*lists):
        pieces = [_pieces(s, c, ci) for s, c, ci in zip(h5sel, chunks, coord)]
        if any(p is None for p in pieces):
            continue
        dst = tuple(p[0] for p in pieces if p[0] is not None)
        src = tuple(p[1] for p in pieces)
        offset = tuple(ci * c for ci, c in zip(coord, chunks))
        try:
            mask, stored = dset.id.read_direct_chunk(offset)
        except Exception as err:  # h5py raises several types for a chunk never written
            if _allocated(dset, offset):
                raise UnreadableFile(f"{where}: chunk at {offset} unreadable ({err})") from None
            out[dst] = fill
            continue
        try:
            _decode_chunk(bytes(stored), mask, pipe, nbytes, dtype, scratch)
        except BadChunk as err:
            raise UnreadableFile(f"{where}: chunk at {offset}: {err}") from None
        out[dst] = scratch[src]
    return out


def _allocated(dset: h5py.Dataset, offset: tuple[int, ...]) -> bool:
    try:
        info = dset.id.get_chunk_info_by_coord(offset)
    except Exception:
        return False
    return info.byte_offset is not None
