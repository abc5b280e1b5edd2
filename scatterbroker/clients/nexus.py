"""NeXus trees whose large fields read through global URIs (DESIGN.md §1, §3).

Three things live here, all on the scientist's side of the wire:

* :func:`nxload` opens a NeXus file *or* a catalog node. For a file it is
  ``nexusformat.nexus.nxload`` plus one step: every large field the wrapper
  describes by its global URI becomes a :class:`RemoteField`, which reads
  through the facility-local HDF5 external link when that link resolves and
  slices lazily over HTTP through the Tiled client when it does not. For a
  node URI (``http://host/api/v1/metadata/<path>``) it builds the whole remote
  tree (every group, attribute and small field) with each large field lazy.
* :func:`wrap` writes a *portable wrapper*: the node's full metadata tree, small
  fields inline, and for each large field both the facility-local external
  link and a placeholder carrying the field's global URI.
* :class:`RemoteField`, the lazy field itself: a ``nexusformat`` ``NXfield``
  (so ``sum()``, ``np.asarray``, ``NXdata.nxsignal``, slicing and NeXpy work)
  whose data never lands in a file: saving a tree that holds one writes the
  placeholder again, never the data.

Wrapper layout
--------------
For a large field ``entry/data/data`` of a NeXus file node::

    entry/data/data        HDF5 external link -> <scan file>:/entry/data/data
    entry/data/data_uri    placeholder: empty dataset of the field's dtype,
                           attributes uri, shape, dtype, units (if any), field="data"
                           and the field's other attributes (long_name, ...)

Plain h5py/nexusformat/NeXpy at the facility read ``data`` through the link,
as with any wrapper; elsewhere the link is broken and ``data_uri`` says where
the data is. A large field with no HDF5 file behind it (frames of CBF files,
arrays uploaded to the catalog) has only the placeholder, under its own name.
So does a :class:`RemoteField` saved by nexusformat (``root.save(...)``); it
then records the local link as ``local_file``/``local_path`` attributes.

Large means more than :data:`INLINE_BYTES` bytes, or two or more dimensions
with more than :data:`INLINE_ELEMENTS` elements.

Examples
--------
>>> from scatterbroker.clients.nexus import nxload, wrap                           # doctest: +SKIP
>>> wrap("http://host:8000/api/v1/metadata/scans/s1/scan1", "scan1.nxs")    # doctest: +SKIP
>>> root = nxload("scan1.nxs")  # copied anywhere: data over HTTP  # doctest: +SKIP
>>> root.entry.data.data[3, 10:20, 10:20].nxdata.sum()                      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import numpy as np
from nexusformat.nexus import tree as _nx
from nexusformat.nexus.tree import NeXusError, NXfield, NXgroup, NXlink, NXroot

from scatterbroker.reduction.nexus_file import new_nexus_file

__all__ = [
    "nxload", "load_remote", "wrap", "WrapReport", "RemoteField", "RemoteDataError",
    "set_api_key", "is_large", "split_uri", "INLINE_BYTES", "INLINE_ELEMENTS",
    "PLACEHOLDER_SUFFIX", "LINK_SPEC", "attach_remote_fields", "node_uri",
]

#: fields larger than this many bytes are linked, not copied (wrap, nxload(URI))
INLINE_BYTES = int(os.getenv("SCATTERBROKER_INLINE_BYTES") or 1 << 20)
#: fields of ndim >= 2 with more than this many elements are linked, not copied
INLINE_ELEMENTS = int(os.getenv("SCATTERBROKER_INLINE_ELEMENTS") or 1000)
#: seconds to wait for a server's first answer about a URI
PROBE_TIMEOUT = float(os.getenv("SCATTERBROKER_PROBE_TIMEOUT") or 10)
#: whole-field reads up to this many bytes are kept in memory (per field)
CACHE_BYTES = int(os.getenv("SCATTERBROKER_FIELD_CACHE_BYTES") or 64 << 20)
#: most nodes a remote tree may have (load_remote, wrap): open a smaller node
MAX_NODES = int(os.getenv("SCATTERBROKER_MAX_NODES") or 20000)
#: a placeholder for field ``X`` beside an external link ``X`` is called ``X`` + this
PLACEHOLDER_SUFFIX = "_uri"
#: spec of a catalog node that stands for a field elsewhere (metadata ``link``:
#: uri, shape, dtype, and the facility-local file/path), e.g. in an uploaded wrapper
LINK_SPEC = "sb-link"
#: attributes describing a placeholder, not the field itself
_PLACEHOLDER_ATTRS = ("uri", "shape", "dtype", "field", "local_file", "local_path")
#: metadata keys our NeXus adapter adds to a field's attributes
_FIELD_EXTRAS = ("value", "error", "error_type")
_METADATA = "/api/v1/metadata/"


class RemoteDataError(NeXusError):
    """A field's data could not be read from its global URI.

    ``str(err)`` names the URI and says why (server unreachable, node removed,
    access refused); ``err.uri`` is the URI.
    """

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = uri, reason
        super().__init__(f"{uri}: {reason}")


# ----------------------------------------------------------------- URIs and keys

_api_keys: dict[str, str] = {}
_clients: dict[tuple[str, str | None], Any] = {}
_lock = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """``(server base URL, node path)`` of a global URI; the path may be ``""``.

    Accepts ``…/api/v1/metadata/<path>``, ``…/api/v1`` and a bare server URL.
    A query string (``?api_key=…``) is dropped.

    Examples
    --------
    >>> split_uri("http://h:8000/api/v1/metadata/scans/s1/scan1")
    ('http://h:8000', 'scans/s1/scan1')
    """
    parts = urlsplit(uri)
    path = parts.path
    if _METADATA.rstrip("/") in path:
        prefix, _, node = path.partition(_METADATA.rstrip("/"))
        node = node.strip("/")
    else:
        prefix, node = path.split("/api/", 1)[0] if "/api/" in path else path.rstrip("/"), ""
    base = urlunsplit((parts.scheme, parts.netloc, prefix.rstrip("/"), "", ""))
    return base, unquote(node)


def node_uri(base: str, path: str) -> str:
    """The global URI of node ``path`` on the server at ``base``."""
    path = "/".join(quote(p, safe="") for p in path.split("/") if p)
    return f"{base.rstrip('/')}{_METADATA}{path}"


def _redacted(uri: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def set_api_key(url: str, api_key: str | None) -> None:
    """Use ``api_key`` for every field whose URI is on the server at ``url``.

    Fields loaded with an explicit ``api_key`` use that; the rest use this
    registry, then ``$SCATTERBROKER_API_KEY``, then ``$TILED_API_KEY``.
    """
    base = split_uri(url)[0]
    with _lock:
        if api_key:
            _api_keys[base] = api_key
        else:
            _api_keys.pop(base, None)
        for key in [k for k in _clients if split_uri(k[0])[0] == base]:
            del _clients[key]


def _key_for(uri: str, api_key: str | None) -> str | None:
    if api_key:
        return api_key
    from urllib.parse import parse_qs

    in_query = parse_qs(urlsplit(uri).query).get("api_key")  # Tiled's ?api_key=... form
    if in_query:
        return in_query[0]
    with _lock:
        key = _api_keys.get(split_uri(uri)[0])
    return key or os.environ.get("SCATTERBROKER_API_KEY") or os.environ.get("TILED_API_KEY") or None


def _why(err: BaseException) -> str:
    """One line on why talking to the server failed."""
    import httpx

    response = getattr(err, "response", None)
    if isinstance(err, (httpx.ConnectError, ConnectionError, httpx.ConnectTimeout)):
        return f"the server is not reachable ({err}); is it running, and is the URL right?"
    if isinstance(err, (httpx.TimeoutException, TimeoutError)):
        return f"the server did not answer in time ({err})"
    if response is not None:
        status = response.status_code
        try:
            detail = response.json().get("detail", response.text)
        except Exception:
            detail = getattr(response, "text", "")
        if status == 404:
            return f"no such node on the server: it was removed or renamed ({detail})"
        if status == 401:
            return ("the server wants an API key (HTTP 401): give api_key=..., "
                    "set_api_key(url, key) or $SCATTERBROKER_API_KEY")
        if status == 403:
            return f"the server refused access (HTTP 403: {detail})"
        return f"the server answered {status}: {detail}"
    if isinstance(err, (httpx.TransportError, OSError)):
        return f"the server is not reachable ({err}); is it running, and is the URL right?"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _probe(uri: str, api_key: str | None) -> None:
    """One quick request so that a dead server or a removed node fails at once and
    clearly (the Tiled client would retry for up to a minute)."""
    import httpx

    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    try:
        response = httpx.get(_redacted(uri), headers=headers, timeout=PROBE_TIMEOUT)
        response.raise_for_status()
    except Exception as err:
        raise RemoteDataError(_redacted(uri), _why(err)) from None


def _connect(uri: str, api_key: str | None = None, *, include_data_sources: bool = False,
             cache: bool = True) -> Any:
    """A Tiled client for the node at ``uri`` (probed first, then cached)."""
    from tiled.client import from_uri

    key = _key_for(uri, api_key)
    cache_key = (_redacted(uri), key, include_data_sources)
    with _lock:
        hit = _clients.get(cache_key) if cache else None
    if hit is not None:
        return hit
    _probe(uri, key)
    try:
        client = from_uri(_redacted(uri), api_key=key, include_data_sources=include_data_sources)
    except Exception as err:
        raise RemoteDataError(_redacted(uri), _why(err)) from None
    if cache:
        with _lock:
            _clients[cache_key] = client
    return client


def _forget(uri: str) -> None:
    with _lock:
        for key in [k for k in _clients if k[0] == _redacted(uri)]:
            del _clients[key]


def is_large(shape: tuple[int, ...], dtype: Any) -> bool:
    """True if a field of this shape and dtype is linked rather than copied."""
    size = math.prod(shape) if shape else 1
    try:
        nbytes = size * np.dtype(dtype).itemsize
    except TypeError:
        nbytes = size * 8
    return nbytes > INLINE_BYTES or (len(shape) >= 2 and size > INLINE_ELEMENTS)


# ------------------------------------------------------------------ RemoteField


def _basic_index(idx: Any, shape: tuple[int, ...]) -> tuple[tuple, tuple, bool]:
    """Split a numpy index into one Tiled/h5py can do (ints and positive-step
    slices) and a post-selection (axis reversals); ``fancy`` if it cannot."""
    sel = idx if isinstance(idx, tuple) else (idx,)
    if any(s is None or isinstance(s, (list, np.ndarray)) for s in sel):
        return (), (), True
    if any(s is Ellipsis for s in sel):
        i = next(k for k, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:i] + (slice(None),) * (len(shape) - len(sel) + 1) + sel[i + 1:]
    if len(sel) > len(shape):
        raise IndexError(f"too many indices ({len(sel)}) for shape {shape}")
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    out, post = [], []
    for s, n in zip(sel, shape, strict=True):
        if isinstance(s, (int, np.integer)):
            i = int(s) + n if s < 0 else int(s)
            if not 0 <= i < n:
                raise IndexError(f"index {s} is out of bounds for axis with size {n}")
            out.append(i)
        elif isinstance(s, slice):
            r = range(*s.indices(n))
            if not r:
                out.append(slice(0, 0))
                post.append(slice(None))
            elif r.step > 0:
                out.append(slice(r.start, r[-1] + 1, r.step))
                post.append(slice(None))
            else:
                out.append(slice(r[-1], r[0] + 1, -r.step))
                post.append(slice(None, None, -1))
        else:
            return (), (), True
    return tuple(out), tuple(post), False


def _has_float(idx: Any) -> bool:
    """True if ``idx`` holds a float (or a slice with float bounds)."""
    for item in idx if isinstance(idx, tuple) else (idx,):
        bounds = (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)
        if any(isinstance(b, (float, np.floating)) for b in bounds):
            return True
    return False


class RemoteField(NXfield):
    """A NeXus field whose data live behind a global URI (and maybe a local link).

    Reads go to the facility-local copy when ``local`` names an HDF5 file and
    dataset that exist here with the same shape and dtype, else over HTTP to
    ``uri`` through the Tiled client, only the slice asked for. The field is
    read-only; saving a tree that holds it writes its placeholder (attributes
    ``uri``, ``shape``, ``dtype``, ``local_file``, ``local_path``), not its data.

    Parameters
    ----------
    uri
        Global URI of the field's catalog node (``…/api/v1/metadata/<path>``).
    shape, dtype
        Of the whole field.
    name, attrs
        As for ``NXfield``; ``attrs`` are the field's own attributes (units, ...).
    local
        ``(file, path inside it)`` of a local copy to prefer, or None.
    api_key
        For the server; default: :func:`set_api_key`, ``$SCATTERBROKER_API_KEY``.

    Examples
    --------
    >>> f = RemoteField("http://h:8000/api/v1/metadata/scans/s1/scan1/entry/data/data",
    ...                 shape=(12, 24, 32), dtype="int32")
    >>> f.shape, f.uri
    ((12, 24, 32), 'http://h:8000/api/v1/metadata/scans/s1/scan1/entry/data/data')
    """

    def __init__(self, uri: str | None = None, shape: Any = None, dtype: Any = None,
                 name: str = "unknown", attrs: Mapping[str, Any] | None = None, *,
                 local: tuple[str, str] | None = None, api_key: str | None = None,
                 **kwargs: Any) -> None:
        attrs = {k: v for k, v in dict(attrs or {}).items() if k not in _PLACEHOLDER_ATTRS[1:]}
        super().__init__(name=name, shape=shape, dtype=dtype, attrs=attrs, **kwargs)
        self._uri = uri
        self._local = (str(local[0]), str(local[1])) if local else None
        self._api_key = api_key
        self._cache: np.ndarray | None = None
        self._placeholder: Any = None
        self._local_ok: tuple | None = None
        self._last_source: str | None = None
        if uri:
            self._attrs["uri"] = uri

    # -- identity

    @property
    def uri(self) -> str | None:
        """The field's global URI."""
        return self._uri

    @property
    def last_source(self) -> str | None:
        """Where the last read came from: ``"local"``, ``"remote"`` or None (no read yet)."""
        return self._last_source

    @property
    def local_path(self) -> str | None:
        """The local HDF5 file the field reads from, or None (reads over HTTP)."""
        return self._local[0] if self._usable_local() else None

    def __repr__(self) -> str:
        return f"RemoteField(shape={self.shape}, dtype={self.dtype}, uri={self._uri!r})"

    # -- nexusformat hooks

    @property
    def nxfilemode(self) -> None:  # type: ignore[override]
        # Never the file's mode: nexusformat would otherwise write attribute
        # changes through to the path, i.e. into the external link's target.
        return None

    @property
    def _memfile(self) -> Any:  # what nexusformat copies when it saves the field
        if getattr(self, "_uri", None) is None and getattr(self, "_local", None) is None:
            return None
        if self._placeholder is None:
            import h5py

            f = h5py.File(f"sb-placeholder-{id(self)}", "w", driver="core", backing_store=False)
            _create_placeholder(f, "data", self.shape, self.dtype, {})
            if self._local is not None:
                f["data"].attrs["local_file"] = self._local[0]
                f["data"].attrs["local_path"] = self._local[1]
            self._placeholder = f
        return self._placeholder

    @_memfile.setter
    def _memfile(self, value: Any) -> None:
        pass  # nexusformat resets it after copying; the placeholder stays valid

    @property
    def nxdata(self) -> Any:  # type: ignore[override]
        """The whole field (read once, then kept if not larger than CACHE_BYTES)."""
        if self._cache is not None:
            return self._cache
        nbytes = (math.prod(self.shape) if self.shape else 1) * np.dtype(self.dtype).itemsize
        if nbytes > _nx.NX_CONFIG["memory"] * 1000 * 1000:
            raise NeXusError(
                f"{self.nxname} is {nbytes / 1e6:.0f} MB, more than NX_MEMORY="
                f"{_nx.NX_CONFIG['memory']} MB: read slices, e.g. field[0]")
        value = self._read(())
        if nbytes <= CACHE_BYTES:
            self._cache = value
        return value

    @nxdata.setter
    def nxdata(self, value: Any) -> None:
        raise NeXusError(f"{self.nxname} reads from {self._uri}: it is read-only")

    def __setitem__(self, idx: Any, value: Any) -> None:
        raise NeXusError(f"{self.nxname} reads from {self._uri}: it is read-only")

    def __getitem__(self, idx: Any) -> Any:
        if idx is None or idx is Ellipsis:
            return self
        if _has_float(idx):  # nexusformat's value-based slicing of 1-D axes
            idx = _nx.convert_index(idx, self)
        return NXfield(self._read(idx), name=self.nxname, attrs=self.safe_attrs)

    def __deepcopy__(self, memo: dict = {}) -> RemoteField:  # noqa: B006 (nexusformat's signature)
        copy = super().__deepcopy__(memo)
        copy._uri, copy._local, copy._api_key = self._uri, self._local, self._api_key
        copy._uncopied_data = None  # never copy bytes from behind the link
        return copy

    def exists(self) -> bool:
        return True

    # -- reading

    def _usable_local(self) -> bool:
        """True if the local copy exists here with the field's shape and dtype."""
        if self._local is None:
            return False
        file, path = self._local
        try:
            stamp = os.stat(file).st_mtime_ns
        except OSError:
            return False
        if self._local_ok is not None and self._local_ok[0] == stamp:
            return self._local_ok[1]
        ok = False
        try:
            import h5py
            import hdf5plugin  # noqa: F401  (Bitshuffle-LZ4 scan files)

            with h5py.File(file, "r") as f:
                dset = f.get(path)
                ok = (isinstance(dset, h5py.Dataset) and tuple(dset.shape) == tuple(self.shape)
                      and (dset.dtype == self.dtype or dset.dtype.kind in "SOU"))
        except Exception:
            ok = False
        self._local_ok = (stamp, ok)
        return ok

    def _read(self, idx: Any) -> np.ndarray:
        if self._usable_local():
            try:
                import h5py

                with h5py.File(self._local[0], "r") as f:
                    dset = f[self._local[1]]
                    value = dset.asstr()[idx] if dset.dtype.kind == "O" else dset[idx]
                self._last_source = "local"
                return np.asarray(value)
            except Exception:
                self._local_ok = None  # fall back to the URI
        if not self._uri:
            raise NeXusError(f"{self.nxname}: no global URI, and the local link "
                             f"{self._local} does not resolve here")
        return self._read_remote(idx)

    def _read_remote(self, idx: Any) -> np.ndarray:
        client = _connect(self._uri, self._api_key)
        shape = tuple(self.shape)
        try:
            if idx == () or idx == Ellipsis:
                value = np.asarray(client.read())
            else:
                sel, post, fancy = _basic_index(idx, shape)
                if fancy:
                    value = np.asarray(client.read())[idx]
                else:
                    value = np.asarray(client[sel] if sel else client.read())
                    if any(p != slice(None) for p in post):
                        value = value[post]
        except (IndexError, NeXusError):
            raise
        except Exception as err:
            _forget(self._uri)
            raise RemoteDataError(self._uri, _why(err)) from None
        self._last_source = "remote"
        if value.dtype != self.dtype and self.dtype is not None and self.dtype.kind not in "SOU":
            value = value.astype(self.dtype, copy=False)
        return value


