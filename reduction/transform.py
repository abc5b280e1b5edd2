"""Reciprocal-space transform of a rotation scan onto a regular HKL grid (DESIGN.md §5).

Per pixel ``(x, y)`` of frame ``z``: ``Q = k_f - k_i`` from the detector
geometry, ``hkl = UB⁻¹ R(z)⁻¹ Q``, nearest-voxel binning. Summed counts ``v``
and summed weights ``n`` (pixels binned) are float64; ``data = v / n`` (NaN
where ``n == 0``). Conventions: ``docs/geometry.md`` and
:mod:`scatterbroker.reduction.geometry`.

**Array axes are (L, K, H)**, C order (H fastest), as the NXdata of the
product (``axes = ["L", "K", "H"]``).

This module is the thin, synchronous wrapper: it validates the inputs,
allocates the grids, streams the frames one block at a time through the numba
kernels of :mod:`scatterbroker.reduction._kernels` and reduces. Memory is
bounded by the grid (``16 bytes x voxels x threads``) plus one block of
frames, never by the length of the scan.

Splitting for a job system: :func:`partial` does one block of frames and
returns its ``(v, n)``; :func:`merge` sums any number of them and
:func:`finish` turns the sum into a :class:`Result`. For integer counts the
result is bit-identical for every split (sums of integers below 2**53 are
exact in float64); for float frames it agrees to rounding.

Examples
--------
>>> import numpy as np
>>> from scatterbroker.reduction.geometry import Geometry, Grid, UB
>>> geom = Geometry(wavelength=0.5, distance=200.0, beam_center=(25.0, 20.0),
...                 pixel_size=(0.172, 0.172))
>>> grid = Grid.from_ranges(H=(-1, 1), K=(-1, 1), L=(-1, 1), step=0.1)
>>> result = transform(np.ones((4, 40, 50)), geom, UB.from_lattice(4, 4, 4, 90, 90, 90), grid)
>>> result.data.shape == grid.shape == (21, 21, 21)
True
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import _kernels
from .geometry import (
    BEAM_DIRECTION,
    Geometry,
    GeometryError,
    Grid,
    GridTooLarge,
    SingularUB,
    TransformError,
    TransformParams,
    UB,
    axis_vector,
    parse_geometry,
    parse_grid,
    parse_ub,
)

__all__ = [
    "Geometry",
    "GeometryError",
    "Grid",
    "GridTooLarge",
    "MaskShapeError",
    "NotAFrameStack",
    "Partial",
    "Result",
    "SingularUB",
    "TransformError",
    "TransformParams",
    "UB",
    "finish",
    "merge",
    "partial",
    "pixel_hkl",
    "transform",
]

#: Units written with the axes.
HKL_UNITS = "rlu"


class NotAFrameStack(TransformError):
    """The input is not a 3-D (frame, y, x) stack of real numbers."""


class MaskShapeError(TransformError):
    """The pixel mask does not have the frames' (ny, nx) shape."""


# --------------------------------------------------------------------------- results


class Partial(NamedTuple):
    """Summed counts ``v`` and weights ``n`` of some frames, float64, shape ``grid.shape`` = (nL, nK, nH)."""

    v: np.ndarray
    n: np.ndarray


