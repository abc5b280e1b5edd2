"""Stack frames into a NeXus scan file (DESIGN.md §4).

Layout
------
::

    entry                              NXentry (default="data"), harvested metadata
      instrument/detector/data         (frame, y, x), one frame per chunk, compressed
      instrument/detector/missing_frames          frame numbers with no data (int64, maybe empty)
      instrument/detector/missing_frames_reasons  one line each: why
      sample                           NXsample (from the scan's metadata)
      data                             NXdata: signal "data" (hard link to the detector data),
                                       axes ["rotation_angle", ".", "."] (deg), and frame_number

Chunks are compressed with Bitshuffle-LZ4 (hdf5plugin) by default; ``gzip``,
``zstd``, ``lz4`` and ``none`` are selectable (:data:`CODECS`). Any h5py with
``import hdf5plugin`` reads the file.

How it is fast
--------------
Frames are decoded *and compressed* in worker processes
(:mod:`.executors`: a local pool of ``os.cpu_count()`` processes, forked while
this process runs one thread and from a fork server otherwise, or a Dask
``distributed`` cluster when ``SCATTERBROKER_DASK_ADDRESS`` is set). Workers
return the finished chunk bytes, exactly as the HDF5 filter would have stored
them; the parent only writes them with ``write_direct_chunk``. Bitshuffle-LZ4
chunks are made by the bitshuffle library inside hdf5plugin (checked against
the HDF5 filter itself once per process); other codecs go through the HDF5
filter on an in-memory file, so every codec gives byte-identical chunks to a
plain ``dset[i] = frame`` write.

Bad input
---------
A frame that is missing, truncated, corrupt, or of another shape (or of a
dtype that cannot be cast safely) is *never* dropped: the frame axis is never
shifted. Its chunk is simply not written, so it reads back as the dataset's
HDF5 fill value: NaN with ``dtype="float32"``, and with the detector's own
integer type (the default) -1, the Pilatus "invalid pixel" value (the type's
maximum for unsigned types). Each such frame is listed, with the reason, in
``missing_frames`` in the file and in :class:`StackReport`; ``strict=True``
refuses to write the file instead. Gaps in the frame numbering count as
missing frames. Two files claiming the same frame number are refused
(:class:`DuplicateFrames`).

The file is written as ``.NAME.part`` beside ``NAME`` and renamed over it only
when complete (after ``fsync``); on any failure, including a full disk
(:class:`DiskFull`), the partial file is removed and an existing ``NAME`` is
left untouched. Input files are only ever opened for reading, and ``NAME`` may
not be one of them. (All of this is :func:`.nexus_file.new_nexus_file`, the
one writer every NeXus file of scatterbroker goes through.)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import bitshuffle
from ..adapters.sequence import Template, stack_structure
from ..errors import ScatterbrokerError
from .executors import DASK_ADDRESS_ENV, pool_for
from .nexus_file import new_nexus_file

__all__ = [
    "CODECS", "DASK_ADDRESS_ENV", "BitshuffleLZ4", "Codec", "DiskFull", "DuplicateFrames", "Gzip", "LZ4",
    "MissingFrames", "NoCompression", "StackError", "StackReport", "Zstd", "parse_codec",
    "stack_files", "stack_sequence", "write_scan",
]

#: Frames in flight per worker (bounds memory: at most this many chunks queued).
IN_FLIGHT_PER_WORKER = 4
#: what a fork server imports once for all its stacking workers
_PRELOAD = ("numpy", "h5py", "hdf5plugin", __name__)

#: progress(frames_done_now, total_frames)
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------- errors


class StackError(ScatterbrokerError):
    """Stacking could not produce a scan file; nothing was written."""

    status_code = 422


class DuplicateFrames(StackError):
    """Two input files claim the same frame number."""


class MissingFrames(StackError):
    """Frames are missing or unreadable and ``strict=True`` was asked for."""


class DiskFull(StackError):
    """The disk filled up while writing; the partial file was removed."""

    status_code = 507


# --------------------------------------------------------------------- codecs


class Codec:
    """How chunks are compressed: the HDF5 filter to declare, and how to make
    the bytes that filter would store for one frame (in a worker process).

    Subclasses set ``name`` and ``filters()``; ``encode`` defaults to running
    the real HDF5 filter on an in-memory file, which is always correct.
    """

    name: str = ""

    def filters(self) -> dict[str, Any]:
        """Keyword arguments for ``h5py.Group.create_dataset``."""
        return {}

    def encode(self, frame: np.ndarray) -> tuple[int, bytes]:
        """``(filter_mask, chunk bytes)`` for one frame, ready for ``write_direct_chunk``."""
        return _encode_with_hdf5(frame, self.filters())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCompression(Codec):
    name = "none"

    def encode(self, frame: np.ndarray) -> tuple[int, bytes]:
        return 0, np.ascontiguousarray(frame).tobytes()


@dataclass(frozen=True, repr=True)
class Gzip(Codec):
    """HDF5 deflate: the chunk is a zlib stream, so ``zlib.compress`` makes it."""

    level: int = 4
    name = "gzip"

    def filters(self) -> dict[str, Any]:
        return {"compression": "gzip", "compression_opts": self.level}

    def encode(self, frame: np.ndarray) -> tuple[int, bytes]:
        return 0, zlib.compress(np.ascontiguousarray(frame), self.level)


class BitshuffleLZ4(Codec):
    """Bitshuffle + LZ4 (HDF5 filter 32008), the default.

    Chunk bytes are the filter's framing: 8-byte big-endian uncompressed size,
    4-byte big-endian block size in bytes, then per block a 4-byte big-endian
    compressed size and the LZ4 block of the bit-shuffled data.
    """

    name = "bitshuffle-lz4"

    def filters(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(cname="lz4"))

    def encode(self, frame: np.ndarray) -> tuple[int, bytes]:
        chunk = bitshuffle.compress_lz4(frame, probe=lambda f: _encode_with_hdf5(f, self.filters())[1])
        if chunk is None:
            return super().encode(frame)
        return 0, chunk


class Zstd(Codec):
    name = "zstd"

    def filters(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.Zstd())


class LZ4(Codec):
    name = "lz4"

    def filters(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.LZ4())


#: Codecs by name (``codec=`` of :func:`stack_files` and ``write_scan``).
CODECS: dict[str, Codec] = {
    c.name: c for c in (BitshuffleLZ4(), Gzip(), Zstd(), LZ4(), NoCompression())
}


def parse_codec(codec: str | Codec) -> Codec:
    """A :class:`Codec` from a name in :data:`CODECS` (or a Codec instance)."""
    if isinstance(codec, Codec):
        return codec
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return CODECS[codec]


def _encode_with_hdf5(frame: np.ndarray, filters: dict[str, Any]) -> tuple[int, bytes]:
    """Run the real HDF5 filter pipeline on one frame in an in-memory file."""
    import h5py

    frame = np.ascontiguousarray(frame)
    name = f"sb-encode-{os.getpid()}-{id(frame)}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        dset = f.create_dataset(
            "d", shape=(1, *frame.shape), dtype=frame.dtype, chunks=(1, *frame.shape), **filters
        )
        dset[0] = frame
        mask, data = dset.id.read_direct_chunk((0,) * (frame.ndim + 1))
    return mask, bytes(data)




# --------------------------------------------------------------------- report


@dataclass
class StackReport:
    """What one stacking run did.

    ``bytes_raw`` is the decoded size of the frames written, in the detector's
    dtype (what "MB/s of raw input" and the compression ratio refer to);
    ``bytes_read`` is the size of the input files; ``bytes_out`` of the scan file.
    """

    path: Path
    n_frames: int
    frame_shape: tuple[int, ...]
    dtype: str
    codec: str
    missing: list[tuple[int, str]] = field(default_factory=list)  # (frame number, why)
    bytes_read: int = 0
    bytes_raw: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    executor: str = ""

    @property
    def written(self) -> int:
        """Frames that hold data (``n_frames`` minus the missing ones)."""
        return self.n_frames - len(self.missing)

    @property
    def frames_per_s(self) -> float:
        return self.n_frames / self.seconds if self.seconds else float("nan")

    @property
    def mb_per_s(self) -> float:
        """Raw (decoded) input megabytes (1e6 bytes) per second."""
        return self.bytes_raw / 1e6 / self.seconds if self.seconds else float("nan")

    @property
    def ratio(self) -> float:
        """Output file size as a fraction of the raw frames' size."""
        return self.bytes_out / self.bytes_raw if self.bytes_raw else float("nan")

    def summary(self) -> str:
        shape = "x".join(str(s) for s in self.frame_shape)
        text = (
            f"{self.n_frames} frames ({shape} {self.dtype}) -> {self.path.name} in "
            f"{self.seconds:.1f} s: {self.frames_per_s:.1f} frames/s, {self.mb_per_s:.0f} MB/s raw, "
            f"{100 * self.ratio:.1f}% of raw ({self.codec}); "
        )
        if not self.missing:
            return text + "no missing frames"
        numbers = ", ".join(str(n) for n, _ in self.missing[:10])
        more = f" and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        return text + f"{len(self.missing)} missing frames: {numbers}{more}"


