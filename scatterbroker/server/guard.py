"""Server-side checks on what a client may put into the catalog.

Tiled 0.2.20 stores whatever a client with write scope sends: node keys such
as ``..``, ``a/b`` or NUL, and ``file://`` assets anywhere on the server's
file system (it only refuses them later, at read time, with an HTTP 500, and
its prefix check lets ``root/../elsewhere`` through). :func:`guard` makes a
catalog refuse such requests when they arrive, whatever client sent them:

* every node key must pass :func:`~scatterbroker.catalog.names.check_key`
  (HTTP 422);
* metadata must not contain a NUL character, in a key or a string value
  (HTTP 422): PostgreSQL's JSONB cannot store it (stock Tiled answers 500
  there, and SQLite would accept it, so a catalog could not move);
* every asset a client sends, whatever the data source's ``management``
  (Tiled keeps client-sent assets next to the ones it makes for writable
  data), must be a plain local URI: ``file:`` (or ``sqlite:``/``duckdb:``)
  with an absolute path, no other host, no ``;``/``?``/``#`` parts and no
  percent-escape (Tiled stores the path undecoded, other readers decode it,
  so ``%2E%2E`` or ``%2F`` would make the file checked differ from the file
  read). ``http:``, ``x-file:`` or a bare path are refused (HTTP 403);
* the asset must resolve, after symlinks and ``..``, inside the readable
  roots, and be a regular file or a directory, not a device or FIFO (HTTP
  403). A path that does not exist yet is accepted when its location is
  inside a root (a scan directory the detector has not filled);
* it must not lie in the server's writable storage (HTTP 403): any write
  key can put bytes of its choosing there (an awkward-array or Zarr write),
  which registered as, say, HDF5 would reach decoders as a data file. The
  writable storage stays readable for what the server wrote there itself.

Refusals name the node path the request addressed, never a server path.

It also clears storage a crash left behind. Tiled creates a new array's Zarr
directory (under the writable storage, at the node's path) before it commits
the node; a server killed in between (or a commit that fails) leaves a
directory no node owns, and every later attempt to create a node at that path
answered HTTP 500 ("An array exists in store"), so a job re-run to the same
output could never write its product. When creating a node fails that way --
after Tiled has checked that no node holds the path -- the directory is an
orphan: it is moved aside to ``<name>.orphaned-<UTC time>`` (kept, for the
operator to inspect or delete) and the node is created once more.

It also works around one Tiled 0.2.20 bug that turns a valid request into an
HTTP 500: an empty selection (``slice=0:0``) of a 2-D or larger array as
``application/octet-stream`` (its serializer catches ``ValueError`` but
``memoryview.cast`` raises ``TypeError`` for a zero in the shape).

It wraps ``create_node``, ``put_data_source`` and ``replace_metadata`` of
Tiled's catalog node class
once per process; the checks apply only to catalogs passed to :func:`guard`,
so other Tiled catalogs in the same process are untouched.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from scatterbroker.adapters.roots import Roots, confine, is_inside, normalize_roots, shown
from scatterbroker.errors import BrokenLink, InvalidMetadata, OutsideRoots, RefusedAsset, ScatterbrokerError
from scatterbroker.catalog.names import check_key
from scatterbroker.server import tiled_compat

_ATTRIBUTE = "_scatterbroker_roots"
_WRITABLE = "_scatterbroker_writable"
_PATH_SCHEMES = {"file", "sqlite", "duckdb"}
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def check_asset(data_uri: str, roots: Roots, writable: Roots = (), node: str = "") -> None:
    """Raise unless ``data_uri`` is a plain local file URI inside ``roots`` and outside
    ``writable``.

    ``node`` is the catalog path the request addressed; refusals name it (and
    the file by its last component only), so the answer shows no server path.

    Raises
    ------
    RefusedAsset
        Not a local ``file:``/``sqlite:``/``duckdb:`` URI with an absolute,
        undecoded path; or inside the writable storage.
    OutsideRoots
        Resolves outside the roots, or to a device, FIFO or socket (or a
        hard-linked file, where the operator refuses those).
    """
    from tiled.utils import path_from_uri

    where = f"node {node or '/'!r}: "
    if not isinstance(data_uri, str) or "\x00" in data_uri:
        raise RefusedAsset(f"{where}an asset URI must be text without NUL characters")
    parsed = urlparse(data_uri)
    if parsed.scheme not in _PATH_SCHEMES:
        what = f"scheme {parsed.scheme + ':'!r}" if parsed.scheme else "a bare path"
        raise RefusedAsset(f"{where}asset URI has {what}; only file: URIs of files inside "
                           "the readable roots can be registered")
    if parsed.netloc not in ("", "localhost"):
        raise RefusedAsset(f"{where}asset URI names host {parsed.netloc!r}; only this "
                           "server's own files (file://localhost/...) can be registered")
    if parsed.params or parsed.query or parsed.fragment:
        raise RefusedAsset(f"{where}asset URI has a ';', '?' or '#' part, which readers "
                           "would not take as part of the path")
    if _PERCENT_ESCAPE.search(parsed.path):
        raise RefusedAsset(f"{where}asset URI path contains a percent-escape "
                           f"({_PERCENT_ESCAPE.search(parsed.path).group(0)}); the server stores "
                           "paths as written, so it could read another file than the one checked")
    path = path_from_uri(data_uri)
    if not path.is_absolute():
        raise RefusedAsset(f"{where}asset URI path {str(path)!r} is relative; give an absolute path")
    try:
        resolved = confine(path, roots, what="asset")
    except BrokenLink:
        # Missing (not yet written) or a symlink loop: accept only if its
        # location is inside a root; reading it later is confined again.
        resolved = Path(os.path.realpath(path))
        if not is_inside(resolved, roots):
            raise OutsideRoots(
                f"{where}asset {shown(str(path))!r} leads outside the readable roots") from None
    except ScatterbrokerError as err:
        raise type(err)(where + str(err)) from None
    if is_inside(resolved, writable):
        raise RefusedAsset(
            f"{where}asset {shown(str(path))!r} lies in the server's writable storage, "
            "which holds bytes any write key can upload: it cannot be registered as data files")


def check_data_sources(data_sources: Any, roots: Roots, writable: Roots = (), node: str = "") -> None:
    """:func:`check_asset` for every asset of every data source a client sent.

    All managements are checked, not only ``external``: Tiled keeps the assets a
    client sends with a writable data source and adds its own after them."""
    for data_source in data_sources or []:
        assets = getattr(data_source, "assets", None) or []
        if assets and _management(data_source) != "external":
            # Tiled deletes the files of a non-external data source with its node
            # (or DELETE /asset ... external_only=false): a client naming files must
            # not make them the server's to delete.
            raise RefusedAsset(
                f"node {node or '/'!r}: a data source that names files must be managed "
                "'external'; the server deletes the files of other data sources with them")
        for asset in assets:
            check_asset(asset.data_uri, roots, writable, node)


def _management(data_source: Any) -> str:
    """A data source's ``management`` as text (an enum on Tiled's models and its ORM rows)."""
    value = getattr(data_source, "management", None) or "external"
    return str(getattr(value, "value", value))


def _has_assets(data_sources: Any) -> bool:
    return any(getattr(ds, "assets", None) for ds in data_sources or [])


def writable_directories(catalog: Any) -> Roots:
    """The real paths of ``catalog``'s file-based writable storage (Tiled's ``FileStorage``)."""
    storage = getattr(getattr(catalog, "context", None), "writable_storage", None) or {}
    return normalize_roots(s.path for s in storage.values()
                           if urlparse(getattr(s, "uri", "")).scheme == "file")


def check_metadata(metadata: Any) -> None:
    """Raise InvalidMetadata if a key or string anywhere in ``metadata`` holds a NUL."""
    stack, where = [(metadata, "")], ""
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidMetadata(f"metadata value at {where or '/'!r} contains a NUL character")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and "\x00" in k:
                    raise InvalidMetadata(f"metadata key {k!r} contains a NUL character")
                stack.append((v, f"{where}/{k}"))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}/{i}") for i, v in enumerate(value))


def guard(catalog: Any, roots: Roots) -> Any:
    """Make ``catalog`` (from ``tiled.catalog.from_uri``) check keys and assets.

    Assets must lie inside ``roots`` and outside the catalog's own file-based
    writable storage (taken from the catalog, so it always matches the config)."""
    _install()
    setattr(catalog.context, _ATTRIBUTE, tuple(roots))
    setattr(catalog.context, _WRITABLE, writable_directories(catalog))
    return catalog


def _as_buffer(mimetype: str, array: Any, metadata: Any) -> Any:
    """Tiled's octet-stream array serializer, also for arrays with a 0 in their shape."""
    import numpy

    array = numpy.ascontiguousarray(array)
    if array.size == 0:
        return b""
    try:
        return memoryview(array).cast("B")
    except (ValueError, TypeError):
        return array.tobytes()


