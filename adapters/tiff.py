"""TIFF frames via tifffile: single images, multi-page stacks, numbered sequences.

A Pilatus TIFF carries the miniCBF header in its ImageDescription tag; it is
harvested like a CBF header, so the same search finds scans in either format.

Pages are hostile input. tifffile decodes a whole page (every strip or tile of
it) for any read, even a 1-pixel one, and allocates the page's *declared*
size; its own zlib, LZMA and PackBits decoders (without imagecodecs) ignore
the decoded size it asks for, so a 1 MB zlib strip of a page declared 16 x 16
inflates to whatever the stream holds (1 GiB here). So, before tifffile
decodes a page: its compression must be one of :data:`SERVED_COMPRESSIONS`,
whose decoders below stop at the size tifffile asks for, and the page and each
of its strips or tiles must decode to at most
:data:`scatterbroker.limits.MAX_CHUNK_BYTES` (else HTTP 413, naming the file,
the size and the setting). A stack is read page by page, and a read whose
answer would exceed the response limit is refused before any page is read.
"""

from __future__ import annotations

import functools
import lzma
import math
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ndindex import ndindex
from tiled.structures.array import ArrayStructure, BuiltinDtype

from .. import limits
from ..caches import LRU
from ..errors import FrameMismatch, IncompleteFile, RequestTooLarge, UnreadableFile
from .minicbf import CBFHeader, parse_text_header
from .roots import file_stamp
from .single import SingleFileAdapter
from .sequence import MAX_READ_BYTES, FrameInfo, HarvestingSequence, expand

_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# ------------------------------------------------------------------ bounded decoders


def _limit(out: Any) -> int:
    """The most bytes a decoder may produce for tifffile's ``out``: the segment's
    declared decoded size (tifffile passes it as an int), else the chunk limit."""
    if isinstance(out, (int, np.integer)) and not isinstance(out, bool):
        return int(out)
    if out is None:
        return limits.MAX_CHUNK_BYTES
    return memoryview(out).nbytes


def _deliver(decoded: bytes, out: Any) -> Any:
    """``decoded`` as tifffile expects it: copied into ``out`` when that is a buffer."""
    if out is None or isinstance(out, (int, np.integer)):
        return decoded
    view = memoryview(out).cast("B")
    view[:len(decoded)] = decoded
    return out


def zlib_decode(data: bytes, /, *, out: Any = None) -> Any:
    """Zlib/Deflate (TIFF compressions 8, 32946, 50013), stopping at the declared size.

    tifffile's fallback calls ``zlib.decompress(data)``, unbounded: a 1 MB
    stream of zeros in a strip declared 16 x 16 pixels inflates to 1 GiB. Here
    zlib produces at most ``_limit(out)`` bytes; the rest of the stream is not
    decoded (libtiff also reads only the bytes a strip needs)."""
    return _deliver(zlib.decompressobj().decompress(data, _limit(out)), out)


def lzma_decode(data: bytes, /, *, out: Any = None) -> Any:
    """LZMA (TIFF compression 34925), stopping at the declared size.

    The decoder's own memory is limited too: liblzma allocates the dictionary
    the stream declares (8 MiB at xz's default preset, up to 1.5 GiB in a
    crafted header) whatever the output; more than the larger of the declared
    size and 64 MiB (xz's largest preset) plus 1 MiB is refused (LZMAError)."""
    limit = _limit(out)
    decoder = lzma.LZMADecompressor(memlimit=max(limit, 64 << 20) + (1 << 20))
    return _deliver(decoder.decompress(data, limit), out)


@functools.lru_cache(maxsize=1)
def _packbits_kernel() -> Any:
    import numba

    @numba.njit(nogil=True, cache=True)
    def run(src: np.ndarray, out: np.ndarray) -> int:
        """PackBits ``src`` into ``out`` (both uint8); the count of bytes written.

        Reads only ``src[i]`` for ``i < src.size`` and writes only ``out[k]``
        for ``k < out.size`` (checked here: numba does not)."""
        n, m = src.size, out.size
        i = k = 0
        while i < n and k < m:
            h = np.int64(src[i])
            i += 1
            if h < 128:  # a literal run of h + 1 bytes
                count = min(h + 1, n - i, m - k)
                for j in range(count):
                    out[k + j] = src[i + j]
                i += h + 1
                k += count
            elif h > 128:  # the next byte, 257 - h times
                if i >= n:
                    break
                count = min(257 - h, m - k)
                for j in range(count):
                    out[k + j] = src[i]
                i += 1
                k += count
            # h == 128: no operation
        return k

    return run