# --------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Slot:
    """One position of the frame axis: its frame number and the file, if any."""

    number: int
    path: Path | None
    why: str = ""  # if path is None: why there is no file


_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<digits>\d+)(?P<suffix>\.[A-Za-z0-9]+)$")


def _slots_from_template(template: Template) -> list[_Slot]:
    """Every frame number from the first to the last of the template's ranges;
    numbers in the gaps are tried too (a frame may have been incomplete when
    the scan was registered)."""
    numbers = template.numbers()
    if not len(numbers):
        raise StackError(f"{template.prefix}*{template.suffix}: the template lists no frames")
    return [
        _Slot(int(n), template.directory / template.name(int(n)))
        for n in range(int(numbers.min()), int(numbers.max()) + 1)
    ]


def _slots_from_paths(paths: Sequence[Path]) -> list[_Slot]:
    """Order files by the number in their names; gaps become missing slots."""
    if not paths:
        raise StackError("no input files")
    seen: dict[Path, Path] = {}
    for p in paths:
        key = Path(os.path.realpath(p))
        if key in seen:
            raise DuplicateFrames(f"{p} is listed twice")
        seen[key] = p
    matches = [_NUMBERED.match(p.name) for p in paths]
    if not any(matches):  # no numbers at all: stack in the order given
        return [_Slot(i, p) for i, p in enumerate(paths, start=1)]
    if not all(matches):
        odd = [p.name for p, m in zip(paths, matches) if not m]
        raise StackError(
            f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}: no frame number in the "
            "name, unlike the other files; narrow the glob"
        )
    by_number: dict[int, Path] = {}
    for p, m in zip(paths, matches):
        n = int(m["digits"])
        if n in by_number:
            raise DuplicateFrames(
                f"frame {n} appears twice: {by_number[n].name} and {p.name}; "
                "remove one (or list the files to stack explicitly)"
            )
        by_number[n] = p
    first, last = min(by_number), max(by_number)
    return [
        _Slot(n, by_number[n]) if n in by_number
        else _Slot(n, None, f"frame {n}: no file (gap in the frame numbers)")
        for n in range(first, last + 1)
    ]


