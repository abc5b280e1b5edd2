"""Readable roots: resolve a path and refuse anything that escapes them.

Every file the server reads, and everything an HDF5 file points at (external
links, virtual-dataset sources, external raw storage), goes through
:func:`confine` *before* a byte of it is read. Paths are compared after
``os.path.realpath``, so ``..`` segments and symlinks cannot leave a root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path

from ..errors import BrokenLink, OutsideRoots

Roots = tuple[Path, ...]

#: A list while someone wants to know which files the current request reads
#: (``scatterbroker.response_cache`` and ``.entry_cache``: what came from files
#: is reused only while they are unchanged); every file confined or opened is
#: added to it as ``(path, file_stamp)``.
files_read: ContextVar[list | None] = ContextVar("scatterbroker_files_read", default=None)


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What identifies a file's content without reading it: device, inode, size, mtime (ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def note_read(path: str | os.PathLike[str], st: os.stat_result) -> None:
    """Record that the current request reads ``path`` as it is now (see :data:`files_read`)."""
    seen = files_read.get()
    if seen is not None:
        seen.append((os.fspath(path), file_stamp(st)))


def one_stamp_each(files: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """The ``(path, file_stamp)`` pairs of :data:`files_read`, one per file, or None if a file
    showed two stamps (it changed while it was read: what came from it may be either version)."""
    files = list(files)
    stamps = dict(files)
    return tuple(stamps.items()) if len(stamps) == len(set(files)) else None


def unchanged(stamps: Iterable[tuple[str, tuple[int, ...]]]) -> bool:
    """True if every ``(path, file_stamp)`` still holds (same device, inode, size and mtime)."""
    for path, stamp in stamps:
        try:
            if file_stamp(os.stat(path)) != stamp:
                return False
        except OSError:
            return False
    return True


def normalize_roots(roots: Iterable[str | os.PathLike[str]]) -> Roots:
    """Return the real (symlink-free, absolute) form of each root directory."""
    return tuple(Path(os.path.realpath(os.fspath(r))) for r in roots)


def is_inside(path: Path, roots: Roots) -> bool:
    """True if the already-resolved ``path`` is a root or lies below one."""
    return any(path == root or root in path.parents for root in roots)


def confine(
    path: str | os.PathLike[str],
    roots: Roots,
    *,
    relative_to: str | os.PathLike[str] | None = None,
    what: str = "path",
) -> Path:
    """Resolve ``path`` and return it if it lies inside ``roots``.

    Parameters
    ----------
    path
        The path as written (in a registration request, or inside an HDF5 link).
    roots
        Output of :func:`normalize_roots`.
    relative_to
        Directory a relative ``path`` is taken against (for an HDF5 external
        link: the directory of the file holding the link).
    what
        Names the path in error messages, e.g. ``"external link target"``.

    Raises
    ------
    OutsideRoots
        The resolved path is outside every root, or is not a regular file or
        directory (a device, FIFO or socket).
    BrokenLink
        The path does not exist, or resolving it loops.

    Examples
    --------
    >>> confine("../../etc/passwd", roots, relative_to="/data/scan1")  # doctest: +SKIP
    OutsideRoots: external link target '../../etc/passwd' resolves to /etc/passwd, outside the readable roots
    """
    raw = os.fspath(path)
    if "\x00" in raw:
        raise OutsideRoots(f"{what} {raw!r} contains a NUL byte")
    joined = os.path.join(os.fspath(relative_to), raw) if relative_to else raw
    try:
        resolved = Path(os.path.realpath(joined, strict=True))
    except FileNotFoundError:
        resolved = Path(os.path.realpath(joined))
        if not is_inside(resolved, roots):
            raise OutsideRoots(
                f"{what} {raw!r} resolves to {resolved}, outside the readable roots"
            ) from None
        raise BrokenLink(f"{what} {raw!r} does not exist ({resolved})") from None
    except OSError as err:  # ELOOP: a symlink cycle
        raise BrokenLink(f"{what} {raw!r} cannot be resolved: {err.strerror}") from None
    if not is_inside(resolved, roots):
        raise OutsideRoots(
            f"{what} {raw!r} resolves to {resolved}, outside the readable roots"
        )
    st = resolved.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OutsideRoots(f"{what} {raw!r} is not a regular file ({resolved})")
    if stat.S_ISREG(st.st_mode):
        note_read(resolved, st)
    return resolved
