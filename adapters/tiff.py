"""TIFF frames via tifffile: single images, multi-page stacks, numbered sequences.

A Pilatus TIFF carries the miniCBF header in its ImageDescription tag; it is
harvested like a CBF header, so the same search finds scans in either format.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any

import numpy as np
from ndindex import ndindex
from tiled.adapters.core import Adapter
from tiled.adapters.utils import init_adapter_from_catalog
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.utils import path_from_uri

from ..errors import IncompleteFile, UnreadableFile
from .minicbf import CBFHeader, parse_text_header
from .roots import confine
from .sequence import FrameInfo, HarvestingSequence

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


def _read_pages(path: Path, key: Any = None) -> np.ndarray:
    tif = _open(path)
    try:
        data = tif.asarray(key=key)
    except Exception as err:
        raise UnreadableFile(f"{path.name}: corrupt TIFF image data ({err})") from None
    finally:
        tif.close()
    return data


class TIFFAdapter(Adapter[ArrayStructure]):
    """A TIFF file: (ny, nx) for one page, (page, ny, nx) for a multi-page stack,
    one page per chunk."""

    structure_family = StructureFamily.array
    mimetype = "image/tiff"
    extensions = (".tif", ".tiff")
    readable_roots = None
    sniff = staticmethod(_sniff)

    def __init__(
        self,
        data_uri: str,
        structure: ArrayStructure | None = None,
        *,
        metadata: dict | None = None,
        specs: list | None = None,
    ) -> None:
        path = Path(path_from_uri(data_uri))
        if self.readable_roots is not None:
            path = confine(path, self.readable_roots, what="file")
        self._path = path
        self._header_md: dict = {}
        if structure is None:
            tif = _open(path)
            try:
                page = tif.pages[0]
                n = len(tif.pages)
                shape = tuple(page.shape) if n == 1 else (n, *page.shape)
                chunks = tuple((s,) for s in shape) if n == 1 else ((1,) * n, *[(s,) for s in page.shape])
                structure = ArrayStructure(
                    data_type=BuiltinDtype.from_numpy_dtype(page.dtype),
                    shape=shape,
                    chunks=chunks,
                )
                header = _header(tif)
                self._header_md = header.summary() if header else {}
            finally:
                tif.close()
        super().__init__(structure, metadata=metadata, specs=specs)

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any) -> "TIFFAdapter":
        return cls(data_uri, **kwargs)

    @classmethod
    def from_catalog(cls, data_source, node, /, **kwargs: Any) -> "TIFFAdapter":
        return init_adapter_from_catalog(cls, data_source, node, **kwargs)

    def metadata(self) -> dict:
        return {**self._header_md, **self._metadata}

    def read(self, slice: Any = ...) -> np.ndarray:
        shape = self._structure.shape
        key = ndindex(tuple(slice) if isinstance(slice, tuple) else slice).expand(shape)
        if len(shape) < 3:
            return _read_pages(self._path).reshape(shape)[key.raw]
        # Decode only the pages the first index selects.
        pages = np.atleast_1d(np.arange(shape[0])[key.args[0].raw])
        data = _read_pages(self._path, key=pages.tolist()).reshape(len(pages), *shape[1:])
        rest = tuple(a.raw for a in key.args[1:])
        return data[(builtins.slice(None), *rest)].reshape(key.newshape(shape))

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        shape = self._structure.shape
        if any(block[1:]) or (len(shape) < 3 and any(block)):
            raise IndexError(f"block {block} is outside the TIFF's chunk grid")
        if len(shape) == 3:
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