def _expand(paths_or_template: Any) -> list[_Slot]:
    if isinstance(paths_or_template, Template):
        return _slots_from_template(paths_or_template)
    if isinstance(paths_or_template, (str, os.PathLike)):
        text = os.fspath(paths_or_template)
        if any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text) if not os.path.isdir(p))
            if not found:
                raise StackError(f"no files match {text!r}")
            return _slots_from_paths(found)
        path = Path(text)
        if path.is_dir():
            return _slots_from_template(_only_sequence(path))
        if not path.exists():
            raise StackError(f"{path} does not exist")
        return _slots_from_paths([path])
    return _slots_from_paths([Path(p) for p in paths_or_template])


def _only_sequence(directory: Path) -> Template:
    """The one frame sequence in ``directory``: numbered files of a format read as a
    sequence, grouped by name around the number (as ``catalog.walk`` groups them;
    reduction does not import the catalog layer)."""
    from ..adapters import registry
    from ..adapters.sequence import ranges_of

    groups: dict[tuple[str, str], list[str]] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if name.startswith(".") or name.endswith(("~", ".tmp", ".part")) or not entry.is_file():
            continue
        m = _NUMBERED.match(name)
        if not m:
            continue
        try:
            mimetype = registry.mimetype_for(Path(entry.path))
        except Exception:  # unknown or unreadable: not a frame
            continue
        if registry.sequence_mimetype(mimetype):
            groups.setdefault((m["prefix"], m["suffix"]), []).append(m["digits"])
    sequences = {key: digits for key, digits in groups.items() if len(digits) > 1}
    if len(sequences) != 1:
        names = ", ".join(f"{p}*{s}" for p, s in sequences) or "none"
        raise StackError(
            f"{directory} holds {len(sequences)} frame sequences ({names}); "
            "give a glob such as 'DIR/scan1_*.cbf'"
        )
    ((prefix, suffix), digits), = sequences.items()
    width = Counter(len(d) for d in digits).most_common(1)[0][0]
    numbers = [int(d) for d in digits if len(d) == width]
    return Template(directory, prefix, width, suffix, ranges_of(numbers))