def _create_placeholder(group: Any, name: str, shape: tuple, dtype: Any,
                        attrs: Mapping[str, Any]) -> Any:
    """An empty dataset standing for a field: attributes shape, dtype, + ``attrs``."""
    import h5py

    dtype = np.dtype(dtype) if dtype is not None else np.dtype("f8")
    stored = h5py.string_dtype() if dtype.kind in "SUO" else dtype
    dset = group.create_dataset(name, shape=(0,), dtype=stored)
    for key, value in attrs.items():
        _set_attr(dset, key, value)
    dset.attrs["shape"] = np.asarray(shape, dtype=np.int64)
    dset.attrs["dtype"] = dtype.str
    return dset


def _set_attr(obj: Any, key: str, value: Any) -> None:
    """Store a JSON-ish value as an HDF5 attribute; values HDF5 cannot hold are skipped."""
    import h5py

    value = _attr_value(value)
    if value is None:
        return
    try:
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            obj.attrs.create(key, value, dtype=h5py.string_dtype())
        else:
            obj.attrs[key] = value
    except (TypeError, ValueError):
        pass


def _attr_value(value: Any) -> Any:
    """A metadata value as something an attribute can hold, or None."""
    if isinstance(value, (str, bool, int, float, np.generic, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)) and value:
        flat = list(value)
        if all(isinstance(v, str) for v in flat) or all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            return flat
        if all(isinstance(v, bool) for v in flat):
            return flat
    return None


