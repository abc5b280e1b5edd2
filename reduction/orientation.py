"""Crystal orientation from Bragg peaks: index, refine U (and the lattice), report UB.

Input: peaks ``(frame, y, x)`` of a rotation scan (:mod:`.peaks`), the scan's
:class:`~.geometry.Geometry` (detector and goniometer) and the lattice
``(a, b, c, alpha, beta, gamma)`` in Å and degrees. Conventions are the
transform's (``docs/geometry.md``): ``Q = k_f - k_i`` (Å⁻¹, 2π included),
``Q_lab = R(frame) · U · B · hkl`` with ``B`` of Busing & Levy (times 2π).

Method
------
1. **Observed Q.** Each peak's lab ``Q`` at its fractional pixel ``(x, y)``,
   rotated back to the sample frame with the goniometer rotation at its
   fractional frame: ``q = R(frame)⁻¹ · Q_lab``. The scanned angle of a
   fractional frame ``f`` is ``start + step·f`` (or ``angles`` interpolated),
   as the transform takes frame ``z`` at ``start + step·z``.
2. **U.** From a given ``u``, or by the two-reflection method (Busing &
   Levy 1967): for pairs of the strongest peaks, every pair of lattice
   vectors ``B·h`` with the same lengths (within ``q_tolerance``) and the
   same angle between them (within ``angle_tolerance``) gives a U (from the
   orthonormal triads of the two pairs); the U that indexes the most peaks
   wins. The lattice's own rotational symmetry makes several U equivalent
   (``U·S`` indexes ``M⁻¹·h`` for every lattice symmetry ``S = B·M·B⁻¹``):
   the search returns the one closest to the identity.
3. **Refinement.** Peaks whose ``h = UB⁻¹·q`` lie within ``tolerance``
   (r.l.u., every component) of an integer ``h₀ ≠ 0`` are *indexed*; then
   ``scipy.optimize.least_squares`` minimises ``Σ |U·B·h₀ − q|²`` (Å⁻¹) over
   the three rotation parameters of U and, with ``refine_lattice``, the six
   lattice parameters. Indexing and refinement alternate until the set of
   indexed peaks no longer changes.

The lattice refined this way absorbs errors of the wavelength and of the
detector distance (they scale all ``|Q|``): refine the lattice only with a
trusted geometry, or to read the scale from a known cell.

Examples
--------
>>> lat = Lattice(4.1, 5.2, 6.3, 90, 90, 90)
>>> lat.B.shape, round(float(lat.B[0, 0]), 6)
((3, 3), 1.532484)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ScatterbrokerError
from .geometry import (
    BEAM_DIRECTION,
    UB,
    Geometry,
    GeometryError,
    Goniometer,
    SingularUB,
    axis_vector,
    busing_levy_b,
    parse_geometry,
)
from .peaks import Peaks

__all__ = [
    "Lattice",
    "NotIndexed",
    "Orientation",
    "OrientationError",
    "SingularOrientation",
    "TooFewPeaks",
    "lattice_symmetry",
    "misorientation",
    "orient",
    "orient_frames",
    "peak_q",
    "scan_rotations",
]

#: Default indexing tolerance, r.l.u. (each of h, k, l within this of an integer).
DEFAULT_TOLERANCE = 0.1


class OrientationError(ScatterbrokerError, ValueError):
    """The orientation cannot be found from these peaks and parameters (HTTP 422)."""

    status_code = 422


class TooFewPeaks(OrientationError):
    """Fewer than three peaks: U has three degrees of freedom and needs non-collinear reflections."""


class NotIndexed(OrientationError):
    """No orientation indexes at least three peaks (wrong lattice, geometry or tolerance)."""


class SingularOrientation(OrientationError):
    """The refinement is undetermined or gave a singular UB (e.g. all indexed peaks in one plane)."""


# --------------------------------------------------------------------------- lattice


@dataclass(frozen=True)
class Lattice:
    """Unit cell: ``a, b, c`` in Å, ``alpha, beta, gamma`` in degrees."""

    a: float
    b: float
    c: float
    alpha: float = 90.0
    beta: float = 90.0
    gamma: float = 90.0

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "alpha", "beta", "gamma"):
            value = getattr(self, name)
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise GeometryError(f"lattice parameter {name} must be a number (got {value!r})") from None
            if not math.isfinite(x) or x <= 0 or (name in ("alpha", "beta", "gamma") and x >= 180):
                unit = "degrees in (0, 180)" if name in ("alpha", "beta", "gamma") else "Å, > 0"
                raise GeometryError(f"lattice parameter {name} must be finite, {unit} (got {value!r})")
            object.__setattr__(self, name, x)
        busing_levy_b(*self.as_tuple())  # refuses angles that make no cell (SingularUB)

    def as_tuple(self) -> tuple[float, float, float, float, float, float]:
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)

    @property
    def B(self) -> np.ndarray:
        """Busing-Levy B with 2π (Å⁻¹): ``B @ hkl`` is Q in the crystal Cartesian frame."""
        return busing_levy_b(*self.as_tuple())

    def to_dict(self) -> dict[str, float]:
        return dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.as_tuple()))

    @classmethod
    def from_dict(cls, d: Any) -> Lattice:
        return parse_lattice(d)


def parse_lattice(value: Any) -> Lattice:
    """A :class:`Lattice` from itself, ``[a, b, c, alpha, beta, gamma]`` or ``{"a": ..., ...}``."""
    if isinstance(value, Lattice):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"a", "b", "c", "alpha", "beta", "gamma"}
        if unknown or not {"a", "b", "c"} <= set(value):
            raise GeometryError(f"a lattice is {{'a', 'b', 'c', 'alpha', 'beta', 'gamma'}} (got {dict(value)!r})")
        return Lattice(**value)
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 6:
        return Lattice(*value)
    raise GeometryError(f"a lattice is [a, b, c, alpha, beta, gamma] (Å, degrees), not {value!r}")


def lattice_symmetry(lattice: Lattice, tol: float = 1e-3) -> np.ndarray:
    """Integer matrices ``M`` (det +1, entries -1..1) mapping the lattice onto itself, shape ``(m, 3, 3)``.

    ``S = B·M·B⁻¹`` is then a rotation, and ``U·S`` indexes the same peaks as
    ``U`` with ``hkl' = M⁻¹·hkl``. Always contains the identity.
    """
    g = lattice.B.T @ lattice.B  # reciprocal metric: |B h|^2 = h^T g h
    vals = np.array(np.meshgrid(*[[-1, 0, 1]] * 9, indexing="ij")).reshape(9, -1).T.reshape(-1, 3, 3)
    vals = vals[np.rint(np.linalg.det(vals)) == 1]
    mgm = np.einsum("nji,jk,nkl->nil", vals, g, vals)
    keep = np.all(np.abs(mgm - g) <= tol * np.abs(g).max(), axis=(1, 2))
    return vals[keep].astype(np.int64)


# --------------------------------------------------------------------------- observed Q


def _rotations(axis: str, angles_deg: np.ndarray) -> np.ndarray:
    """Right-handed rotations about ``axis`` by each angle, shape ``(n, 3, 3)`` (as ``rotation_matrix``)."""
    e = axis_vector(axis)
    a = np.radians(np.asarray(angles_deg, dtype=float))
    c, s = np.cos(a)[:, None, None], np.sin(a)[:, None, None]
    ex = np.array([[0.0, -e[2], e[1]], [e[2], 0.0, -e[0]], [-e[1], e[0], 0.0]])
    return c * np.eye(3) + (1.0 - c) * np.outer(e, e) + s * ex


def scan_rotations(goniometer: Goniometer, frame: Any) -> np.ndarray:
    """Sample rotation ``R`` (sample → lab) at fractional frame indices, shape ``(n, 3, 3)``.

    The scanned angle is ``start + step·frame`` (or the goniometer's ``angles``
    interpolated linearly), plus the scanned circle's offset; the other
    circles stay at their fixed angles. At integer frames this equals
    ``Goniometer.rotations``.
    """
    f = np.atleast_1d(np.asarray(frame, dtype=float))
    if goniometer.angles is not None:
        table = np.asarray(goniometer.angles, dtype=float)
        idx = np.arange(len(table), dtype=float)
        scanned = np.interp(f, idx, table)
        if len(table) > 1:  # extrapolate linearly past the ends, not clamp
            lo, hi = f < 0, f > len(table) - 1
            scanned[lo] = table[0] + (table[1] - table[0]) * f[lo]
            scanned[hi] = table[-1] + (table[-1] - table[-2]) * (f[hi] - len(table) + 1)
    else:
        scanned = goniometer.start + goniometer.step * f
    out = np.broadcast_to(np.eye(3), (len(f), 3, 3)).copy()
    for i, circle in enumerate(goniometer.circles):
        if i == goniometer.scan_index:
            out = out @ _rotations(circle.axis, scanned + circle.angle)
        else:
            out = out @ _rotations(circle.axis, np.array([circle.angle]))[0]
    return out


def _columns(peaks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frame, y, x, intensity) of a Peaks, a mapping of columns, or an (n, 3) array (frame, y, x)."""
    if isinstance(peaks, (Peaks, Mapping)):
        p = Peaks.from_dict(peaks) if not isinstance(peaks, Peaks) else peaks
        return p.frame, p.y, p.x, p.intensity
    a = np.asarray(peaks, dtype=float)
    if a.ndim != 2 or a.shape[1] not in (3, 4):
        raise OrientationError(f"peaks must be a peak table or an (n, 3) array of (frame, y, x), got shape {a.shape}")
    return a[:, 0], a[:, 1], a[:, 2], (a[:, 3] if a.shape[1] == 4 else np.ones(len(a)))