def _reader_class(slots: list[_Slot]) -> type:
    """The sequence adapter class for the first input file's format."""
    from ..adapters import registry

    first = next((s.path for s in slots if s.path is not None and s.path.exists()), None)
    if first is None:
        raise StackError(f"none of the {len(slots)} input files exists")
    mimetype = registry.mimetype_for(first)
    sequence = registry.sequence_mimetype(mimetype)
    if sequence is None:
        raise StackError(
            f"{first.name}: no sequence adapter is installed for {mimetype}, so its "
            "frames cannot be stacked"
        )
    return registry.adapters_by_mimetype()[sequence]


def _reference(cls: type, slots: list[_Slot]) -> tuple[tuple[int, ...], np.dtype, dict]:
    """Frame shape and dtype of the scan (the most common among a few frames
    spread over the scan), plus the first good frame's harvested metadata."""
    candidates = [s for s in slots if s.path is not None]
    picks = [candidates[0], candidates[len(candidates) // 2], candidates[-1]]
    picks = list(dict.fromkeys(picks)) + [s for s in candidates if s not in picks]
    found: list[tuple[tuple[int, ...], np.dtype]] = []
    summary: dict | None = None
    errors: list[str] = []
    reader = None
    for k, slot in enumerate(picks):
        if found and k >= 3:  # three spread-out frames looked at, at least one good
            break
        try:
            if hasattr(cls, "inspect"):
                info = cls.inspect(slot.path)
                shape, dtype, md = tuple(info.shape), np.dtype(info.dtype), info.summary
            else:
                if reader is None:
                    reader = _make_reader(cls, slot.path.parent, (1, 1), np.dtype("u1"))
                frame = np.asarray(reader.read_frame(slot.path))
                shape, dtype, md = frame.shape, frame.dtype, {}
        except Exception as err:
            errors.append(str(err))
            continue
        found.append((shape, dtype.newbyteorder("=")))
        if summary is None:
            summary = md
    if not found:
        raise StackError(
            f"none of the {len(candidates)} frames is readable (first error: {errors[0]})"
            if errors else "no frames to stack"
        )
    (shape, dtype), _ = Counter(found).most_common(1)[0]
    return shape, dtype, summary or {}


def _make_reader(cls: type, directory: Path, shape: tuple[int, ...], dtype: np.dtype):
    """One adapter instance whose ``read_frame`` the workers call (built once)."""
    template = Template(directory, "", 0, "", ((1, 1),))
    return cls(template, stack_structure(1, shape, dtype))


def _out_dtype(source: np.dtype, dtype: Any) -> np.dtype:
    if dtype is None:
        return source
    out = np.dtype(dtype)
    if np.can_cast(source, out, "safe") or (source.kind in "iu" and out.kind == "f"):
        return out
    raise ValueError(f"cannot store {source} frames as {out} without losing data")


def _fill_value(dtype: np.dtype):
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "u":
        return np.iinfo(dtype).max
    return -1


# --------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Spec:
    """What every worker needs (pickled with each task; small)."""

    reader: Any
    shape: tuple[int, ...]
    dtype: str  # the scan's (detector's) dtype
    out_dtype: str
    codec: Codec
    rows: bool  # also return the frame's header row (angles)


def _work(spec: _Spec, position: int, path: str) -> tuple:
    """Decode, check, convert and compress one frame.

    Returns ``(position, filter_mask, chunk, row, nbytes_read, None)`` or
    ``(position, None, None, None, 0, reason)``; never raises for a bad frame.
    """
    p = Path(path)
    try:
        frame = np.asarray(spec.reader.read_frame(p))
        if frame.shape != spec.shape:
            raise ValueError(f"{p.name}: frame shape {frame.shape} differs from the scan's {spec.shape}")
        out, scan = np.dtype(spec.out_dtype), np.dtype(spec.dtype)
        if frame.dtype != scan and not np.can_cast(frame.dtype, scan, "safe"):
            raise ValueError(f"{p.name}: frame dtype {frame.dtype} differs from the scan's {scan}")
        frame = np.ascontiguousarray(frame, dtype=out)
        mask, chunk = spec.codec.encode(frame)
        row = None
        if spec.rows:
            with contextlib.suppress(Exception):
                row = type(spec.reader).inspect(p).row
        return position, mask, chunk, row, p.stat().st_size, None
    except FileNotFoundError:
        return position, None, None, None, 0, f"{p.name}: no such file"
    except Exception as err:  # any decoder error: report the frame, go on
        text = str(err).strip().splitlines()
        reason = text[0] if text else type(err).__name__
        if p.name not in reason:
            reason = f"{p.name}: {reason}"
        return position, None, None, None, 0, reason


def _write_chunk(dset, position: int, mask: int, chunk: bytes) -> None:
    """Store one pre-compressed frame (a seam: tests replace it to fill the disk)."""
    dset.id.write_direct_chunk((position,) + (0,) * (dset.ndim - 1), chunk, mask)


# --------------------------------------------------------------------- stacking


def stack_files(
    paths_or_template: Template | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    angles: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    codec: str | Codec = "bitshuffle-lz4",
    dtype: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
    strict: bool = False,
) -> StackReport:
    """Stack numbered frame files (any format with a sequence adapter) into a NeXus scan file.

    Parameters
    ----------
    paths_or_template
        A :class:`~scatterbroker.adapters.sequence.Template`, a glob
        (``"DIR/scan1_*.cbf"``), a directory holding one frame sequence, or a
        list of files. Files are ordered by the number in their names; two
        files with the same number raise :class:`DuplicateFrames`.
    out_path
        The scan file to write (replaced atomically if it exists).
    angles
        Rotation angle of each frame (one per frame number from first to
        last), degrees. Default: the ``start_angle`` in each frame's header,
        where the format has one (missing frames interpolated).
    metadata
        Scan metadata in the ``adapters.units`` layout (``sample/...``,
        ``instrument/...`` with ``name@units``). Default: the first frame's
        harvested header.
    codec
        A name in :data:`CODECS` (default Bitshuffle-LZ4) or a :class:`Codec`.
    dtype
        ``None`` keeps the detector's dtype (missing frames read as -1);
        ``"float32"`` converts (missing frames read as NaN). Counts above
        2**24 are not exact in float32.
    workers
        Worker processes (default ``os.cpu_count()``; 1 = in this process).
        Ignored when ``SCATTERBROKER_DASK_ADDRESS`` names a Dask scheduler.
    progress
        Called as ``progress(frames_done_now, total_frames)``, first with 0.
    strict
        Raise :class:`MissingFrames` (writing nothing) if any frame is missing.

    Returns
    -------
    StackReport

    Examples
    --------
    >>> stack_files("/data/raw/s1/scan1_*.cbf", "/data/scans/s1/scan1.nxs").summary()  # doctest: +SKIP
    """
    slots = _expand(paths_or_template)
    cls = _reader_class(slots)
    shape, source, summary = _reference(cls, slots)
    return _stack(
        slots, out_path, cls=cls, shape=shape, source=source,
        angles=angles, angle_map=None,
        metadata=summary if metadata is None else metadata,
        codec=codec, dtype=dtype, workers=workers, progress=progress, strict=strict,
        origin=_origin(paths_or_template),
    )


def stack_sequence(
    template: Template,
    out_path: str | os.PathLike[str],
    *,
    adapter: type,
    frame_shape: Sequence[int],
    frame_dtype: Any,
    metadata: Mapping[str, Any],
    angles_by_frame: Mapping[int, float] | None = None,
    origin: str | None = None,
    codec: str | Codec = "bitshuffle-lz4",
    dtype: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
    strict: bool = False,
) -> StackReport:
    """Stack a sequence whose format, frame shape and dtype are already known (a
    catalog's scan node: :func:`scatterbroker.catalog.stacking.stack_scan`).

    Unlike :func:`stack_files` nothing is guessed from the files: ``adapter`` is
    the sequence adapter class, ``frame_shape``/``frame_dtype`` the scan's,
    ``metadata`` what goes into ``entry/sample`` and ``entry/instrument``;
    ``angles_by_frame`` maps frame numbers to rotation angles (missing ones
    interpolated); ``origin`` is recorded as ``entry@source``. Other parameters
    as :func:`stack_files`.
    """
    return _stack(
        _slots_from_template(template), out_path, cls=adapter, shape=tuple(frame_shape),
        source=np.dtype(frame_dtype).newbyteorder("="), angles=None,
        angle_map=dict(angles_by_frame or {}), metadata=metadata, codec=codec, dtype=dtype,
        workers=workers, progress=progress, strict=strict,
        origin=_origin(template) if origin is None else origin,
    )


def _origin(paths_or_template: Any) -> str:
    if isinstance(paths_or_template, Template):
        t = paths_or_template
        return str(t.directory / f"{t.prefix}{'#' * max(t.width, 1)}{t.suffix}")
    if isinstance(paths_or_template, (str, os.PathLike)):
        return os.fspath(paths_or_template)
    return f"{len(paths_or_template)} files"


def _stack(
    slots: list[_Slot],
    out_path: str | os.PathLike[str],
    *,
    cls: type,
    shape: tuple[int, ...],
    source: np.dtype,
    angles: Sequence[float] | None,
    angle_map: dict[int, float] | None,
    metadata: Mapping[str, Any],
    codec: str | Codec,
    dtype: Any,
    workers: int | None,
    progress: Progress | None,
    strict: bool,
    origin: str,
) -> StackReport:
    import h5py

    t0 = time.perf_counter()
    codec = parse_codec(codec)
    out_dtype = _out_dtype(source, dtype)
    out = Path(out_path)
    if out.is_dir():
        raise StackError(f"{out} is a directory; give the scan file's name")
    if not out.parent.is_dir():
        raise StackError(f"{out.parent} does not exist")
    n = len(slots)
    if angles is not None and len(angles) != n:
        raise ValueError(f"{len(angles)} angles for {n} frames (frame numbers {slots[0].number}..{slots[-1].number})")
    workers = max(1, int(workers or os.cpu_count() or 1))
    want_rows = angles is None and not angle_map and hasattr(cls, "inspect")
    spec = _Spec(
        reader=_make_reader(cls, next(s.path for s in slots if s.path is not None).parent, shape, source),
        shape=tuple(shape), dtype=source.str, out_dtype=out_dtype.str, codec=codec, rows=want_rows,
    )
    missing: dict[int, str] = {i: s.why for i, s in enumerate(slots) if s.path is None}
    rows: dict[int, dict] = {}
    tasks = [(i, str(s.path)) for i, s in enumerate(slots) if s.path is not None]
    report = StackReport(out, n, tuple(shape), out_dtype.name, codec.name)
    fill = _fill_value(out_dtype)
    existed = out.exists()
    try:
        with new_nexus_file(out, inputs=[s.path for s in slots if s.path is not None],
                            error=StackError) as f:
            if progress:
                progress(0, n)
                if missing:
                    progress(len(missing), n)
            f.attrs["NX_class"] = "NXroot"
            f.attrs["creator"] = "scatterbroker"
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            instrument = entry.require_group("instrument")
            instrument.attrs["NX_class"] = "NXinstrument"
            detector = instrument.require_group("detector")
            detector.attrs["NX_class"] = "NXdetector"
            dset = detector.create_dataset(
                "data", shape=(n, *shape), dtype=out_dtype, chunks=(1, *shape),
                fillvalue=fill, **codec.filters(),
            )
            with pool_for(workers, len(tasks), start="auto", preload=_PRELOAD) as executor:
                report.executor = executor.description
                in_flight = max(2, IN_FLIGHT_PER_WORKER * executor.slots)
                for position, mask, chunk, row, nbytes, why in executor.as_completed(
                    functools.partial(_work, spec), tasks, in_flight
                ):
                    if why is not None:
                        missing[position] = why
                    else:
                        _write_chunk(dset, position, mask, chunk)
                        report.bytes_read += nbytes
                        if row:
                            rows[position] = row
                    if progress:
                        progress(1, n)
            if len(missing) == n:
                first = next(iter(missing.values()))
                raise StackError(f"none of the {n} frames could be read (first problem: {first})")
            report.missing = sorted((slots[i].number, why) for i, why in missing.items())
            if strict and missing:
                raise MissingFrames(
                    f"{len(missing)} of {n} frames missing or unreadable (first: "
                    f"{report.missing[0][1]}); nothing written. Without strict they are "
                    f"filled with {fill} and listed in missing_frames"
                )
            numbers = np.array([s.number for s in slots], dtype=np.int64)
            if angles is None:
                if angle_map:
                    known = {i: angle_map[s.number] for i, s in enumerate(slots) if s.number in angle_map}
                else:
                    known = {i: r["start_angle"] for i, r in rows.items()
                             if isinstance(r.get("start_angle"), (int, float))}
                angles = _fill_angles(n, known)
            units_tree = dict(metadata)
            _write_tree(entry, units_tree)
            entry.require_group("sample").attrs["NX_class"] = "NXsample"
            dset.attrs["units"] = "counts"
            dset.attrs["interpretation"] = "image"
            detector["missing_frames"] = np.array([m for m, _ in report.missing], dtype=np.int64)
            detector.create_dataset(
                "missing_frames_reasons",
                data=np.array([why for _, why in report.missing], dtype=object),
                dtype=h5py.string_dtype(),
            )
            entry.attrs["source"] = origin
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            data["data"] = dset  # hard link: same dataset, no copy
            data["frame_number"] = numbers
            data.attrs["frame_number_indices"] = 0
            axis = "frame_number"
            if angles is not None:
                data["rotation_angle"] = np.asarray(angles, dtype=float)
                data["rotation_angle"].attrs["units"] = "deg"
                data.attrs["rotation_angle_indices"] = 0
                axis = "rotation_angle"
            data.attrs["axes"] = [axis, ".", "."]
    except (OSError, RuntimeError) as err:
        full = _disk_full(err, out, existed)
        if full is not None:
            raise full from err
        raise
    report.bytes_raw = report.written * int(np.prod(shape)) * source.itemsize
    report.bytes_out = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report


#: errno -> how a write that could not grow the file is described
_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file size limit was reached (File too large)",
    errno.EDQUOT: "the disk quota is exceeded",
}


def _disk_full(err: BaseException, out: Path, existed: bool) -> DiskFull | None:
    """A :class:`DiskFull` for ``err`` if it says the file could not grow, else None.

    HDF5 reports a failed write through h5py as an ``OSError`` or, when it
    happens while the file is flushed on close, a ``RuntimeError`` whose text
    holds ``errno = 28`` (ENOSPC), ``27`` (EFBIG: ``ulimit -f``) or ``122`` (EDQUOT).
    """
    code = getattr(err, "errno", None)
    if code not in _FULL:
        m = re.search(r"errno = (\d+)", str(err))
        code = int(m.group(1)) if m else None
    if code not in _FULL:
        text = str(err)
        code = next((c for c in _FULL if os.strerror(c) in text), None)
    if code is None:
        return None
    kept = f"; the existing {out.name} is untouched" if existed else ""
    return DiskFull(f"{_FULL[code]} while writing {out.name} in {out.parent}: "
                    f"the partial file was removed{kept}")


def _fill_angles(n: int, known: dict[int, float]) -> np.ndarray | None:
    """Angles at every position: known values, interpolated inside, extrapolated
    linearly at the ends; None if nothing is known."""
    if not known:
        return None
    x = np.array(sorted(known), dtype=float)
    y = np.array([known[int(i)] for i in x], dtype=float)
    positions = np.arange(n, dtype=float)
    if len(x) == 1:
        return np.full(n, y[0])
    out = np.interp(positions, x, y)
    low, high = positions < x[0], positions > x[-1]
    out[low] = y[0] + (positions[low] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[high] = y[-1] + (positions[high] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out


# --------------------------------------------------------------------- simple writer


def write_scan(
    path: str | os.PathLike[str],
    frames: Sequence[np.ndarray] | np.ndarray,
    *,
    angles: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    codec: str = "bitshuffle-lz4",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a NeXus scan file from frames already in memory (each (ny, nx)), atomically.

    Parameters
    ----------
    frames
        Frames in scan order, axes (y, x); all the same shape and dtype.
    angles
        Rotation angle of each frame, degrees; becomes the NXdata frame axis.
    metadata
        Harvested scan metadata (``adapters.units`` layout): ``sample/...``,
        ``instrument/...`` values are written as NeXus fields with units.
    codec
        One of ``CODECS``.
    """
    filters = parse_codec(codec).filters()
    path = Path(path)
    n = len(frames)
    first = np.asarray(frames[0])
    try:
        with new_nexus_file(path) as f:
            f.attrs["NX_class"] = "NXroot"
            f.attrs["creator"] = "scatterbroker"
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            _write_tree(entry, metadata or {})
            detector = entry.require_group("instrument").require_group("detector")
            entry["instrument"].attrs["NX_class"] = "NXinstrument"
            detector.attrs["NX_class"] = "NXdetector"
            dset = detector.create_dataset(
                "data",
                shape=(n, *first.shape),
                dtype=first.dtype,
                chunks=(1, *first.shape),
                **filters,
            )
            for i in range(n):
                dset[i] = np.asarray(frames[i])
                if progress:
                    progress(1)
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            data["data"] = dset  # hard link: same dataset, no copy
            axis = "rotation_angle" if angles is not None else "frame_number"
            values = np.asarray(angles if angles is not None else np.arange(n), dtype=float)
            data.create_dataset(axis, data=values)
            if angles is not None:
                data[axis].attrs["units"] = "deg"
            data.attrs["axes"] = [axis, ".", "."]
    except (OSError, RuntimeError) as err:
        full = _disk_full(err, path, path.exists())
        if full is not None:
            raise full from err
        raise
    return path


_CLASSES = {
    "sample": "NXsample",
    "instrument": "NXinstrument",
    "detector": "NXdetector",
    "monochromator": "NXmonochromator",
    "scan": "NXcollection",
}


def _write_tree(group, tree: Mapping[str, Any]) -> None:
    """Write nested metadata as NeXus fields; ``name@units`` become attributes.

    Values h5py cannot store directly (lists of strings, nested lists of
    mappings) are written as strings rather than failing the whole file.
    """
    for key, value in tree.items():
        if "@" in key or key == "source":
            continue
        units = tree.get(f"{key}@units")
        # A harvested name may hold '/' (a SPEC column 'I/I0') or be '.': not an HDF5 link name.
        key = str(key).replace("/", "_").strip() or "_"
        if key in (".", ".."):
            key = f"_{key}"
        if isinstance(value, Mapping):
            try:
                sub = group.require_group(key)
            except (TypeError, ValueError):  # the name is taken by a dataset
                continue
            if key in _CLASSES:
                sub.attrs["NX_class"] = _CLASSES[key]
            _write_tree(sub, value)
        elif value is not None:
            if key in group:
                continue  # already written (e.g. the detector's data)
            try:
                group[key] = value
            except (TypeError, ValueError):
                if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                    import h5py

                    group.create_dataset(key, data=list(value), dtype=h5py.string_dtype())
                else:
                    group[key] = str(value)
            if units is not None:
                group[key].attrs["units"] = units
