"""CBF frames (Pilatus/Eiger miniCBF): single files and numbered sequences.

Byte-offset pixels are decoded by :mod:`scatterbroker.adapters.byte_offset` (the GIL
released, bounded by ``SCATTERBROKER_MAX_CHUNK_BYTES``), other compressions are
refused; headers are parsed by :mod:`.minicbf`
without decoding, which is what makes registration fast and lets a truncated or
still-being-written frame be refused before it is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype

from scatterbroker.adapters import byte_offset
from scatterbroker import limits
from ..errors import IncompleteFile, RequestTooLarge, UnreadableFile
from .minicbf import _HEAD_BYTES, MAGIC, CBFHeader, parse_header, read_header
from .single import SingleFileAdapter
from .sequence import FrameInfo, HarvestingSequence, expand


def decode(path: Path) -> np.ndarray:
    """Decode one CBF frame to a (ny, nx) array of the stored integer type.

    The header is checked first (a truncated frame is refused before
    decoding); then only the binary section is read, and decompressed by
    :func:`scatterbroker.adapters.byte_offset.decode`, which refuses a frame or section
    larger than :data:`scatterbroker.limits.MAX_CHUNK_BYTES` (HTTP 413) before
    allocating it. Other CBF compressions are refused (HTTP 422): fabio, the
    only other decoder at hand, decodes nothing but byte-offset either, with a
    Cython decoder that reads past the end of a crafted section.
    """
    header, section = _read(path)
    if not header.byte_offset:
        raise UnreadableFile(
            f"{path.name}: CBF compression not served: only x-CBF_BYTE_OFFSET is decoded")
    return byte_offset.decode(section, header.shape, header.dtype, name=path.name)


def stored_section(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> memoryview | None:
    """The byte-offset section of one CBF file as stored (not decoded), after checking its
    header, or None if the file holds another compression, shape or pixel type.

    What the fast route sends to clients that decode CBF themselves (codec ``cbf``).
    """
    header, section = _read(path)
    if not header.byte_offset or tuple(header.shape) != tuple(shape) or header.dtype != dtype:
        return None
    return section


def _read(path: Path) -> tuple[CBFHeader, memoryview]:
    """The header and the binary section (exactly ``X-Binary-Size`` bytes) of one CBF file.

    Both come from one open file (a file replaced in between cannot mix two
    headers and sections), and only the header's first 64 KiB and the section
    are read: bytes after the section (a file padded to gigabytes) are not.
    A section larger than :data:`~scatterbroker.limits.MAX_CHUNK_BYTES` is
    refused (HTTP 413) before it is read.
    """
    with open(path, "rb") as f:  # read-only
        head = f.read(_HEAD_BYTES)
        header = parse_header(head, os.fstat(f.fileno()).st_size, path)
        if header.binary_size > limits.MAX_CHUNK_BYTES:
            raise RequestTooLarge(
                f"{path.name}: its CBF binary section is {header.binary_size} bytes, more than "
                f"the server reads in one piece (SCATTERBROKER_MAX_CHUNK_BYTES = "
                f"{limits.MAX_CHUNK_BYTES})")
        end = header.binary_offset + header.binary_size
        if end <= len(head):
            return header, memoryview(head)[header.binary_offset:end]
        buf = bytearray(header.binary_size)
        f.seek(header.binary_offset)
        got = f.readinto(buf)
    if got != header.binary_size:  # shrunk since the header was parsed
        raise IncompleteFile(
            f"{path.name}: truncated CBF frame: its binary section ends after {got} of "
            f"{header.binary_size} bytes")
    return header, memoryview(buf)


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
