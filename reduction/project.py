"""Projections and statistics of a frame stack: the second job operation.

All functions take arrays ordered (frame, y, x) and return plain NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ScatterbrokerError


class ProjectionError(ScatterbrokerError, ValueError):
    """Parameters a projection cannot use (unknown kind, bad axis or ROI)."""

    status_code = 422


def parse_slab(text: str | None, ndim: int) -> tuple[slice, ...]:
    """``"0:10,:,100:200"`` -> a tuple of slices (integers keep their axis)."""
    if not text:
        return (slice(None),) * ndim
    out = []
    for part in text.split(","):
        bits = part.strip().split(":")
        if len(bits) > 3:
            raise ProjectionError(f"bad slab element {part!r}")
        try:
            nums = [int(b) if b.strip() else None for b in bits]
        except ValueError:
            raise ProjectionError(f"bad slab element {part!r}") from None
        out.append(slice(nums[0], nums[0] + 1 if nums[0] is not None and nums[0] != -1 else None)
                   if len(nums) == 1 else slice(*nums))
    if len(out) > ndim:
        raise ProjectionError(f"slab {text!r} has {len(out)} axes, the data has {ndim}")
    return tuple(out) + (slice(None),) * (ndim - len(out))


def reduce_axis(data: np.ndarray, kind: str, axis: int) -> np.ndarray:
    """Sum or mean (float64) of ``data`` along ``axis``."""
    if kind not in ("sum", "mean"):
        raise ProjectionError(f"unknown projection {kind!r}: use 'sum' or 'mean'")
    if not -data.ndim <= axis < data.ndim:
        raise ProjectionError(f"axis {axis} is out of range for {data.ndim}-d data")
    return getattr(np, kind)(data, axis=axis, dtype=np.float64)


def roi_statistics(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame sum, mean, min and max over a (frame, y, x) ROI."""
    flat = frames.reshape(len(frames), -1).astype(np.float64)
    return {"sum": flat.sum(1), "mean": flat.mean(1), "min": flat.min(1), "max": flat.max(1)}


def radial_profile(image: np.ndarray, center: tuple[float, float], bins: int) -> dict[str, np.ndarray]:
    """Azimuthal average of a (y, x) image about ``center`` = (x, y) in pixels.

    Returns bin centres ``r`` (pixels), the mean intensity per ring and the
    number of pixels per ring.
    """
    if bins < 1:
        raise ProjectionError("bins must be >= 1")
    y, x = np.indices(image.shape)
    r = np.hypot(x - center[0], y - center[1]).ravel()
    edges = np.linspace(0.0, r.max() + 1e-9, bins + 1)
    index = np.clip(np.digitize(r, edges) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    sums = np.bincount(index, weights=image.ravel().astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)
    return {"r": 0.5 * (edges[1:] + edges[:-1]), "intensity": mean, "pixels": counts}


def project(frames: Any, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run one projection described by ``params`` on a (frame, y, x) array-like.

    ``{"kind": "sum"|"mean", "axis": 0, "slab": "0:10,:,:"}``,
    ``{"kind": "roi", "slab": ":,90:110,230:260"}`` or
    ``{"kind": "radial", "center": [x, y], "bins": 100, "slab": "0:30"}``.
    Only the slab is read.
    """
    kind = params.get("kind", "sum")
    shape = tuple(frames.shape)
    if len(shape) != 3:
        raise ProjectionError(f"input is {len(shape)}-d, not a (frame, y, x) stack")
    data = np.asarray(frames[parse_slab(params.get("slab"), 3)])
    if kind in ("sum", "mean"):
        return {"data": reduce_axis(data, kind, int(params.get("axis", 0)))}
    if kind == "roi":
        return roi_statistics(data)
    if kind == "radial":
        center = params.get("center")
        if center is None or len(center) != 2:
            raise ProjectionError("radial profile needs center = [x, y] in pixels")
        return radial_profile(data.sum(0, dtype=np.float64), (float(center[0]), float(center[1])),
                              int(params.get("bins", 100)))
    raise ProjectionError(f"unknown projection kind {kind!r}: use sum, mean, roi or radial")