# ----------------------------------------------------------- nxload (files)


def nxload(source: str | os.PathLike[str], mode: str = "r", *, api_key: str | None = None,
           local: bool = True, **kwargs: Any) -> Any:
    """Open a NeXus file or a catalog node as a nexusformat tree with lazy fields.

    Parameters
    ----------
    source
        A NeXus file (wrapper or any other), or a node's global URI
        ``http(s)://host/api/v1/metadata/<path>``.
    mode
        File mode for ``nexusformat`` (``"r"`` or ``"rw"``); URIs are read-only.
    api_key
        For the server(s) behind the URIs; default :func:`set_api_key`, then
        ``$SCATTERBROKER_API_KEY``.
    local
        For a URI: let large fields read the server's file directly when it is
        reachable here (same file system, e.g. at the facility).

    Returns
    -------
    NXroot
        For a file or a container node; ``NXfield`` for an array node.

    Raises
    ------
    RemoteDataError
        A URI whose server is down, whose node is gone, or that needs a key
        (for a file: only when a remote field is read, never on opening).

    Examples
    --------
    >>> root = nxload("copied_wrapper.nxs")                                  # doctest: +SKIP
    >>> root.entry.data.data[0].nxdata.shape                                 # doctest: +SKIP
    (1679, 1475)
    """
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return load_remote(text, api_key=api_key, local=local)
    from nexusformat.nexus import nxload as _nxload

    path = Path(text)
    root = _nxload(str(path), mode, **kwargs)
    attach_remote_fields(root, base=path.resolve().parent, api_key=api_key)
    return root


