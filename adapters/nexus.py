"""NeXus-aware, read-only HDF5 adapter: one Tiled node per HDF5 group.

Replaces Tiled's stock ``HDF5Adapter`` for scatterbroker:

* every HDF5 group is a container whose ``specs`` carry its ``NX_class`` and
  whose metadata holds the group's *own* attributes (not the file root's);
  an ``NXdata`` group also exposes its resolved ``signal`` and ``axes``;
* every dataset is a lazily sliced array (:class:`NexusField`): scalars have
  shape ``()`` and a ``"value"`` in their metadata, strings come back as numpy
  unicode arrays;
* links are classified with ``group.get(name, getlink=True)`` *before* any
  target is touched, and resolved here, never by HDF5: soft links within their
  file (loops are detected), external links only after
  :func:`~scatterbroker.adapters.roots.confine` accepted the target file.
  Virtual-dataset sources and external raw storage are confined the same way
  before a byte of data is read, and HDF5 is told (dataset-access property
  ``${ORIGIN}`` prefixes) to resolve them exactly where they were checked;
* a link that is broken or escapes the readable roots becomes an empty node
  with ``specs=[Spec("BrokenLink")]`` and ``{"link": {..., "error": ...}}``
  metadata; its siblings list and read normally and reading beneath it
  raises the named exception (:class:`~scatterbroker.errors.OutsideRoots`,
  :class:`~scatterbroker.errors.BrokenLink`, ...).

Field specs are ``[]``: a dataset is a plain Tiled array, so every Tiled
client reads it without a special client class; being a field is implied by
the structure family.

Adapters hold *locations* (real file path + hard-link path inside it), not
h5py objects. Files are opened read-only through a small LRU of handles keyed
by real path and invalidated when the file's inode, size or mtime change.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import h5py
import hdf5plugin  # noqa: F401  (registers Bitshuffle/LZ4/... filters with HDF5)
import numpy as np
from tiled.adapters.container import ContainerAdapter
from tiled.adapters.core import Adapter
from tiled.adapters.mapping import MapAdapter
from tiled.adapters.utils import asset_parameters_to_adapter_kwargs, split_chunks
from tiled.iterviews import ItemsView, KeysView, ValuesView
from tiled.ndslice import NDSlice
from tiled.structures.array import ArrayStructure, BuiltinDtype, StructDtype
from tiled.structures.container import ContainerStructure
from tiled.structures.core import Spec, StructureFamily
from tiled.utils import IndexersMixin, path_from_uri

from ..errors import BrokenLink, OutsideRoots, RequestTooLarge, ScatterbrokerError, UnreadableFile
from .. import limits
from ..caches import LRU
from . import hdf5_chunks
from .roots import Roots, confine, file_stamp, normalize_roots, note_read
from . import sequence as _sequence  # its MAX_READ_BYTES: one limit for every read
from .units import put, to_canonical

__all__ = ["NexusAdapter", "NexusField", "NexusErrorNode", "summary", "HDF5_MAGIC"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: open HDF5 file handles kept (LRU)
OPEN_FILES = int(os.getenv("SCATTERBROKER_HDF5_OPEN_FILES", "64"))
#: soft + external links followed while resolving one path
MAX_LINK_HOPS = int(os.getenv("SCATTERBROKER_HDF5_MAX_LINK_HOPS", "32"))
#: above this many HDF5 chunks a 1-D/2-D array is served as one block
MAX_BLOCKS = int(os.getenv("SCATTERBROKER_HDF5_MAX_BLOCKS", "10000"))
#: depth up to which a container's listing is inlined in its metadata response
INLINED_DEPTH = int(os.getenv("SCATTERBROKER_HDF5_INLINED_DEPTH", "7"))
#: HDF5 file locking for our read-only handles: unset = HDF5's default (which
#: HDF5_USE_FILE_LOCKING controls), else "true", "false" or "best-effort". HDF5
#: refuses to open one file twice in a process with different locking flags, so
#: this must match what other code in the server process uses.
LOCKING = os.getenv("SCATTERBROKER_HDF5_LOCKING") or None
#: string arrays up to this many elements also carry their values in metadata
STRING_VALUE_MAX = 100
# HDF5 reads these once at start-up and lets them override our ${ORIGIN}
# prefixes, so with either set we cannot know where VDS/external data come from.
_PREFIX_ENV = ("HDF5_VDS_PREFIX", "HDF5_EXTFILE_PREFIX")

AnyNode = Union["NexusAdapter", "NexusField", "NexusErrorNode"]


# --------------------------------------------------------------------------- files


class _OpenFiles:
    """Bounded LRU of read-only ``h5py.File`` handles keyed by real path, each found
    again only while the file's stamp is the one it was opened with."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._files: LRU[h5py.File] = LRU(self.maxsize)

    @staticmethod
    def stamp(path: Path) -> tuple[int, ...]:
        try:
            st = os.stat(path)
        except OSError as err:
            raise BrokenLink(f"{path}: {err.strerror}") from None
        note_read(path, st)  # a cached handle is used without confine(): record it here
        return file_stamp(st)

    def get(self, path: Path) -> h5py.File:
        stamp, key = self.stamp(path), str(path)
        handle = self._files.get(key, stamp=stamp)  # changed on disk: the stale one is dropped
        if handle is not None:
            return handle
        try:
            handle = h5py.File(path, "r", locking=LOCKING)
        except Exception as err:  # OSError for truncated/not-HDF5, others for odd files
            raise UnreadableFile(f"{path}: not a readable HDF5 file ({err})") from None
        self._files.put(key, handle, stamp=stamp)
        return handle


