"""Register a directory tree into a Tiled catalog, incrementally.

Runs where the files are (the server machine or one sharing its file system)
and talks to the server through the Tiled client, like ``tiled register``.
Each node remembers what it was built from (``metadata["source"]``: path, file
count, bytes, newest mtime); a re-run skips nodes whose source is unchanged,
rebuilds changed ones, and adds new ones. A file that cannot be read is
reported and skipped; registration goes on with the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiled.client.utils import ClientError
from tiled.structures.core import Spec, StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management
from tiled.utils import ensure_uri

from ..adapters import registry
from ..adapters.roots import Roots, confine
from ..errors import ScatterbrokerError
from .checksum import ALGORITHM, checksums, file_checksum
from .names import check_key
from .sidecar import fingerprint as sidecar_fingerprint
from .sidecar import is_sidecar_problem, merge, sidecar_for
from .walk import Listing, Sequence, Single, walk

#: Spec of a scan container holding ``frames`` (array) and ``headers`` (table).
SCAN_SPEC = Spec("scan")
#: Spec of array nodes the Python client reads through the fast data route
#: (scatterbroker.clients.fast_array.FastArrayClient; plain Tiled clients ignore it).
FAST_SPEC = Spec("sb-array")

Progress = Callable[[int, str], None]


@dataclass
class Report:
    """Outcome of one registration run."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    files: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def summary(self) -> str:
        return (
            f"{self.files} files: {len(self.created)} nodes created, "
            f"{len(self.updated)} updated, {self.unchanged} unchanged, "
            f"{len(self.failed)} problems"
        )


def source_of(item: Sequence | Single) -> dict[str, Any]:
    """What a node was built from; an unchanged source means nothing to redo.

    A scan's source is its frames (path pattern, count, total bytes, newest
    mtime) and, under ``"sidecars"``, the state of every sidecar that applies
    to it (:func:`scatterbroker.catalog.sidecar.fingerprint`), so an edited
    sidecar is harvested again. The key is left out when no sidecar applies.
    Sidecars are fingerprinted *before* they are read: one edited in between
    is harvested again on the next run, never missed.
    """
    size, mtime = item.stats
    if isinstance(item, Single):
        return {"path": str(item.path), "files": 1, "bytes": size, "mtime_ns": mtime}
    source: dict[str, Any] = {
        "path": str(item.directory / f"{item.prefix}*{item.suffix}"),
        "files": len(item.numbers),
        "bytes": size,
        "mtime_ns": mtime,
    }
    sidecars = sidecar_fingerprint(item.directory, item.key)
    if sidecars:
        source["sidecars"] = sidecars
    return source


def register(
    node: Any,
    path: str | os.PathLike[str],
    *,
    prefix: str = "",
    roots: Roots | None = None,
    progress: Progress | None = None,
) -> Report:
    """Register everything under ``path`` below ``node``/``prefix``.

    Parameters
    ----------
    node
        A writable Tiled container client (``tiled.client.from_uri(url, api_key=...)``).
    path
        Directory (or single file) on the file system the server reads.
    prefix
        Slash-separated node path below ``node`` to register under; created as needed.
    roots
        If given, ``path`` must resolve inside these readable roots.
    progress
        Called as ``progress(n_files_done, description)``.

    Returns
    -------
    Report
        Created/updated node paths, the unchanged count, and every problem file.
    """
    path = Path(os.path.realpath(path))
    if roots is not None:
        path = confine(path, roots, what="registration path")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    report = Report()
    base = _ensure_containers(node, [p for p in prefix.split("/") if p])
    if path.is_file():
        listing = Listing(path.parent)
        from .walk import list_directory

        full = list_directory(path.parent)
        listing.singles = [s for s in full.singles if s.path == path]
        listing.sequences = []
        listing.unknown = [u for u in full.unknown if u[0] == path]
        _register_listing(base, listing, prefix, report, progress)
        return report
    for parts, listing in walk(path):
        try:
            target = _ensure_containers(base, list(parts))
        except ScatterbrokerError as err:
            report.failed.append((str(listing.directory), str(err)))
            continue
        _register_listing(target, listing, "/".join(filter(None, [prefix, *parts])), report, progress)
    return report


def _ensure_containers(node: Any, parts: list[str]) -> Any:
    for part in parts:
        check_key(part)
        if part in node:
            node = node[part]
        else:
            node = node.create_container(key=part)
    return node


def _register_listing(
    node: Any, listing: Listing, where: str, report: Report, progress: Progress | None
) -> None:
    for path, why in listing.unknown:
        report.failed.append((str(path), why))
        report.files += 1
        if progress:
            progress(1, path.name)
    existing = {key: child.metadata.get("source") for key, child in node.items()}
    for key, item in listing.keyed().items():
        n_files = 1 if isinstance(item, Single) else len(item.numbers)
        label = f"{where}/{key}".lstrip("/")
        report.files += n_files
        source = source_of(item)
        try:
            check_key(key)
            if key in existing:
                if existing[key] == source:
                    report.unchanged += 1
                    continue
                if isinstance(item, Sequence) and same_frames(existing[key], source):
                    # Only a sidecar changed: harvest it again in place, frames untouched.
                    for why in refresh_sidecars(node[key], item, source):
                        report.failed.append((str(item.directory), why))
                    report.updated.append(label)
                    continue
                node[key].delete(recursive=True, external_only=False)
                changed = True
            else:
                changed = False
            if isinstance(item, Single):
                register_single(node, key, item, source)
            else:
                for bad, why in register_sequence(node, key, item, source):
                    report.failed.append((str(bad), why))
            (report.updated if changed else report.created).append(label)
        except (ScatterbrokerError, ClientError, OSError) as err:
            where_ = str(item.path) if isinstance(item, Single) else source["path"]
            report.failed.append((where_, str(err)))
        finally:
            if progress:
                progress(n_files, label)


