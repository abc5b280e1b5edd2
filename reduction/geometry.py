"""Parameters of the reciprocal-space transform: geometry, UB matrix, HKL grid.

Every parameter set is a frozen dataclass checked by a module-level
``parse_*`` function and round-tripped through plain JSON types with
``to_dict``/``from_dict``, so a job record is JSON (STYLE.md, "Reduction").

Conventions (full statement and diagram in ``docs/geometry.md``)
---------------------------------------------------------------
- Laboratory frame as in xrayutilities' defaults: right-handed ``x, y, z``;
  the primary beam travels along **+y**, **z** points up, **x** is horizontal
  (to the right when looking downstream).
- Axes are written like xrayutilities: ``"x+"`` is a right-handed rotation
  about +x, ``"x-"`` a left-handed one (= right-handed about -x). The same
  strings name directions (``"z-"``: towards -z).
- Angles in degrees, lengths in mm, wavelength in Å, Q in Å⁻¹ with
  ``|k| = 2π/λ`` (so ``Q = k_f - k_i``, ``|Q| = 4π sin θ / λ``), HKL in
  reciprocal-lattice units.
- A vector fixed to the sample appears in the lab frame as ``R @ v`` with
  ``R = R_1 @ R_2 @ ... @ R_n`` (circles listed outer to inner), and
  ``Q_lab = R @ UB @ hkl``; hence ``hkl = UB⁻¹ @ R⁻¹ @ Q_lab``.
- Detector pixel ``[row, col]`` (frame axes ``(y, x)``) has its centre at
  pixel coordinates ``(x, y) = (col, row)``; the beam centre is given in the
  same 0-based coordinates (xrayutilities ``cch2, cch1``).

Examples
--------
>>> g = Geometry(wavelength=0.5, distance=500.0, beam_center=(840.0, 740.0),
...              pixel_size=(0.172, 0.172))
>>> Geometry.from_dict(g.to_dict()) == g
True
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scatterbroker.errors import ScatterbrokerError

__all__ = [
    "BEAM_DIRECTION",
    "DEFAULT_MAX_VOXELS",
    "Circle",
    "Geometry",
    "GeometryError",
    "Goniometer",
    "Grid",
    "GridAxis",
    "GridTooLarge",
    "SingularUB",
    "TransformError",
    "TransformParams",
    "UB",
    "axis_vector",
    "parse_direction",
    "rotation_matrix",
]

#: Primary beam direction in the lab frame (xrayutilities' default ``r_i``).
BEAM_DIRECTION = "y+"

#: Largest grid ``transform`` accepts unless told otherwise
#: (env ``SCATTERBROKER_TRANSFORM_MAX_VOXELS``).
DEFAULT_MAX_VOXELS = int(float(os.getenv("SCATTERBROKER_TRANSFORM_MAX_VOXELS", "2e8")))

_DIRECTION_RE = re.compile(r"^[xyz][+-]$")


# --------------------------------------------------------------------------- errors


class TransformError(ScatterbrokerError, ValueError):
    """Invalid input to the reciprocal-space transform (HTTP 422 in a server).

    Also a ``ValueError``, so plain Python callers can catch it as one.
    """

    status_code = 422


class GeometryError(TransformError):
    """A geometry, UB or grid parameter is missing, of the wrong type, or out of range."""


class SingularUB(GeometryError):
    """The UB matrix cannot be inverted (zero or near-zero determinant)."""


class GridTooLarge(GeometryError):
    """The output grid needs more voxels (memory) than the configured limit."""

    status_code = 413


# --------------------------------------------------------------------------- helpers


def parse_direction(value: Any, what: str = "direction") -> str:
    """Check an xrayutilities-style axis/direction string such as ``"z+"``."""
    if not isinstance(value, str) or not _DIRECTION_RE.match(value.strip().lower()):
        raise GeometryError(f"{what} must be one of x+, x-, y+, y-, z+, z- (got {value!r})")
    return value.strip().lower()


def axis_vector(direction: str) -> np.ndarray:
    """Unit vector of a direction string: ``axis_vector("z-") -> [0, 0, -1]``."""
    d = parse_direction(direction)
    v = np.zeros(3)
    v["xyz".index(d[0])] = 1.0 if d[1] == "+" else -1.0
    return v


def rotation_matrix(axis: str | Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``axis`` (direction string or 3-vector).

    Right-handed about the given direction, so ``"x-"`` turns the other way
    round from ``"x+"`` (as xrayutilities' ``rotation_xm``).
    """
    e = axis_vector(axis) if isinstance(axis, str) else np.asarray(axis, dtype=float)
    e = e / np.linalg.norm(e)
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    ex = np.array([[0.0, -e[2], e[1]], [e[2], 0.0, -e[0]], [-e[1], e[0], 0.0]])
    return c * np.eye(3) + (1.0 - c) * np.outer(e, e) + s * ex