_files = _OpenFiles(OPEN_FILES)
#: (roots, location, file stamp) of datasets with neither virtual nor external storage
_plain: LRU[bool] = LRU(4096)
_layouts: LRU[bool] = LRU(4096)  # dataset -> has VDS/external storage
_dapl_lock = threading.Lock()
_dapl: Any = None


def _safe_dapl() -> Any:
    """Dataset-access properties resolving VDS/external files next to the file itself."""
    global _dapl
    with _dapl_lock:
        if _dapl is None:
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_efile_prefix(b"${ORIGIN}")
            dapl.set_virtual_prefix(b"${ORIGIN}")
            _dapl = dapl
        return _dapl


def _names_files(dcpl: Any) -> bool:
    """True if a dataset's storage lies in other files: virtual (VDS) or external raw storage."""
    return dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count() > 0


def _open_member(group: h5py.Group, name: str, key: tuple | None = None) -> Any:
    """Open the hard-linked member ``name`` of ``group``.

    A dataset with virtual or external storage is (re)opened with the safe
    access properties. Plain datasets keep HDF5's defaults: HDF5 refuses to open
    one dataset twice with different prefixes, and other code in the process
    (h5py, nexusformat) opens them with the defaults. ``key`` identifies the
    dataset (file, stamp, path) so the layout is inspected only once.
    """
    special = _layouts.get(key) if key is not None else None
    if special is None:
        obj = group[name]
        if not isinstance(obj, h5py.Dataset):
            return obj
        special = _names_files(obj.id.get_create_plist())
        if key is not None:
            _layouts.put(key, special)
        if not special:
            return obj
        del obj  # close it before reopening with other access properties
    if special:
        return h5py.Dataset(h5py.h5d.open(group.id, group._e(name), dapl=_safe_dapl()))
    return group[name]


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _where(file: Path, path: Sequence[str]) -> str:
    return f"{file.name}:/{'/'.join(path)}"


@dataclass(frozen=True)
class _Loc:
    """A hard-link location: real file path and member names from its root."""

    file: Path
    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return "/" + "/".join(self.path)


class _Context:
    """Readable roots plus link resolution shared by all nodes of one tree."""

    def __init__(self, roots: Roots, field_specs: tuple[Spec, ...] = ()) -> None:
        self.roots = roots
        self.field_specs = field_specs

    def open(self, file: Path) -> h5py.File:
        return _files.get(file)

    def resolve(
        self, file: Path, segments: Sequence[str], *, allow_external: bool = True
    ) -> tuple[_Loc, Any, h5py.File]:
        """Follow ``segments`` from the root of ``file``, resolving every link ourselves.

        Returns the hard location reached, the opened object and the file handle
        that keeps it alive. Raises BrokenLink, OutsideRoots or UnreadableFile.
        """
        todo, cur = list(segments), []
        hops, seen = 0, set()
        handle = self.open(file)
        stamp = _files.stamp(file)
        obj: Any = handle
        while todo:
            seg = todo.pop(0)
            if not isinstance(obj, h5py.Group):
                raise BrokenLink(f"{_where(file, cur)} is a dataset, not a group")
            link = obj.get(seg, getlink=True)
            if link is None:
                raise BrokenLink(f"{_where(file, cur + [seg])} does not exist")
            if isinstance(link, h5py.HardLink):
                cur.append(seg)
                obj = _open_member(obj, seg, (file, stamp, tuple(cur)))
                continue
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise BrokenLink(f"more than {MAX_LINK_HOPS} links at {_where(file, cur + [seg])}")
            if isinstance(link, h5py.SoftLink):
                target = _split(link.path)
                new = target if link.path.startswith("/") else cur + target
            elif isinstance(link, h5py.ExternalLink):
                if not allow_external:
                    raise OutsideRoots(
                        f"{_where(file, cur + [seg])} is an external link; HDF5 would "
                        "follow it by its own rules, so it is refused here"
                    )
                file = confine(
                    link.filename, self.roots, relative_to=file.parent,
                    what="external link target",
                )
                handle, stamp = self.open(file), _files.stamp(file)
                new = _split(link.path)
            else:
                raise BrokenLink(f"{_where(file, cur + [seg])}: unsupported link type")
            state = (file, tuple(new + todo))
            if state in seen:
                raise BrokenLink(f"link loop at {_where(file, cur + [seg])}")
            seen.add(state)
            todo, cur, obj = new + todo, [], handle
        return _Loc(file, tuple(cur)), obj, handle

    def check_storage(self, loc: _Loc, dset: h5py.Dataset) -> None:
        """Confine VDS sources and external raw files of ``dset`` before any read.

        Only "this dataset has neither" is remembered (per roots, location and
        file stamp: it cannot change while the file is unchanged). The files a
        dataset with virtual or external storage names are resolved and confined
        again on every call: they can be swapped (e.g. for a symlink leaving the
        roots) without this file changing.
        """
        key = (self.roots, loc, _files.stamp(loc.file))
        if not _plain.get(key) and not self._check_storage(loc, dset):
            _plain.put(key, True)

    def _check_storage(self, loc: _Loc, dset: h5py.Dataset) -> bool:
        """Confine the files ``dset``'s storage names; False if it names none."""
        dcpl = dset.id.get_create_plist()
        if not _names_files(dcpl):
            return False
        virtual = dcpl.get_layout() == h5py.h5d.VIRTUAL
        n_external = dcpl.get_external_count()
        for var in _PREFIX_ENV:
            if os.environ.get(var):
                raise OutsideRoots(
                    f"{_where(loc.file, loc.path)}: {var} is set in the server's "
                    "environment, so HDF5 would not resolve its data files where "
                    "they were checked"
                )
        for i in range(n_external):
            name = dcpl.get_external(i)[0].decode("utf-8", "surrogateescape")
            confine(name, self.roots, relative_to=loc.file.parent,
                    what="external raw storage file")
            _note_link(loc.file.parent, name)
        if not virtual:
            return True
        checked = set()
        for i in range(dcpl.get_virtual_count()):
            fname, dname = dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)
            if (fname, dname) in checked:
                continue
            checked.add((fname, dname))
            if "%" in fname or "%" in dname:
                raise OutsideRoots(
                    f"virtual dataset source {fname!r}:{dname!r} uses a printf-style "
                    "pattern, which cannot be confined to the readable roots"
                )
            src = loc.file if fname == "." else confine(
                fname, self.roots, relative_to=loc.file.parent,
                what="virtual dataset source",
            )
            if fname != ".":
                _note_link(loc.file.parent, fname)
            src_loc, src_obj, _keep = self.resolve(src, _split(dname), allow_external=False)
            if not isinstance(src_obj, h5py.Dataset):
                raise BrokenLink(
                    f"virtual dataset source {_where(src, src_loc.path)} is not a dataset"
                )
            if _names_files(src_obj.id.get_create_plist()):
                raise OutsideRoots(
                    f"virtual dataset source {_where(src, src_loc.path)} has virtual "
                    "or external storage itself; nested indirection is refused"
                )
        return True