def _storage_exists(err: BaseException) -> bool:
    """Tiled's storage initialisation found something at the new node's location."""
    return isinstance(err, FileExistsError) or type(err).__name__ in ("ContainsArrayError", "ContainsGroupError")


async def _move_orphan(node: Any, key: str) -> bool:
    """Move aside what occupies the writable-storage location of ``node``'s new child
    ``key`` (Tiled's ``init_storage`` path: the storage URI, then the quoted path
    segments); True if something was moved. Called only after Tiled has found no
    node at that path, so nothing in the catalog refers to it."""
    import datetime
    import logging
    from urllib.parse import quote_plus, urljoin

    from tiled.utils import path_from_uri

    child = [*await node.path_segments(), key]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    moved = False
    for storage in node.context.writable_storage.values():
        uri = getattr(storage, "uri", "")
        if urlparse(uri).scheme != "file":
            continue
        where = path_from_uri(urljoin(uri + "/", "/".join(quote_plus(s) for s in child)))
        if where.is_dir() and not where.is_symlink():
            aside = where.with_name(f"{where.name}.orphaned-{stamp}")
            os.rename(where, aside)
            logging.getLogger("scatterbroker.catalog").warning(
                "storage at %s belonged to no node (left by a crash during a write?): moved to %s",
                where, aside)
            moved = True
    return moved