def peak_q(peaks: Any, geometry: Geometry | Mapping[str, Any]) -> np.ndarray:
    """Sample-frame ``q = R(frame)⁻¹ · (k_f − k_i)`` of each peak, shape ``(n, 3)``, Å⁻¹.

    ``peaks``: a :class:`~.peaks.Peaks` table, a mapping with ``frame, y, x``
    columns, or an ``(n, 3)`` array of ``(frame, y, x)`` (fractional frame
    index, detector row, column; 0-based pixel centres).
    """
    geometry = parse_geometry(geometry)
    frame, y, x, _ = _columns(peaks)
    p0, ex, ey = geometry.detector_frame()
    r = p0 + x[:, None] * ex + y[:, None] * ey
    q_lab = geometry.k * r / np.linalg.norm(r, axis=1, keepdims=True) - geometry.k * axis_vector(BEAM_DIRECTION)
    rot = scan_rotations(geometry.goniometer, frame)
    return np.einsum("nji,nj->ni", rot, q_lab)  # R^T q_lab


# --------------------------------------------------------------------------- helpers


def misorientation(u1: Any, u2: Any) -> float:
    """Angle (degrees) of the rotation ``u1 · u2ᵀ`` taking one orientation to the other."""
    m = np.asarray(u1, dtype=float) @ np.asarray(u2, dtype=float).T
    return math.degrees(math.acos(float(np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0))))