def _note_link(directory: Path, name: str) -> None:
    """Record the path HDF5 will open as written (``lstat``: a symlink's own stamp), beside
    the real file :func:`confine` recorded, so read caches drop an answer when the link
    is swapped even though the file it pointed at is unchanged."""
    path = os.path.join(directory, name)
    try:
        note_read(path, os.lstat(path))
    except OSError:
        pass


# ------------------------------------------------------------------- conversions


def _text(value: str | bytes) -> str:
    """Decode bytes / clean surrogate-escaped str so that it is valid UTF-8 text.

    NUL becomes U+FFFD like any undecodable byte: PostgreSQL's JSONB (the
    catalog's metadata column) cannot store it.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
        return value.replace("\x00", "\ufffd")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape" if _escaped(value) else "replace")
        return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _escaped(value: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)


def _jsonable(value: Any) -> Any:
    """Convert an HDF5 attribute value to JSON-able Python."""
    if isinstance(value, (bytes, str)):
        return _text(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value[()]) if value.ndim == 0 else _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, h5py.Empty):
        return None
    return str(value)


def _attrs(obj: Any) -> dict[str, Any]:
    """The object's own attributes, one bad attribute never spoiling the rest."""
    out: dict[str, Any] = {}
    try:
        count = h5py.h5o.get_info(obj.id).num_attrs
        if count > limits.MAX_ATTRIBUTES:  # 100,000 attributes took a minute of CPU
            return {"error": f"{count:,} attributes, more than the server reads for one object "
                             f"({limits.MAX_ATTRIBUTES:,}, SCATTERBROKER_MAX_ATTRIBUTES): omitted"}
        names = list(obj.attrs.keys())
    except Exception as err:
        return {"error": f"attributes unreadable: {err}"}
    for name in names:
        try:
            out[_text(name)] = _jsonable(obj.attrs[name])
        except Exception as err:
            out[_text(name)] = f"<unreadable attribute: {err}>"
    return out


def _nx_class(md: dict[str, Any]) -> str | None:
    value = md.get("NX_class")
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) and value else None


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in re.split(r"[:,]", value) if v.strip()]
    if isinstance(value, list):
        return [n for v in value for n in _names(v)]
    return []


def _selection(sel: Any, shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple[int, ...]]:
    """Turn a numpy-style ``sel`` into an h5py selection (positive steps only).

    Returns the h5py selection, a numpy post-selection reversing axes that asked
    for negative steps, and the result shape.
    """
    sel = tuple(sel) if isinstance(sel, tuple) else (sel,)
    if any(s is Ellipsis for s in sel):
        i = next(k for k, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:i] + (slice(None),) * (len(shape) - len(sel) + 1) + sel[i + 1 :]
    if len(sel) > len(shape):
        raise IndexError(f"too many indices ({len(sel)}) for shape {shape}")
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    h5sel: list[Any] = []
    post: list[slice] = []
    out_shape: list[int] = []
    for s, n in zip(sel, shape):
        if isinstance(s, (int, np.integer)):
            i = int(s) + n if s < 0 else int(s)
            if not 0 <= i < n:
                raise IndexError(f"index {s} out of range for axis of length {n}")
            h5sel.append(i)
            continue
        if not isinstance(s, slice):
            raise IndexError(f"unsupported index {s!r}")
        r = range(*s.indices(n))
        out_shape.append(len(r))
        if not r:
            h5sel.append(slice(0, 0))
            post.append(slice(None))
        elif r.step > 0:
            h5sel.append(slice(r.start, r[-1] + 1, r.step))
            post.append(slice(None))
        else:
            h5sel.append(slice(r[-1], r[0] + 1, -r.step))
            post.append(slice(None, None, -1))
    return tuple(h5sel), tuple(post), tuple(out_shape)


# ------------------------------------------------------------------------- nodes


