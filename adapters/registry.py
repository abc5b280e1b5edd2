"""Adapter plug-ins: discovered from the ``scatterbroker.adapters`` entry-point group.

A package declares ``<format-name> = "pkg.module:AdapterClass"`` in that
group. The class is a Tiled adapter (``from_uris``, ``from_catalog``,
``structure()``, ``metadata()``, ``specs``) that declares what it reads:

``mimetype``
    e.g. ``"image/x-cbf"``; ``aliases`` (optional) lists further mimetypes it
    serves (our NeXus adapter also serves Tiled's ``application/x-hdf5``);

``extensions``
    file-name endings it reads, e.g. ``(".cbf",)``;
``sniff(path) -> bool``
    a classmethod that checks magic bytes, used when the extension is ambiguous;
``readable_roots``
    a class attribute (``None`` by default); the server binds the configured
    readable roots into it, so an adapter that follows links can confine them.

A sequence of numbered files of one format is served by the adapter
registered for ``multipart/related;type=<mimetype>``, if there is one.

Our own CBF, TIFF and NeXus adapters are registered the same way, in
``pyproject.toml``. A plug-in that fails to import is skipped with a warning;
it never stops the server.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import UnknownFormat
from .roots import Roots

GROUP = "scatterbroker.adapters"
SEQUENCE_PREFIX = "multipart/related;type="


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, type]:
    found: dict[str, type] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        try:
            cls = ep.load()
            mimetypes = (cls.mimetype, *getattr(cls, "aliases", ()))
        except Exception as err:  # a broken plug-in must not break the host
            warnings.warn(
                f"Adapter {ep.name!r} ({ep.value}) failed to load: {err}", stacklevel=2
            )
            continue
        for mimetype in mimetypes:
            if mimetype in found:
                kept = found[mimetype]
                warnings.warn(
                    f"Two adapters claim {mimetype!r}; keeping "
                    f"{kept.__module__}.{kept.__qualname__}, ignoring {ep.value}",
                    stacklevel=2,
                )
                continue
            found[mimetype] = cls
    return found


def adapters_by_mimetype() -> Mapping[str, type]:
    """All installed adapters, keyed by mimetype (read-only view)."""
    return types.MappingProxyType(_load())


def refresh() -> None:
    """Forget the cached entry points (after installing a plug-in in-process)."""
    _load.cache_clear()


def sequence_mimetype(mimetype: str) -> str | None:
    """The mimetype serving numbered files of ``mimetype`` as one stack, if installed."""
    seq = SEQUENCE_PREFIX + mimetype
    return seq if seq in _load() else None


def mimetype_for(path: str | os.PathLike[str]) -> str:
    """Choose the mimetype for a file by extension, then by ``sniff`` where offered.

    Raises
    ------
    UnknownFormat
        No installed adapter claims the file; the message lists what is installed.
    """
    path = Path(path)
    name = path.name.lower()
    candidates = [
        (mt, cls)
        for mt, cls in _load().items()
        if not mt.startswith(SEQUENCE_PREFIX)
        and any(name.endswith(ext) for ext in getattr(cls, "extensions", ()))
    ]
    for mt, cls in candidates:
        sniff = getattr(cls, "sniff", None)
        if sniff is None or sniff(path):
            return mt
    known = sorted(
        {ext for cls in _load().values() for ext in getattr(cls, "extensions", ())}
    )
    if candidates and path.stat().st_size == 0:
        raise UnknownFormat(f"{path.name}: empty file (0 bytes)")
    if candidates:
        raise UnknownFormat(
            f"{path.name}: its content does not match its extension "
            f"(tried {', '.join(mt for mt, _ in candidates)})"
        )
    raise UnknownFormat(
        f"{path.name}: no installed adapter reads this file type "
        f"(installed: {', '.join(known)}); see docs/adapters.md to add one"
    )


def bind_roots(adapters: Mapping[str, type], roots: Roots) -> dict[str, type]:
    """Give every adapter that declares ``readable_roots`` the server's roots.

    Returns a new mapping of subclasses; the classes themselves are untouched,
    so a test or a second server in the same process can bind other roots.
    """
    bound: dict[str, type] = {}
    cache: dict[type, type] = {}
    for mt, cls in adapters.items():
        if hasattr(cls, "readable_roots"):
            if cls not in cache:
                cache[cls] = type(cls.__name__, (cls,), {"readable_roots": roots})
            bound[mt] = cache[cls]
        else:
            bound[mt] = cls
    return bound


def extensions() -> Iterable[str]:
    """Every file-name ending some installed adapter reads."""
    return sorted({e for c in _load().values() for e in getattr(c, "extensions", ())})
