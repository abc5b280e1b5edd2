"""Bragg-peak search in a rotation scan: 3-D connected regions above a threshold.

A frame stack ``(frame, y, x)`` is read one block of frames at a time, so
memory is one block (plus one frame of labels carried over), never the scan.
In each frame a pixel is *above threshold* when

    counts > threshold                     (``threshold`` given: absolute counts), or
    counts > background + k · noise        (default: ``k = sigma = 5``),

with ``background`` the frame's median over the unmasked pixels (at most
``BACKGROUND_SAMPLE`` of them, evenly spaced; or a given number) and ``noise = max(1.4826 · MAD, min_noise)`` (a robust standard
deviation; ``min_noise`` defaults to one count). Masked pixels (mask True)
and NaN counts are never above threshold. Pixels above threshold that touch
in 3-D (faces, edges or corners, in ``frame, y, x``) form one peak, also
across block boundaries, so a reflection spread over several frames is one
peak.

Per peak: the centroid weighted by ``counts - background`` (fractional
``frame``, ``y`` = row, ``x`` = column, 0-based, pixel centres on integers as
in :mod:`scatterbroker.reduction.geometry`), the ``intensity`` (sum of
``counts - background``) and ``npix`` (pixels x frames in the region).

Examples
--------
>>> import numpy as np
>>> frames = np.zeros((5, 20, 30))
>>> frames[1:4, 8:11, 10:13] = [[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]
>>> p = find_peaks(frames, threshold=0.5)
>>> len(p), float(p.frame[0]), float(p.y[0]), float(p.x[0]), int(p.npix[0])
(1, 2.0, 9.0, 11.0, 27)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import TransformError
from .transform import MaskShapeError, NotAFrameStack

__all__ = ["COLUMNS", "MaskShapeError", "NotAFrameStack", "PeakSearchError", "Peaks", "find_peaks", "peak_options"]

#: Columns of a peak table, in order.
COLUMNS = ("frame", "y", "x", "intensity", "npix")

#: Refuse a search with more connected regions than this (the threshold is too low).
DEFAULT_MAX_REGIONS = 1_000_000

_MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution = 1.4826 x its median absolute deviation

#: Background and noise of a frame come from at most this many evenly spaced unmasked pixels.
BACKGROUND_SAMPLE = 100_000


class PeakSearchError(TransformError):
    """Parameters the peak search cannot use (HTTP 422; also a ``ValueError``)."""


@dataclass(frozen=True)
class Peaks:
    """A peak table: one row per peak, strongest first.

    Attributes
    ----------
    frame, y, x : float64 (n,)
        Centroid: fractional scan frame index, detector row and column
        (0-based; pixel ``[row, col]`` has its centre at ``y = row, x = col``).
    intensity : float64 (n,)
        Sum of ``counts - background`` over the peak's pixels (counts).
    npix : int64 (n,)
        Number of (frame, y, x) voxels in the peak.
    """

    frame: np.ndarray
    y: np.ndarray
    x: np.ndarray
    intensity: np.ndarray
    npix: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for name in COLUMNS:
            a = np.asarray(getattr(self, name), dtype=np.int64 if name == "npix" else np.float64).ravel()
            if n is not None and len(a) != n:
                raise PeakSearchError(f"peak columns differ in length ({name}: {len(a)}, frame: {n})")
            n = len(a)
            object.__setattr__(self, name, a)

    def __len__(self) -> int:
        return len(self.frame)

    def take(self, index: Any) -> Peaks:
        """The rows ``index`` (integer indices or a boolean mask)."""
        return Peaks(*(getattr(self, c)[index] for c in COLUMNS))

    def to_dict(self) -> dict[str, np.ndarray]:
        """``{"frame": ..., "y": ..., "x": ..., "intensity": ..., "npix": ...}``."""
        return {c: getattr(self, c) for c in COLUMNS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Peaks:
        """From a mapping with at least ``frame, y, x`` (``intensity`` default 1, ``npix`` default 1)."""
        if isinstance(d, Peaks):
            return d
        missing = {"frame", "y", "x"} - set(d)
        if missing:
            raise PeakSearchError(f"a peak table needs columns frame, y, x (missing {sorted(missing)})")
        n = len(np.ravel(d["frame"]))
        return cls(d["frame"], d["y"], d["x"], d.get("intensity", np.ones(n)), d.get("npix", np.ones(n, int)))


# --------------------------------------------------------------------------- input checks


def _stack_shape(frames: Any) -> tuple[int, int, int]:
    shape = getattr(frames, "shape", None)
    if shape is None:
        raise NotAFrameStack(f"frames must be a (frame, y, x) array, got {type(frames).__name__}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        hint = " (for one frame use frames[None])" if len(shape) == 2 else ""
        raise NotAFrameStack(f"frames must be a 3-D (frame, y, x) stack, got {len(shape)}-D shape {shape}{hint}")
    if min(shape) < 1:
        raise NotAFrameStack(f"frames have an empty axis: shape {shape}")
    dtype = getattr(frames, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        raise NotAFrameStack(f"frames must hold real numbers, got dtype {dtype}")
    return shape  # type: ignore[return-value]


def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    if mask is None:
        return np.zeros(shape, dtype=bool)
    m = np.asarray(mask.read() if callable(getattr(mask, "read", None)) else mask)
    if m.shape != shape:
        raise MaskShapeError(f"mask shape {m.shape} does not match the frames' detector shape (ny, nx) = {shape}")
    if m.dtype.kind not in "biu":
        raise MaskShapeError(f"mask must be boolean (True = excluded pixel), got dtype {m.dtype}")
    return m != 0


def _number(value: Any, what: str, *, minimum: float | None = None) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PeakSearchError(f"{what} must be a number (got {value!r})") from None
    if not np.isfinite(x) or (minimum is not None and x < minimum):
        raise PeakSearchError(f"{what} must be a finite number >= {minimum} (got {value!r})")
    return x


# --------------------------------------------------------------------------- search


class _Regions:
    """Moments of labelled regions, and which regions continue one another across blocks."""

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self.count = 0
        self.parts: list[np.ndarray] = []  # (n, 8): w, w*z, w*y, w*x, npix, z, y, x sums
        self.links: list[np.ndarray] = []  # (m, 2) global ids to merge

    def add(self, moments: np.ndarray) -> int:
        """Register ``len(moments)`` new regions; return the global id of the first minus one."""
        offset = self.count
        self.count += len(moments)
        if self.count > self.max_regions:
            raise PeakSearchError(
                f"more than {self.max_regions:,} separate regions above the threshold: the threshold is "
                "too low for this data (raise 'threshold' or 'sigma', or mask bad pixels)"
            )
        self.parts.append(moments)
        return offset

    def merged(self) -> np.ndarray:
        """Moments summed over linked regions, one row per peak."""
        if not self.parts:
            return np.zeros((0, 8))
        moments = np.concatenate(self.parts)
        parent = np.arange(self.count + 1)

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for a, b in (np.concatenate(self.links) if self.links else np.zeros((0, 2), int)):
            ra, rb = root(int(a)), root(int(b))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        roots = np.array([root(i) for i in range(1, self.count + 1)], dtype=np.int64)
        uniq, inverse = np.unique(roots, return_inverse=True)
        out = np.zeros((len(uniq), moments.shape[1]))
        np.add.at(out, inverse, moments)
        return out


def find_peaks(
    frames: Any,
    *,
    threshold: float | None = None,
    sigma: float = 5.0,
    background: float | None = None,
    min_noise: float = 1.0,
    mask: Any = None,
    min_pixels: int = 3,
    first_frame: int = 0,
    block_frames: int = 8,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> Peaks:
    """Find Bragg peaks in a ``(frame, y, x)`` stack, reading ``block_frames`` frames at a time.

    Parameters
    ----------
    frames
        ``(n_frames, ny, nx)`` counts: a NumPy array or anything sliced along
        axis 0 into NumPy (h5py dataset, Tiled ``ArrayClient``). Any real dtype;
        NaN counts are ignored.
    threshold
        Absolute threshold (counts): pixels with ``counts > threshold`` belong to
        peaks. If not given, the threshold of each frame is
        ``background + sigma * noise`` (see the module docstring).
    sigma
        ``k`` of the ``k · noise`` threshold (used when ``threshold`` is None).
    background
        Background (counts) subtracted from the peaks' intensities and centroid
        weights, and the base of the ``k · noise`` threshold; default: each
        frame's median over unmasked pixels.
    min_noise
        Lower bound of the noise estimate (counts; default 1 count: use a
        smaller value for normalised, non-count data).
    mask
        Optional ``(ny, nx)`` boolean array, **True = excluded pixel** (as
        ``numpy.ma``, NeXus ``pixel_mask`` and the transform).
    min_pixels
        Regions with fewer (frame, y, x) voxels are dropped (single hot pixels, noise).
    first_frame
        Scan index of ``frames[0]`` (added to the ``frame`` column).
    block_frames
        Frames read at a time. Memory: about ``(itemsize + 6) bytes x
        block_frames x ny x nx`` (the block as read, which pixels are above
        threshold, their labels), e.g. 0.5 GB for 8 Pilatus 6M frames of int32.
    max_regions
        Refuse (:class:`PeakSearchError`) when more regions than this are above
        threshold: the threshold is too low.

    Returns
    -------
    Peaks
        Strongest (largest ``intensity``) first.

    Raises
    ------
    NotAFrameStack
        Not a 3-D stack of real numbers.
    MaskShapeError
        The mask is not boolean ``(ny, nx)``.
    PeakSearchError
        Bad parameters, or a threshold so low that everything is a peak.
    """
    nf, ny, nx = _stack_shape(frames)
    valid = ~_mask(mask, (ny, nx))
    if not valid.any():
        raise MaskShapeError("the mask excludes every pixel")
    if threshold is not None:
        threshold = _number(threshold, "threshold")
    sigma = _number(sigma, "sigma", minimum=0.0)
    min_noise = _number(min_noise, "min_noise", minimum=0.0)
    if background is not None:
        background = _number(background, "background")
    if not isinstance(block_frames, (int, np.integer)) or isinstance(block_frames, bool) or block_frames < 1:
        raise PeakSearchError(f"block_frames must be a positive integer (got {block_frames!r})")
    if not isinstance(min_pixels, (int, np.integer)) or isinstance(min_pixels, bool) or min_pixels < 1:
        raise PeakSearchError(f"min_pixels must be a positive integer (got {min_pixels!r})")
    from scipy import ndimage

    sample = np.flatnonzero(valid.ravel())
    if len(sample) > BACKGROUND_SAMPLE:
        sample = sample[np.linspace(0, len(sample) - 1, BACKGROUND_SAMPLE).astype(np.int64)]

    structure = np.ones((3, 3, 3), dtype=bool)  # faces, edges and corners touch
    regions = _Regions(int(max_regions))
    prev_above: np.ndarray | None = None  # last frame of the previous block: above threshold
    prev_ids: np.ndarray | None = None  # ... and its global region ids

    for start in range(0, nf, block_frames):
        block = np.asarray(frames[start : min(nf, start + block_frames)])
        if block.ndim != 3 or block.shape[1:] != (ny, nx) or block.dtype.kind not in "biuf":
            raise NotAFrameStack(f"a block of frames has shape {block.shape} and dtype {block.dtype}, "
                                 f"expected (n, {ny}, {nx}) real numbers")
        n = len(block)
        if background is None or threshold is None:
            pixels = block.reshape(n, -1)[:, sample].astype(np.float64)  # (n, <= BACKGROUND_SAMPLE)
        if background is None:
            bg = np.nanmedian(pixels, axis=1)
        else:
            bg = np.full(n, background)
        bg = np.where(np.isfinite(bg), bg, 0.0)  # an all-NaN frame: nothing is above threshold anyway
        if threshold is None:
            mad = np.nanmedian(np.abs(pixels - bg[:, None]), axis=1)
            noise = np.maximum(np.nan_to_num(_MAD_TO_SIGMA * mad), min_noise)
            thr = bg + sigma * noise
        else:
            thr = np.full(n, threshold)
        with np.errstate(invalid="ignore"):
            above = block > thr[:, None, None]  # NaN > x is False; no float copy of the block
        above &= valid
        if prev_above is not None:
            labels, count = ndimage.label(np.concatenate([prev_above[None], above]), structure=structure)
            carried, labels = labels[0], labels[1:]
        else:
            labels, count = ndimage.label(above, structure=structure)
            carried = None
        z, yy, xx = np.nonzero(above)
        ids = labels[z, yy, xx]
        w = np.maximum(block[z, yy, xx].astype(np.float64) - bg[z], 0.0)
        zf = (z + first_frame + start).astype(np.float64)
        moments = np.stack(
            [np.bincount(ids, weights=q, minlength=count + 1)[1:]
             for q in (w, w * zf, w * yy, w * xx, np.ones_like(w), zf, yy.astype(float), xx.astype(float))],
            axis=1,
        )
        offset = regions.add(moments)
        if carried is not None:
            touching = prev_above & (carried > 0)
            pairs = np.unique(np.stack([carried[touching] + offset, prev_ids[touching]], axis=1), axis=0)
            if len(pairs):
                regions.links.append(pairs)
        prev_above = above[-1].copy()
        prev_ids = np.where(labels[-1] > 0, labels[-1] + offset, 0)
        del block, above, labels

    m = regions.merged()
    m = m[m[:, 4] >= min_pixels]
    weighted = m[:, 0] > 0
    w = np.where(weighted, m[:, 0], m[:, 4])
    cz = np.where(weighted, m[:, 1], m[:, 5]) / np.maximum(w, 1e-300)
    cy = np.where(weighted, m[:, 2], m[:, 6]) / np.maximum(w, 1e-300)
    cx = np.where(weighted, m[:, 3], m[:, 7]) / np.maximum(w, 1e-300)
    order = np.argsort(-m[:, 0], kind="stable")
    return Peaks(cz[order], cy[order], cx[order], m[order, 0], np.rint(m[order, 4]).astype(np.int64))


#: ``find_peaks`` keyword arguments a job's parameters may set.
PEAK_PARAMETERS = ("threshold", "sigma", "background", "min_noise", "mask", "min_pixels", "block_frames")


def peak_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """``find_peaks`` keyword arguments from JSON job parameters (unknown names refused; ``mask``
    as nested lists of booleans becomes a ``(ny, nx)`` bool array)."""
    if not isinstance(params, Mapping):
        raise PeakSearchError(f"peak-search parameters must be a JSON object, not {type(params).__name__}")
    unknown = set(params) - set(PEAK_PARAMETERS)
    if unknown:
        raise PeakSearchError(f"unknown peak-search parameter(s) {sorted(unknown)}; known: {list(PEAK_PARAMETERS)}")
    out = {k: params[k] for k in PEAK_PARAMETERS if params.get(k) is not None}
    if "mask" in out:
        out["mask"] = np.asarray(out["mask"])
    return out