def packbits_decode(data: bytes, /, *, out: Any = None) -> Any:
    """PackBits (TIFF compression 32773), stopping at the declared size.

    tifffile's fallback decodes into a Python list (8 bytes of pointer per
    decoded byte, ~1 s per 10 MB) and ignores the declared size."""
    buf = np.empty(_limit(out), dtype=np.uint8)
    k = _packbits_kernel()(np.frombuffer(data, dtype=np.uint8), buf)
    return _deliver(buf[:k].tobytes(), out)


#: TIFF compressions served, with a decoder that stops at the size tifffile
#: declares for the strip or tile (none, zlib/deflate, LZMA, PackBits). Others
#: (LZW, JPEG, zstd, ...) are refused with HTTP 422: their decoders come from
#: imagecodecs, not installed here, whose bounds are not checked by our tests.
SERVED_COMPRESSIONS: dict[int, Callable[..., Any] | None] = {
    1: None, 8: zlib_decode, 32946: zlib_decode, 50013: zlib_decode,
    34925: lzma_decode, 32773: packbits_decode,
}


class _BoundedDecompressors(Mapping):
    """tifffile's decompressor table with ours for :data:`SERVED_COMPRESSIONS`.

    tifffile looks decoders up in this process-wide table when it builds a
    page's decode function; installing ours once (at import) makes every
    tifffile read in the server bounded for these codes. Other codes fall
    through to tifffile's own table (our adapters refuse them before)."""

    def __init__(self, original: Mapping) -> None:
        self.original = original

    def __getitem__(self, key: int) -> Callable[..., Any]:
        codec = SERVED_COMPRESSIONS.get(key)
        return codec if codec is not None else self.original[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self.original)

    def __len__(self) -> int:
        return len(self.original)


def _install_bounded_decoders() -> None:
    import tifffile

    table = tifffile.TIFF.DECOMPRESSORS
    if not isinstance(table, _BoundedDecompressors):
        tifffile.TIFF.DECOMPRESSORS = _BoundedDecompressors(table)


_install_bounded_decoders()


def _check_page(page: Any, index: int, path: Path) -> None:
    """Refuse a page before tifffile decodes it, unless its decoding is bounded.

    Raises UnreadableFile (422) for a compression not in
    :data:`SERVED_COMPRESSIONS` or a pixel type tifffile cannot give, and
    RequestTooLarge (413) when the page, or one of its strips or tiles (a
    tile may be declared larger than its image), would decode to more than
    :data:`scatterbroker.limits.MAX_CHUNK_BYTES` bytes.
    """
    compression = int(page.compression)
    if compression not in SERVED_COMPRESSIONS:
        try:
            import tifffile
            label = tifffile.COMPRESSION(compression).name
        except ValueError:
            label = str(compression)
        raise UnreadableFile(
            f"{path.name}: TIFF compression {label} is not served (served: none, zlib/"
            f"deflate, LZMA, PackBits)")
    if page.dtype is None:
        raise UnreadableFile(f"{path.name}: TIFF page {index} has a pixel type that cannot be read")
    itemsize = np.dtype(page.dtype).itemsize
    try:
        segment = math.prod(page.chunks) * itemsize
    except Exception as err:
        raise UnreadableFile(f"{path.name}: corrupt TIFF page {index} ({err})") from None
    for what, size in (("page", math.prod(page.shape) * itemsize), ("strip or tile", segment)):
        if size > limits.MAX_CHUNK_BYTES:
            raise RequestTooLarge(
                f"{path.name}: TIFF page {index}: one {what} decodes to {size} bytes, more than "
                f"the server decodes in one piece (SCATTERBROKER_MAX_CHUNK_BYTES = "
                f"{limits.MAX_CHUNK_BYTES})")