class Result:
    """A transformed scan on its grid. All arrays have axes **(L, K, H)**.

    Attributes
    ----------
    v : ndarray, float64, (nL, nK, nH)
        Summed counts per voxel.
    n : ndarray, float64, (nL, nK, nH)
        Summed weights per voxel: the number of (unmasked, non-NaN) pixels binned.
    grid : Grid
    data : ndarray, float64, (nL, nK, nH)
        ``v / n``, NaN where ``n == 0`` (computed on first access).
    H, K, L : ndarray
        Voxel centres along each axis (r.l.u.).
    """

    axes = ("L", "K", "H")

    def __init__(self, v: np.ndarray, n: np.ndarray, grid: Grid, params: TransformParams | None = None) -> None:
        grid = parse_grid(grid)
        if v.shape != grid.shape or n.shape != grid.shape:
            raise TransformError(f"v {v.shape} and n {n.shape} must both have the grid's shape {grid.shape}")
        self.v, self.n, self.grid, self.params = v, n, grid, params

    #: Union of the 4 KiB pages of ``v``/``n`` any thread wrote (set by :func:`transform`), or None.
    _touched: np.ndarray | None = None

    @functools.cached_property
    def data(self) -> np.ndarray:
        if self._touched is None:
            return _kernels.ratio_reference(self.v, self.n)
        out = np.empty(self.v.size)
        _kernels.ratio(self.v.reshape(-1), self.n.reshape(-1), self._touched, out)
        return out.reshape(self.v.shape)

    @property
    def H(self) -> np.ndarray:  # noqa: N802 (crystallographic name)
        return self.grid.H.centres

    @property
    def K(self) -> np.ndarray:  # noqa: N802
        return self.grid.K.centres

    @property
    def L(self) -> np.ndarray:  # noqa: N802
        return self.grid.L.centres

    @property
    def partial(self) -> Partial:
        return Partial(self.v, self.n)

    def to_nxdata(self, *, normalized: bool = True) -> dict[str, Any]:
        """The result as an NXdata-shaped dict: ``{"attrs": {...}, name: {"value", "attrs"}, ...}``.

        ``normalized=True`` (the product layout of DESIGN.md §5): signal
        ``data = v/n`` (NaN where empty) and ``weights = n``. Note that
        nexusformat treats a field called ``weights`` as the divisor of a
        *summed* signal (``NXdata.weighted_data()``), so do not call that on
        this layout. ``normalized=False`` gives nexusformat's own weighted
        layout: signal ``data = v`` and ``data_weights = n``.
        """
        axes_attrs = {f"{a}_indices": i for i, a in enumerate(self.axes)}
        out: dict[str, Any] = {
            "attrs": {"NX_class": "NXdata", "signal": "data", "axes": list(self.axes), **axes_attrs},
        }
        if normalized:
            out["data"] = {"value": self.data, "attrs": {"long_name": "mean counts per pixel (v/n)", "units": "counts"}}
            out["weights"] = {"value": self.n, "attrs": {"long_name": "pixels binned (n)"}}
        else:
            out["data"] = {"value": self.v, "attrs": {"long_name": "summed counts (v)", "units": "counts"}}
            out["data_weights"] = {"value": self.n, "attrs": {"long_name": "pixels binned (n)"}}
        for a in self.axes:
            out[a] = {"value": getattr(self, a), "attrs": {"units": HKL_UNITS, "long_name": a}}
        return out

    def __repr__(self) -> str:
        filled = int(np.count_nonzero(self.n))
        return f"<Result grid (L, K, H) = {self.grid.shape}, {filled:,} voxels filled, {self.n.sum():,.0f} pixels>"


# --------------------------------------------------------------------------- geometry -> kernel inputs


def _frame_shape(frames: Any) -> tuple[int, int, int]:
    shape = getattr(frames, "shape", None)
    if shape is None:
        try:
            shape = np.shape(frames)
        except Exception:  # noqa: BLE001 - anything unshaped is "not a frame stack"
            raise NotAFrameStack(f"frames must be a (frame, y, x) array, got {type(frames).__name__}") from None
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        hint = " (for one frame use frames[None])" if len(shape) == 2 else ""
        raise NotAFrameStack(f"frames must be a 3-D (frame, y, x) stack, got {len(shape)}-D shape {shape}{hint}")
    if min(shape[1:]) < 1:
        raise NotAFrameStack(f"frames have an empty detector axis: shape {shape}")
    dtype = getattr(frames, "dtype", None)
    if dtype is not None:
        _check_dtype(np.dtype(dtype))
    return shape  # type: ignore[return-value]


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise NotAFrameStack(f"frames must hold real numbers, got dtype {dtype}")