class NexusErrorNode(ContainerAdapter):
    """An empty container standing in for a broken, escaping or unreadable member.

    Listing it is harmless; looking up anything beneath it raises ``error``
    (a :class:`~scatterbroker.errors.ScatterbrokerError`, e.g. OutsideRoots).
    """

    structure_family = StructureFamily.container

    def __init__(self, error: ScatterbrokerError, *, link: dict[str, str] | None = None) -> None:
        self.error = error
        md: dict[str, Any] = {"error": str(error), "error_type": type(error).__name__}
        specs = []
        if link is not None:
            md = {"link": {**link, "error": str(error)}, "error_type": type(error).__name__}
            specs = [Spec("BrokenLink")]
        super().__init__(ContainerStructure(keys=[]), metadata=md, specs=specs)

    def __getitem__(self, key: str) -> Any:
        raise type(self.error)(str(self.error))

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __contains__(self, key: object) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.error!r}>"


class NexusField(Adapter[ArrayStructure]):
    """One HDF5 dataset as a lazily read Tiled array.

    Axes are in HDF5 (C) order: for a detector stack ``(frame, y, x)``. Blocks
    are one frame each for ``ndim >= 3``, the HDF5 chunk grid for smaller
    arrays (when it has at most ``MAX_BLOCKS`` blocks), else the whole array.
    Metadata is the dataset's own attributes, plus ``"value"`` for scalars (and
    small string arrays), plus ``"error"`` when the field cannot be read.
    """

    structure_family = StructureFamily.array

    def __init__(
        self,
        ctx: _Context,
        loc: _Loc,
        dset: h5py.Dataset,
        *,
        metadata: dict[str, Any] | None = None,
        specs: list[Spec] | None = None,
    ) -> None:
        self._ctx, self._loc = ctx, loc
        self._error: ScatterbrokerError | None = None
        self._attrs = _attrs(dset)
        self._string = h5py.check_string_dtype(dset.dtype)
        try:
            ctx.check_storage(loc, dset)
        except ScatterbrokerError as err:
            self._error = err
        except Exception as err:
            self._error = UnreadableFile(f"{_where(loc.file, loc.path)}: {err}")
        dtype, self._value = dset.dtype, None
        empty = dset.shape is None  # HDF5 null dataspace (h5py.Empty): served as (0,)
        shape = (0,) if empty else dset.shape
        if self._string is not None:
            n = self._string.length or 1
            if self._error is None and self._string.length is None and not empty \
                    and dset.size > limits.MAX_VLEN_STRINGS:
                # the longest string is learnt by decoding them all: refuse before that
                self._error = RequestTooLarge(
                    f"{_where(loc.file, loc.path)}: {dset.size:,} variable-length strings, more "
                    f"than the server decodes for one node ({limits.MAX_VLEN_STRINGS:,}, "
                    "SCATTERBROKER_MAX_VLEN_STRINGS)")
            if self._error is None and not empty and (
                self._string.length is None or dset.size <= STRING_VALUE_MAX
            ):
                try:
                    where = _where(loc.file, loc.path)
                    values = _read_dataset(dset, _selection((), shape)[0], tuple(shape), True, where)
                    longest = int(np.char.str_len(values).max(initial=1))
                    n = max(n if self._string.length else 1, longest)
                    if values.ndim == 0 or values.size <= STRING_VALUE_MAX:
                        self._value = values.tolist()
                except Exception as err:
                    self._error = UnreadableFile(f"{_where(loc.file, loc.path)}: {err}")
            dtype = np.dtype(f"<U{n}")
        elif dtype.hasobject or dtype.subdtype is not None:
            if self._error is None:
                self._error = UnreadableFile(
                    f"{_where(loc.file, loc.path)}: HDF5 type {dtype} (references, "
                    "variable-length or array members) cannot be served as an array"
                )
            dtype = np.dtype(f"V{max(dtype.itemsize, 1)}")
        try:
            data_type = (StructDtype if dtype.fields else BuiltinDtype).from_numpy_dtype(dtype)
        except Exception as err:
            self._error = self._error or UnreadableFile(f"{_where(loc.file, loc.path)}: {err}")
            data_type = BuiltinDtype.from_numpy_dtype(np.dtype("V1"))
        if self._error is None and self._string is None and shape == ():
            try:
                self._value = _jsonable(dset[()])
            except Exception as err:
                self._error = UnreadableFile(f"{_where(loc.file, loc.path)}: {err}")
        self._dtype = dtype
        structure = ArrayStructure(
            data_type=data_type, shape=tuple(shape), chunks=self._chunks(shape, dset.chunks)
        )
        super().__init__(structure, metadata=metadata, specs=specs)

    # -- constructors, shaped like Tiled's adapters

    @classmethod
    def from_uris(cls, data_uri: str, *, dataset: str = "", **kwargs: Any) -> NexusField:
        """The dataset at ``dataset`` inside the file ``data_uri``."""
        node = NexusAdapter.from_uris(data_uri, dataset=dataset, **kwargs)
        if not isinstance(node, NexusField):
            raise UnreadableFile(f"{dataset!r} in {data_uri} is not a dataset")
        return node

    @classmethod
    def from_catalog(cls, data_source: Any, node: Any, /, **kwargs: Any) -> NexusField:
        field = NexusAdapter.from_catalog(data_source, node, **kwargs)
        if not isinstance(field, NexusField):
            raise UnreadableFile(f"catalog node {node!r} does not point at a dataset")
        return field

    @staticmethod
    def _chunks(shape: tuple[int, ...], h5chunks: tuple[int, ...] | None) -> tuple:
        if not shape or 0 in shape:
            return tuple((n,) for n in shape)
        if len(shape) >= 3:
            if shape[0] > MAX_BLOCKS:  # never build a tuple of 2**40 ones
                return (split_chunks(shape[0], -(-shape[0] // MAX_BLOCKS)),) + tuple(
                    (n,) for n in shape[1:])
            return ((1,) * shape[0],) + tuple((n,) for n in shape[1:])
        if h5chunks and math.prod(math.ceil(n / c) for n, c in zip(shape, h5chunks)) <= MAX_BLOCKS:
            return tuple(split_chunks(n, c) for n, c in zip(shape, h5chunks))
        return tuple((n,) for n in shape)

    # -- Tiled protocol

    def metadata(self) -> dict[str, Any]:
        md = dict(self._attrs)
        if self._value is not None:
            md["value"] = self._value
        if self._error is not None:
            md["error"] = str(self._error)
            md["error_type"] = type(self._error).__name__
        md.update(self._metadata)
        return md

    def read(self, slice: NDSlice | Any = ...) -> np.ndarray:
        """Read ``slice`` (numpy-style, in (frame, y, x) order) and only that."""
        sel = () if slice is None or slice is Ellipsis else slice
        return self._read(sel)

    def read_block(self, block: tuple[int, ...], slice: Any = None) -> np.ndarray:
        """Read block ``block`` of ``structure().chunks``, optionally sub-sliced."""
        chunks = self._structure.chunks
        if len(block) != len(chunks):
            raise IndexError(f"block {block} does not match {len(chunks)} dimensions")
        region = []
        for i, sizes in zip(block, chunks):
            if not 0 <= i < len(sizes):
                raise IndexError(f"block {block} out of range")
            start = sum(sizes[:i])
            region.append(_slice(start, start + sizes[i]))
        arr = self._read(tuple(region))
        return arr[tuple(slice)] if slice else arr

    def _read(self, sel: Any) -> np.ndarray:
        if self._error is not None:
            raise type(self._error)(str(self._error))
        shape = self._structure.shape
        try:
            h5sel, post, out_shape = _selection(sel, shape)
        except (ValueError, TypeError) as err:  # e.g. a slice step of 0
            raise IndexError(f"invalid selection {sel!r}: {err}") from None
        if 0 in out_shape or (shape and 0 in shape):
            return np.empty(out_shape, dtype=self._dtype)
        nbytes, limit = math.prod(out_shape) * self._dtype.itemsize, _sequence.MAX_READ_BYTES
        if nbytes > limit:  # refuse before h5py allocates (and fills) it
            raise RequestTooLarge(
                f"{_where(self._loc.file, self._loc.path)}: selection of shape {out_shape} "
                f"would return {nbytes / 1e9:.2f} GB, more than the server's limit of "
                f"{limit / 1e9:.2f} GB; request a smaller slice"
            )
        try:
            loc, dset, _keep = self._ctx.resolve(self._loc.file, self._loc.path)
            if loc != self._loc or not isinstance(dset, h5py.Dataset):
                raise BrokenLink(f"{_where(self._loc.file, self._loc.path)} changed on disk")
            self._ctx.check_storage(loc, dset)
            arr = _read_dataset(dset, h5sel, out_shape, self._string is not None,
                                _where(loc.file, loc.path))
        except (ScatterbrokerError, IndexError):
            raise
        except Exception as err:
            raise UnreadableFile(f"{_where(self._loc.file, self._loc.path)}: {err}") from None
        arr = arr.astype(self._dtype, copy=False)
        return arr[post] if post else arr

    def open_dataset(self) -> tuple[h5py.Dataset, h5py.File, tuple]:
        """The dataset, re-resolved and confined exactly as for :meth:`read`.

        For readers that go below h5py (the fast data route reads stored chunk
        bytes itself). Returns the dataset, the file handle that keeps it open
        (hold it while reading), and a key naming this dataset *and* the file's
        current (device, inode, size, mtime) stamp, for caches that must drop
        what they learnt when the file changes. Raises like :meth:`read`.
        """
        if self._error is not None:
            raise type(self._error)(str(self._error))
        loc, dset, keep = self._ctx.resolve(self._loc.file, self._loc.path)
        if loc != self._loc or not isinstance(dset, h5py.Dataset):
            raise BrokenLink(f"{_where(self._loc.file, self._loc.path)} changed on disk")
        self._ctx.check_storage(loc, dset)
        return dset, keep, (str(loc.file), _files.stamp(loc.file), loc.path)


    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_where(self._loc.file, self._loc.path)}>"


_slice = slice  # NexusField.read_block shadows the builtin with its parameter


def _read_dataset(dset: h5py.Dataset, h5sel: tuple, out_shape: tuple[int, ...], strings: bool,
                  where: str) -> np.ndarray:
    """Read a normalized selection (see :func:`_selection`) with its cost bounded.

    Compressed datasets are decoded by :mod:`.hdf5_chunks` (never by HDF5's
    filter plug-ins, which trust the file); plain ones by h5py, in pieces of at
    most ``limits.HDF5_READ_PIECE_BYTES`` along the first axis, so HDF5's
    global lock is released between pieces and other requests' reads run.
    """
    hdf5_chunks.check_cost(dset, h5sel, where)
    pipe = hdf5_chunks.pipeline(dset, where)
    if strings:
        if pipe is not None:
            if h5py.check_string_dtype(dset.dtype).length is None:
                raise hdf5_chunks.UnsupportedFilter(
                    f"{where}: variable-length strings in a compressed dataset are not "
                    "decoded by this server")
            raw = hdf5_chunks.read(dset, h5sel, out_shape, dset.dtype, pipe, where)
            return np.char.decode(raw, "utf-8", errors="replace") if raw.size else raw.astype(str)
        text = dset.asstr(errors="replace")
        raw = np.asarray(text[h5sel] if h5sel else text[()])
        return raw.astype(str) if raw.dtype == object else raw
    if pipe is not None:
        return hdf5_chunks.read(dset, h5sel, out_shape, dset.dtype, pipe, where)
    if not h5sel:
        return np.asarray(dset[()])
    first = h5sel[0]
    nbytes = math.prod(out_shape) * dset.dtype.itemsize
    if isinstance(first, int) or nbytes <= limits.HDF5_READ_PIECE_BYTES or len(
            range(first.start, first.stop, first.step)) < 2:
        return np.asarray(dset[h5sel])
    out = np.empty(out_shape, dtype=dset.dtype)
    picks = range(first.start, first.stop, first.step)
    per = max(1, len(picks) * limits.HDF5_READ_PIECE_BYTES // nbytes)
    for k in range(0, len(picks), per):
        part = picks[k:k + per]
        out[k:k + len(part)] = dset[(slice(part.start, part[-1] + 1, part.step),) + h5sel[1:]]
    return out


class NexusAdapter(ContainerAdapter, IndexersMixin):
    """A NeXus/HDF5 file, or one group in it, as a Tiled container.

    Parameters
    ----------
    data_uri
        ``file://`` URI or plain path of the file; it must lie inside
        ``readable_roots`` (the file's own directory when that is ``None``).
    structure
        Accepted for ``init_adapter_from_catalog`` compatibility; ignored.
    metadata, specs
        Caller's metadata/specs; the caller wins over the file's attributes.

    Raises
    ------
    OutsideRoots, BrokenLink
        The file is outside the readable roots, or missing.
    UnreadableFile
        The file is not readable HDF5 (truncated, corrupt, other format).

    Examples
    --------
    >>> tree = NexusAdapter.from_uris("file://localhost/data/scan_0001.nxs")  # doctest: +SKIP
    >>> tree["entry"]["data"]["data"].read((slice(0, 1),)).shape  # doctest: +SKIP
    (1, 1024, 1024)
    """

    structure_family = StructureFamily.container
    mimetype = "application/x-nexus"
    #: further mimetypes served (registry.py): Tiled's own for .h5/.hdf5/.nxs
    aliases = ("application/x-hdf5",)
    extensions = (".nxs", ".nx5", ".nexus", ".h5", ".hdf5", ".hdf")
    #: bound by the server to the resolved readable roots (see registry.bind_roots)
    readable_roots: Roots | None = None
    #: specs given to every field (dataset) of the tree; the server sets
    #: ``Spec("sb-array")`` when it mounts the fast data route (server.catalog)
    field_specs: tuple[Spec, ...] = ()

    def __init__(
        self,
        data_uri: str | os.PathLike[str],
        structure: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        specs: list[Spec] | None = None,
        **kwargs: Any,  # swmr/libver/locking of stock HDF5 data sources: ignored
    ) -> None:
        raw = os.fspath(data_uri)
        path = Path(path_from_uri(raw)) if raw.startswith("file:") else Path(raw)
        roots = self.readable_roots
        if roots is None:
            roots = normalize_roots([os.path.dirname(os.path.realpath(path))])
        file = confine(path, roots, what="file")
        if not file.is_file():
            raise UnreadableFile(f"{file} is not a file")
        ctx = _Context(roots, tuple(self.field_specs))
        handle = ctx.open(file)
        self._setup(ctx, _Loc(file, ()), handle, metadata, specs, root=True)

    @classmethod
    def _group(cls, ctx: _Context, loc: _Loc, group: h5py.Group) -> NexusAdapter:
        node = cls.__new__(cls)
        node._setup(ctx, loc, group, None, None, root=False)
        return node

    def _setup(self, ctx: _Context, loc: _Loc, group: h5py.Group,
               metadata: dict[str, Any] | None, specs: list[Spec] | None, *, root: bool) -> None:
        self._ctx, self._loc, self._root = ctx, loc, root
        try:
            self._keys = [_text(k) for k in group.keys()]
            self._keyset = frozenset(self._keys)  # membership in O(1): listings are paged
        except Exception as err:
            raise UnreadableFile(
                f"{_where(loc.file, loc.path)}: cannot list members ({err})"
            ) from None
        self._attrs = _attrs(group)
        try:
            self._hard_links = h5py.h5o.get_info(group.id).rc
        except Exception:
            self._hard_links = 2  # unknown: do not inline it
        self._children: dict[str, AnyNode] = {}
        self._summary: dict[str, Any] | None = None
        nx_class = _nx_class(self._attrs)
        if nx_class == "NXdata":
            self._attrs.update(self._nxdata(group))
        own = [Spec(nx_class)] if nx_class else []
        # The catalog hands specs over as dicts; direct callers as Spec or str.
        caller = [Spec(**s) if isinstance(s, dict) else Spec(s) if isinstance(s, str) else s
                  for s in specs or []]
        caller_names = {s.name for s in caller}
        caller += [s for s in own if s.name not in caller_names]
        super().__init__(ContainerStructure(keys=self._keys), metadata=metadata, specs=caller)

    # -- constructors, shaped like Tiled's adapters

    @classmethod
    def from_uris(cls, data_uri: str, *, dataset: str | Sequence[str] | None = None,
                  metadata: dict[str, Any] | None = None, specs: list[Spec] | None = None,
                  **kwargs: Any) -> AnyNode:
        """Open the file (or the group/dataset at ``dataset`` in it)."""
        if not dataset:
            return cls(data_uri, metadata=metadata, specs=specs)
        node: Any = cls(data_uri)
        path = dataset if isinstance(dataset, str) else "/".join(dataset)
        for seg in _split(path):
            if not isinstance(node, NexusAdapter):
                raise BrokenLink(f"{path!r}: {seg!r} is below a dataset")
            node = node[seg]
        if isinstance(node, NexusErrorNode):
            raise type(node.error)(str(node.error))
        node._metadata = dict(metadata or {})
        node.specs = list(specs or []) + [s for s in node.specs if s not in (specs or [])]
        return node

    @classmethod
    def from_catalog(cls, data_source: Any, node: Any, /, **kwargs: Any) -> AnyNode:
        """Server path: asset URI from ``data_source``, metadata/specs from ``node``."""
        params = asset_parameters_to_adapter_kwargs(data_source)
        uri = params.get("data_uri") or params["data_uris"][0]
        return cls.from_uris(uri, dataset=kwargs.get("dataset"),
                             metadata=dict(node.metadata_ or {}), specs=list(node.specs or []))

    @classmethod
    def sniff(cls, path: str | os.PathLike[str]) -> bool:
        """True if the HDF5 signature is at offset 0 or a userblock offset (512, 1024, ...)."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                for offset in (0, *(512 << k for k in range(12))):
                    if offset + 8 > size:
                        break
                    f.seek(offset)
                    if f.read(8) == HDF5_MAGIC:
                        return True
        except OSError:
            return False
        return False

    # -- Mapping

    def __getitem__(self, key: str) -> AnyNode:
        if "/" in key.strip("/"):
            node: Any = self
            for seg in _split(key):
                node = node[seg]
            return node
        key = key.strip("/")
        if key not in self._children:
            if key not in self._keyset:
                raise KeyError(key)
            self._children[key] = self._child(key)
        return self._children[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keyset

    def _child(self, key: str) -> AnyNode:
        """Build the node for member ``key``; never raises for a bad member."""
        link: dict[str, str] | None = None
        try:
            _loc, group, _keep = self._ctx.resolve(self._loc.file, self._loc.path)
            raw = group.get(key, getlink=True)
            if isinstance(raw, h5py.SoftLink):
                link = {"path": raw.path}
            elif isinstance(raw, h5py.ExternalLink):
                link = {"file": raw.filename, "path": raw.path}
            loc, obj, handle = self._ctx.resolve(self._loc.file, self._loc.path + (key,))
            if isinstance(obj, h5py.Dataset):
                return NexusField(self._ctx, loc, obj, specs=list(self._ctx.field_specs))
            if isinstance(obj, h5py.Group):
                return type(self)._group(self._ctx, loc, obj)
            return NexusErrorNode(UnreadableFile(
                f"{_where(loc.file, loc.path)} is a named datatype, not data"))
        except ScatterbrokerError as err:
            return NexusErrorNode(err, link=link)
        except Exception as err:
            return NexusErrorNode(
                UnreadableFile(f"{_where(self._loc.file, self._loc.path + (key,))}: {err}"),
                link=link)

    def keys(self) -> KeysView:  # type: ignore[override]
        return KeysView(lambda: len(self), self._keys_slice)

    def values(self) -> ValuesView:  # type: ignore[override]
        return ValuesView(lambda: len(self), self._items_slice)

    def items(self) -> ItemsView:  # type: ignore[override]
        return ItemsView(lambda: len(self), self._items_slice)

    def _keys_slice(self, start: int, stop: int | None, direction: int,
                    page_size: int | None = None) -> list[str]:
        keys = self._keys if direction > 0 else self._keys[::-1]
        return keys[start:stop]

    def _items_slice(self, start: int, stop: int | None, direction: int,
                     page_size: int | None = None) -> list[tuple[str, AnyNode]]:
        return [(k, self[k]) for k in self._keys_slice(start, stop, direction)]

    # -- Tiled protocol

    def metadata(self) -> dict[str, Any]:
        md = dict(self._attrs)
        if self._root:
            md.update(self.summary())
        md.update(self._metadata)
        return md

    def structure(self) -> ContainerStructure:
        return ContainerStructure(keys=list(self._keys))

    def search(self, query: Any) -> Any:
        """Filter the direct children by metadata, as a MapAdapter would."""
        return self._as_map().search(query)

    def sort(self, sorting: Any) -> Any:
        """Sort the direct children ("_" keeps HDF5 order; other keys: metadata)."""
        if all(key == "_" and direction > 0 for key, direction in sorting):
            return self
        return self._as_map().sort(sorting)

    def _as_map(self) -> MapAdapter:
        return MapAdapter(dict(self.items()), metadata=self.metadata(), specs=self.specs)

    def read(self, fields: Any = None) -> NexusAdapter:
        if fields is not None:
            raise NotImplementedError
        return self

    def inlined_contents_enabled(self, depth: int) -> bool:
        """Inline this group's listing into its parent's answer only if that stays small.

        A group reached through more than one hard link (a group linking to itself or
        to an ancestor, or many links to one group) is never inlined: 30 links of a
        group to itself made Tiled inline ~30^6 nodes. With that rule each object is
        inlined at most once, so an answer grows with the file, never exponentially.
        """
        return (depth <= INLINED_DEPTH and self._hard_links <= 1
                and len(self._keys) <= limits.MAX_INLINED_MEMBERS)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_where(self._loc.file, self._loc.path)} {self._keys}>"

    # -- NeXus

    def _nxdata(self, group: h5py.Group) -> dict[str, Any]:
        """``signal`` (str) and ``axes`` (list of str) of an NXdata group, old style too."""
        out: dict[str, Any] = {}
        signal, axes = self._attrs.get("signal"), _names(self._attrs.get("axes"))
        fields: dict[str, dict[str, Any]] = {}
        if not isinstance(signal, str) or not axes:
            for name in self._keys:  # hard-linked fields only: never follow links here
                try:
                    if isinstance(group.get(name, getlink=True), h5py.HardLink) and \
                            group.get(name, getclass=True) is h5py.Dataset:
                        fields[name] = _attrs(_open_member(group, name))
                except Exception:
                    continue
        if not isinstance(signal, str) or not signal:
            signal = next((n for n, a in fields.items()
                           if str(a.get("signal")) in ("1", "True")), None)
        if signal:
            out["signal"] = signal
            if not axes:
                axes = _names(fields.get(signal, {}).get("axes"))
        if not axes:
            ranked = sorted((a["axis"], n) for n, a in fields.items()
                            if isinstance(a.get("axis"), int))
            axes = [n for _, n in ranked]
        if axes:
            out["axes"] = axes
        return out

    def summary(self) -> dict[str, Any]:
        """Harvested, searchable summary of the first NXentry (see :func:`summary`)."""
        if self._summary is None:
            self._summary = _harvest(self)
        return self._summary


# ----------------------------------------------------------------------- summary

#: (output key, group role, field name, quantity for to_canonical or None)
_HARVEST = (
    ("sample/name", "sample", "name", None),
    ("sample/temperature", "sample", "temperature", "temperature"),
    ("instrument/monochromator/wavelength", "monochromator", "wavelength", "wavelength"),
    ("instrument/detector/distance", "detector", "distance", "length"),
    ("instrument/detector/x_pixel_size", "detector", "x_pixel_size", "length"),
    ("instrument/detector/y_pixel_size", "detector", "y_pixel_size", "length"),
    ("instrument/detector/beam_center_x", "detector", "beam_center_x", "pixels"),
    ("instrument/detector/beam_center_y", "detector", "beam_center_y", "pixels"),
    ("instrument/detector/count_time", "detector", "count_time", "time"),
    ("start_time", "entry", "start_time", None),
    ("title", "entry", "title", None),
)


def _find(group: Any, name: str, nx_class: str) -> NexusAdapter | None:
    """Member ``name`` if it is a group, else the first member of class ``nx_class``."""
    if not isinstance(group, NexusAdapter):
        return None
    child = group.get(name) if name in group else None
    if isinstance(child, NexusAdapter):
        return child
    for key in group:
        child = group[key]
        if isinstance(child, NexusAdapter) and any(s.name == nx_class for s in child.specs):
            return child
    return None


def _harvest(root: NexusAdapter) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        entry = next((root[k] for k in root if isinstance(root[k], NexusAdapter)
                      and any(s.name == "NXentry" for s in root[k].specs)), None)
        entry = entry or _find(root, "entry", "NXentry")
        instrument = _find(entry, "instrument", "NXinstrument")
        groups = {
            "entry": entry,
            "sample": _find(entry, "sample", "NXsample"),
            "monochromator": _find(instrument, "monochromator", "NXmonochromator"),
            "detector": _find(instrument, "detector", "NXdetector"),
        }
    except Exception:
        return out
    for key, role, name, quantity in _HARVEST:
        group = groups[role]
        try:
            field = group[name] if group is not None and name in group else None
            if not isinstance(field, NexusField) or field._error is not None:
                continue
            value = field._value
            if value is None and field.structure().shape == (1,):
                value = _jsonable(field.read()[0])
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if quantity is None:
                if isinstance(value, (str, int, float)):
                    put(out, key, _text(str(value)))
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            units = field._attrs.get("units")
            if not isinstance(units, str):
                if quantity != "pixels":
                    continue  # a number without units is not searchable across formats
                units = "pixel"
            converted, unit = to_canonical(float(value), units, quantity)
            put(out, key, converted, unit)
        except Exception:  # unknown units, odd values: skip, never fail the file
            continue
    return out


def summary(source: Any, *, roots: Any = None) -> dict[str, Any]:
    """Searchable summary of a NeXus file's first NXentry.

    Keys are NeXus paths, values converted to canonical units with the unit in a
    sibling ``<name>@units`` key (see :mod:`scatterbroker.adapters.units`):
    ``sample/name``, ``sample/temperature`` (K), ``instrument/monochromator/
    wavelength`` (angstrom), ``instrument/detector/distance``, ``x_pixel_size``,
    ``y_pixel_size`` (mm), ``beam_center_x``/``beam_center_y`` (pixel),
    ``count_time`` (s), ``start_time`` and ``title`` (str). A value whose units
    are missing or cannot be converted is left out.

    Parameters
    ----------
    source
        Path, ``file://`` URI, or an open h5py File/Group (its file is reopened
        read-only here, so links are confined like everywhere else).
    roots
        Readable roots; default: the file's own directory.

    Examples
    --------
    >>> summary("scan_0001.nxs")["sample"]["temperature"]  # doctest: +SKIP
    300.0
    """
    if isinstance(source, (h5py.File, h5py.Group, h5py.Dataset)):
        source = source.file.filename
    cls = NexusAdapter
    if roots is not None:
        cls = type("NexusAdapter", (NexusAdapter,), {"readable_roots": normalize_roots(roots)})
    return dict(cls(source).summary())