def _is_placeholder(item: Any) -> bool:
    if not isinstance(item, NXfield) or isinstance(item, (NXlink, RemoteField)):
        return False
    attrs = item.attrs
    if "uri" not in attrs or "shape" not in attrs:
        return False
    uri = str(attrs["uri"])
    return uri.startswith(("http://", "https://")) and item.size == 0


def _attr(attrs: Any, key: str, default: Any = None) -> Any:
    """An attribute's value as nexusformat returns it (size-1 arrays as scalars)."""
    return attrs[key] if key in attrs else default


def attach_remote_fields(root: Any, *, base: Path | None = None, api_key: str | None = None) -> int:
    """Replace every placeholder in a loaded tree by a :class:`RemoteField`.

    Works on the tree's dictionaries only: nothing is written to its file,
    whatever its mode. Returns the number of fields attached.
    """
    count = 0
    for group in list(_groups(root)):
        entries = group.entries  # loads a lazily read group's members
        for name, item in list(entries.items()):
            if not _is_placeholder(item):
                continue
            target = str(_attr(item.attrs, "field", name) or name)
            local = None
            linked = entries.get(target) if target != name else None
            if isinstance(linked, NXlink) and linked._filename is not None:
                local = _resolve(linked._filename, linked._target, base)
            elif "local_file" in item.attrs and "local_path" in item.attrs:
                local = _resolve(str(_attr(item.attrs, "local_file")),
                                 str(_attr(item.attrs, "local_path")), base)
            shape = tuple(int(n) for n in np.atleast_1d(dict.__getitem__(item.attrs, "shape").nxdata))
            dtype = str(_attr(item.attrs, "dtype", item.dtype))
            attrs = {k: _attr(item.attrs, k) for k in item.attrs if k not in _PLACEHOLDER_ATTRS}
            field_ = RemoteField(str(_attr(item.attrs, "uri")), shape=shape, dtype=dtype,
                                 name=target, attrs=attrs, local=local, api_key=api_key)
            if target != name:
                del entries[name]
            entries[target] = field_
            field_._group = group
            count += 1
    return count


