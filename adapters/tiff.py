"""TIFF frames via tifffile: single images, multi-page stacks, numbered sequences.

A Pilatus TIFF carries the miniCBF header in its ImageDescription tag; it is
harvested like a CBF header, so the same search finds scans in either format.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype

from ..errors import IncompleteFile, UnreadableFile
from .minicbf import CBFHeader, parse_text_header
from .roots import file_stamp
from .single import SingleFileAdapter
from .sequence import FrameInfo, HarvestingSequence, expand

_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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
        self._lock = threading.Lock()
        self._files: OrderedDict[str, tuple] = OrderedDict()

    def read(self, path: Path, key: Any) -> np.ndarray:
        stamp = file_stamp(os.stat(path))
        with self._lock:
            hit = self._files.get(str(path))
            if hit is not None and hit[0] == stamp:
                self._files.move_to_end(str(path))
        if hit is None or hit[0] != stamp:
            tif = _open(path)
            if len(tif.pages) == 1:
                try:
                    return _asarray(tif, path, key)
                finally:
                    tif.close()
            hit = (stamp, tif, threading.Lock())
            with self._lock:
                old = self._files.pop(str(path), None)
                self._files[str(path)] = hit
                evicted = [old] if old else []
                while len(self._files) > self.maxsize:
                    evicted.append(self._files.popitem(last=False)[1])
            for _stamp, handle, lock in evicted:
                with lock:
                    handle.close()
        _stamp, tif, lock = hit
        with lock:
            if tif.filehandle.closed:  # evicted meanwhile by another thread
                return _read_once(path, key)
            return _asarray(tif, path, key)


def _asarray(tif: Any, path: Path, key: Any) -> np.ndarray:
    try:
        return tif.asarray(key=key)
    except Exception as err:
        raise UnreadableFile(f"{path.name}: corrupt TIFF image data ({err})") from None


def _read_once(path: Path, key: Any) -> np.ndarray:
    tif = _open(path)
    try:
        return _asarray(tif, path, key)
    finally:
        tif.close()


_tiffs = _OpenTiffs(OPEN_FILES)


def _read_pages(path: Path, key: Any = None) -> np.ndarray:
    return _tiffs.read(path, key)


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

    def read(self, slice: Any = ...) -> np.ndarray:
        shape = self._structure.shape
        key = expand(slice, shape)
        if not self._multipage:
            return _read_pages(self._path).reshape(shape)[key.raw]
        # Decode only the pages the first index selects.
        pages = np.atleast_1d(np.arange(shape[0])[key.args[0].raw])
        if not len(pages):
            return np.empty(key.newshape(shape), dtype=self._structure.data_type.to_numpy_dtype())
        data = _read_pages(self._path, key=pages.tolist()).reshape(len(pages), *shape[1:])
        rest = tuple(a.raw for a in key.args[1:])
        return data[(builtins.slice(None), *rest)].reshape(key.newshape(shape))

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        shape = self._structure.shape
        if any(block[1:]) or (not self._multipage and any(block)):
            raise IndexError(f"block {block} is outside the TIFF's chunk grid")
        if self._multipage:
            data = _read_pages(self._path, key=block[0]).reshape(1, *shape[1:])
        else:
            data = _read_pages(self._path).reshape(shape)
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