def _rotvec(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if angle == 0.0:
        return np.eye(3)
    e = v / angle
    ex = np.array([[0.0, -e[2], e[1]], [e[2], 0.0, -e[0]], [-e[1], e[0], 0.0]])
    return math.cos(angle) * np.eye(3) + (1 - math.cos(angle)) * np.outer(e, e) + math.sin(angle) * ex


def _as_rotation(u: Any) -> np.ndarray:
    try:
        m = np.asarray(u, dtype=float)
    except (TypeError, ValueError):
        raise GeometryError(f"U must be a 3x3 rotation matrix (got {u!r})") from None
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise GeometryError(f"U must be a finite 3x3 rotation matrix (got shape {m.shape})")
    if not np.allclose(m @ m.T, np.eye(3), atol=1e-3) or np.linalg.det(m) < 0:
        raise GeometryError("U must be a proper rotation (orthonormal, determinant +1)")
    return _nearest_rotation(m)


def _index(q: np.ndarray, ub: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional hkl, nearest integers, and which peaks are indexed (all within tolerance, not 000)."""
    h = np.linalg.solve(ub, q.T).T
    h0 = np.rint(h)
    ok = np.all(np.abs(h - h0) <= tolerance, axis=1) & np.any(h0 != 0, axis=1)
    return h, h0, ok


def _triads(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Orthonormal frames (columns t1 ∥ v1, t2 ∥ v1×v2, t3), shape ``(n, 3, 3)``."""
    t1 = v1 / np.linalg.norm(v1, axis=-1, keepdims=True)
    t2 = np.cross(v1, v2)
    t2 /= np.linalg.norm(t2, axis=-1, keepdims=True)
    return np.stack([t1, t2, np.cross(t1, t2)], axis=-1)


# --------------------------------------------------------------------------- search


def search_u(
    q: np.ndarray,
    lattice: Lattice,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    strongest: int = 15,
    q_tolerance: float = 0.02,
    angle_tolerance: float = 2.0,
) -> tuple[np.ndarray, int]:
    """U by the two-reflection method over pairs of the first ``strongest`` peaks of ``q``.

    ``q``: sample-frame Q of the peaks, strongest first, ``(n, 3)`` Å⁻¹.
    Returns ``(U, number of peaks it indexes)``: the best-indexing U,
    rotated by the lattice symmetry to the equivalent closest to the identity.
    Raises :class:`NotIndexed` if no U indexes three peaks.
    """
    b = lattice.B
    qn = np.linalg.norm(q, axis=1)
    qmax = float(qn.max()) * (1 + q_tolerance)
    hmax = [int(qmax * length / (2 * math.pi)) + 1 for length in (lattice.a, lattice.b, lattice.c)]
    if np.prod([2 * h + 1 for h in hmax]) > 2_000_000:
        raise OrientationError(f"the peaks reach |Q| = {qmax:.2f} Å⁻¹, too many reflections ({hmax}) to search: "
                               "give a starting 'u'")
    grids = np.meshgrid(*[np.arange(-h, h + 1) for h in hmax], indexing="ij")
    hkl = np.stack([g.ravel() for g in grids], axis=1)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    bh = hkl @ b.T
    bn = np.linalg.norm(bh, axis=1)
    keep = bn <= qmax
    hkl, bh, bn = hkl[keep], bh[keep], bn[keep]

    top = [i for i in range(min(len(q), strongest)) if qn[i] > 0]
    cands = {i: np.flatnonzero(np.abs(bn - qn[i]) <= q_tolerance * qn[i]) for i in top}
    angle_tol = math.radians(angle_tolerance)
    candidates = []
    for a_i, i in enumerate(top):
        for j in top[a_i + 1 :]:
            ci, cj = cands[i], cands[j]
            if not len(ci) or not len(cj):
                continue
            obs = math.acos(float(np.clip(q[i] @ q[j] / (qn[i] * qn[j]), -1, 1)))
            if not math.radians(8) < obs < math.radians(172):  # nearly collinear: no triad
                continue
            calc = np.arccos(np.clip((bh[ci] / bn[ci, None]) @ (bh[cj] / bn[cj, None]).T, -1, 1))
            si, sj = np.nonzero(np.abs(calc - obs) <= angle_tol)
            if not len(si):
                continue
            tc = _triads(bh[ci[si]], bh[cj[sj]])
            to = _triads(q[i][None], q[j][None])
            candidates.append(to @ np.transpose(tc, (0, 2, 1)))
    if not candidates:
        raise NotIndexed(
            f"no pair of the {len(top)} strongest peaks matches a pair of reflections of the lattice "
            f"{lattice.as_tuple()} (lengths within {q_tolerance:.0%}, angles within {angle_tolerance}°): "
            "check the lattice, wavelength, distance and beam centre"
        )
    us = np.concatenate(candidates)
    if len(us) > 1_000_000:
        raise OrientationError(f"{len(us):,} candidate orientations (a large or high-symmetry cell): "
                               "give a starting 'u', or fewer 'strongest' peaks or tighter tolerances")
    binv = np.linalg.inv(b)
    count, spread = _score(us, q, binv, tolerance)
    k = int(np.lexsort((spread, -count))[0])
    best_u, best = us[k], int(count[k])
    if best < 3:
        raise NotIndexed(f"the best orientation found indexes only {best} of {len(q)} peaks within "
                         f"{tolerance} r.l.u.: check the lattice and the geometry")
    # Equivalent settings U·S (S = B M B⁻¹, M a symmetry of the lattice, found with the search's
    # own tolerance on |Q|²): of those indexing as many peaks, the one closest to the identity.
    sym = np.einsum("ij,njk,kl->nil", b, lattice_symmetry(lattice, tol=2 * q_tolerance), binv)
    equivalents = np.array([_nearest_rotation(best_u @ s) for s in sym])
    counts, _ = _score(equivalents, q, binv, tolerance)
    equivalents = equivalents[counts >= best]
    return _as_rotation(equivalents[int(np.argmax(np.trace(equivalents, axis1=1, axis2=2)))]), best


def _nearest_rotation(m: np.ndarray) -> np.ndarray:
    w, _, vt = np.linalg.svd(m)
    return w @ vt


def _score(us: np.ndarray, q: np.ndarray, binv: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """For each U of ``us`` (k, 3, 3): peaks indexed within ``tolerance``, and the sum of their
    largest hkl deviations (to break ties)."""
    counts, spreads = [], []
    chunk = max(1, 4_000_000 // (3 * len(q)))
    for s in range(0, len(us), chunk):
        h = np.einsum("ij,nkj,pk->npi", binv, us[s : s + chunk], q)  # B^-1 U^T q
        h0 = np.rint(h)
        err = np.abs(h - h0).max(axis=2)
        ok = (err <= tolerance) & np.any(h0 != 0, axis=2)
        counts.append(ok.sum(axis=1))
        spreads.append(np.where(ok, err, 0.0).sum(axis=1))
    return np.concatenate(counts), np.concatenate(spreads)


# --------------------------------------------------------------------------- refinement


def refine(
    q: np.ndarray,
    hkl: np.ndarray,
    u: np.ndarray,
    lattice: Lattice,
    *,
    refine_lattice: bool = False,
    f_scale: float | None = None,
) -> tuple[np.ndarray, Lattice]:
    """Least-squares U (and lattice) minimising ``Σ |U·B·hkl − q|²`` (Å⁻¹) over the given pairs.

    ``q``: ``(n, 3)`` sample-frame Q; ``hkl``: ``(n, 3)`` integer indices.
    With ``f_scale`` (Å⁻¹) the loss is ``soft_l1`` (quadratic below ``f_scale``,
    linear above), so a few wrongly indexed peaks pull less.
    Returns ``(U, lattice)``. Raises :class:`SingularOrientation` when the
    pairs do not determine the parameters (e.g. coplanar peaks with the lattice refined).
    """
    from scipy.optimize import least_squares

    p0 = np.array(lattice.as_tuple())

    def ub_of(x: np.ndarray) -> np.ndarray:
        return _rotvec(x[:3]) @ u @ (busing_levy_b(*x[3:]) if refine_lattice else lattice.B)

    def residual(x: np.ndarray) -> np.ndarray:
        try:
            return (hkl @ ub_of(x).T - q).ravel()
        except SingularUB:
            return np.full(q.size, 1e3)

    x0 = np.concatenate([np.zeros(3), p0]) if refine_lattice else np.zeros(3)
    kw: dict[str, Any] = {"x_scale": "jac", "xtol": 1e-12, "ftol": 1e-12, "gtol": 1e-12}
    if refine_lattice:
        lo = np.concatenate([np.full(3, -np.pi), p0[:3] * 0.5, np.maximum(p0[3:] - 30, 1.0)])
        hi = np.concatenate([np.full(3, np.pi), p0[:3] * 2.0, np.minimum(p0[3:] + 30, 179.0)])
        kw["bounds"] = (lo, hi)
    if f_scale is not None:
        kw.update(loss="soft_l1", f_scale=float(f_scale))
    result = least_squares(residual, x0, **kw)
    jac = np.atleast_2d(result.jac)
    sv = np.linalg.svd(jac, compute_uv=False)
    if len(sv) < len(x0) or not sv[-1] > 1e-9 * sv[0]:
        raise SingularOrientation(
            f"the {len(q)} indexed peaks do not determine "
            f"{'U and the lattice' if refine_lattice else 'U'} (they lie in one plane or on one line)"
        )
    new_u = _as_rotation(_rotvec(result.x[:3]) @ u)
    try:
        new_lattice = Lattice(*result.x[3:]) if refine_lattice else lattice
    except GeometryError as err:
        raise SingularOrientation(f"the refined lattice is not a cell: {err}") from None
    return new_u, new_lattice


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Orientation:
    """A refined orientation and how well it indexes the peaks.

    Attributes
    ----------
    u : (3, 3)
        Rotation U (crystal Cartesian frame → sample frame at all circles zero).
    lattice : Lattice
        The lattice (refined if asked).
    ub : (3, 3)
        ``U · B`` in Å⁻¹, 2π included (the transform's convention: ``Q = UB·hkl``).
    hkl : (n, 3)
        Fractional indices of every peak under ``ub``.
    indexed : (n,) bool
        Within ``tolerance`` of an integer, not (0, 0, 0).
    tolerance : float
        Indexing tolerance, r.l.u.
    rms_hkl : float
        RMS of ``|hkl − round(hkl)|`` over indexed peaks, r.l.u.
    rms_q : float
        RMS of ``|UB·round(hkl) − q|`` over indexed peaks, Å⁻¹.
    method : str
        ``"search"`` (two-reflection search) or ``"given u"``.
    peaks : Peaks | None
        The peak table the orientation was found from, when known.
    """

    u: np.ndarray
    lattice: Lattice
    ub: np.ndarray
    hkl: np.ndarray
    indexed: np.ndarray
    tolerance: float
    rms_hkl: float
    rms_q: float
    method: str
    peaks: Peaks | None = field(default=None, compare=False)

    @property
    def indexed_fraction(self) -> float:
        """Fraction of peaks indexed (0 … 1)."""
        return float(self.indexed.mean()) if len(self.indexed) else 0.0

    def to_ub(self) -> UB:
        """The refined UB as a :class:`~.geometry.UB`, e.g. for ``TransformParams``."""
        return UB(self.ub)

    def nexus_sample(self) -> dict[str, Any]:
        """NeXus ``NXsample`` fields: ``orientation_matrix`` (U), ``ub_matrix`` (UB **without** 2π,
        Busing-Levy as NeXus defines it) and ``unit_cell`` ``[a, b, c, alpha, beta, gamma]``;
        ``UB.from_nexus`` reads them back."""
        return {
            "orientation_matrix": self.u.tolist(),
            "ub_matrix": (self.ub / (2 * math.pi)).tolist(),
            "unit_cell": list(self.lattice.as_tuple()),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Product arrays: ``ub`` (2π), ``u``, and ``peaks_*`` columns with their ``h, k, l`` and ``indexed``."""
        out = {"ub": self.ub, "u": self.u}
        if self.peaks is not None:
            out.update({f"peaks_{k}": v for k, v in self.peaks.to_dict().items()})
        out.update({"peaks_h": self.hkl[:, 0], "peaks_k": self.hkl[:, 1], "peaks_l": self.hkl[:, 2],
                    "peaks_indexed": self.indexed.astype(np.uint8)})
        return out

    def metadata(self) -> dict[str, Any]:
        """Product metadata (JSON): lattice, quality, UB (2π) and the NXsample-style ``sample`` group."""
        return {
            "ub": self.ub.tolist(), "ub@units": "1/angstrom (2 pi included: Q = UB hkl)",
            "u": self.u.tolist(),
            "lattice": self.lattice.to_dict(), "lattice@units": "angstrom, degrees",
            "indexed_fraction": self.indexed_fraction, "n_peaks": len(self.indexed),
            "n_indexed": int(self.indexed.sum()), "tolerance": self.tolerance, "tolerance@units": "rlu",
            "rms_hkl": self.rms_hkl, "rms_hkl@units": "rlu", "rms_q": self.rms_q, "rms_q@units": "1/angstrom",
            "method": self.method,
            "sample": self.nexus_sample(),
        }


def orient(
    peaks: Any,
    geometry: Geometry | Mapping[str, Any],
    lattice: Lattice | Any,
    *,
    u: Any = None,
    refine_lattice: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    strongest: int = 15,
    q_tolerance: float = 0.02,
    angle_tolerance: float = 2.0,
    max_iterations: int = 10,
    min_fraction: float = 0.5,
) -> Orientation:
    """Index the peaks of a rotation scan and refine U (and optionally the lattice).

    Parameters
    ----------
    peaks
        :class:`~.peaks.Peaks` (strongest first), a mapping of columns
        ``frame, y, x[, intensity]``, or an ``(n, 3)`` array of ``(frame, y, x)``:
        fractional scan frame index, detector row and column (0-based).
    geometry
        The scan's :class:`~.geometry.Geometry` (its goniometer maps frames to angles).
    lattice
        ``[a, b, c, alpha, beta, gamma]`` (Å, degrees), a mapping, or :class:`Lattice`.
    u
        Starting U (3x3 rotation); default: search (two-reflection method).
    refine_lattice
        Also refine the six lattice parameters (needs peaks not all in one plane).
    tolerance
        Indexing tolerance (r.l.u.): every component of ``hkl`` within this of an integer.
    strongest, q_tolerance, angle_tolerance
        Search: pairs among the ``strongest`` peaks; |Q| matched within
        ``q_tolerance`` (relative), angles within ``angle_tolerance`` degrees.
    max_iterations
        Index/refine rounds at most (stops when the indexed set is stable).
    min_fraction
        Fail (:class:`NotIndexed`) when fewer than this fraction of the peaks
        index: a wrong cell still indexes some peaks by chance (a quarter to
        a third in the tests). Lower it for several grains or many spurious peaks.

    Raises
    ------
    TooFewPeaks, NotIndexed, SingularOrientation
        All are :class:`OrientationError` (a ``ValueError``, HTTP 422).
    """
    geometry = parse_geometry(geometry)
    lattice = parse_lattice(lattice)
    frame, y, x, intensity = _columns(peaks)
    n = len(frame)
    if n < 3:
        raise TooFewPeaks(f"{n} peak(s) found; at least 3 (not on one line) are needed to orient a crystal "
                          "(lower the peak threshold, or check the mask)")
    tolerance = float(tolerance)
    if not 0 < tolerance < 0.5:
        raise OrientationError(f"tolerance must be in (0, 0.5) r.l.u. (got {tolerance})")
    order = np.argsort(-intensity, kind="stable")
    q = peak_q(np.stack([frame, y, x], axis=1), geometry)
    if u is None:
        u0, _ = search_u(q[order], lattice, tolerance=tolerance, strongest=strongest,
                         q_tolerance=q_tolerance, angle_tolerance=angle_tolerance)
        method = "search"
    else:
        u0, method = _as_rotation(u), "given u"

    current, cell = u0, lattice
    previous: np.ndarray | None = None
    for _ in range(max(1, int(max_iterations))):
        _, h0, ok = _index(q, current @ cell.B, tolerance)
        if ok.sum() < 3:
            raise NotIndexed(f"only {int(ok.sum())} of {n} peaks index within {tolerance} r.l.u. "
                             f"({method}); check the lattice, the geometry or the starting U")
        if previous is not None and np.array_equal(ok, previous):
            break
        # least squares, then again with a robust loss scaled by the typical residual
        current, cell = refine(q[ok], h0[ok], current, cell, refine_lattice=refine_lattice)
        misfit = np.linalg.norm(h0[ok] @ (current @ cell.B).T - q[ok], axis=1)
        scale = 3.0 * float(np.median(misfit))
        if scale > 0:
            current, cell = refine(q[ok], h0[ok], current, cell, refine_lattice=refine_lattice, f_scale=scale)
        previous = ok
    ub = current @ cell.B
    try:
        UB(ub)
    except SingularUB as err:
        raise SingularOrientation(str(err)) from None
    h, h0, ok = _index(q, ub, tolerance)
    rms_hkl = float(np.sqrt(np.mean(np.sum((h[ok] - h0[ok]) ** 2, axis=1)))) if ok.any() else math.nan
    rms_q = float(np.sqrt(np.mean(np.sum((h0[ok] @ ub.T - q[ok]) ** 2, axis=1)))) if ok.any() else math.nan
    if ok.mean() < min_fraction:
        raise NotIndexed(
            f"the best orientation ({method}) indexes only {int(ok.sum())} of {n} peaks ({ok.mean():.0%}) within "
            f"{tolerance} r.l.u., RMS residual {rms_hkl:.3f} r.l.u. (min_fraction = {min_fraction}): "
            "check the lattice and the geometry, or refine the lattice"
        )
    table = peaks if isinstance(peaks, Peaks) else None
    return Orientation(u=current, lattice=cell, ub=ub, hkl=h, indexed=ok, tolerance=tolerance,
                       rms_hkl=rms_hkl, rms_q=rms_q, method=method, peaks=table)


#: ``orient`` keyword arguments a job's parameters may set.
ORIENT_PARAMETERS = ("u", "refine_lattice", "tolerance", "strongest", "q_tolerance", "angle_tolerance",
                     "max_iterations", "min_fraction")


def orient_frames(frames: Any, params: Mapping[str, Any]) -> Orientation:
    """Find the peaks of a frame stack and orient the crystal: the ``orient`` job operation.

    ``params``: ``geometry`` (as for the transform), ``lattice``
    ``[a, b, c, alpha, beta, gamma]``, optional ``peaks`` (keyword arguments of
    :func:`~.peaks.find_peaks`, e.g. ``{"sigma": 8, "min_pixels": 3}``), ``mask``
    (``(ny, nx)`` booleans, True = excluded), and any of ``u``,
    ``refine_lattice``, ``tolerance``, ``strongest``, ``q_tolerance``,
    ``angle_tolerance``, ``max_iterations``, ``min_fraction`` (see :func:`orient`).
    """
    from .peaks import find_peaks, peak_options

    known = {"geometry", "lattice", "peaks", "mask", *ORIENT_PARAMETERS}
    unknown = set(params) - known
    if unknown:
        raise OrientationError(f"unknown orient parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    for name in ("geometry", "lattice"):
        if name not in params:
            raise OrientationError(f"orient needs '{name}' in its parameters")
    options = peak_options({**(params.get("peaks") or {}), **({"mask": params["mask"]} if "mask" in params else {})})
    peaks = find_peaks(frames, **options)
    return orient(peaks, params["geometry"], params["lattice"],
                  **{k: params[k] for k in ORIENT_PARAMETERS if k in params})
