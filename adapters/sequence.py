"""Numbered frame files of one scan served as ONE array (n_frames, ny, nx).

The catalog stores a sequence compactly: one directory asset plus a file-name
template (``prefix``, zero-padding ``width``, ``suffix``) and the frame numbers
as inclusive ``ranges``. A 3,600-frame scan is one small database row, and a
growing scan only changes its ``ranges``. A read touches only the frames its
slice selects, decoding them on a shared thread pool.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ndindex import ndindex
from tiled.adapters.core import Adapter
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management
from tiled.utils import ensure_uri, path_from_uri

from scatterbroker.adapters import frame_cache
from ..errors import FrameMismatch, RequestTooLarge, UnreadableFile
from .roots import confine, file_stamp

#: Threads decoding frames concurrently (codecs release the GIL for most of a frame).
IO_WORKERS = int(os.environ.get("SCATTERBROKER_IO_WORKERS") or min(8, (os.cpu_count() or 2) + 2))
#: Largest array one read may return, bytes (``SCATTERBROKER_MAX_RESPONSE_BYTES``);
#: Tiled's own ``response_bytesize_limit`` default, but checked before any frame is decoded.
MAX_READ_BYTES = int(os.environ.get("SCATTERBROKER_MAX_RESPONSE_BYTES") or 300_000_000)

_pool: ThreadPoolExecutor | None = None


def expand(selection: Any, shape: Sequence[int]):
    """``selection`` (numpy-style) as an ndindex expanded for ``shape``.

    Out-of-range and malformed selections (a step of 0, an index too large for
    the platform) raise IndexError, which Tiled answers with HTTP 400.
    """
    try:
        return ndindex(tuple(selection) if isinstance(selection, tuple) else selection).expand(shape)
    except IndexError:
        raise
    except (ValueError, TypeError, OverflowError) as err:
        raise IndexError(f"invalid selection {selection!r}: {err}") from None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(IO_WORKERS, thread_name_prefix="sb-frames")
    return _pool


@dataclass(frozen=True)
class Template:
    """File names ``f"{prefix}{number:0{width}d}{suffix}"`` in ``directory``."""

    directory: Path
    prefix: str
    width: int
    suffix: str
    ranges: tuple[tuple[int, int], ...]

    def numbers(self) -> np.ndarray:
        """Frame numbers in stacking order (int64)."""
        if not self.ranges:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b + 1) for a, b in self.ranges])

    def name(self, number: int) -> str:
        return f"{self.prefix}{number:0{self.width}d}{self.suffix}"

    def parameters(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "width": self.width,
            "suffix": self.suffix,
            "ranges": [list(r) for r in self.ranges],
        }


def ranges_of(numbers: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """Compress sorted frame numbers to inclusive runs: [1,2,3,7] -> ((1,3),(7,7))."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        elif not runs or n != runs[-1][1]:
            runs.append([n, n])
    return tuple((a, b) for a, b in runs)


def stack_structure(n: int, frame_shape: Sequence[int], dtype: np.dtype) -> ArrayStructure:
    """(n, ny, nx) with one frame per chunk."""
    return ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype(dtype)),
        shape=(n, *frame_shape),
        chunks=((1,) * n, *[(s,) for s in frame_shape]),
    )


