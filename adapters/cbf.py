"""CBF frames (Pilatus/Eiger miniCBF): single files and numbered sequences.

Byte-offset pixels are decoded by :mod:`scatterbroker.byte_offset` (the GIL
released), other compressions by fabio; headers are parsed by :mod:`.minicbf`
without decoding, which is what makes registration fast and lets a truncated or
still-being-written frame be refused before it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype

from .. import byte_offset
from ..errors import UnreadableFile
from .minicbf import MAGIC, parse_header, read_header
from .single import SingleFileAdapter
from .sequence import FrameInfo, HarvestingSequence, expand


def decode(path: Path) -> np.ndarray:
    """Decode one CBF frame to a (ny, nx) array of the stored integer type.

    The file is read once; the header is checked (so a truncated frame is
    refused before decoding) and byte-offset data is decompressed by
    :func:`scatterbroker.byte_offset.decode`. Other CBF compressions go
    through ``fabio.open``.
    """
    import fabio

    raw, header = _read(path)
    try:
        if not header.byte_offset:
            return fabio.open(str(path)).data
        start = header.binary_offset
        return byte_offset.decode(memoryview(raw)[start:start + header.binary_size], header.shape, header.dtype)
    except Exception as err:  # fabio (other compressions) raises many types for corrupt bytes
        raise UnreadableFile(f"{path.name}: corrupt CBF data ({err or type(err).__name__})") from None


def stored_section(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> memoryview | None:
    """The byte-offset section of one CBF file as stored (not decoded), after checking its
    header, or None if the file holds another compression, shape or pixel type.

    What the fast route sends to clients that decode CBF themselves (codec ``cbf``).
    """
    raw, header = _read(path)
    if not header.byte_offset or tuple(header.shape) != tuple(shape) or header.dtype != dtype:
        return None
    return memoryview(raw)[header.binary_offset:header.binary_offset + header.binary_size]


def _read(path: Path):
    with open(path, "rb") as f:  # read-only
        raw = f.read()
    return raw, parse_header(raw[:65536], len(raw), path)


def _sniff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class CBFAdapter(SingleFileAdapter):
    """One CBF frame as a (ny, nx) array; the miniCBF header is its metadata.

    Examples
    --------
    >>> CBFAdapter.from_uris("file:///data/scan_00001.cbf").read()[0, :4]  # doctest: +SKIP
    """

    mimetype = "image/x-cbf"
    extensions = (".cbf",)
    sniff = staticmethod(_sniff)

    @classmethod
    def inspect_file(cls, path: Path) -> tuple[ArrayStructure, dict]:
        header = read_header(path)
        structure = ArrayStructure(
            data_type=BuiltinDtype.from_numpy_dtype(header.dtype),
            shape=header.shape,
            chunks=tuple((s,) for s in header.shape),
        )
        return structure, header.summary()

    def read(self, slice: Any = ...) -> np.ndarray:
        key = expand(slice, self._structure.shape)  # refuse a bad slice before decoding
        return decode(self._path)[key.raw]

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        if any(block):
            raise IndexError(f"block {block}: a CBF frame is a single block")
        data = decode(self._path)
        return data[slice] if slice else data


class CBFSequenceAdapter(HarvestingSequence):
    """Numbered CBF files of one scan as a (frame, y, x) stack."""

    mimetype = "multipart/related;type=image/x-cbf"

    @classmethod
    def inspect(cls, path: Path) -> FrameInfo:
        header = read_header(path)
        return FrameInfo(header.shape, header.dtype, header.summary(), header.frame_row())

    def read_frame(self, path: Path) -> np.ndarray:
        return decode(path)

    def stored_frames(self, positions: range) -> list[memoryview] | None:
        """The byte-offset sections of the frames at ``positions`` as stored in their files
        (confined, headers checked, not decoded), or None if one of them is not stored as
        the scan's frames are (byte-offset, the scan's frame shape and pixel type)."""
        dtype = self._structure.data_type.to_numpy_dtype()
        sections = []
        for position in positions:
            section = stored_section(self.confined_frame_path(position), self._structure.shape[1:], dtype)
            if section is None:
                return None
            sections.append(section)
        return sections