def _as_block(block: Any, shape: tuple[int, int]) -> np.ndarray:
    a = np.asarray(block)
    _check_dtype(a.dtype)
    if a.ndim != 3 or a.shape[1:] != shape:
        raise NotAFrameStack(f"a block of frames has shape {a.shape}, expected (n, {shape[0]}, {shape[1]})")
    if a.dtype.kind == "b":
        a = a.view(np.uint8)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _mask_array(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=np.uint8)
    m = np.asarray(mask.read() if callable(getattr(mask, "read", None)) else mask)
    if m.shape != shape:
        raise MaskShapeError(
            f"mask shape {m.shape} does not match the frames' detector shape (ny, nx) = {shape}"
        )
    if m.dtype.kind not in "biu":
        raise MaskShapeError(f"mask must be boolean (True = excluded pixel), got dtype {m.dtype}")
    return np.ascontiguousarray(m != 0, dtype=np.uint8)


@dataclass
class _Plan:
    """Everything that does not change from frame to frame."""

    params: TransformParams
    shape: tuple[int, int]
    scale: np.ndarray  # (ny, nx) k/|r|, NaN where masked
    p0: np.ndarray
    ex: np.ndarray
    ey: np.ndarray
    ki: np.ndarray
    prescale: np.ndarray  # diag(1/step) @ UB^-1

    @classmethod
    def build(cls, params: TransformParams, shape: tuple[int, int], mask: Any) -> _Plan:
        g = params.geometry
        m = _mask_array(mask, shape)
        p0, ex, ey = g.detector_frame()
        scale = np.empty(shape, dtype=np.float64)
        _kernels.pixel_scale(p0, ex, ey, g.k, m, scale)
        prescale = np.diag(1.0 / params.grid.step) @ params.ub.inverse()
        return cls(params, shape, scale, p0, ex, ey, g.k * axis_vector(BEAM_DIRECTION), prescale)

    def check_frames(self, first: int, count: int) -> None:
        if first < 0:
            raise TransformError(f"first frame index must be >= 0 (got {first})")
        angles = self.params.geometry.goniometer.angles
        if angles is not None and first + count > len(angles):
            raise TransformError(
                f"frames {first}..{first + count - 1} but the goniometer lists only {len(angles)} scan angles"
            )

    def coefficients(self, first: int, count: int) -> np.ndarray:
        """Per-frame kernel coefficients ``(A p0, A ey, A ex, b - A k_i)``, shape (count, 4, 3)."""
        grid = self.params.grid
        rot = self.params.geometry.goniometer.rotations(first, count)
        # A_f = diag(1/step) UB^-1 R_f^-1, and R^-1 = R^T for a rotation
        a = self.prescale @ np.transpose(rot, (0, 2, 1))
        b = -grid.start / grid.step
        coef = np.empty((count, 4, 3))
        coef[:, 0] = a @ self.p0
        coef[:, 1] = a @ self.ey
        coef[:, 2] = a @ self.ex
        coef[:, 3] = b - a @ self.ki
        return coef


def _threads(nthreads: int | None) -> int:
    import numba

    return numba.get_num_threads() if nthreads is None else max(1, int(nthreads))


def _accumulate(
    frames: Any,
    first_frame: int,
    params: TransformParams,
    *,
    mask: Any,
    block_frames: int,
    progress: Callable[[int], None] | None,
    max_voxels: int | None,
    nthreads: int | None,
) -> tuple[Partial, np.ndarray]:
    nf, ny, nx = _frame_shape(frames)
    if not isinstance(block_frames, (int, np.integer)) or block_frames < 1:
        raise TransformError(f"block_frames must be a positive integer (got {block_frames!r})")
    grid = params.grid
    threads = _threads(nthreads)
    grid.check_size(max_voxels, threads)
    plan = _Plan.build(params, (ny, nx), mask)
    plan.check_frames(first_frame, nf)

    size = grid.size
    v = _zeros(size)
    n = _zeros(size)
    v_rest = _zeros((threads - 1) * size).reshape(threads - 1, size)
    n_rest = _zeros((threads - 1) * size).reshape(threads - 1, size)
    touched = np.zeros((threads, (size >> _kernels.PAGE_SHIFT) + 1), dtype=np.uint8)
    nl, nk, nh = grid.shape

    def read(i: int) -> np.ndarray:
        return _as_block(frames[i : min(nf, i + block_frames)], (ny, nx))

    starts = list(range(0, nf, block_frames))
    # Reading a block from HDF5 / a Tiled server overlaps the kernel (which releases the GIL).
    prefetch = not isinstance(frames, np.ndarray) and len(starts) > 1
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sb-frames") if prefetch else None
    try:
        pending = pool.submit(read, starts[0]) if pool else None
        for j, i in enumerate(starts):
            block = pending.result() if pool else read(i)
            if pool and j + 1 < len(starts):
                pending = pool.submit(read, starts[j + 1])
            count = block.shape[0]
            coef = plan.coefficients(first_frame + i, count)
            _kernels.bin_frames(block, plan.scale, coef, nh, nk, nl, v, n, v_rest, n_rest, touched)
            del block
            if progress is not None:
                progress(count)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    if threads > 1:
        _kernels.reduce_partials(v, v_rest, touched)
        _kernels.reduce_partials(n, n_rest, touched)
    del v_rest, n_rest
    return Partial(v.reshape(grid.shape), n.reshape(grid.shape)), touched.any(axis=0)