class FrameSequenceAdapter(Adapter[ArrayStructure]):
    """Base for a stack of single-frame files; a format implements ``read_frame``.

    Axes are (frame, y, x): frame in order of frame number, y the slow detector
    axis, x the fast one, exactly as fabio/tifffile return each frame.
    """

    structure_family = StructureFamily.array
    readable_roots = None

    def __init__(
        self,
        template: Template,
        structure: ArrayStructure,
        *,
        metadata: dict | None = None,
        specs: list | None = None,
    ) -> None:
        super().__init__(structure, metadata=metadata, specs=specs)
        self.template = template
        self._numbers = template.numbers()
        if len(self._numbers) != structure.shape[0]:
            raise UnreadableFile(
                f"sequence {template.prefix}*{template.suffix}: catalog lists "
                f"{len(self._numbers)} frames but the structure has {structure.shape[0]}"
            )

    @classmethod
    def from_catalog(cls, data_source: DataSource, node: Any, /, **kwargs: Any):
        (asset,) = [a for a in data_source.assets if a.parameter == "data_uri"]
        directory = Path(path_from_uri(asset.data_uri))
        if cls.readable_roots is not None:
            directory = confine(directory, cls.readable_roots, what="scan directory")
        template = Template(
            directory,
            kwargs["prefix"],
            int(kwargs["width"]),
            kwargs["suffix"],
            tuple((int(a), int(b)) for a, b in kwargs["ranges"]),
        )
        return cls(template, data_source.structure, metadata=node.metadata_, specs=node.specs)

    def data_source(self, mimetype: str) -> DataSource:
        """How the catalog stores this sequence: one directory asset + template."""
        return DataSource(
            structure_family=StructureFamily.array,
            mimetype=mimetype,
            structure=self.structure(),
            parameters=self.template.parameters(),
            management=Management.external,
            assets=[
                Asset(
                    data_uri=ensure_uri(str(self.template.directory)),
                    is_directory=True,
                    parameter="data_uri",
                )
            ],
        )

    @abstractmethod
    def read_frame(self, path: Path) -> np.ndarray:
        """Decode one frame file to a (ny, nx) array."""

    def frame_path(self, position: int) -> Path:
        """Path of the frame at stacking ``position`` (0-based)."""
        return self.template.directory / self.template.name(int(self._numbers[position]))

    def confined_frame_path(self, position: int) -> Path:
        """:meth:`frame_path`, checked to resolve inside the readable roots (if configured)."""
        path = self.frame_path(position)
        if self.readable_roots is not None:
            path = confine(path, self.readable_roots, what="frame")
        return path

    def _frame(self, position: int) -> np.ndarray:
        """The frame at ``position``, decoded (read-only: it may be kept in
        :data:`scatterbroker.adapters.frame_cache.frames` and given to the next reader)."""
        path = self.confined_frame_path(position)
        key = (os.fspath(path), file_stamp(os.stat(path)))
        kept = frame_cache.frames.get(key)
        if kept is not None:
            return kept
        frame = self.read_frame(path)
        expected = self._structure.shape[1:]
        dtype = self._structure.data_type.to_numpy_dtype()
        if frame.shape != expected:
            raise FrameMismatch(
                f"{path.name}: frame shape {frame.shape} differs from the scan's {expected}"
            )
        if frame.dtype != dtype:
            if not np.can_cast(frame.dtype, dtype, "same_kind"):
                raise FrameMismatch(
                    f"{path.name}: frame dtype {frame.dtype} differs from the scan's {dtype}"
                )
            frame = frame.astype(dtype)
        return frame_cache.frames.put(key, frame)

    def read(self, slice: Any = ...) -> np.ndarray:
        shape = self._structure.shape
        key = expand(slice, shape)
        first, rest = key.args[0], tuple(a.raw for a in key.args[1:])
        positions = np.atleast_1d(np.arange(shape[0])[first.raw])
        dtype = self._structure.data_type.to_numpy_dtype()
        out_shape = key.newshape(shape)
        nbytes = int(np.prod(out_shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > MAX_READ_BYTES:
            raise RequestTooLarge(
                f"slice would return {nbytes / 1e9:.2f} GB, more than the server's "
                f"limit of {MAX_READ_BYTES / 1e9:.2f} GB; request fewer frames at a time"
            )
        frame_out = ndindex(rest).newshape(shape[1:]) if rest else shape[1:]
        out = np.empty((len(positions), *frame_out), dtype=dtype)

        def fill(i: int) -> None:
            frame = self._frame(int(positions[i]))
            out[i] = frame[rest] if rest else frame

        if len(positions) == 1:
            fill(0)
        else:
            list(_executor().map(fill, range(len(positions))))
        return out.reshape(out_shape)

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        if any(block[1:]) or not 0 <= block[0] < self._structure.shape[0]:
            raise IndexError(f"block {block} is outside the stack's chunk grid")
        frame = self._frame(block[0])[np.newaxis]
        return frame[slice] if slice else frame


@dataclass(frozen=True)
class FrameInfo:
    """Header-only facts about one frame file, for registration.

    ``summary`` is scan-level metadata (NeXus-style keys, canonical units);
    ``row`` holds this frame's per-frame values (angles, exposure, timestamp).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    summary: dict
    row: dict


@dataclass
class Harvest:
    """A sequence ready to register, plus what was left out and why."""

    adapter: FrameSequenceAdapter
    columns: dict[str, list]
    rejected: list[tuple[Path, str]]


class HarvestingSequence(FrameSequenceAdapter):
    """A frame sequence whose format can read headers without decoding pixels."""

    @classmethod
    @abstractmethod
    def inspect(cls, path: Path) -> FrameInfo:
        """Header-only read of one frame; raises UnreadableFile/IncompleteFile."""

    @classmethod
    def harvest(
        cls,
        directory: Path,
        prefix: str,
        width: int,
        suffix: str,
        numbers: Sequence[int],
    ) -> Harvest:
        """Read every frame's header and build the sequence.

        Frames that are unreadable, incomplete, or differ in shape/dtype from
        the first good frame are left out and reported in ``rejected``; the
        rest register. Raises UnreadableFile if no frame is usable.
        """
        rejected: list[tuple[Path, str]] = []
        good: list[int] = []
        rows: list[dict] = []
        first: FrameInfo | None = None
        name = f"{prefix}{{n:0{width}d}}{suffix}"
        for number in sorted(set(numbers)):
            path = directory / name.format(n=number)
            try:
                info = cls.inspect(path)
            except (UnreadableFile, OSError) as err:
                rejected.append((path, str(err)))
                continue
            if first is None:
                first = info
            elif (info.shape, info.dtype) != (first.shape, first.dtype):
                rejected.append(
                    (path, f"{path.name}: frame {info.shape} {info.dtype} differs from "
                           f"the scan's {first.shape} {first.dtype}")
                )
                continue
            good.append(number)
            rows.append({"frame": number, "file": path.name, **info.row})
        if first is None:
            raise UnreadableFile(
                f"{prefix}*{suffix}: none of {len(numbers)} frames is readable"
                + (f" (first error: {rejected[0][1]})" if rejected else "")
            )
        template = Template(directory, prefix, width, suffix, ranges_of(good))
        columns = _columns(rows)
        metadata = dict(first.summary)
        metadata["scan"] = {
            **metadata.get("scan", {}),
            "frames": len(good),
            "first_frame": good[0],
            "last_frame": good[-1],
        }
        if "start_angle" in columns and len(good) > 1:
            angles = [a for a in columns["start_angle"] if a is not None]
            if angles:
                metadata["scan"]["end_angle"] = angles[-1]
                metadata["scan"]["end_angle@units"] = "deg"
        adapter = cls(template, stack_structure(len(good), first.shape, first.dtype), metadata=metadata)
        return Harvest(adapter, columns, rejected)


def _columns(rows: list[dict]) -> dict[str, list]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return {k: [row.get(k) for row in rows] for k in keys}