def _groups(group: Any) -> Iterator[Any]:
    if isinstance(group, NXlink):
        return
    yield group
    for item in list(group.entries.values()):
        if isinstance(item, NXgroup) and not isinstance(item, NXlink):
            yield from _groups(item)


def _resolve(filename: str, path: str, base: Path | None) -> tuple[str, str]:
    file = Path(filename)
    if not file.is_absolute() and base is not None:
        file = base / file
    return os.path.normpath(file), path


# ----------------------------------------------------- remote trees (neutral form)


@dataclass
class _Field:
    name: str
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    dtype: np.dtype
    uri: str | None = None
    value: Any = None            # small fields: the data
    local: tuple[str, str] | None = None   # server file + path inside it


@dataclass
class _Link:
    name: str
    file: str | None
    path: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    name: str
    nx_class: str | None
    attrs: dict[str, Any]
    children: list[Any] = field(default_factory=list)
    uri: str | None = None


def _nx_class(specs: Any, metadata: Mapping[str, Any]) -> str | None:
    for spec in specs or []:
        name = getattr(spec, "name", spec)
        if isinstance(name, str) and name.startswith("NX"):
            return name
    value = metadata.get("NX_class")
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) and value.startswith("NX") else None


def _attrs_of(metadata: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for key, value in dict(metadata).items():
        if key in drop:
            continue
        value = _attr_value(value)
        if value is not None:
            out[key] = value
    return out


class _Walker:
    """Reads a remote tree into the neutral form, counting nodes."""

    def __init__(self, api_key: str | None, max_nodes: int, with_local: bool) -> None:
        self.api_key, self.max_nodes, self.with_local = api_key, max_nodes, with_local
        self.nodes = 0
        self.problems: list[str] = []

    def _count(self, uri: str) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise NeXusError(f"{uri}: more than {self.max_nodes} nodes; open a smaller node "
                             "(or raise SCATTERBROKER_MAX_NODES)")

    def node(self, client: Any, name: str, file_ctx: tuple[str, str] | None) -> Any:
        from scatterbroker.catalog.uris import global_uri

        uri = global_uri(client)
        self._count(uri)
        family = getattr(client.structure_family, "value", client.structure_family)
        metadata = dict(client.metadata or {})
        specs = [getattr(s, "name", s) for s in client.specs or []]
        own_file = self._file_of(client) if self.with_local else None
        if own_file is not None:
            file_ctx = (own_file, "")
        if family == "array":
            return self.array(client, name, uri, metadata, file_ctx)
        if family in ("table", "dataframe"):
            return self.table(client, name, uri, metadata)
        if family != "container":
            self.problems.append(f"{uri}: {family} nodes are not NeXus; left out")
            return None
        if LINK_SPEC in specs and isinstance(metadata.get("link"), Mapping):
            return self.link_node(name, metadata)
        if "BrokenLink" in specs:
            link = metadata.get("link") or {}
            self.problems.append(f"{uri}: broken link ({link.get('error', '')})")
            return _Link(name, link.get("file"), str(link.get("path", "")))
        group = _Group(name, _nx_class(specs, metadata), _attrs_of(metadata), uri=uri)
        for key, child in client.items():
            sub = (file_ctx[0], f"{file_ctx[1]}/{key}") if file_ctx else None
            item = self.node(child, key, sub)
            if item is not None:
                group.children.append(item)
        return group

    def _file_of(self, client: Any) -> str | None:
        """The server-side HDF5 file a node is registered from, if any."""
        try:
            sources = client.data_sources() or []
        except Exception:
            return None
        for source in sources:
            mimetype = getattr(source, "mimetype", "") or ""
            if "hdf5" not in mimetype and "nexus" not in mimetype:
                continue
            for asset in getattr(source, "assets", None) or []:
                uri = getattr(asset, "data_uri", "")
                if uri.startswith("file:"):
                    from tiled.utils import path_from_uri

                    return str(path_from_uri(uri))
        return None

    def array(self, client: Any, name: str, uri: str, metadata: dict,
              file_ctx: tuple[str, str] | None) -> _Field | None:
        if "error" in metadata:
            self.problems.append(f"{uri}: {metadata['error']}")
            return None
        structure = client.structure()
        shape = tuple(structure.shape)
        dtype = structure.data_type.to_numpy_dtype()
        attrs = _attrs_of(metadata, drop=_FIELD_EXTRAS)
        item = _Field(name, attrs, shape, dtype, uri=uri,
                      local=(file_ctx[0], file_ctx[1] or "/") if file_ctx else None)
        if is_large(shape, dtype):
            return item
        value = metadata.get("value")
        if value is not None and np.shape(value) == shape:
            item.value = np.asarray(value) if dtype.kind in "US" else np.asarray(value, dtype=dtype)
        else:
            try:
                item.value = np.asarray(client.read())
            except Exception as err:
                self.problems.append(f"{uri}: {_why(err)}")
                return None
        return item

    def table(self, client: Any, name: str, uri: str, metadata: dict) -> _Group | None:
        try:
            frame = client.read()
        except Exception as err:
            self.problems.append(f"{uri}: {_why(err)}")
            return None
        group = _Group(name, "NXcollection", _attrs_of(metadata), uri=uri)
        for column in frame.columns:
            values = frame[column].to_numpy()
            if values.dtype == object:
                values = values.astype(str)
            group.children.append(_Field(str(column), {}, values.shape, values.dtype,
                                         value=values))
        return group

    def link_node(self, name: str, metadata: dict) -> _Field | _Link:
        link = dict(metadata["link"])
        attrs = _attrs_of({k: v for k, v in metadata.items() if k != "link"}, drop=_FIELD_EXTRAS)
        if link.get("uri") and link.get("shape") is not None and link.get("dtype"):
            file = link.get("file")  # only an absolute path means something here
            local = (file, link.get("path", "/")) if file and os.path.isabs(file) else None
            return _Field(name, attrs, tuple(link["shape"]), np.dtype(link["dtype"]),
                          uri=link["uri"], local=local)
        return _Link(name, link.get("file"), str(link.get("path", "")), attrs)


def _walk(uri: str, api_key: str | None, *, with_local: bool,
          max_nodes: int = MAX_NODES) -> tuple[Any, _Walker, Any]:
    client = _connect(uri, api_key, include_data_sources=with_local, cache=False)
    walker = _Walker(api_key, max_nodes, with_local)
    file_ctx = None
    if with_local:
        file_ctx = _file_context(client, api_key)
    name = client.path_parts[-1] if client.path_parts else "root"
    try:
        tree = walker.node(client, name, file_ctx)
    except (NeXusError, RemoteDataError):
        raise
    except Exception as err:
        raise RemoteDataError(_redacted(uri), _why(err)) from None
    return tree, walker, client


def _file_context(client: Any, api_key: str | None) -> tuple[str, str] | None:
    """(server file, path inside it) when ``client`` is a node inside a registered file."""
    from tiled.client import from_uri

    parts = list(client.path_parts)
    if len(parts) < 2:
        return None
    base = str(client.context.api_uri).rstrip("/")
    root = from_uri(base, api_key=_key_for(base, api_key), include_data_sources=True)
    walker = _Walker(api_key, MAX_NODES, True)
    node = root
    for i, part in enumerate(parts[:-1]):
        node = node[part]
        file = walker._file_of(node)
        if file is not None:
            return file, "/" + "/".join(parts[i + 1:])
    return None


def load_remote(uri: str, *, api_key: str | None = None, local: bool = True,
                max_nodes: int = MAX_NODES) -> Any:
    """The catalog node at ``uri`` as a nexusformat tree (see :func:`nxload`).

    A NeXus file node becomes its ``NXroot``; an ``NXentry`` (or any other
    container) is put in a new ``NXroot`` under its own name; an array node is
    returned as a field. Small fields are read now, large ones are
    :class:`RemoteField`. The root's ``uri`` attribute is ``uri``.
    """
    tree, walker, client = _walk(uri, api_key, with_local=local, max_nodes=max_nodes)
    if isinstance(tree, _Field):
        return _to_nexus(tree, api_key)
    if isinstance(tree, _Link) or tree is None:
        raise RemoteDataError(_redacted(uri), "is a broken link, not data")
    if tree.nx_class == "NXroot":
        root = NXroot(attrs={k: v for k, v in tree.attrs.items() if k != "NX_class"})
        for child in tree.children:
            root[child.name] = _to_nexus(child, api_key)
    else:
        root = NXroot()
        if tree.nx_class is None:
            tree.nx_class = "NXentry"
        root[_safe_name(tree.name)] = _to_nexus(tree, api_key)
    root.attrs["uri"] = _redacted(uri)
    root._sb_problems = walker.problems
    return root


def _safe_name(name: str) -> str:
    return name or "entry"


def _to_nexus(item: Any, api_key: str | None) -> Any:
    if isinstance(item, _Field):
        if item.value is None:
            return RemoteField(item.uri, shape=item.shape, dtype=item.dtype, name=item.name,
                               attrs=item.attrs, local=item.local, api_key=api_key)
        value = item.value
        if value.dtype.kind == "U":
            value = value.tolist() if value.ndim else str(value)
        return NXfield(value, name=item.name, attrs=dict(item.attrs))
    if isinstance(item, _Link):
        return NXlink(target=item.path or "/", file=item.file, name=item.name)
    attrs = {k: v for k, v in item.attrs.items() if k != "NX_class"}
    group = NXgroup(nxclass=item.nx_class or "NXcollection", name=item.name, attrs=attrs)
    for child in item.children:
        group[child.name] = _to_nexus(child, api_key)
    return group


# ------------------------------------------------------------------------ wrap


@dataclass
class WrapReport:
    """What :func:`wrap` wrote."""

    path: Path
    uri: str
    groups: int = 0
    inline: int = 0
    linked: int = 0           # large fields with a local link and a URI placeholder
    remote_only: int = 0      # large fields with a URI placeholder only
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path}: {self.groups} groups, {self.inline} small fields inline, "
                f"{self.linked} large fields linked (external link + URI), "
                f"{self.remote_only} by URI only, {len(self.problems)} problems")


