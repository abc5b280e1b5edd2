"""ESRF EDF frames for scatterbroker: the worked example of docs/adapters.md.

A separate distribution, ``scatterbroker-edf``, whose pyproject.toml declares::

    [project.entry-points."scatterbroker.adapters"]
    edf = "sb_edf:EDFAdapter"
    edf-sequence = "sb_edf:EDFSequenceAdapter"

:class:`EDFAdapter` serves one ``.edf`` file as a (y, x) array.
:class:`EDFSequenceAdapter` serves numbered files (``sample_00001.edf`` ...)
of one scan as one (frame, y, x) stack, with a row of header values per frame.
Only single-frame EDF files are read; a multi-frame file is refused with a
message saying so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tiled.adapters.core import Adapter
from tiled.adapters.utils import init_adapter_from_catalog
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.utils import path_from_uri

from scatterbroker.adapters.roots import confine
from scatterbroker.adapters.sequence import FrameInfo, HarvestingSequence
from scatterbroker.adapters.units import put, to_canonical
from scatterbroker.errors import IncompleteFile, UnreadableFile

MIMETYPE = "image/x-edf"

#: EDF header key -> (NeXus-style path, quantity, unit if the value names none).
#: The ESRF SAXS keywords: lengths in metres, beam centre in pixels.
SUMMARY = {
    "SampleDistance": ("instrument/detector/distance", "length", "m"),
    "WaveLength": ("instrument/monochromator/wavelength", "wavelength", "m"),
    "PSize_1": ("instrument/detector/x_pixel_size", "length", "m"),
    "PSize_2": ("instrument/detector/y_pixel_size", "length", "m"),
    "Center_1": ("instrument/detector/beam_center_x", "pixels", "pixel"),
    "Center_2": ("instrument/detector/beam_center_y", "pixels", "pixel"),
    "ExposureTime": ("instrument/detector/count_time", "time", "s"),
}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S*)\s*$")


def _number(text: str | None) -> tuple[float, str] | None:
    """``"0.5 m"`` -> ``(0.5, "m")``; ``"0.5"`` -> ``(0.5, "")``; else None."""
    m = _NUMBER.match(text or "")
    return (float(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class EDFHeader:
    """What an EDF header says: frame shape (ny, nx), dtype, and every key as text."""

    shape: tuple[int, int]
    dtype: np.dtype
    fields: dict[str, str]

    def summary(self) -> dict:
        """Searchable metadata: NeXus-style keys, canonical units (adapters/units.py).

        A value whose unit is unknown is left out (it stays in the raw header).
        """
        md: dict = {}
        for key, (path, quantity, default_unit) in SUMMARY.items():
            parsed = _number(self.fields.get(key))
            if parsed is None:
                continue
            value, unit = parsed
            try:
                put(md, path, *to_canonical(value, unit or default_unit, quantity))
            except ValueError:
                continue
        return md

    def frame_row(self) -> dict:
        """Values that change from frame to frame: exposure (s) and motor positions.

        Motors are the ``motor_mne``/``motor_pos`` pairs spec and BLISS write,
        in the control system's user units (EDF does not record them).
        """
        row: dict = {}
        exposure = _number(self.fields.get("ExposureTime"))
        if exposure is not None:
            try:
                row["exposure_time"] = to_canonical(exposure[0], exposure[1] or "s", "time")[0]
            except ValueError:
                pass
        names = self.fields.get("motor_mne", "").split()
        positions = self.fields.get("motor_pos", "").split()
        for name, position in zip(names, positions):
            parsed = _number(position)
            if parsed is not None:
                row[name] = parsed[0]
        return row


def read_header(path: str | os.PathLike[str]) -> EDFHeader:
    """Read the header only (no pixels decoded).

    Raises
    ------
    UnreadableFile
        Empty, not EDF, or more than one frame.
    IncompleteFile
        Shorter than its header says (truncated, or still being written).
    """
    import fabio
    from fabio.edfimage import EdfImage

    path = Path(path)
    if os.stat(path).st_size == 0:
        raise UnreadableFile(f"{path.name}: empty file (0 bytes), not an EDF image")
    try:
        image = fabio.openheader(str(path))
    except Exception as err:  # fabio raises OSError, ValueError, ... for bad headers
        raise UnreadableFile(f"{path.name}: not a readable EDF file ({err})") from None
    with image:
        if not isinstance(image, EdfImage):
            raise UnreadableFile(f"{path.name}: not an EDF file (fabio reads it as {type(image).__name__})")
        if image.incomplete_file:
            raise IncompleteFile(f"{path.name}: truncated EDF file: shorter than its header says")
        if image.nframes != 1:
            raise UnreadableFile(
                f"{path.name}: {image.nframes} frames in one file; sb_edf reads single-frame EDF files"
            )
        return EDFHeader(tuple(image.shape), np.dtype(image.dtype), dict(image.header))


def decode(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the (ny, nx) frame of one EDF file.

    fabio pads a truncated file with zeros (and only logs a warning), so the
    completeness check here is what turns it into an error.
    """
    import fabio

    path = Path(path)
    try:
        with fabio.open(str(path)) as image:
            incomplete, data = image.incomplete_file, image.data
    except Exception as err:
        raise UnreadableFile(f"{path.name}: not a readable EDF file ({err})") from None
    if incomplete:
        raise IncompleteFile(f"{path.name}: truncated EDF file: shorter than its header says")
    return data


def is_edf(path: str | os.PathLike[str]) -> bool:
    """EDF starts with ``{`` (after at most a line break), as in fabio's magic table."""
    with open(path, "rb") as f:
        return f.read(4).lstrip(b"\r\n").startswith(b"{")


class EDFAdapter(Adapter[ArrayStructure]):
    """One single-frame EDF file as a (y, x) array; its header is the metadata.

    Examples
    --------
    >>> EDFAdapter.from_uris("file:///data/dark.edf").read()[:2, :4]  # doctest: +SKIP
    """

    structure_family = StructureFamily.array
    mimetype = MIMETYPE
    extensions = (".edf",)
    readable_roots = None  # the server binds its readable roots here
    sniff = staticmethod(is_edf)

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
        if structure is None:  # direct use / registration: read the header
            header = read_header(path)
            structure = ArrayStructure(
                data_type=BuiltinDtype.from_numpy_dtype(header.dtype),
                shape=header.shape,
                chunks=tuple((n,) for n in header.shape),
            )
            self._header_md = {**header.summary(), "edf": header.fields}
        super().__init__(structure, metadata=metadata, specs=specs)

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any) -> "EDFAdapter":
        return cls(data_uri, **kwargs)

    @classmethod
    def from_catalog(cls, data_source, node, /, **kwargs: Any) -> "EDFAdapter":
        return init_adapter_from_catalog(cls, data_source, node, **kwargs)

    def metadata(self) -> dict:
        return {**self._header_md, **self._metadata}  # the caller's metadata wins

    def read(self, slice: Any = ...) -> np.ndarray:
        data = decode(self._path)
        return data if slice is ... else data[slice]

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        if any(block):
            raise IndexError(f"block {block}: an EDF frame is a single block")
        data = decode(self._path)
        return data[slice] if slice else data


class EDFSequenceAdapter(HarvestingSequence):
    """Numbered single-frame EDF files of one scan as a (frame, y, x) stack."""

    mimetype = f"multipart/related;type={MIMETYPE}"

    @classmethod
    def inspect(cls, path: Path) -> FrameInfo:
        header = read_header(path)
        return FrameInfo(header.shape, header.dtype, header.summary(), header.frame_row())

    def read_frame(self, path: Path) -> np.ndarray:
        return decode(path)