def _zeros(count: int) -> np.ndarray:
    """float64 zeros on ordinary 4 KiB pages: only the pages written become resident.

    The grids are mostly empty (a scan sweeps a shell of reciprocal space), so
    this keeps RSS and page-fault time proportional to the region reached, not
    to the grid. NumPy would ask for transparent huge pages on allocations this
    large; those are each 2 MiB and, when memory is fragmented, make the kernel
    compact memory on every fault (measured here: 0.1 to 2 s per GB).
    """
    if count == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(count)
    mm = mmap.mmap(-1, count * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mm.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mm, dtype=np.float64, count=count)


def _with_threads(nthreads: int | None, fn: Callable[[], Any]) -> Any:
    if nthreads is None:
        return fn()
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(nthreads), numba.config.NUMBA_NUM_THREADS)))
    try:
        return fn()
    finally:
        numba.set_num_threads(previous)


# --------------------------------------------------------------------------- public API


def transform(
    frames: Any,
    geometry: Geometry | Mapping[str, Any],
    ub: UB | Any,
    grid: Grid | Mapping[str, Any],
    *,
    mask: Any = None,
    first_frame: int = 0,
    block_frames: int = 16,
    progress: Callable[[int], None] | None = None,
    max_voxels: int | None = None,
    nthreads: int | None = None,
) -> Result:
    """Transform a (frame, y, x) stack onto the HKL ``grid``.

    Parameters
    ----------
    frames
        ``(n_frames, ny, nx)`` counts: a NumPy array or anything sliced along
        axis 0 into NumPy (h5py dataset, Tiled ``ArrayClient``, ...); read
        ``block_frames`` frames at a time (the next block is read while the
        current one is binned). Any real dtype; NaN counts are skipped.
    geometry, ub, grid
        :class:`Geometry`, :class:`UB` (or a 3x3 array, 2π convention) and
        :class:`Grid`, or their ``to_dict`` forms.
    mask
        Optional ``(ny, nx)`` boolean array, **True = excluded pixel** (as
        ``numpy.ma`` and NeXus ``pixel_mask``: nonzero is bad).
    first_frame
        Scan index of ``frames[0]`` (sets the goniometer angles).
    block_frames
        Frames per kernel call.
    progress
        Called with the number of frames done after each block.
    max_voxels
        Refuse larger grids (default ``SCATTERBROKER_TRANSFORM_MAX_VOXELS`` or 2e8).
    nthreads
        numba threads (default: numba's); memory is ``16 bytes x voxels x nthreads``.

    Returns
    -------
    Result
        ``v``, ``n``, ``data`` with axes **(L, K, H)**.

    Raises
    ------
    NotAFrameStack, MaskShapeError, GridTooLarge, SingularUB, GeometryError
        All are ``TransformError``, a ``ValueError``.
    """
    params = TransformParams(parse_geometry(geometry), parse_ub(ub), parse_grid(grid))
    part, touched = _with_threads(
        nthreads,
        lambda: _accumulate(
            frames, first_frame, params, mask=mask, block_frames=block_frames,
            progress=progress, max_voxels=max_voxels, nthreads=nthreads,
        ),
    )
    result = Result(part.v, part.n, params.grid, params)
    result._touched = touched
    return result