def _open(path: Path):
    """Open a TIFF read-only and check every page's strips lie inside the file."""
    import tifffile

    size = os.stat(path).st_size
    if size == 0:
        raise UnreadableFile(f"{path.name}: empty file (0 bytes), not a TIFF image")
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as err:
        raise UnreadableFile(f"{path.name}: not a readable TIFF ({err})") from None
    try:
        if len(tif.pages) == 0:  # tifffile only logs a bad first-IFD offset
            raise UnreadableFile(
                f"{path.name}: corrupt TIFF: no readable image directory "
                "(the first IFD offset points outside the file)"
            )
        for page in tif.pages:
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
            if ends and max(ends) > size:
                raise IncompleteFile(
                    f"{path.name}: truncated TIFF: image data runs to byte "
                    f"{max(ends)} but the file has {size}"
                )
    except UnreadableFile:
        tif.close()
        raise
    except Exception as err:
        tif.close()
        raise UnreadableFile(f"{path.name}: corrupt TIFF directory ({err})") from None
    return tif


def _header(tif) -> CBFHeader | None:
    """The miniCBF header a Pilatus writes into ImageDescription, if any."""
    desc = tif.pages[0].tags.get("ImageDescription")
    if desc is None or not isinstance(desc.value, str):
        return None
    return parse_text_header(desc.value)


def _sniff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _MAGICS


#: open multi-page TIFF files kept (LRU); SCATTERBROKER_TIFF_OPEN_FILES
OPEN_FILES = int(os.environ.get("SCATTERBROKER_TIFF_OPEN_FILES") or 32)


class _OpenTiffs:
    """Bounded LRU of open, already validated ``TiffFile`` handles.

    Parsing a stack's page directories (and checking every strip lies inside
    the file) costs more than reading one page, so a stack read page by page
    keeps its handle. Keyed by path; a handle is dropped when the file's
    (device, inode, size, mtime) change. One lock per file: tifffile handles
    are not safe for concurrent reads; different files read in parallel.
    Single-page files are not kept (a sequence reads each once).
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._files: LRU[tuple] = LRU(self.maxsize)  # path -> (stamp, TiffFile, its lock)

    @contextmanager
    def open(self, path: Path) -> Iterator[Any]:
        """A validated ``TiffFile`` of ``path``, for this thread alone while in use."""
        stamp = file_stamp(os.stat(path))
        hit = self._files.get(str(path))
        if hit is None or hit[0] != stamp:
            tif = _open(path)
            if len(tif.pages) == 1:
                try:
                    yield tif
                finally:
                    tif.close()
                return
            hit = (stamp, tif, threading.Lock())
            for _stamp, handle, lock in self._files.put(str(path), hit):  # evicted or replaced
                with lock:
                    handle.close()
        _stamp, tif, lock = hit
        with lock:
            if not tif.filehandle.closed:
                yield tif
                return
        # evicted meanwhile by another thread: a handle of our own
        tif = _open(path)
        try:
            yield tif
        finally:
            tif.close()


def _page(tif: Any, index: int, path: Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Page ``index`` decoded, after :func:`_check_page` (and, given ``shape``, after
    checking the page has that shape: a stack's pages may each declare their own)."""
    page = tif.pages[index]
    if shape is not None and tuple(page.shape) != tuple(shape):
        raise FrameMismatch(
            f"{path.name}: TIFF page {index} is {tuple(page.shape)}, the stack's pages are {shape}")
    _check_page(page, index, path)
    try:
        return page.asarray()
    except Exception as err:
        raise UnreadableFile(f"{path.name}: corrupt TIFF image data ({err})") from None


_tiffs = _OpenTiffs(OPEN_FILES)


def _read_pages(path: Path) -> np.ndarray:
    """Every page of one file: the page itself for a single page, else stacked
    (page, ...) -- the whole file being one frame of a sequence, bounded as one chunk."""
    with _tiffs.open(path) as tif:
        n = len(tif.pages)
        if n == 1:
            return _page(tif, 0, path)
        shape = tuple(tif.pages[0].shape)
        nbytes = n * math.prod(shape) * np.dtype(tif.pages[0].dtype or "u1").itemsize
        if nbytes > limits.MAX_CHUNK_BYTES:
            raise RequestTooLarge(
                f"{path.name}: its {n} TIFF pages decode to {nbytes} bytes, more than the server "
                f"decodes in one piece (SCATTERBROKER_MAX_CHUNK_BYTES = {limits.MAX_CHUNK_BYTES})")
        return np.stack([_page(tif, i, path, shape) for i in range(n)])


