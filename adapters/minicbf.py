"""Header-only parsing of CBF files (Pilatus miniCBF conventions).

Registration must harvest thousands of frames per second, so this reads only
the text header and the MIME binary header at the start of the file (a few KB)
and never decodes pixels. It also tells whether a file is complete: the binary
section must be as long as its ``X-Binary-Size`` says, which catches truncated
frames and frames the detector is still writing.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IncompleteFile, UnreadableFile
from .units import put, to_canonical

MAGIC = b"###CBF"
BINARY_START = b"\x0c\x1a\x04\xd5"
_HEAD_BYTES = 65536

_ELEMENT_TYPES = {
    "signed 8-bit integer": "i1",
    "unsigned 8-bit integer": "u1",
    "signed 16-bit integer": "i2",
    "unsigned 16-bit integer": "u2",
    "signed 32-bit integer": "i4",
    "unsigned 32-bit integer": "u4",
    "signed 64-bit integer": "i8",
    "signed 32-bit real ieee": "f4",
    "signed 64-bit real ieee": "f8",
}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LINE = re.compile(rf"^#\s*([A-Za-z_][A-Za-z0-9_]*)[:=]?\s+({_NUMBER})\s*([A-Za-z.°]*)")
_PAIR = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)\s*x\s*({_NUMBER})\s*([A-Za-z]*)")
_BEAM = re.compile(rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)")
_TIME = re.compile(r"^#\s*(\d{4}[-/]\d\d[-/]\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?)")

#: miniCBF key -> (summary path, quantity); angles also go into per-frame columns.
_SUMMARY = {
    "Exposure_time": ("instrument/detector/count_time", "time"),
    "Exposure_period": ("instrument/detector/frame_time", "time"),
    "Wavelength": ("instrument/monochromator/wavelength", "wavelength"),
    "Detector_distance": ("instrument/detector/distance", "length"),
    "Start_angle": ("scan/start_angle", "angle"),
    "Angle_increment": ("scan/angle_increment", "angle"),
}
#: Header values that change from frame to frame: column name -> (key, quantity)
FRAME_COLUMNS = {
    "start_angle": ("Start_angle", "angle"),
    "angle_increment": ("Angle_increment", "angle"),
    "exposure_time": ("Exposure_time", "time"),
    "phi": ("Phi", "angle"),
    "chi": ("Chi", "angle"),
    "omega": ("Omega", "angle"),
    "kappa": ("Kappa", "angle"),
    "two_theta": ("Detector_2theta", "angle"),
}


@dataclass(frozen=True)
class CBFHeader:
    """What the first few KB of a CBF file say.

    ``shape`` is (ny, nx): slow axis first, as numpy and fabio return the frame.
    ``values`` maps a miniCBF key (``"Wavelength"``) to ``(number, unit)``.
    """

    path: Path
    shape: tuple[int, int]
    dtype: np.dtype
    binary_offset: int
    binary_size: int
    file_size: int
    byte_offset: bool = True
    values: dict[str, tuple[float, str]] = field(default_factory=dict)
    detector: str | None = None
    timestamp: str | None = None
    pixel_size: tuple[tuple[float, str], tuple[float, str]] | None = None
    beam_xy: tuple[float, float] | None = None

    def summary(self) -> dict:
        """Harvested metadata under NeXus-style keys, in canonical units."""
        md: dict = {}
        if self.detector:
            put(md, "instrument/detector/description", self.detector)
        for key, (path, quantity) in _SUMMARY.items():
            if key in self.values:
                value, unit = self.values[key]
                try:
                    put(md, path, *to_canonical(value, unit or "", quantity))
                except ValueError:
                    put(md, path, value, unit or None)
        if self.pixel_size:
            (px, ux), (py, uy) = self.pixel_size
            try:
                x, y = to_canonical(px, ux, "length"), to_canonical(py, uy, "length")
            except ValueError:  # unknown unit: leave it out, never fail the file
                pass
            else:
                put(md, "instrument/detector/x_pixel_size", *x)
                put(md, "instrument/detector/y_pixel_size", *y)
        if self.beam_xy:
            put(md, "instrument/detector/beam_center_x", self.beam_xy[0], "pixel")
            put(md, "instrument/detector/beam_center_y", self.beam_xy[1], "pixel")
        if self.timestamp:
            put(md, "start_time", self.timestamp)
        return md

    def frame_row(self) -> dict[str, float | str | None]:
        """This frame's per-frame values (angles in deg, times in s)."""
        row: dict[str, float | str | None] = {"timestamp": self.timestamp}
        for column, (key, quantity) in FRAME_COLUMNS.items():
            if key in self.values:
                value, unit = self.values[key]
                try:
                    row[column] = to_canonical(value, unit or _DEFAULT[quantity], quantity)[0]
                except ValueError:
                    row[column] = value
        return row


_DEFAULT = {"angle": "deg", "time": "s"}


def read_header(path: str | os.PathLike[str]) -> CBFHeader:
    """Parse the header of one CBF file without decoding its pixels.

    Raises
    ------
    UnreadableFile
        Not a CBF file, or its binary header lacks size, shape or element type.
    IncompleteFile
        The file ends before its binary section does (truncated or still being
        written).
    """
    path = Path(path)
    with open(path, "rb") as f:  # read-only: raw data is never opened for writing
        head = f.read(4096)  # a Pilatus header fits; read more only if it does not
        size = os.fstat(f.fileno()).st_size
        if BINARY_START not in head and size > len(head):
            head += f.read(_HEAD_BYTES - len(head))
    return parse_header(head, size, path)


