"""Stacking a registered scan node: the catalog's side of making a NeXus scan file.

Reduction computes on the files it is given (``reduction/stack.py``); this
module asks the catalog which files those are. From a scan node (a Tiled
client, or its global URI) it reads the frames' data source (the numbered
files' directory and template, their format), the scan's metadata and the
``headers`` table's angles, then hands them to
:func:`scatterbroker.reduction.stack.stack_sequence`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import registry
from ..adapters.sequence import Template
from ..reduction.stack import Codec, Progress, StackError, StackReport, stack_sequence

__all__ = ["stack_scan"]


def stack_scan(
    node: Any,
    out_path: str | os.PathLike[str],
    *,
    api_key: str | None = None,
    codec: str | Codec = "bitshuffle-lz4",
    dtype: Any = None,
    workers: int | None = None,
    progress: Progress | None = None,
    strict: bool = False,
) -> StackReport:
    """Stack the frames of a registered scan node into a NeXus scan file.

    ``node`` is a Tiled client of a scan container (``frames`` array +
    ``headers`` table, as ``catalog.register`` makes it) or its global URI.
    Frames are read from the files the catalog points at, so this runs where
    those files are (the server machine or one sharing its file system). The
    scan's metadata fills ``entry/sample`` and ``entry/instrument``; the
    ``headers`` table's ``start_angle`` column gives the angle axis. The frame
    node is not changed. Other parameters as
    :func:`scatterbroker.reduction.stack.stack_files`.

    Examples
    --------
    >>> stack_scan(client["raw/p1/s1/scan1"], "/data/scans/s1/scan1.nxs")  # doctest: +SKIP
    """
    from tiled.utils import path_from_uri

    if isinstance(node, str):
        from tiled.client import from_uri

        node = from_uri(node, api_key=api_key)
    if "frames" not in node:
        raise StackError(f"{node.uri}: not a scan node (it has no 'frames' array)")
    frames = node["frames"]
    sources = frames.data_sources() or []
    if not sources or not {"prefix", "width", "suffix", "ranges"} <= set(sources[0].parameters):
        raise StackError(f"{node.uri}: its frames are not a sequence of numbered files")
    source = sources[0]
    (asset,) = [a for a in source.assets if a.parameter == "data_uri"]
    directory = Path(path_from_uri(asset.data_uri))
    if not directory.is_dir():
        raise StackError(
            f"{directory}: the scan's frame files are not on this machine; run the "
            "stacking where the files are (the server machine or a shared file system)"
        )
    p = source.parameters
    template = Template(
        directory, p["prefix"], int(p["width"]), p["suffix"],
        tuple((int(a), int(b)) for a, b in p["ranges"]),
    )
    cls = registry.adapters_by_mimetype().get(source.mimetype)
    if cls is None:
        raise StackError(f"no adapter is installed for {source.mimetype}")
    metadata = {k: v for k, v in dict(node.metadata).items() if k != "source"}
    parts = list(node.path_parts)
    if "sample" not in metadata and len(parts) >= 2:
        metadata["sample"] = {"name": parts[-2]}  # /raw/<proposal>/<sample>/<scan>
    metadata.setdefault("title", "/".join(parts))
    angle_map: dict[int, float] = {}
    if "headers" in node:
        table = node["headers"].read()
        if {"frame", "start_angle"} <= set(table.columns):
            angle_map = {
                int(f): float(a) for f, a in zip(table["frame"], table["start_angle"])
                if a is not None and a == a
            }
    return stack_sequence(
        template, out_path, adapter=cls, frame_shape=tuple(frames.shape[1:]),
        frame_dtype=np.dtype(frames.dtype), metadata=metadata, angles_by_frame=angle_map,
        origin=node.uri, codec=codec, dtype=dtype, workers=workers, progress=progress,
        strict=strict,
    )