def _finite(value: Any, what: str, *, positive: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} must be a number (got {value!r})") from None
    if not math.isfinite(x):
        raise GeometryError(f"{what} must be finite (got {x})")
    if positive and x <= 0:
        raise GeometryError(f"{what} must be > 0 (got {x})")
    return x


def _pair(value: Any, what: str, *, positive: bool = False) -> tuple[float, float]:
    try:
        seq = [value, value] if np.isscalar(value) else list(value)
    except TypeError:
        raise GeometryError(f"{what} must be a pair (x, y) (got {value!r})") from None
    if len(seq) != 2:
        raise GeometryError(f"{what} must be a pair (x, y) (got {value!r})")
    return (_finite(seq[0], f"{what}[0]", positive=positive), _finite(seq[1], f"{what}[1]", positive=positive))


def _read_array(obj: Any) -> np.ndarray:
    """Value of a nexusformat field, Tiled array client, h5py dataset or plain array."""
    if not isinstance(obj, np.ndarray):
        if hasattr(obj, "nxvalue"):  # nexusformat NXfield
            obj = obj.nxvalue
        elif callable(getattr(obj, "read", None)):  # tiled ArrayClient
            obj = obj.read()
        elif hasattr(obj, "shape") and hasattr(obj, "dtype"):  # h5py Dataset
            obj = obj[()]
    return np.asarray(obj, dtype=float)


# --------------------------------------------------------------------------- circles


