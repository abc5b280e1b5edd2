"""Canonical units for harvested metadata, so one search works across formats.

Harvested values are stored under NeXus-style nested keys with their unit in a
sibling ``<name>@units`` key (the NeXus ``field@attribute`` notation), e.g.
``{"instrument": {"detector": {"distance": 500.0, "distance@units": "mm"}}}``.
Values are converted to one unit per quantity so that
``Key("instrument.detector.distance") > 300`` means the same for every format.
"""

from __future__ import annotations

import math

#: quantity -> canonical unit
CANONICAL = {
    "length": "mm",
    "wavelength": "angstrom",
    "temperature": "K",
    "angle": "deg",
    "time": "s",
    "energy": "eV",
    "pixels": "pixel",
}

# unit spelling -> (quantity, factor to canonical, offset)
_UNITS: dict[str, tuple[str, float, float]] = {}


def _add(quantity: str, factor: float, *names: str, offset: float = 0.0) -> None:
    for name in names:
        _UNITS[name.lower()] = (quantity, factor, offset)


_add("length", 1000.0, "m", "meter", "meters", "metre")
_add("length", 10.0, "cm")
_add("length", 1.0, "mm", "millimeter", "millimeters")
_add("length", 1e-3, "um", "µm", "micron", "microns", "micrometer")
_add("wavelength", 1.0, "a", "å", "angstrom", "angstroms", "ang")
_add("wavelength", 10.0, "nm")
_add("temperature", 1.0, "k", "kelvin")
_add("temperature", 1.0, "c", "degc", "celsius", "°c", offset=273.15)
_add("angle", 1.0, "deg", "deg.", "degree", "degrees", "°")
_add("angle", 180.0 / math.pi, "rad", "radian", "radians")
_add("time", 1.0, "s", "sec", "second", "seconds")
_add("time", 1e-3, "ms", "millisecond", "milliseconds")
_add("energy", 1.0, "ev")
_add("energy", 1000.0, "kev")
_add("pixels", 1.0, "pixel", "pixels", "px")


def to_canonical(value: float, unit: str, quantity: str) -> tuple[float, str]:
    """Convert ``value`` in ``unit`` to the canonical unit of ``quantity``.

    A wavelength given as a length (``0.07 nm``, ``7e-11 m``) is accepted.
    Unknown or mismatched units raise ``ValueError`` naming both.

    Examples
    --------
    >>> to_canonical(0.5, "m", "length")
    (500.0, 'mm')
    """
    key = unit.strip().lower()
    if key not in _UNITS:
        raise ValueError(f"unknown unit {unit!r} for {quantity}")
    found, factor, offset = _UNITS[key]
    if quantity == "wavelength" and found == "length":
        return value * factor * 1e7, CANONICAL["wavelength"]  # mm -> angstrom
    if found != quantity:
        raise ValueError(f"unit {unit!r} is a {found}, expected a {quantity}")
    return value * factor + offset, CANONICAL[quantity]


def put(tree: dict, path: str, value: object, unit: str | None = None) -> None:
    """Store ``value`` at the slash-separated ``path`` of a nested dict, with its unit.

    Examples
    --------
    >>> md = {}; put(md, "sample/temperature", 300.0, "K"); md
    {'sample': {'temperature': 300.0, 'temperature@units': 'K'}}
    """
    *parents, name = path.split("/")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[name] = value
    if unit is not None:
        node[f"{name}@units"] = unit