@functools.lru_cache(maxsize=1)
def _install() -> None:
    # through the seam (scatterbroker/server/tiled_compat.py): the guard refuses to start on a
    # Tiled whose catalog writes differ from those it wraps; the serializer falls back to Tiled's
    tiled_compat.install("empty-array-serializer", _register_serializer)
    tiled_compat.install("registration-guard", _wrap_writes)


def _register_serializer() -> None:
    from tiled.media_type_registration import default_serialization_registry

    default_serialization_registry.register("array", "application/octet-stream", _as_buffer)


def _wrap_writes() -> None:
    from tiled.catalog.adapter import CatalogNodeAdapter

    create_node = CatalogNodeAdapter.create_node
    put_data_source = CatalogNodeAdapter.put_data_source

    @functools.wraps(create_node)
    async def guarded_create_node(self, structure_family, metadata, key=None, specs=None,
                                  data_sources=None, *args, **kwargs):
        roots = getattr(self.context, _ATTRIBUTE, None)
        if roots is not None:
            if key is not None:
                check_key(key)
            check_metadata(metadata)
            if _has_assets(data_sources):
                node = "/".join([*await self.path_segments(), key or "<new node>"])
                check_data_sources(data_sources, roots, getattr(self.context, _WRITABLE, ()), node)
        try:
            return await create_node(self, structure_family, metadata, key, specs,
                                     data_sources, *args, **kwargs)
        except Exception as err:
            if key is None or not _storage_exists(err) or not await _move_orphan(self, key):
                raise
        return await create_node(self, structure_family, metadata, key, specs,
                                 data_sources, *args, **kwargs)

    @functools.wraps(put_data_source)
    async def guarded_put_data_source(self, data_source, *args, **kwargs):
        roots = getattr(self.context, _ATTRIBUTE, None)
        if roots is not None:
            node = "/".join(await self.path_segments())
            before = {ds.id: _management(ds) for ds in getattr(self.node, "data_sources", None) or []}
            if data_source.id in before and before[data_source.id] != _management(data_source):
                # external -> writable would make Tiled delete registered (raw) files
                raise RefusedAsset(f"node {node or '/'!r}: a data source's management cannot "
                                   f"be changed (it is {before[data_source.id]!r})")
            if _has_assets([data_source]):
                check_data_sources([data_source], roots, getattr(self.context, _WRITABLE, ()), node)
        return await put_data_source(self, data_source, *args, **kwargs)

    replace_metadata = CatalogNodeAdapter.replace_metadata

    @functools.wraps(replace_metadata)
    async def guarded_replace_metadata(self, metadata=None, *args, **kwargs):
        if getattr(self.context, _ATTRIBUTE, None) is not None:
            check_metadata(metadata)
        return await replace_metadata(self, metadata, *args, **kwargs)

    CatalogNodeAdapter.replace_metadata = guarded_replace_metadata
    CatalogNodeAdapter.create_node = guarded_create_node
    CatalogNodeAdapter.put_data_source = guarded_put_data_source