def wrap(uri: str, out: str | os.PathLike[str], *, api_key: str | None = None,
         relative: bool = True, max_nodes: int = MAX_NODES) -> WrapReport:
    """Write a portable wrapper NeXus file for the node at ``uri``.

    Every group and attribute of the node's tree is copied, small fields
    inline. Each large field gets an HDF5 external link to the server's file
    (relative to ``out``'s directory when ``relative``, else absolute), when
    there is one, and a placeholder holding its global URI, shape, dtype and
    units. ``out`` is written under a temporary name and renamed when complete
    (:func:`~scatterbroker.reduction.nexus_file.new_nexus_file`), never over a
    file it links to.

    Examples
    --------
    >>> wrap("http://host:8000/api/v1/metadata/scans/s1/scan1", "scan1.nxs").summary()  # doctest: +SKIP
    'scan1.nxs: 6 groups, 9 small fields inline, 1 large fields linked ...'
    """
    out = Path(out)
    tree, walker, client = _walk(uri, api_key, with_local=True, max_nodes=max_nodes)
    report = WrapReport(out, _redacted(uri), problems=list(walker.problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    with new_nexus_file(out, inputs=_linked_files(tree)) as f:
        if isinstance(tree, _Group) and tree.nx_class == "NXroot":
            _write_attrs(f, tree.attrs)
            children = tree.children
        else:
            if isinstance(tree, _Group) and tree.nx_class is None:
                tree.nx_class = "NXentry"
            children = [tree] if tree is not None else []
        f.attrs["NX_class"] = "NXroot"
        f.attrs["creator"] = "scatterbroker wrap"
        f.attrs["uri"] = _redacted(uri)
        f.attrs["file_name"] = out.name
        f.attrs["file_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for child in children:
            _write_item(f, child, out.resolve().parent, relative, report)
    return report


def _linked_files(item: Any) -> Iterator[str]:
    """The server files a wrapper of ``item`` links to (never to be written over)."""
    if isinstance(item, _Group):
        for child in item.children:
            yield from _linked_files(child)
    elif isinstance(item, _Field) and item.local is not None:
        yield item.local[0]


def _write_attrs(obj: Any, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        _set_attr(obj, key, value)


def _write_item(parent: Any, item: Any, where: Path, relative: bool, report: WrapReport) -> None:
    import h5py

    if isinstance(item, _Group):
        group = parent.create_group(item.name)
        _write_attrs(group, item.attrs)
        if item.nx_class:
            group.attrs["NX_class"] = item.nx_class
        report.groups += 1
        for child in item.children:
            _write_item(group, child, where, relative, report)
        return
    if isinstance(item, _Link):
        if item.file:
            parent[item.name] = h5py.ExternalLink(item.file, item.path or "/")
        elif item.path:
            parent[item.name] = h5py.SoftLink(item.path)
        return
    if item.value is not None:
        value = item.value
        if value.dtype.kind == "U":
            data = value.tolist() if value.ndim else str(value)
            dset = parent.create_dataset(item.name, data=data, dtype=h5py.string_dtype()) \
                if value.ndim else parent.create_dataset(item.name, data=data)
        else:
            dset = parent.create_dataset(item.name, data=value)
        _write_attrs(dset, item.attrs)
        report.inline += 1
        return
    attrs = {k: v for k, v in item.attrs.items() if k not in ("signal", "axes", "target")}
    attrs["uri"] = item.uri
    if item.local is not None:
        file = item.local[0]
        if relative:
            file = os.path.relpath(file, where)
        parent[item.name] = h5py.ExternalLink(file, item.local[1])
        attrs["field"] = item.name
        _create_placeholder(parent, item.name + PLACEHOLDER_SUFFIX, item.shape, item.dtype, attrs)
        report.linked += 1
    else:
        _create_placeholder(parent, item.name, item.shape, item.dtype, attrs)
        report.remote_only += 1