def partial(
    frames_block: Any,
    first_frame_index: int,
    params: TransformParams | Mapping[str, Any],
    *,
    mask: Any = None,
    block_frames: int = 16,
    max_voxels: int | None = None,
    nthreads: int | None = None,
) -> Partial:
    """``(v, n)`` of some consecutive frames of a scan, for splitting a scan into tasks.

    ``frames_block[i]`` is frame ``first_frame_index + i`` of the scan.
    ``params`` is a :class:`TransformParams` or its ``to_dict()`` (JSON) form.
    Sum the parts with :func:`merge`, finish with :func:`finish`; the result
    equals :func:`transform` of the whole scan (bit-identical for integer counts).

    Examples
    --------
    >>> parts = [partial(frames[i:i + 100], i, params) for i in range(0, len(frames), 100)]  # doctest: +SKIP
    >>> result = finish(merge(parts), params)  # doctest: +SKIP
    """
    params = TransformParams.from_dict(params) if not isinstance(params, TransformParams) else params
    part, _ = _with_threads(
        nthreads,
        lambda: _accumulate(
            frames_block, int(first_frame_index), params, mask=mask, block_frames=block_frames,
            progress=None, max_voxels=max_voxels, nthreads=nthreads,
        ),
    )
    return part


def merge(parts: Iterable[Partial | Result | tuple[np.ndarray, np.ndarray]]) -> Partial | Result:
    """Sum partial ``(v, n)`` grids, in the order given.

    ``parts`` may be any iterable (e.g. results arriving from an executor): it
    is consumed one part at a time, so memory is one accumulator plus the part
    in hand. Returns a :class:`Result` if every input is a Result (on the same
    grid), else a :class:`Partial`. The inputs are not modified.
    """
    v = n = None
    first_result: Result | None = None
    all_results = True
    for p in parts:
        if isinstance(p, Result):
            if first_result is None:
                first_result = p
            elif p.grid != first_result.grid:
                raise TransformError("cannot merge results on different grids")
            pv, pn = p.v, p.n
        else:
            all_results = False
            pv, pn = p
        pv, pn = np.asarray(pv), np.asarray(pn)
        if v is None:
            v, n = np.array(pv, dtype=np.float64), np.array(pn, dtype=np.float64)
        else:
            if pv.shape != v.shape or pn.shape != n.shape:
                raise TransformError(f"cannot merge grids of shapes {v.shape} and {pv.shape}")
            v += pv
            n += pn
    if v is None:
        raise TransformError("merge() needs at least one part")
    if all_results and first_result is not None:
        return Result(v, n, first_result.grid, first_result.params)
    return Partial(v, n)


def finish(part: Partial | tuple[np.ndarray, np.ndarray], params: TransformParams | Grid | Mapping[str, Any]) -> Result:
    """Wrap summed ``(v, n)`` as a :class:`Result` (``params``: TransformParams, Grid, or a dict of either)."""
    if isinstance(params, Mapping) and set(params) == {"geometry", "ub", "grid"}:
        params = TransformParams.from_dict(params)
    if isinstance(params, TransformParams):
        return Result(np.asarray(part[0]), np.asarray(part[1]), params.grid, params)
    return Result(np.asarray(part[0]), np.asarray(part[1]), parse_grid(params))


def pixel_hkl(
    geometry: Geometry | Mapping[str, Any],
    ub: UB | Any,
    shape: tuple[int, int],
    frames: Iterable[int] | int = 0,
) -> np.ndarray:
    """HKL of every pixel of the given scan frames, shape ``(n_frames, ny, nx, 3)`` (H, K, L last).

    Straightforward NumPy (``Q = k_f - k_i``, ``hkl = UB⁻¹ R⁻¹ Q``), independent of
    the kernels' folded arithmetic; for checks and for finding where a pixel goes.
    """
    geometry = parse_geometry(geometry)
    ub = parse_ub(ub)
    idx = [frames] if isinstance(frames, (int, np.integer)) else list(frames)
    q = geometry.lab_q(tuple(shape))  # (ny, nx, 3)
    out = np.empty((len(idx), *q.shape))
    ubi = ub.inverse()
    for j, z in enumerate(idx):
        r = geometry.goniometer.rotations(int(z), 1)[0]
        out[j] = q @ (ubi @ r.T).T
    return out
