"""CBF frames (Pilatus/Eiger miniCBF) via fabio: single files and numbered sequences.

Pixels are decoded by fabio; headers are parsed by :mod:`.minicbf` without
decoding, which is what makes registration fast and lets a truncated or
still-being-written frame be refused before it is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tiled.structures.array import ArrayStructure, BuiltinDtype

from ..errors import UnreadableFile
from .minicbf import MAGIC, parse_header, read_header
from .single import SingleFileAdapter
from .sequence import FrameInfo, HarvestingSequence, expand


def decode(path: Path) -> np.ndarray:
    """Decode one CBF frame to a (ny, nx) array of the stored integer type.

    The file is read once; the header is checked (so a truncated frame is
    refused before decoding) and byte-offset data is decompressed with fabio's
    codec directly. Other CBF compressions go through ``fabio.open``.
    """
    import fabio
    from fabio.compression import decByteOffset

    with open(path, "rb") as f:  # read-only
        raw = f.read()
    header = parse_header(raw[:65536], len(raw), path)
    try:
        if not header.byte_offset:
            return fabio.open(str(path)).data
        start = header.binary_offset
        n = header.shape[0] * header.shape[1]
        # No size hint: the whole X-Binary-Size section must decode to exactly n
        # pixels (with a hint the codec stops at n, so random bytes would pass).
        data = np.asarray(decByteOffset(raw[start:start + header.binary_size], dtype=header.dtype.name))
        if data.size != n:
            raise ValueError(
                f"its {header.binary_size} bytes of byte-offset data decode to "
                f"{data.size} pixels, the header says {header.shape[1]} x {header.shape[0]} = {n}")
        return data.reshape(header.shape)
    except Exception as err:  # fabio raises many types for corrupt bytes
        raise UnreadableFile(f"{path.name}: corrupt CBF data ({err or type(err).__name__})") from None


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