@dataclass(frozen=True)
class Circle:
    """One rotation circle: name, axis (``"x+"``...), fixed angle in degrees.

    For the scanned circle of a :class:`Goniometer`, ``angle`` is an offset
    added to the scanned value (a motor zero correction).
    """

    name: str
    axis: str
    angle: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise GeometryError(f"circle name must be a non-empty string (got {self.name!r})")
        object.__setattr__(self, "axis", parse_direction(self.axis, f"axis of circle {self.name!r}"))
        object.__setattr__(self, "angle", _finite(self.angle, f"angle of circle {self.name!r}"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axis": self.axis, "angle": self.angle}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circle:
        return parse_circle(d)


def parse_circle(value: Any) -> Circle:
    """A :class:`Circle` from itself, a dict, or a ``(name, axis[, angle])`` tuple."""
    if isinstance(value, Circle):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"name", "axis", "angle"}
        if unknown:
            raise GeometryError(f"unknown circle field(s) {sorted(unknown)}")
        return Circle(value.get("name", ""), value.get("axis", ""), value.get("angle", 0.0))
    if isinstance(value, (tuple, list)) and 2 <= len(value) <= 3:
        return Circle(*value)
    raise GeometryError(f"a circle is {{'name', 'axis', 'angle'}} or (name, axis, angle), not {value!r}")


def _circles(value: Any, what: str) -> tuple[Circle, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GeometryError(f"{what} must be a sequence of circles (got {value!r})")
    circles = tuple(parse_circle(c) for c in value)
    names = [c.name for c in circles]
    if len(set(names)) != len(names):
        raise GeometryError(f"{what}: circle names must be unique (got {names})")
    return circles


def _chain(circles: Sequence[Circle], angles: Sequence[float]) -> np.ndarray:
    r = np.eye(3)
    for c, a in zip(circles, angles):
        r = r @ rotation_matrix(c.axis, a)
    return r


# --------------------------------------------------------------------------- goniometer

#: Default sample stack, outer to inner: theta (goniometer pitch about the
#: horizontal axis), omega (vertical), chi (about the beam), phi (on chi;
#: vertical at chi = 0). The scan rotates ``phi``.
DEFAULT_SAMPLE_CIRCLES: tuple[Circle, ...] = (
    Circle("theta", "x+"),
    Circle("omega", "z+"),
    Circle("chi", "y+"),
    Circle("phi", "z+"),
)


@dataclass(frozen=True)
class Goniometer:
    """Sample circles (outer to inner) and the one circle the scan rotates.

    Frame ``z`` (0-based, in the whole scan) is taken at scanned angle
    ``angles[z]`` if ``angles`` is given, else ``start + step * z``; the
    scanned circle's own ``angle`` is added as an offset. The other circles
    stay at their fixed ``angle`` (the chi/omega/theta offsets).
    """

    circles: tuple[Circle, ...] = DEFAULT_SAMPLE_CIRCLES
    scan_axis: str = "phi"
    start: float = 0.0
    step: float = 0.1
    angles: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        parse_goniometer_fields(self)

    # -- per frame
    def scan_angles(self, first: int, count: int) -> np.ndarray:
        """Scanned-circle angles (degrees, offset included) of frames ``first .. first+count-1``."""
        idx = np.arange(first, first + count)
        if self.angles is not None:
            if first < 0 or first + count > len(self.angles):
                raise GeometryError(
                    f"frames {first}..{first + count - 1} requested but the goniometer lists "
                    f"{len(self.angles)} scan angles"
                )
            base = np.asarray(self.angles, dtype=float)[first : first + count]
        else:
            base = self.start + self.step * idx.astype(float)
        return base + self.circle(self.scan_axis).angle

    def circle_angles(self, first: int, count: int) -> np.ndarray:
        """All circle angles, shape ``(count, len(circles))``, degrees."""
        out = np.tile(np.array([c.angle for c in self.circles], dtype=float), (count, 1))
        out[:, self.scan_index] = self.scan_angles(first, count)
        return out

    def rotations(self, first: int, count: int) -> np.ndarray:
        """Sample rotation ``R`` (sample -> lab) of each frame, shape ``(count, 3, 3)``."""
        return np.stack([_chain(self.circles, a) for a in self.circle_angles(first, count)]) if count else np.zeros((0, 3, 3))

    @property
    def scan_index(self) -> int:
        return [c.name for c in self.circles].index(self.scan_axis)

    def circle(self, name: str) -> Circle:
        for c in self.circles:
            if c.name == name:
                return c
        raise GeometryError(f"no circle named {name!r}; circles are {[c.name for c in self.circles]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "circles": [c.to_dict() for c in self.circles],
            "scan_axis": self.scan_axis,
            "start": self.start,
            "step": self.step,
            "angles": None if self.angles is None else list(self.angles),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Goniometer:
        return parse_goniometer(d)


def parse_goniometer_fields(g: Goniometer) -> None:
    set_ = lambda k, v: object.__setattr__(g, k, v)  # noqa: E731  (frozen dataclass)
    circles = _circles(g.circles, "goniometer circles")
    if not circles:
        raise GeometryError("the goniometer needs at least one circle (the scanned one)")
    set_("circles", circles)
    if g.scan_axis not in [c.name for c in circles]:
        raise GeometryError(
            f"scan_axis {g.scan_axis!r} is not one of the goniometer circles {[c.name for c in circles]}"
        )
    set_("start", _finite(g.start, "goniometer start"))
    set_("step", _finite(g.step, "goniometer step"))
    if g.angles is not None:
        a = np.asarray(g.angles, dtype=float).ravel()
        if not np.all(np.isfinite(a)):
            raise GeometryError("goniometer angles must all be finite")
        set_("angles", tuple(float(x) for x in a))


def parse_goniometer(value: Any) -> Goniometer:
    """A :class:`Goniometer` from itself or its ``to_dict`` form."""
    if isinstance(value, Goniometer):
        return value
    if not isinstance(value, Mapping):
        raise GeometryError(f"goniometer must be a dict, not {type(value).__name__}")
    unknown = set(value) - {"circles", "scan_axis", "start", "step", "angles"}
    if unknown:
        raise GeometryError(f"unknown goniometer field(s) {sorted(unknown)}")
    kw = dict(value)
    if "circles" in kw:
        kw["circles"] = _circles(kw["circles"], "goniometer circles")
    return Goniometer(**kw)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Instrument geometry of a rotation scan with a flat area detector.

    The parameters map one to one onto xrayutilities' ``QConversion`` with
    ``r_i = [0, 1, 0]`` and ``init_area`` (see :meth:`xrayutilities_args`).

    Parameters
    ----------
    wavelength
        Å; ``|k| = 2π / wavelength``.
    distance
        mm, from the sample (centre of rotation) to the beam-centre pixel.
    beam_center
        ``(x, y)`` in pixels (0-based; the centre of pixel ``[row, col]`` is at
        ``x = col, y = row``): where the primary beam meets the detector when all
        detector-arm angles are zero.
    pixel_size
        ``(x, y)`` in mm: along the columns (fast axis) and the rows (slow axis).
    x_direction, y_direction
        Lab direction of increasing column index (``x``) and row index (``y``)
        at zero arm angles; both perpendicular to the beam (+y) and to each
        other. Default: columns along +x, rows downwards (-z). xrayutilities:
        ``detectorDir2 = x_direction``, ``detectorDir1 = y_direction``.
    rotation
        Degrees, detector rotation about the primary beam (xrayutilities ``detrot``).
    tilt, tilt_azimuth
        Degrees, tilt of the detector plane (xrayutilities ``tilt``,
        ``tiltazimuth``): the in-plane axis ``t = cos(a) ŷ + sin(a) x̂`` with
        ``a = tilt_azimuth + 90°`` (``ŷ``, ``x̂``: unit row and column
        directions), and the plane turns by ``tilt`` right-handed about
        ``-t`` (as xrayutilities' ``rotation_arb``), about the beam-centre pixel.
    arm
        Detector circles, outer to inner, with fixed angles (e.g. a 2θ arm
        ``Circle("tth", "x+", 20.0)``); the detector turns about the sample.
    goniometer
        Sample circles and the scan; see :class:`Goniometer`.
    """

    wavelength: float
    distance: float
    beam_center: tuple[float, float]
    pixel_size: tuple[float, float]
    x_direction: str = "x+"
    y_direction: str = "z-"
    rotation: float = 0.0
    tilt: float = 0.0
    tilt_azimuth: float = 0.0
    arm: tuple[Circle, ...] = ()
    goniometer: Goniometer = field(default_factory=Goniometer)

    def __post_init__(self) -> None:
        parse_geometry_fields(self)

    @property
    def k(self) -> float:
        """``|k| = 2π/λ`` in Å⁻¹."""
        return 2.0 * math.pi / self.wavelength

    def detector_frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lab-frame position of pixel ``[0, 0]`` and the steps of one column and one row (mm).

        Returns ``(p0, ex, ey)``: pixel ``[row, col]`` sits at ``p0 + col*ex + row*ey``
        (the detector is flat, so this holds for any tilt and arm angle).
        """
        e1 = axis_vector(self.y_direction) * self.pixel_size[1]  # xrayutilities rpixel1 (rows)
        e2 = axis_vector(self.x_direction) * self.pixel_size[0]  # rpixel2 (columns)
        if self.tilt:
            az = math.radians(self.tilt_azimuth) + math.pi / 2
            t = math.cos(az) * e1 / np.linalg.norm(e1) + math.sin(az) * e2 / np.linalg.norm(e2)
            # xrayutilities' rotation_arb turns left-handed about its axis: match it exactly
            rt = rotation_matrix(-t, self.tilt)
            e1, e2 = rt @ e1, rt @ e2
        beam = axis_vector(BEAM_DIRECTION)
        centre = self.distance * beam - self.beam_center[1] * e1 - self.beam_center[0] * e2
        circles = list(self.arm) + ([Circle("detrot", BEAM_DIRECTION, self.rotation)] if self.rotation else [])
        md = _chain(circles, [c.angle for c in circles])
        return md @ centre, md @ e2, md @ e1

    def pixel_positions(self, shape: tuple[int, int]) -> np.ndarray:
        """Lab-frame position (mm) of every pixel centre, shape ``(ny, nx, 3)``."""
        p0, ex, ey = self.detector_frame()
        ny, nx = shape
        rows = np.arange(ny, dtype=float)[:, None, None]
        cols = np.arange(nx, dtype=float)[None, :, None]
        return p0 + rows * ey + cols * ex

    def lab_q(self, shape: tuple[int, int]) -> np.ndarray:
        """``Q = k_f - k_i`` (Å⁻¹, lab frame) of every pixel, shape ``(ny, nx, 3)``; frame-independent."""
        r = self.pixel_positions(shape)
        kf = self.k * r / np.linalg.norm(r, axis=-1, keepdims=True)
        return kf - self.k * axis_vector(BEAM_DIRECTION)

    def xrayutilities_args(self, shape: tuple[int, int]) -> dict[str, Any]:
        """The same geometry as xrayutilities arguments (for cross-checks).

        Returns ``{"qconv": (sampleAxis, detectorAxis, r_i), "init_area": {...},
        "detector_angles": [...]}``; sample angles come from
        ``goniometer.circle_angles``.
        """
        ny, nx = shape
        return {
            "qconv": ([c.axis for c in self.goniometer.circles], [c.axis for c in self.arm] or ["x+"], [0, 1, 0]),
            "init_area": dict(
                detectorDir1=self.y_direction, detectorDir2=self.x_direction,
                cch1=self.beam_center[1], cch2=self.beam_center[0], Nch1=ny, Nch2=nx,
                distance=self.distance, pwidth1=self.pixel_size[1], pwidth2=self.pixel_size[0],
                detrot=self.rotation, tiltazimuth=self.tilt_azimuth, tilt=self.tilt,
            ),
            "detector_angles": [c.angle for c in self.arm] or [0.0],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "wavelength": self.wavelength,
            "distance": self.distance,
            "beam_center": list(self.beam_center),
            "pixel_size": list(self.pixel_size),
            "x_direction": self.x_direction,
            "y_direction": self.y_direction,
            "rotation": self.rotation,
            "tilt": self.tilt,
            "tilt_azimuth": self.tilt_azimuth,
            "arm": [c.to_dict() for c in self.arm],
            "goniometer": self.goniometer.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Geometry:
        return parse_geometry(d)


_GEOMETRY_FIELDS = {
    "wavelength", "distance", "beam_center", "pixel_size", "x_direction", "y_direction",
    "rotation", "tilt", "tilt_azimuth", "arm", "goniometer",
}


def parse_geometry_fields(g: Geometry) -> None:
    set_ = lambda k, v: object.__setattr__(g, k, v)  # noqa: E731  (frozen dataclass)
    set_("wavelength", _finite(g.wavelength, "wavelength (Å)", positive=True))
    set_("distance", _finite(g.distance, "detector distance (mm)", positive=True))
    set_("beam_center", _pair(g.beam_center, "beam_center (pixels)"))
    set_("pixel_size", _pair(g.pixel_size, "pixel_size (mm)", positive=True))
    xd = parse_direction(g.x_direction, "x_direction")
    yd = parse_direction(g.y_direction, "y_direction")
    beam_axis = BEAM_DIRECTION[0]
    if xd[0] == beam_axis or yd[0] == beam_axis:
        raise GeometryError(
            f"detector x/y directions must be perpendicular to the beam ({BEAM_DIRECTION}); "
            f"got x_direction={xd!r}, y_direction={yd!r}"
        )
    if xd[0] == yd[0]:
        raise GeometryError(f"x_direction and y_direction must be perpendicular (got {xd!r}, {yd!r})")
    set_("x_direction", xd)
    set_("y_direction", yd)
    for name in ("rotation", "tilt", "tilt_azimuth"):
        set_(name, _finite(getattr(g, name), name))
    set_("arm", _circles(g.arm, "detector arm"))
    set_("goniometer", parse_goniometer(g.goniometer))


def parse_geometry(value: Any) -> Geometry:
    """A :class:`Geometry` from itself or its ``to_dict`` form (unknown keys are an error)."""
    if isinstance(value, Geometry):
        return value
    if not isinstance(value, Mapping):
        raise GeometryError(f"geometry must be a dict, not {type(value).__name__}")
    unknown = set(value) - _GEOMETRY_FIELDS
    if unknown:
        raise GeometryError(f"unknown geometry field(s) {sorted(unknown)}; known: {sorted(_GEOMETRY_FIELDS)}")
    missing = {"wavelength", "distance", "beam_center", "pixel_size"} - set(value)
    if missing:
        raise GeometryError(f"geometry is missing {sorted(missing)}")
    kw = dict(value)
    if "arm" in kw:
        kw["arm"] = _circles(kw["arm"], "detector arm")
    if "goniometer" in kw:
        kw["goniometer"] = parse_goniometer(kw["goniometer"])
    return Geometry(**kw)


# --------------------------------------------------------------------------- UB


def busing_levy_b(a: float, b: float, c: float, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """Busing & Levy (1967) B matrix **with the 2π factor** (Å⁻¹); angles in degrees.

    ``B @ hkl`` is Q in the crystal Cartesian frame: x along a*, y in the
    (a*, b*) plane, z along c (real space).
    """
    al, be, ga = (math.radians(x) for x in (alpha, beta, gamma))
    ca, cb, cg = math.cos(al), math.cos(be), math.cos(ga)
    sa, sb, sg = math.sin(al), math.sin(be), math.sin(ga)
    vol2 = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    if not vol2 > 0:
        raise SingularUB(f"lattice angles ({alpha}, {beta}, {gamma}) do not form a cell (zero volume)")
    vol = a * b * c * math.sqrt(vol2)
    ast, bst, cst = b * c * sa / vol, a * c * sb / vol, a * b * sg / vol  # reciprocal lengths (no 2π)
    cos_bst = (ca * cg - cb) / (sa * sg)
    cos_gst = (ca * cb - cg) / (sa * sb)
    sin_bst, sin_gst = math.sqrt(max(0.0, 1 - cos_bst**2)), math.sqrt(max(0.0, 1 - cos_gst**2))
    bmat = np.array(
        [
            [ast, bst * cos_gst, cst * cos_bst],
            [0.0, bst * sin_gst, -cst * sin_bst * ca],
            [0.0, 0.0, 1.0 / c],
        ]
    )
    return 2.0 * math.pi * bmat


@dataclass(frozen=True)
class UB:
    """Orientation matrix ``UB`` (Å⁻¹, 2π convention): ``Q_sample = UB @ hkl``.

    ``matrix`` is stored as a row-major tuple of three 3-tuples. Construction
    refuses a singular matrix (:class:`SingularUB`). A Busing-Levy UB without
    2π (as NeXus ``NXsample/ub_matrix``) is ``UB(2*np.pi*M)`` or
    ``UB.from_nexus``.

    Examples
    --------
    >>> ub = UB.from_lattice(4.0, 4.0, 4.0, 90, 90, 90)
    >>> bool(np.allclose(ub.array @ [1, 0, 0], [2 * np.pi / 4, 0, 0]))
    True
    """

    matrix: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrix", parse_ub_matrix(self.matrix))

    @property
    def array(self) -> np.ndarray:
        return np.array(self.matrix, dtype=float)

    def inverse(self) -> np.ndarray:
        return np.linalg.inv(self.array)

    @classmethod
    def from_lattice(
        cls, a: float, b: float, c: float, alpha: float, beta: float, gamma: float, U: Any = None
    ) -> UB:
        """``U @ B`` with B from the lattice (Å, degrees; Busing-Levy, 2π included), U default identity."""
        vals = [_finite(x, n, positive=True) for x, n in zip((a, b, c, alpha, beta, gamma), "a b c alpha beta gamma".split())]
        if any(v >= 180 for v in vals[3:]):
            raise GeometryError(f"lattice angles must be in (0, 180) degrees (got {vals[3:]})")
        u = np.eye(3) if U is None else np.asarray(U, dtype=float)
        if u.shape != (3, 3):
            raise GeometryError(f"U must be 3x3 (got shape {u.shape})")
        return cls(u @ busing_levy_b(*vals))

    @classmethod
    def from_nexus(cls, sample: Any, *, convention: str = "busing-levy") -> UB:
        """UB from a NeXus ``NXsample`` group (h5py group, nexusformat, Tiled container or dict).

        Reads ``ub_matrix``, else ``orientation_matrix``. NeXus defines
        ``orientation_matrix`` as U alone, but many writers store the full UB
        there: if it is a pure rotation and ``unit_cell`` (or
        ``unit_cell_abc`` + ``unit_cell_alphabetagamma``) is present it is
        taken as U and multiplied by B of that cell, otherwise as the UB.
        ``convention="busing-levy"`` (NeXus: Å⁻¹ without 2π) multiplies by 2π;
        ``"2pi"`` takes the matrix as is.
        """
        if convention not in ("busing-levy", "2pi"):
            raise GeometryError(f"convention must be 'busing-levy' or '2pi' (got {convention!r})")
        scale = 2.0 * math.pi if convention == "busing-levy" else 1.0

        def get(name: str) -> np.ndarray | None:
            try:
                if name in sample:
                    return _read_array(sample[name])
            except (KeyError, TypeError):
                return None
            return None

        ub = get("ub_matrix")
        if ub is not None:
            return cls(scale * ub.reshape(3, 3))
        om = get("orientation_matrix")
        if om is None:
            raise GeometryError("the sample group has neither 'ub_matrix' nor 'orientation_matrix'")
        om = om.reshape(3, 3)
        cell = get("unit_cell")
        if cell is None:
            abc, angles = get("unit_cell_abc"), get("unit_cell_alphabetagamma")
            if abc is not None and angles is not None:
                cell = np.concatenate([abc.ravel(), angles.ravel()])
        if cell is not None and np.allclose(om @ om.T, np.eye(3), atol=1e-6):
            return cls.from_lattice(*np.asarray(cell, dtype=float).ravel()[:6], U=om)
        return cls(scale * om)

    def to_dict(self) -> dict[str, Any]:
        return {"matrix": [list(r) for r in self.matrix]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UB:
        if isinstance(d, UB):
            return d
        if not isinstance(d, Mapping) or set(d) != {"matrix"}:
            raise GeometryError(f"a UB record is {{'matrix': [[...], [...], [...]]}} (got {d!r})")
        return cls(d["matrix"])


def parse_ub_matrix(value: Any) -> tuple[tuple[float, float, float], ...]:
    """Check a 3x3 finite, invertible matrix; return it as nested tuples."""
    try:
        m = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise GeometryError(f"UB must be a 3x3 matrix of numbers (got {value!r})") from None
    if m.shape != (3, 3):
        raise GeometryError(f"UB must be 3x3 (got shape {m.shape})")
    if not np.all(np.isfinite(m)):
        raise GeometryError("UB contains NaN or infinity")
    norms = np.linalg.norm(m, axis=1)
    det = float(np.linalg.det(m))
    if not np.all(norms > 0) or abs(det) <= 1e-10 * float(np.prod(norms)):
        raise SingularUB(
            f"UB matrix is singular (det = {det:.3g}, row norms {np.round(norms, 6).tolist()}); "
            "its rows must be linearly independent (check the lattice and U)"
        )
    return tuple(tuple(float(x) for x in row) for row in m)  # type: ignore[return-value]


def parse_ub(value: Any) -> UB:
    """A :class:`UB` from itself, a 3x3 array-like, or ``{"matrix": ...}``."""
    if isinstance(value, UB):
        return value
    if isinstance(value, Mapping):
        return UB.from_dict(value)
    return UB(value)


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridAxis:
    """One grid axis: voxel centres ``start + step * i``, ``i = 0 .. num-1`` (r.l.u.).

    Voxel ``i`` holds points with ``floor((h - start)/step + 0.5) == i``;
    points outside ``[start - step/2, stop + step/2)`` are dropped.
    """

    start: float
    step: float
    num: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _finite(self.start, "grid start"))
        object.__setattr__(self, "step", _finite(self.step, "grid step", positive=True))
        num = self.num
        if isinstance(num, float) and num.is_integer():
            num = int(num)
        if not isinstance(num, (int, np.integer)) or isinstance(num, bool) or num < 1:
            raise GeometryError(f"grid size must be a positive integer (got {self.num!r})")
        object.__setattr__(self, "num", int(num))

    @property
    def stop(self) -> float:
        """Centre of the last voxel."""
        return self.start + self.step * (self.num - 1)

    @property
    def centres(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.num, dtype=float)

    @classmethod
    def from_range(cls, start: float, stop: float, *, step: float | None = None, num: int | None = None) -> GridAxis:
        """Centres from ``start`` to ``stop``: given ``num`` (``step = (stop-start)/(num-1)``,
        as ``np.linspace`` and xrayutilities' ``Gridder3D``) or ``step`` (``num`` is the
        largest count whose last centre does not pass ``stop`` by more than 1e-9 step)."""
        start, stop = _finite(start, "grid start"), _finite(stop, "grid stop")
        if (step is None) == (num is None):
            raise GeometryError("give exactly one of step or num for each grid axis")
        if num is not None:
            if not isinstance(num, (int, np.integer)) or num < 1:
                raise GeometryError(f"grid size must be a positive integer (got {num!r})")
            if num == 1:
                raise GeometryError("a 1-voxel axis needs a step: use GridAxis(start, step, 1)")
            if not stop > start:
                raise GeometryError(f"grid stop must be > start (got {start} .. {stop})")
            return cls(start, (stop - start) / (num - 1), int(num))
        step = _finite(step, "grid step", positive=True)
        if stop < start:
            raise GeometryError(f"grid stop must be >= start (got {start} .. {stop})")
        n = math.floor((stop - start) / step + 1e-9) + 1
        return cls(start, step, n)

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "step": self.step, "num": self.num}


@dataclass(frozen=True)
class Grid:
    """Regular HKL grid. Arrays on it are C-ordered with axes **(L, K, H)**.

    ``shape`` is ``(L.num, K.num, H.num)``, as the ``data``/``weights``
    arrays of the result (NeXus/nxrefine order: the last axis, H, is fastest).

    Examples
    --------
    >>> g = Grid.from_ranges(H=(-2, 2), K=(-2, 2), L=(0, 4), step=0.1)
    >>> g.shape
    (41, 41, 41)
    """

    H: GridAxis
    K: GridAxis
    L: GridAxis

    def __post_init__(self) -> None:
        for name in "HKL":
            ax = getattr(self, name)
            if isinstance(ax, Mapping):
                ax = GridAxis(**ax)
            if not isinstance(ax, GridAxis):
                raise GeometryError(f"grid axis {name} must be a GridAxis or dict (got {ax!r})")
            object.__setattr__(self, name, ax)

    @classmethod
    def from_ranges(
        cls,
        H: tuple[float, float],
        K: tuple[float, float],
        L: tuple[float, float],
        *,
        step: float | Sequence[float] | None = None,
        shape: int | Sequence[int] | None = None,
    ) -> Grid:
        """Grid from ``(start, stop)`` voxel-centre ranges and ``step`` or ``shape``, both given in
        **(H, K, L)** order (a scalar applies to all three)."""
        if (step is None) == (shape is None):
            raise GeometryError("give exactly one of step or shape")
        ranges = [H, K, L]
        for name, r in zip("HKL", ranges):
            if len(r) != 2:
                raise GeometryError(f"{name} range must be (start, stop) (got {r!r})")
        if step is not None:
            steps = [step] * 3 if np.isscalar(step) else list(step)
            if len(steps) != 3:
                raise GeometryError("step must be a number or (dH, dK, dL)")
            axes = [GridAxis.from_range(r[0], r[1], step=s) for r, s in zip(ranges, steps)]
        else:
            nums = [shape] * 3 if np.isscalar(shape) else list(shape)
            if len(nums) != 3:
                raise GeometryError("shape must be an integer or (nH, nK, nL)")
            axes = [GridAxis.from_range(r[0], r[1], num=n) for r, n in zip(ranges, nums)]
        return cls(*axes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(nL, nK, nH)``."""
        return (self.L.num, self.K.num, self.H.num)

    @property
    def size(self) -> int:
        return self.H.num * self.K.num * self.L.num

    @property
    def start(self) -> np.ndarray:
        """``(H0, K0, L0)``."""
        return np.array([self.H.start, self.K.start, self.L.start])

    @property
    def step(self) -> np.ndarray:
        """``(dH, dK, dL)``."""
        return np.array([self.H.step, self.K.step, self.L.step])

    def nbytes(self, nthreads: int = 1) -> int:
        """Memory the transform allocates: float64 ``v`` and ``n`` per thread."""
        return 16 * self.size * max(1, nthreads)

    def check_size(self, max_voxels: int | None = None, nthreads: int = 1) -> None:
        """Raise :class:`GridTooLarge` above ``max_voxels`` (default ``DEFAULT_MAX_VOXELS``)."""
        limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
        if self.size > limit:
            need = self.nbytes(nthreads)
            raise GridTooLarge(
                f"HKL grid of {self.H.num} x {self.K.num} x {self.L.num} = {self.size:,} voxels "
                f"would need {need / 1e9:.1f} GB (float64 sums and weights, 16 bytes per voxel, "
                f"per thread x {max(1, nthreads)} threads); the limit is {limit:,} voxels "
                "(max_voxels= or SCATTERBROKER_TRANSFORM_MAX_VOXELS). Use a coarser step or a smaller range."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"H": self.H.to_dict(), "K": self.K.to_dict(), "L": self.L.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grid:
        return parse_grid(d)


def parse_grid(value: Any) -> Grid:
    """A :class:`Grid` from itself or ``{"H": {"start", "step", "num"}, "K": ..., "L": ...}``."""
    if isinstance(value, Grid):
        return value
    if not isinstance(value, Mapping) or set(value) != {"H", "K", "L"}:
        raise GeometryError(f"a grid record is {{'H': {{...}}, 'K': {{...}}, 'L': {{...}}}} (got {value!r})")
    axes = []
    for name in "HKL":
        a = value[name]
        if not isinstance(a, Mapping) or set(a) != {"start", "step", "num"}:
            raise GeometryError(f"grid axis {name} must be {{'start', 'step', 'num'}} (got {a!r})")
        axes.append(GridAxis(a["start"], a["step"], a["num"]))
    return Grid(*axes)


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class TransformParams:
    """Everything a transform task needs besides the frames and the mask (JSON-able)."""

    geometry: Geometry
    ub: UB
    grid: Grid

    def __post_init__(self) -> None:
        object.__setattr__(self, "geometry", parse_geometry(self.geometry))
        object.__setattr__(self, "ub", parse_ub(self.ub))
        object.__setattr__(self, "grid", parse_grid(self.grid))

    def to_dict(self) -> dict[str, Any]:
        return {"geometry": self.geometry.to_dict(), "ub": self.ub.to_dict(), "grid": self.grid.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformParams:
        if isinstance(d, TransformParams):
            return d
        if not isinstance(d, Mapping) or set(d) != {"geometry", "ub", "grid"}:
            raise GeometryError("transform parameters are {'geometry': ..., 'ub': ..., 'grid': ...}")
        return cls(d["geometry"], d["ub"], d["grid"])
