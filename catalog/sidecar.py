"""Sidecar metadata written by a beamline control system next to the frames.

For a scan whose frames are ``scan1_00001.cbf …`` the sidecar is
``scan1.json``, ``scan1.yaml`` or ``scan1.yml`` in the same directory; a
``metadata.json``/``.yaml`` there applies to every scan in the directory (the
scan's own file wins). Content is NeXus-style nested keys, units either in a
sibling ``name@units`` key or as ``{"value": …, "units": …}``::

    sample:
      name: LaB6
      temperature: {value: 25, units: C}      # stored as 298.15 K

Known quantities are converted to the canonical units of
:mod:`scatterbroker.adapters.units`, so a search finds scans across formats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters.units import to_canonical

EXTENSIONS = (".json", ".yaml", ".yml")
DIRECTORY_SIDECAR = "metadata"

#: field name -> quantity, for unit conversion
_QUANTITIES = {
    "temperature": "temperature",
    "wavelength": "wavelength",
    "distance": "length",
    "x_pixel_size": "length",
    "y_pixel_size": "length",
    "count_time": "time",
    "frame_time": "time",
    "energy": "energy",
}


def is_sidecar(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS


def read_sidecar(path: Path) -> dict:
    """Parse one sidecar file; raise ValueError naming the file if it is malformed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:
        raise ValueError(f"{path.name}: unreadable sidecar metadata ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path.name}: sidecar metadata must be a mapping of keys")
    return normalize(data)


def normalize(tree: Mapping[str, Any]) -> dict:
    """Unfold ``{"value", "units"}`` pairs and convert known quantities."""
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and "value" in value and "units" in value:
            value, unit = value["value"], str(value["units"])
        elif isinstance(value, Mapping):
            out[key] = normalize(value)
            continue
        else:
            unit = tree.get(f"{key}@units")
        if "@" in key:
            continue
        quantity = _QUANTITIES.get(key)
        if quantity and unit is not None and isinstance(value, (int, float)):
            try:
                value, unit = to_canonical(float(value), unit, quantity)
            except ValueError:
                pass
        out[key] = value
        if unit is not None:
            out[f"{key}@units"] = unit
    return out


def sidecar_for(directory: Path, key: str) -> tuple[dict, list[str]]:
    """Merged sidecar metadata for scan ``key`` in ``directory``, plus problems."""
    merged: dict = {}
    problems: list[str] = []
    for stem in (DIRECTORY_SIDECAR, key):
        for ext in EXTENSIONS:
            path = directory / f"{stem}{ext}"
            if path.is_file():
                try:
                    merge(merged, read_sidecar(path))
                except ValueError as err:
                    problems.append(str(err))
    return merged, problems


def merge(into: dict, new: Mapping[str, Any]) -> dict:
    """Deep-merge ``new`` into ``into`` (``new`` wins)."""
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into
