"""Stack frames into a NeXus scan file (DESIGN.md §4).

Layout: ``entry/instrument/detector/data`` holds the (frame, y, x) stack,
chunked one frame per chunk and compressed with Bitshuffle-LZ4 (hdf5plugin)
by default; ``entry/data`` is an NXdata linking to it with the rotation angle
as its frame axis. The file is written under a temporary name and renamed
only when complete, so a reader never sees half a scan file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: name -> (h5py compression kwargs factory)
CODECS: dict[str, Callable[[], dict[str, Any]]] = {
    "bitshuffle-lz4": lambda: dict(__import__("hdf5plugin").Bitshuffle(cname="lz4")),
    "zstd": lambda: dict(__import__("hdf5plugin").Zstd()),
    "gzip": lambda: {"compression": "gzip", "compression_opts": 4},
    "none": lambda: {},
}


def write_scan(
    path: str | os.PathLike[str],
    frames: Sequence[np.ndarray] | np.ndarray,
    *,
    angles: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    codec: str = "bitshuffle-lz4",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a NeXus scan file from frames (each (ny, nx)), atomically.

    Parameters
    ----------
    frames
        Frames in scan order, axes (y, x); all the same shape and dtype.
    angles
        Rotation angle of each frame, degrees; becomes the NXdata frame axis.
    metadata
        Harvested scan metadata (``adapters.units`` layout): ``sample/...``,
        ``instrument/...`` values are written as NeXus fields with units.
    codec
        One of ``CODECS``.
    """
    import h5py

    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    n = len(frames)
    first = np.asarray(frames[0])
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["NX_class"] = "NXroot"
            f.attrs["creator"] = "scatterbroker"
            entry = f.create_group("entry")
            entry.attrs["NX_class"] = "NXentry"
            entry.attrs["default"] = "data"
            _write_tree(entry, metadata or {})
            detector = entry.require_group("instrument").require_group("detector")
            entry["instrument"].attrs["NX_class"] = "NXinstrument"
            detector.attrs["NX_class"] = "NXdetector"
            dset = detector.create_dataset(
                "data",
                shape=(n, *first.shape),
                dtype=first.dtype,
                chunks=(1, *first.shape),
                **CODECS[codec](),
            )
            for i in range(n):
                dset[i] = np.asarray(frames[i])
                if progress:
                    progress(1)
            data = entry.create_group("data")
            data.attrs["NX_class"] = "NXdata"
            data.attrs["signal"] = "data"
            data["data"] = dset  # hard link: same dataset, no copy
            axis = "rotation_angle" if angles is not None else "frame_number"
            values = np.asarray(angles if angles is not None else np.arange(n), dtype=float)
            data.create_dataset(axis, data=values)
            if angles is not None:
                data[axis].attrs["units"] = "deg"
            data.attrs["axes"] = [axis, ".", "."]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_tree(group, tree: Mapping[str, Any]) -> None:
    """Write nested metadata as NeXus fields; ``name@units`` become attributes."""
    classes = {"sample": "NXsample", "instrument": "NXinstrument",
               "detector": "NXdetector", "monochromator": "NXmonochromator"}
    for key, value in tree.items():
        if "@" in key or key == "source":
            continue
        if isinstance(value, Mapping):
            sub = group.require_group(key)
            if key in classes:
                sub.attrs["NX_class"] = classes[key]
            _write_tree(sub, value)
        elif value is not None:
            group[key] = value
            if f"{key}@units" in tree:
                group[key].attrs["units"] = tree[f"{key}@units"]
