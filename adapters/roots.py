"""Readable roots: resolve a path and refuse anything that escapes them.

Every file the server reads, and everything an HDF5 file points at (external
links, virtual-dataset sources, external raw storage), goes through
:func:`confine` *before* a byte of it is read. Paths are compared after
``os.path.realpath``, so ``..`` segments and symlinks cannot leave a root.

A *hard* link is invisible to this: it is the file itself, with no path
leading elsewhere, so a hard link made inside a root to a file outside it (on
the same file system) is served. ``SCATTERBROKER_REFUSE_HARD_LINKS=1`` makes
:func:`confine` refuse every regular file whose link count is above 1 (an
operator whose data never has hard links can close the hole that way).

Error messages never carry the server's absolute paths (they went to every
client that could read the node, and ``/proc/self`` resolved to the server's
PID): a path is shown as written when it is relative (an HDF5 link target,
which comes from the file), by its last component when it is absolute.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path

from ..environment import env_flag
from ..errors import BrokenLink, OutsideRoots

#: Environment variable: ``1`` refuses regular files with more than one hard link.
REFUSE_HARD_LINKS = "SCATTERBROKER_REFUSE_HARD_LINKS"

Roots = tuple[Path, ...]

#: A list while someone wants to know which files the current request reads
#: (``scatterbroker.server.response_cache`` and ``.entry_cache``: what came from files
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


def shown(raw: str) -> str:
    """How an error message names the path ``raw``: as written if relative (it
    came from the request or the file, and reveals no server directory), else
    ``.../<last component>``, so no absolute server path reaches a client."""
    if not os.path.isabs(raw):
        return raw
    name = os.path.basename(raw.rstrip("/"))
    return f".../{name}" if name else "/"


def refuse_hard_links() -> bool:
    """Whether :func:`confine` refuses hard-linked files (``SCATTERBROKER_REFUSE_HARD_LINKS``,
    default off). Read on every call, so a test or an operator's restart sees the
    current value; the lookup costs nothing next to the ``stat`` it guards."""
    return env_flag(REFUSE_HARD_LINKS, False)


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
        directory (a device, FIFO or socket), or is a regular file with more
        than one hard link while :func:`refuse_hard_links` says so.
    BrokenLink
        The path does not exist, or resolving it loops.

    Examples
    --------
    >>> confine("../../etc/passwd", roots, relative_to="/data/scan1")  # doctest: +SKIP
    OutsideRoots: external link target '../../etc/passwd' leads outside the readable roots
    """
    raw = os.fspath(path)
    name = shown(raw)
    if "\x00" in raw:
        raise OutsideRoots(f"{what} {name!r} contains a NUL byte")
    joined = os.path.join(os.fspath(relative_to), raw) if relative_to else raw
    try:
        resolved = Path(os.path.realpath(joined, strict=True))
    except FileNotFoundError:
        resolved = Path(os.path.realpath(joined))
        if not is_inside(resolved, roots):
            raise OutsideRoots(f"{what} {name!r} leads outside the readable roots") from None
        raise BrokenLink(f"{what} {name!r} does not exist") from None
    except OSError as err:  # ELOOP: a symlink cycle
        raise BrokenLink(f"{what} {name!r} cannot be resolved: {err.strerror}") from None
    if not is_inside(resolved, roots):
        raise OutsideRoots(f"{what} {name!r} leads outside the readable roots")
    st = resolved.stat()
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise OutsideRoots(f"{what} {name!r} is not a regular file (a device, FIFO or socket)")
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink > 1 and refuse_hard_links():
            raise OutsideRoots(
                f"{what} {name!r} has {st.st_nlink} hard links: this server refuses "
                f"hard-linked files ({REFUSE_HARD_LINKS}), since one may be a file "
                "outside the readable roots"
            )
        note_read(resolved, st)
    return resolved
