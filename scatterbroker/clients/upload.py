"""Share a customised wrapper back: register a NeXus file's tree as new catalog nodes.

``scatterbroker upload out.nxs URI`` (or :func:`upload`) turns a NeXus file
that a scientist customised (a fit result, a new ``NXprocess``, notes) into a
node of the catalog, without ever copying large data:

* every group becomes a container, its attributes the node's metadata and its
  ``NX_class`` the node's spec;
* every small dataset is written as an array into the **server's writable
  storage** (Tiled ``write_array``), with its attributes as metadata (plus
  ``value`` for scalars and short arrays, as the NeXus adapter does);
* every large field, i.e. a placeholder with a global URI (see
  :mod:`scatterbroker.clients.nexus`) and/or an HDF5 external link, becomes an empty
  container with spec ``sb-link`` and metadata ``{"link": {"uri", "shape",
  "dtype", "file", "path"}}``: it keeps pointing at the original data.
  ``scatterbroker.clients.nexus.nxload(URI)`` and the NeXpy plugin read through it.

Refused, before anything is written:

* a target node that exists (:class:`NodeExists`, as the server's own 409);
* a target under raw data (first path segment in ``SCATTERBROKER_RAW_PREFIXES``,
  default ``raw``) or inside any registered file or scan, i.e. below a node
  with an externally managed data source (:class:`ReadOnlyLocation`): uploads
  never go into readable (raw) storage;
* a dataset above ``SCATTERBROKER_UPLOAD_MAX_BYTES`` (default 256 MB), or all
  of them together above it (:class:`UploadTooLarge`): keep large data on the
  facility's server and link to it;
* a name that cannot be a node key, or a file that is not HDF5.

A failure half-way (network) removes the partly written node again.

Examples
--------
>>> from scatterbroker.clients.upload import upload                               # doctest: +SKIP
>>> upload("fit.nxs", "http://host:8000/api/v1/metadata/users/ana/fit1").uri  # doctest: +SKIP
'http://host:8000/api/v1/metadata/users/ana/fit1'
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scatterbroker.errors import ScatterbrokerError
from scatterbroker.clients.nexus import LINK_SPEC, node_uri, split_uri

__all__ = ["upload", "plan", "UploadReport", "UploadRefused", "NodeExists",
           "ReadOnlyLocation", "UploadTooLarge", "RAW_PREFIXES", "MAX_UPLOAD_BYTES"]

#: first path segments holding raw data: nothing is ever uploaded below them
RAW_PREFIXES = tuple(p.strip("/") for p in os.getenv("SCATTERBROKER_RAW_PREFIXES", "raw").split(",")
                     if p.strip("/"))
#: most bytes one upload may write (and any one dataset in it)
MAX_UPLOAD_BYTES = int(os.getenv("SCATTERBROKER_UPLOAD_MAX_BYTES") or 256 << 20)
#: arrays up to this many elements also carry their values in metadata
VALUE_IN_METADATA = 100


class UploadRefused(ScatterbrokerError):
    """The upload was refused before anything was written."""

    status_code = 400


class NodeExists(UploadRefused):
    """The target node exists already: uploads never overwrite."""

    status_code = 409


class ReadOnlyLocation(UploadRefused):
    """The target lies under raw data or inside a registered file or scan."""

    status_code = 403


class UploadTooLarge(UploadRefused):
    """A dataset (or the whole upload) is larger than ``MAX_UPLOAD_BYTES``."""

    status_code = 413


@dataclass
class _Item:
    """One node to create, in creation order (parents first)."""

    parts: tuple[str, ...]           # below the target node; () is the target itself
    kind: str                        # "group", "array" or "link"
    metadata: dict[str, Any]
    specs: list[str] = field(default_factory=list)
    data: np.ndarray | None = None


@dataclass
class UploadReport:
    """What :func:`upload` created."""

    uri: str
    groups: int = 0
    arrays: int = 0
    links: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.uri}: {self.groups} groups, {self.arrays} small arrays "
                f"({self.bytes} bytes) stored, {self.links} links kept as links")


# ------------------------------------------------------------------ planning


def plan(path: str | os.PathLike[str], *, max_bytes: int = MAX_UPLOAD_BYTES
         ) -> tuple[list[_Item], list[str]]:
    """Read ``path`` and list the nodes an upload would create, checking everything.

    Never follows an external link and never reads a placeholder's data.
    Returns the items (the root first) and warnings (links that only a
    facility-local path describes).
    """
    import h5py

    from scatterbroker.adapters.nexus import _attrs
    from scatterbroker.catalog.names import check_key

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UploadRefused(f"{path}: not a readable NeXus/HDF5 file ({err})") from None
    items: list[_Item] = []
    warnings: list[str] = []
    total = [0]
    with f:
        root_md = _attrs(f)
        root_md["upload"] = {"file": path.name, "uploaded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "bytes": path.stat().st_size}
        items.append(_Item((), "group", root_md, _specs(root_md) or ["NXroot"]))

        def visit(group: Any, parts: tuple[str, ...]) -> None:
            names = list(group.keys())
            paired = {}  # field name -> its placeholder beside an external link
            for name in names:
                ph = _placeholder(group, name)
                if ph is not None and ph.attrs.get("field") not in (None, name):
                    target = _text(ph.attrs["field"])
                    if isinstance(group.get(target, getlink=True), (h5py.ExternalLink, h5py.SoftLink)):
                        paired[target] = name
            for name in names:
                if name in paired.values():
                    continue
                check_key(name)
                where = parts + (name,)
                label = "/".join(where)
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    ph = group[paired[name]] if name in paired else None
                    file = os.path.normpath(path.resolve().parent / link.filename)
                    items.append(_link_item(where, ph, file=file, path=link.path))
                    if ph is None:
                        warnings.append(f"{label}: external link to {link.filename}:{link.path} "
                                        "has no global URI; it reads only where that file exists")
                    continue
                if isinstance(link, h5py.SoftLink):
                    try:
                        obj = group[name]
                    except Exception:
                        obj = None
                    ph = _as_placeholder(obj) if obj is not None else None
                    if isinstance(obj, h5py.Dataset) and ph is None and not _external(obj):
                        items.append(_array_item(where, obj, max_bytes, total))
                    elif ph is not None:
                        items.append(_link_item(where, ph))
                    else:
                        items.append(_Item(where, "link", {"link": {"path": link.path}}, [LINK_SPEC]))
                    continue
                obj = group[name]
                if isinstance(obj, h5py.Group):
                    md = _attrs(obj)
                    items.append(_Item(where, "group", md, _specs(md)))
                    visit(obj, where)
                elif isinstance(obj, h5py.Dataset):
                    ph = _placeholder(group, name)
                    if ph is not None:
                        target = _text(ph.attrs.get("field", name)) or name
                        items.append(_link_item(parts + (check_key(target),), ph))
                    elif _external(obj):
                        items.append(_Item(where, "link", {**_attrs(obj), "link": {
                            "path": obj.name, "error": "virtual or external storage: not uploaded"}},
                            [LINK_SPEC]))
                        warnings.append(f"{label}: virtual/external-storage dataset kept as a link only")
                    else:
                        items.append(_array_item(where, obj, max_bytes, total))

        visit(f, ())
    return items, warnings


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(()).item())
    return str(value)


def _specs(md: dict[str, Any]) -> list[str]:
    value = md.get("NX_class")
    if isinstance(value, list) and value:
        value = value[0]
    return [value] if isinstance(value, str) and value else []


def _placeholder(group: Any, name: str) -> Any:
    """The dataset ``name`` if it is a URI placeholder (see scatterbroker.clients.nexus), else None."""
    import h5py

    try:
        if not isinstance(group.get(name, getlink=True), h5py.HardLink):
            return None
        obj = group.get(name)
    except Exception:
        return None
    return _as_placeholder(obj)


def _as_placeholder(obj: Any) -> Any:
    import h5py

    if not isinstance(obj, h5py.Dataset) or obj.size != 0:
        return None
    uri = obj.attrs.get("uri")
    if uri is None or "shape" not in obj.attrs:
        return None
    return obj if _text(uri).startswith(("http://", "https://")) else None


def _external(dset: Any) -> bool:
    import h5py

    plist = dset.id.get_create_plist()
    return plist.get_layout() == h5py.h5d.VIRTUAL or plist.get_external_count() > 0


def _link_item(where: tuple[str, ...], ph: Any, *, file: str | None = None,
               path: str | None = None) -> _Item:
    from scatterbroker.adapters.nexus import _attrs

    link: dict[str, Any] = {}
    md: dict[str, Any] = {}
    if ph is not None:
        attrs = _attrs(ph)
        link["uri"] = attrs.pop("uri")
        link["shape"] = [int(n) for n in np.atleast_1d(ph.attrs["shape"])]
        link["dtype"] = _text(attrs.pop("dtype", ""))
        attrs.pop("shape", None)
        attrs.pop("field", None)
        file = file or attrs.pop("local_file", None)
        path = path or attrs.pop("local_path", None)
        attrs.pop("local_file", None)
        attrs.pop("local_path", None)
        md.update(attrs)
    if file:
        link["file"] = file
    if path:
        link["path"] = path
    md["link"] = link
    return _Item(where, "link", md, [LINK_SPEC])


def _array_item(where: tuple[str, ...], dset: Any, max_bytes: int, total: list[int]) -> _Item:
    import h5py

    from scatterbroker.adapters.nexus import _attrs, _jsonable

    label = "/".join(where)
    nbytes = int(dset.size) * max(dset.dtype.itemsize, 1)
    total[0] += nbytes
    if nbytes > max_bytes or total[0] > max_bytes:
        raise UploadTooLarge(
            f"{label}: {nbytes / 1e6:.1f} MB (upload so far {total[0] / 1e6:.1f} MB) is more than "
            f"{max_bytes / 1e6:.0f} MB. Uploads carry small data; keep large data on the "
            "server and link to it (scatterbroker wrap writes such links)")
    if h5py.check_string_dtype(dset.dtype) is not None:
        raw = dset.asstr(errors="replace")[()]
        data = np.array(raw.tolist() if isinstance(raw, np.ndarray) else raw, dtype=str)
    elif dset.dtype.kind in "biufc":
        data = np.asarray(dset[()])
    else:
        raise UploadRefused(f"{label}: HDF5 type {dset.dtype} cannot be uploaded as an array")
    md = _attrs(dset)
    if data.size <= VALUE_IN_METADATA and data.dtype.kind != "c":
        md["value"] = _jsonable(data)
    return _Item(where, "array", md, [], data)


# ------------------------------------------------------------------- upload


def upload(path: str | os.PathLike[str], target: str, *, node: str | None = None,
           api_key: str | None = None, max_bytes: int = MAX_UPLOAD_BYTES,
           progress: Callable[[int, int], None] | None = None) -> UploadReport:
    """Register the NeXus file ``path`` as the new node ``target``.

    Parameters
    ----------
    path
        A NeXus file, typically a wrapper customised with nexusformat.
    target
        The new node's global URI (``http://host/api/v1/metadata/<path>``), or
        the server URL when ``node`` gives the path.
    node
        Node path below ``target`` (e.g. ``users/ana/fit1``).
    api_key
        Needed to write; default ``$SCATTERBROKER_API_KEY``.

    Returns
    -------
    UploadReport
        The new node's URI and what was stored.

    Raises
    ------
    NodeExists, ReadOnlyLocation, UploadTooLarge, UploadRefused
        Before anything is written.
    """
    import httpx
    from tiled.client import from_uri
    from tiled.client.utils import ClientError
    from tiled.structures.core import Spec

    from scatterbroker.catalog.names import check_key
    from scatterbroker.clients.nexus import RemoteDataError, _probe, _why

    base, where = split_uri(target)
    if node:
        where = "/".join(p for p in [where, node.strip("/")] if p)
    parts = [p for p in where.split("/") if p]
    if not parts:
        raise UploadRefused("give the new node's path, e.g. .../api/v1/metadata/users/me/fit1")
    for part in parts:
        check_key(part)
    uri = node_uri(base, "/".join(parts))
    if parts[0] in RAW_PREFIXES:
        raise ReadOnlyLocation(
            f"{uri}: '{parts[0]}/' holds raw data, which is never written to; upload "
            "elsewhere (e.g. users/<you>/...)")
    items, warnings = plan(path, max_bytes=max_bytes)
    api_key = api_key or os.environ.get("SCATTERBROKER_API_KEY") or None
    _probe(f"{base}/api/v1/", api_key)
    try:
        root = from_uri(base, api_key=api_key, include_data_sources=True)
    except Exception as err:
        raise RemoteDataError(base, _why(err)) from None

    parent, missing = root, []
    for i, part in enumerate(parts[:-1]):
        if missing or part not in parent:
            missing.append(part)
            continue
        parent = parent[part]
        _check_writable(parent, node_uri(base, "/".join(parts[: i + 1])), uri)
    if not missing and parts[-1] in parent:
        raise NodeExists(f"{uri} exists already; uploads never overwrite: choose a new name")

    report = UploadReport(uri, warnings=warnings)
    created_at, created_key = parent, (missing or [parts[-1]])[0]
    try:
        for part in missing:
            parent = parent.create_container(key=part)
        nodes: dict[tuple[str, ...], Any] = {}
        for n, item in enumerate(items, start=1):
            holder = parent if not item.parts else nodes[item.parts[:-1]]
            key = parts[-1] if not item.parts else item.parts[-1]
            specs = [Spec(s) for s in item.specs]
            if item.kind == "group":
                nodes[item.parts] = holder.create_container(key=key, metadata=item.metadata, specs=specs)
                report.groups += 1
            elif item.kind == "array":
                holder.write_array(item.data, key=key, metadata=item.metadata, specs=specs)
                report.arrays += 1
                report.bytes += int(item.data.nbytes)
            else:
                holder.create_container(key=key, metadata=item.metadata, specs=specs)
                report.links += 1
            if progress:
                progress(n, len(items))
    except ClientError as err:
        _remove(created_at, created_key)
        if err.response.status_code == 409:
            raise NodeExists(f"{uri} exists already; uploads never overwrite") from None
        raise RemoteDataError(uri, _why(err)) from None
    except (httpx.HTTPError, OSError) as err:
        _remove(created_at, created_key)
        raise RemoteDataError(uri, _why(err)) from None
    except BaseException:
        _remove(created_at, created_key)
        raise
    return report


def _check_writable(node: Any, node_uri_: str, target: str) -> None:
    """Refuse a target below registered data: a file, a scan, anything with an
    externally managed data source, or anything that is not a container."""
    family = getattr(node.structure_family, "value", node.structure_family)
    if family != "container":
        raise ReadOnlyLocation(f"{target}: {node_uri_} is a {family}, not a container")
    try:
        sources = node.data_sources() or []
    except Exception:
        sources = []
    for source in sources:
        management = getattr(getattr(source, "management", None), "value",
                             getattr(source, "management", None))
        if management == "external" or getattr(source, "assets", None):
            raise ReadOnlyLocation(
                f"{target}: {node_uri_} is registered data ({getattr(source, 'mimetype', '')}); "
                "uploads never go into raw or registered files: upload elsewhere")


def _remove(parent: Any, key: str) -> None:
    try:
        if key in parent:
            parent.delete_contents(key, recursive=True, external_only=False)
    except Exception:
        pass
