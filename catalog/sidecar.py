"""Sidecar metadata written by a beamline control system next to the frames.

For a scan whose frames are ``scan1_00001.cbf …`` (catalog key ``scan1``) the
sidecars, merged in this order (a later one wins key by key), are:

1. ``metadata.json``/``.yaml``/``.yml`` in the same directory: every scan there;
2. the scan's SPEC scan: ``#S 1`` of ``scan.spec``, or of the only ``*.spec``
   file in the directory (the rule is in :mod:`scatterbroker.catalog.spec`);
3. ``scan1.json``, ``scan1.yaml`` or ``scan1.yml``: this scan only.

JSON/YAML content is NeXus-style nested keys, units either in a sibling
``name@units`` key or as ``{"value": …, "units": …}``::

    sample:
      name: LaB6
      temperature: {value: 25, units: C}      # stored as 298.15 K

Known quantities are converted to the canonical units of
:mod:`scatterbroker.adapters.units`, so a search finds scans across formats.
A malformed sidecar is a problem (one line naming the file), never a failed
scan. :func:`fingerprint` is what registration compares to see whether any
of a scan's sidecars changed since it was harvested.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapters.units import to_canonical
from . import spec

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
    """Whether ``path`` is sidecar metadata (JSON, YAML or SPEC), not data."""
    suffix = path.suffix.lower()
    return suffix in EXTENSIONS or suffix == spec.SUFFIX


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


def _files(directory: Path, stem: str) -> list[Path]:
    return [directory / f"{stem}{ext}" for ext in EXTENSIONS if (directory / f"{stem}{ext}").is_file()]


def sidecar_for(directory: Path, key: str) -> tuple[dict, list[str]]:
    """Merged sidecar metadata for scan ``key`` in ``directory``, plus problems."""
    merged: dict = {}
    problems: list[str] = []
    for path in _files(directory, DIRECTORY_SIDECAR):
        _merge_file(merged, path, problems)
    spec_path, number, problem = spec.spec_file_for(directory, key)
    if problem:
        problems.append(problem)
    if spec_path is not None and number is not None:
        found, more = spec.read_spec_scan(spec_path, number)
        merge(merged, found)
        problems += more
    for path in _files(directory, key):
        _merge_file(merged, path, problems)
    return merged, problems


def _merge_file(merged: dict, path: Path, problems: list[str]) -> None:
    try:
        merge(merged, read_sidecar(path))
    except (ValueError, OSError) as err:
        problems.append(str(err))


def fingerprint(directory: Path, key: str) -> dict[str, list]:
    """The state of every sidecar that applies to scan ``key``, by file name.

    JSON/YAML: ``[size, mtime_ns]``. SPEC (``"<file>#S<n>"``): the scan
    block's ``[bytes, digest]`` (:func:`scatterbroker.catalog.spec.fingerprint`),
    so scans sharing a growing SPEC file are not all harvested again. Empty
    when no sidecar applies, so scans without sidecars keep the source record
    they always had.
    """
    out: dict[str, list] = {}
    for path in [*_files(directory, DIRECTORY_SIDECAR), *_files(directory, key)]:
        try:
            st = path.stat()
        except OSError:
            continue
        out[path.name] = [st.st_size, st.st_mtime_ns]
    spec_path, number, _ = spec.spec_file_for(directory, key)
    if spec_path is not None and number is not None:
        out[f"{spec_path.name}#S{number}"] = spec.fingerprint(spec_path, number)
    return out


def is_sidecar_problem(message: str, key: str) -> bool:
    """Whether a ``metadata["problems"]`` line of scan ``key`` came from a sidecar
    (they all start with the sidecar's file name, or with the key for an
    ambiguous SPEC file), so a re-harvest can replace them."""
    head = message.split(":", 1)[0].split(" ", 1)[0].split(",", 1)[0]
    return head.lower().endswith((*EXTENSIONS, spec.SUFFIX)) or (
        message.startswith(f"{key}: ") and "SPEC files" in message)


def applies_to(path: Path, key: str) -> bool:
    """Whether the sidecar file ``path`` can be one of scan ``key``'s (same directory assumed)."""
    stem, suffix = path.stem, path.suffix.lower()
    if suffix in EXTENSIONS:
        return stem in (DIRECTORY_SIDECAR, key)
    return suffix == spec.SUFFIX and spec.scan_number(key) is not None


def merge(into: dict, new: Mapping[str, Any]) -> dict:
    """Deep-merge ``new`` into ``into`` (``new`` wins)."""
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into