def _check_answer(shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse (413) an answer larger than the response limit before any page is decoded."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_READ_BYTES:
        raise RequestTooLarge(
            f"slice would return {nbytes / 1e9:.2f} GB, more than the server's limit of "
            f"{MAX_READ_BYTES / 1e9:.2f} GB (SCATTERBROKER_MAX_RESPONSE_BYTES); request fewer "
            "pages at a time")


class TIFFAdapter(SingleFileAdapter):
    """A TIFF file: (ny, nx) for one page, (page, ny, nx) for a multi-page stack,
    one page per chunk."""

    mimetype = "image/tiff"
    extensions = (".tif", ".tiff")
    sniff = staticmethod(_sniff)

    @classmethod
    def inspect_file(cls, path: Path) -> tuple[ArrayStructure, dict]:
        tif = _open(path)
        try:
            page = tif.pages[0]
            n = len(tif.pages)
            shape = tuple(page.shape) if n == 1 else (n, *page.shape)
            chunks = tuple((s,) for s in shape) if n == 1 else ((1,) * n, *[(s,) for s in page.shape])
            structure = ArrayStructure(
                data_type=BuiltinDtype.from_numpy_dtype(page.dtype), shape=shape, chunks=chunks,
            )
            header = _header(tif)
            return structure, (header.summary() if header else {})
        finally:
            tif.close()

    @property
    def _multipage(self) -> bool:
        """One page per chunk along axis 0 (a single page may itself be 3-D: RGB planes)."""
        shape, chunks = self._structure.shape, self._structure.chunks
        return len(shape) >= 3 and tuple(chunks[0]) == (1,) * shape[0]

    def _one_page(self) -> np.ndarray:
        with _tiffs.open(self._path) as tif:
            return _page(tif, 0, self._path, self._structure.shape).reshape(self._structure.shape)

    def read(self, slice: Any = ...) -> np.ndarray:
        shape = self._structure.shape
        dtype = self._structure.data_type.to_numpy_dtype()
        key = expand(slice, shape)
        out_shape = key.newshape(shape)
        _check_answer(out_shape, dtype)
        if not self._multipage:
            return self._one_page()[key.raw]
        # Decode only the pages the first index selects, one at a time (a page's
        # memory is freed before the next is decoded).
        pages = np.atleast_1d(np.arange(shape[0])[key.args[0].raw])
        rest = tuple(a.raw for a in key.args[1:])
        page_out = ndindex(rest).newshape(shape[1:])
        out = np.empty((len(pages), *page_out), dtype=dtype)
        if len(pages):
            with _tiffs.open(self._path) as tif:
                for j, i in enumerate(pages.tolist()):
                    out[j] = _page(tif, i, self._path, shape[1:])[rest]
        return out.reshape(out_shape)

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        shape = self._structure.shape
        if any(block[1:]) or (not self._multipage and any(block)):
            raise IndexError(f"block {block} is outside the TIFF's chunk grid")
        if self._multipage:
            if not 0 <= block[0] < shape[0]:
                raise IndexError(f"block {block} is outside the TIFF's chunk grid")
            with _tiffs.open(self._path) as tif:
                data = _page(tif, block[0], self._path, shape[1:]).reshape(1, *shape[1:])
        else:
            data = self._one_page()
        return data[slice] if slice else data


class TIFFSequenceAdapter(HarvestingSequence):
    """Numbered single-page TIFF files of one scan as a (frame, y, x) stack."""

    mimetype = "multipart/related;type=image/tiff"

    @classmethod
    def inspect(cls, path: Path) -> FrameInfo:
        tif = _open(path)
        try:
            page = tif.pages[0]
            shape = tuple(page.shape) if len(tif.pages) == 1 else (len(tif.pages), *page.shape)
            header = _header(tif)
            summary = header.summary() if header else {}
            row = header.frame_row() if header else {}
            return FrameInfo(shape, np.dtype(page.dtype), summary, row)
        finally:
            tif.close()

    def read_frame(self, path: Path) -> np.ndarray:
        return _read_pages(path)
