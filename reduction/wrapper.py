"""Wrapper files: small NeXus files holding metadata and external links (DESIGN.md §4).

A wrapper is what scientists copy and customise: its big fields are HDF5
external links into a scan file, so it stays a few KB while exposing the data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .nexus_file import new_nexus_file
from .stack import _write_tree


def write_wrapper(
    path: str | os.PathLike[str],
    scan_file: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    relative: bool = True,
) -> Path:
    """Write a wrapper NeXus file linking ``entry/data/data`` to a scan file.

    The link target is stored relative to the wrapper's directory when
    ``relative`` (so a wrapper and its scan file can move together), else absolute.
    Written through :func:`~scatterbroker.reduction.nexus_file.new_nexus_file`:
    complete or not at all, never over the scan file itself.
    """
    import h5py

    path, scan_file = Path(path), Path(scan_file)
    target = os.path.relpath(scan_file, path.parent) if relative else str(scan_file.resolve())
    with new_nexus_file(path, inputs=[scan_file]) as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["creator"] = "scatterbroker"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        _write_tree(entry, metadata or {})
        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "data"
        data["data"] = h5py.ExternalLink(target, "/entry/instrument/detector/data")
        with h5py.File(scan_file, "r") as scan:
            for name in scan["entry/data"]:
                if name != "data":
                    data[name] = scan["entry/data"][name][()]
                    data[name].attrs.update(scan["entry/data"][name].attrs)
            data.attrs["axes"] = scan["entry/data"].attrs.get("axes", [])
    return path