def parse_header(head: bytes, size: int, path: Path) -> CBFHeader:
    """Parse a CBF header from the first bytes ``head`` of a file of ``size`` bytes."""
    if not head.startswith(MAGIC):
        if not head:
            raise UnreadableFile(f"{path.name}: empty file (0 bytes), not a CBF frame")
        raise UnreadableFile(f"{path.name}: not a CBF file (no '###CBF' signature)")
    start = head.find(BINARY_START)
    if start < 0:
        if size > _HEAD_BYTES:
            raise UnreadableFile(f"{path.name}: CBF header longer than {_HEAD_BYTES} bytes")
        raise IncompleteFile(f"{path.name}: truncated CBF file: it ends inside the header")
    # NUL becomes U+FFFD: harvested text goes into the catalog, and PostgreSQL's
    # JSONB cannot store NUL.
    text = head[:start].decode("latin-1").replace("\x00", "\ufffd")
    mime = _mime_fields(text)
    try:
        binary_size = int(mime["x-binary-size"])
        nx = int(mime["x-binary-size-fastest-dimension"])
        ny = int(mime["x-binary-size-second-dimension"])
        element = mime["x-binary-element-type"].strip('"').strip().lower()
        byte_offset = "x-cbf_byte_offset" in text.lower()
    except (KeyError, ValueError) as err:
        raise UnreadableFile(f"{path.name}: CBF binary header lacks {err}") from None
    if element not in _ELEMENT_TYPES:
        raise UnreadableFile(f"{path.name}: unsupported CBF element type {element!r}")
    if nx <= 0 or ny <= 0 or binary_size <= 0:
        raise UnreadableFile(
            f"{path.name}: CBF binary header gives an impossible frame: {nx} x {ny} "
            f"pixels in {binary_size} bytes"
        )
    if byte_offset and nx * ny > binary_size:
        # byte-offset spends at least one byte per pixel: a header promising more
        # pixels than bytes is corrupt (and would make a decoder allocate them).
        raise UnreadableFile(
            f"{path.name}: corrupt CBF header: {nx} x {ny} pixels cannot fit in "
            f"X-Binary-Size {binary_size} bytes of byte-offset data"
        )
    offset = start + len(BINARY_START)
    if size < offset + binary_size:
        raise IncompleteFile(
            f"{path.name}: truncated CBF frame: {size} bytes, header promises "
            f"{offset + binary_size}"
        )
    return CBFHeader(
        path=path,
        shape=(ny, nx),
        dtype=np.dtype(_ELEMENT_TYPES[element]).newbyteorder("<"),
        binary_offset=offset,
        binary_size=binary_size,
        file_size=size,
        byte_offset=byte_offset,
        **_text_fields(text),
    )


def _mime_fields(text: str) -> dict[str, str]:
    """``Name: value`` lines of the MIME header, keys lower-cased."""
    section = text.rsplit("--CIF-BINARY-FORMAT-SECTION--", 1)[-1]
    out = {}
    for line in section.splitlines():
        name, sep, value = line.partition(":")
        if sep and name and not name.startswith(" "):
            out[name.strip().lower()] = value.strip().rstrip(";")
    return out


def _text_fields(text: str) -> dict:
    """The miniCBF ``# Key value unit`` lines of a header, as CBFHeader fields."""
    values: dict[str, tuple[float, str]] = {}
    out: dict = {"values": values, "detector": None, "timestamp": None,
                 "pixel_size": None, "beam_xy": None}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            continue
        if line.startswith("# Detector:"):
            out["detector"] = line.split(":", 1)[1].strip()
        elif (m := _TIME.match(line)) and out["timestamp"] is None:
            out["timestamp"] = m.group(1)
        elif line.startswith("# Pixel_size") and (m := _PAIR.search(line)):
            if _finite(m.group(1), m.group(3)):
                out["pixel_size"] = (
                    (float(m.group(1)), m.group(2) or "m"),
                    (float(m.group(3)), m.group(4) or "m"),
                )
        elif line.startswith("# Beam_xy") and (m := _BEAM.search(line)):
            if _finite(m.group(1), m.group(2)):
                out["beam_xy"] = (float(m.group(1)), float(m.group(2)))
        elif (m := _LINE.match(line)) and _finite(m.group(2)):
            values[m.group(1)] = (float(m.group(2)), m.group(3))
    return out


def _finite(*numbers: str) -> bool:
    """``1e999`` parses as inf: not a value metadata (JSON) can hold."""
    return all(math.isfinite(float(n)) for n in numbers)


def parse_text_header(text: str) -> CBFHeader | None:
    """Parse miniCBF lines found outside a CBF file (a Pilatus TIFF's
    ImageDescription). Returns a header with only text-derived fields, or None."""
    fields = _text_fields(text)
    if not (fields["values"] or fields["detector"]):
        return None
    return CBFHeader(Path(""), (0, 0), np.dtype("i4"), 0, 0, 0, False, **fields)