def register_single(node: Any, key: str, item: Single, source: dict) -> None:
    """Create the node for one file, with its checksum in ``metadata["checksum"]``."""
    cls = registry.adapters_by_mimetype()[item.mimetype]
    uri = ensure_uri(str(item.path))
    adapter = cls.from_uris(uri)
    if hasattr(adapter, "generate_data_sources"):
        data_sources = adapter.generate_data_sources(item.mimetype, item.path, False, size=item.stats[0])
    else:
        structure = adapter.structure()
        data_sources = [
            DataSource(
                structure_family=adapter.structure_family,
                mimetype=item.mimetype,
                structure=structure,
                parameters={},
                management=Management.external,
                assets=[
                    Asset(data_uri=uri, is_directory=False, size=item.stats[0], parameter="data_uri")
                ],
            )
        ]
    node.new(
        structure_family=adapter.structure_family,
        data_sources=data_sources,
        key=key,
        metadata={
            **adapter.metadata(),
            "source": source,
            "checksum": {ALGORITHM: file_checksum(item.path)},
        },
        specs=list(adapter.specs) + (
            [FAST_SPEC] if adapter.structure_family == StructureFamily.array else []),
    )


def register_sequence(node: Any, key: str, item: Sequence, source: dict) -> list[tuple[Path, str]]:
    """Create the scan container (``frames`` + ``headers``); return rejected frames.

    ``headers`` is an appendable table (one row per frame: number, file name,
    header values, checksum) so the watcher can grow it frame by frame.
    """
    cls = registry.adapters_by_mimetype()[item.mimetype]
    harvest = cls.harvest(item.directory, item.prefix, item.width, item.suffix, item.numbers)
    extra, problems = sidecar_for(item.directory, item.key)
    metadata = merge(dict(harvest.adapter.metadata()), extra)
    rejected = [*harvest.rejected, *item.rejected]
    if rejected or problems:  # bad frames and sidecars, on the node as well as in the report
        metadata["problems"] = [why for _, why in rejected] + problems
    # The source record goes on last: a scan that failed half-way has none, so
    # the next run rebuilds it instead of counting it unchanged.
    scan = node.create_container(key=key, metadata=metadata, specs=[SCAN_SPEC])
    try:
        scan.new(
            structure_family=StructureFamily.array,
            data_sources=[harvest.adapter.data_source(item.mimetype)],
            key="frames",
            metadata={"axes": ["frame", "y", "x"]},
            specs=[FAST_SPEC],
        )
        columns = dict(harvest.columns)
        columns[ALGORITHM] = checksums(item.directory / name for name in columns["file"])
        create_headers(scan, columns)
        scan.update_metadata(metadata={"source": source}, drop_revision=True)
    except BaseException:
        scan.delete(recursive=True, external_only=False)  # no half scans in the catalog
        raise
    return rejected + [(item.directory, why) for why in problems]


def same_frames(old: Any, new: dict[str, Any]) -> bool:
    """Whether two scan sources describe the same frames (sidecars aside)."""
    if not isinstance(old, dict):
        return False  # no source: a scan whose registration stopped half-way
    strip = lambda s: {k: v for k, v in s.items() if k != "sidecars"}  # noqa: E731
    return strip(old) == strip(new)


#: ``metadata["scan"]`` keys that describe the frames (kept when sidecars are re-read).
_FRAME_KEYS = ("frames", "first_frame", "last_frame", "end_angle", "end_angle@units")


def refresh_sidecars(scan: Any, item: Sequence, source: dict[str, Any]) -> list[str]:
    """Harvest the sidecars of an existing scan node again; its frames are not touched.

    The metadata becomes what :func:`register_sequence` would make today:
    the first registered frame's header summary, the frame counts already in
    the node, the sidecars merged on top, and ``source``. Problems from the
    frames stay; problems from sidecars are replaced by today's. Returns the
    sidecar problems found now.
    """
    cls = registry.adapters_by_mimetype()[item.mimetype]
    old = dict(scan.metadata)
    first = old.get("scan", {}).get("first_frame", item.numbers[0])
    info = cls.inspect(item.directory / f"{item.prefix}{int(first):0{item.width}d}{item.suffix}")
    metadata = dict(info.summary)
    metadata["scan"] = {**metadata.get("scan", {}),
                        **{k: v for k, v in old.get("scan", {}).items() if k in _FRAME_KEYS}}
    extra, problems = sidecar_for(item.directory, item.key)
    merge(metadata, extra)
    kept = [p for p in old.get("problems", []) if not is_sidecar_problem(p, item.key)]
    if kept or problems:
        metadata["problems"] = kept + problems
    metadata["source"] = source
    scan.replace_metadata(metadata=metadata, drop_revision=True)
    return problems


def create_headers(scan: Any, columns: dict[str, list]) -> Any:
    """The scan's appendable ``headers`` table, holding ``columns`` as its first rows."""
    import pandas as pd
    import pyarrow as pa

    rows = pa.Table.from_pandas(pd.DataFrame(columns), preserve_index=False)
    # A column empty in every frame has Arrow type null, which Tiled cannot store.
    rows = rows.cast(pa.schema([
        pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in rows.schema
    ]))
    table = scan.create_appendable_table(rows.schema, key="headers")
    table.append_partition(0, rows)  # an Arrow table: a DataFrame would add its index
    return table
