"""The one way scatterbroker writes a NeXus (HDF5) file: :func:`new_nexus_file`.

Why one helper: scan files, wrapper files and client-side wrappers are read
while they are being replaced -- the ingest watcher registers them, a server
serves them, NeXpy or a colleague has them open -- and they are written on
disks that fill up and by processes that get interrupted. Each writer used to
carry its own copy of "write to a temporary name, then rename", and the copies
had drifted (one never removed its temporary on failure, only one made the
data durable before the rename). Here, once:

* the file is written as ``.NAME.part`` in the target's own directory (hidden,
  and with a suffix the directory walk and the watcher skip), so the rename is
  atomic (same file system) and no reader ever sees a half-written file;
* on success its data is ``fsync``-ed and only then renamed over ``NAME``, so
  after a crash ``NAME`` is the old file or the whole new one, never a torn one;
* on any failure (a full disk, a decoder error, ``KeyboardInterrupt``) the
  temporary is removed and an existing ``NAME`` is left untouched;
* a path among ``inputs`` (the raw frames or the scan file being read) is
  refused before anything is opened: raw files are never written.

The callers set the file's content (root attributes, groups); what a failure
means to them (e.g. the stacker's :class:`~scatterbroker.reduction.stack.DiskFull`)
they decide around this context manager, which re-raises whatever happened.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ScatterbrokerError

__all__ = ["RawFileProtected", "new_nexus_file", "temporary_name"]


class RawFileProtected(ScatterbrokerError, ValueError):
    """The file to write is one of the inputs being read; nothing was written."""

    status_code = 422


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.NAME.part`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.part")


@contextlib.contextmanager
def new_nexus_file(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    error: type[Exception] = RawFileProtected,
) -> Iterator[Any]:
    """Open a new HDF5 file that replaces ``path`` atomically once the block completes.

    Yields the open ``h5py.File`` (mode ``"w"``) of the temporary; when the
    ``with`` block ends without an exception the file is closed, fsync-ed and
    renamed over ``path``. Otherwise the temporary is removed and the
    exception goes on. ``inputs``: files that are read to make this one;
    ``path`` resolving to one of them raises ``error`` (a
    :class:`RawFileProtected` unless the caller names its own class).
    """
    import h5py

    path = Path(path)
    protected = {os.path.realpath(p) for p in inputs}
    if protected and os.path.realpath(path) in protected:
        raise error(f"{path} is one of the input files; raw files are never written")
    tmp = temporary_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        with open(tmp, "rb") as fh:  # make the data durable before it replaces anything
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
