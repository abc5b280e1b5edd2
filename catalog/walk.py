"""Walk a directory tree and decide what each file becomes in the catalog.

Numbered files of one format in one directory (``scan_00001.cbf`` …) become a
single :class:`Sequence`; other readable files become :class:`Single` nodes;
files no installed adapter reads are listed in ``Listing.unknown`` with the
reason. Pure: nothing here talks to a server or opens a file for writing.
"""

from __future__ import annotations

import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import registry
from ..errors import UnknownFormat
from .sidecar import is_sidecar

NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<digits>\d+)(?P<suffix>\.[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Sequence:
    """Numbered files ``{prefix}{n:0{width}d}{suffix}`` forming one scan."""

    directory: Path
    prefix: str
    width: int
    suffix: str
    numbers: tuple[int, ...]
    mimetype: str  # of the sequence adapter
    stats: tuple[int, int]  # (total bytes, newest mtime_ns)
    #: numbered files of the same prefix and suffix left out of the scan: (path, why)
    rejected: tuple[tuple[Path, str], ...] = ()

    @property
    def key(self) -> str:
        return self.prefix.rstrip("_-. ") or self.suffix.lstrip(".")


@dataclass(frozen=True)
class Single:
    path: Path
    mimetype: str
    stats: tuple[int, int]

    @property
    def key(self) -> str:
        return self.path.name.split(".", 1)[0] or self.path.name


@dataclass
class Listing:
    """What one directory holds, in catalog terms."""

    directory: Path
    sequences: list[Sequence] = field(default_factory=list)
    singles: list[Single] = field(default_factory=list)
    subdirectories: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)  # metadata files, see sidecar.py
    unknown: list[tuple[Path, str]] = field(default_factory=list)

    def keyed(self) -> dict[str, Sequence | Single]:
        """Items by catalog key; a clash falls back to the full file name."""
        items: list[Sequence | Single] = [*self.sequences, *self.singles]
        counts: dict[str, int] = defaultdict(int)
        for item in items:
            counts[item.key] += 1
        for sub in self.subdirectories:
            counts[sub.name] += 1
        out: dict[str, Sequence | Single] = {}
        for item in items:
            key = item.key
            if counts[key] > 1:
                key = item.path.name if isinstance(item, Single) else f"{item.prefix}*{item.suffix}"
            out[key] = item
        return out


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.endswith(("~", ".tmp", ".part"))


def list_directory(directory: Path) -> Listing:
    """Classify the entries of one directory (not recursive)."""
    listing = Listing(directory)
    numbered: dict[tuple[str, str, str], list[tuple[str, os.stat_result]]] = defaultdict(list)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if _is_hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            listing.subdirectories.append(Path(entry.path))
            continue
        try:
            is_file = entry.is_file()
        except OSError:  # ELOOP: a cycle of symbolic links
            is_file = False
        if not is_file:
            # Reported, not silently dropped: a symlinked directory (not followed: it
            # could loop or leave the root), a broken or looping link, a device, FIFO
            # or socket (never opened: reading one can block or never end).
            listing.unknown.append((Path(entry.path), _not_a_file(entry)))
            continue
        path = Path(entry.path)
        if is_sidecar(path):
            listing.sidecars.append(path)
            continue
        try:
            mimetype = registry.mimetype_for(path)
        except (UnknownFormat, OSError) as err:
            listing.unknown.append((path, str(err)))
            continue
        st = entry.stat()
        m = NUMBERED.match(entry.name)
        if m and registry.sequence_mimetype(mimetype):
            numbered[(m["prefix"], m["suffix"], mimetype)].append((m["digits"], st))
        else:
            listing.singles.append(Single(path, mimetype, (st.st_size, st.st_mtime_ns)))
    for (prefix, suffix, mimetype), found in numbered.items():
        groups = _by_width(found)
        width = max(groups, key=lambda w: (len(groups[w]), w))  # the scan: the largest group
        members = groups[width]
        if len(members) == 1:  # a lone numbered file is just a file (each of them)
            for digits, st in found:
                path = directory / f"{prefix}{digits}{suffix}"
                listing.singles.append(Single(path, mimetype, (st.st_size, st.st_mtime_ns)))
            continue
        numbers = {int(d): d for d, _ in members}
        rejected = [
            (directory / f"{prefix}{d}{suffix}", misnumbered(f"{prefix}{d}{suffix}", int(d),
                                                             numbers, prefix, width, suffix))
            for w, others in groups.items() if w != width for d, _ in others
        ]
        listing.sequences.append(
            Sequence(
                directory,
                prefix,
                width,
                suffix,
                tuple(sorted(numbers)),
                registry.sequence_mimetype(mimetype),
                (sum(st.st_size for _, st in members), max(st.st_mtime_ns for _, st in members)),
                tuple(sorted(rejected)),
            )
        )
    return listing


def misnumbered(name: str, number: int, numbers: Any, prefix: str, width: int, suffix: str) -> str:
    """Why ``name`` is left out of a scan numbered ``{prefix}{n:0{width}d}{suffix}``
    that already holds frame ``numbers``."""
    own = f"{prefix}{number:0{width}d}{suffix}"
    if number in numbers:
        return f"{name}: duplicate frame number {number} ({own} is that frame); left out"
    return f"{name}: frame number not written like the rest of the scan ({own}); left out"


def _not_a_file(entry: os.DirEntry) -> str:
    """Why a directory entry that is neither a directory nor a regular file is skipped."""
    name = entry.name
    if entry.is_symlink():
        try:
            target = os.stat(entry.path)
        except OSError as err:  # ENOENT: broken; ELOOP: a cycle of links
            return f"{name}: symbolic link cannot be resolved ({err.strerror}); skipped"
        if stat.S_ISDIR(target.st_mode):
            return f"{name}: symbolic link to a directory, not followed"
        return f"{name}: symbolic link to a device, FIFO or socket, not a regular file; skipped"
    return f"{name}: a device, FIFO or socket, not a regular file; skipped"


def _by_width(found: list[tuple[str, os.stat_result]]) -> dict[int, list]:
    """Split numbered files by zero-padding: '00012' is width 5; '12' fits any
    padded width of 2 digits present, else it is unpadded (width 0)."""
    padded = {len(d) for d, _ in found if len(d) > 1 and d.startswith("0")}
    groups: dict[int, list] = defaultdict(list)
    for digits, st in found:
        width = len(digits) if len(digits) in padded else 0
        groups[width].append((digits, st))
    return groups


def walk(root: Path) -> Iterator[tuple[tuple[str, ...], Listing]]:
    """Yield ``(relative directory parts, listing)`` top-down from ``root``.

    Symlinked directories are not followed (they could loop or leave the root).
    """
    root = Path(root)
    stack: list[tuple[tuple[str, ...], Path]] = [((), root)]
    while stack:
        parts, directory = stack.pop(0)
        listing = list_directory(directory)
        yield parts, listing
        stack[:0] = [((*parts, sub.name), sub) for sub in listing.subdirectories]
