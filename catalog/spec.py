"""SPEC data files (certif.com ``spec``) as the sidecar of a scan of frames.

Which SPEC scan belongs to which frames
---------------------------------------
A scan of frames ``<prefix><frame>.<ext>`` has the catalog key ``K``: the
prefix without trailing ``_-. `` (``lab6_0012`` for ``lab6_0012_00001.cbf``).

1. **Scan number**: the number that ends ``K`` (``lab6_0012`` → 12,
   ``scan3`` → 3). A key that does not end in a number has no SPEC scan.
2. **SPEC file**: ``<stem>.spec`` in the frames' directory, where ``<stem>``
   is ``K`` without that number and the separators before it
   (``lab6_0012`` → ``lab6.spec``); failing that, the only ``*.spec`` file in
   the directory. Several ``*.spec`` files, none of them ``<stem>.spec``:
   nothing is guessed and a problem says so. (A SPEC file without the
   ``.spec`` suffix is not looked at: link or rename it.)
3. **Scan**: the ``#S`` line with that number. If the number appears more
   than once (SPEC restarted its numbering), the last is used and a problem
   says so; if it does not appear, a problem says so.

What is harvested (see :func:`parse_scan`)
------------------------------------------
- ``#O``/``#o`` motor names with the scan's ``#P`` positions: all of them in
  ``spec/positioners`` (``{name: position}``, SPEC's own units); known
  goniometer motors also as NeXus-style keys in degrees (:data:`GONIOMETER`:
  ``th`` → ``sample/theta``, ``tth`` → ``instrument/detector/two_theta`` …).
- ``#L`` columns: ``spec/columns`` (names), ``spec/points`` (rows so far) and,
  up to :data:`MAX_VALUES` numbers, ``spec/data`` (``{column: [values]}``).
- Temperature: the first ``#L`` column, else positioner, whose name is a
  temperature (:func:`temperature_unit`: ``Temp``, ``temperature``,
  ``T_sample``, ``sample_temp`` …, optionally with a unit: ``Temp (C)``,
  ``temp_K``). Stored as ``sample/temperature`` in K (a column: its mean over
  the points); SPEC records no units, so a name without one is taken as
  kelvin, and ``spec/temperature_from`` says which name was used and how.
- ``sample/name`` only from an explicit ``#C sample: NAME`` / ``#C sample = NAME``
  (``sample name``/``sample_name`` too); the scan's ``#C`` lines win over the
  file header's. ``#F`` (a path) is never taken as a sample name.
- ``#D`` of the scan (else of the file header): ``start_time`` (ISO 8601,
  SPEC's local time, no zone) and ``spec/date`` as written.
- ``#S`` command, ``#T`` count time (s) or ``#M`` monitor preset, ``#Q`` hkl,
  ``#G0``… geometry lines, ``#G3`` or ``#UB0``–``#UB2`` orientation matrix
  (``spec/ub_matrix``, SPEC's convention: 2π included). When ``#G1`` holds a
  unit cell whose reciprocal lengths (also in ``#G1``) agree with it, the cell
  goes to ``sample/unit_cell_abc``/``unit_cell_alphabetagamma`` and, if the
  UB agrees with that cell, ``sample/ub_matrix`` in the NeXus convention
  (Busing-Levy, without 2π, Å⁻¹).

A malformed file or scan gives problems (one line each, naming the file,
scan and line); whatever could be read is kept and registration goes on.
The parser is this small module rather than ``silx.io.specfile`` or
``spec2nexus``: the format is a handful of line types, and neither package is
worth its weight (silx) or its dependencies (spec2nexus) for that.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..adapters.units import put, to_canonical

SUFFIX = ".spec"
#: Largest ``points x columns`` whose values go into ``spec/data``.
MAX_VALUES = 20_000
#: At most this many data-line problems are listed per scan (then a count).
MAX_LINE_PROBLEMS = 3

#: SPEC motor name or mnemonic (lower case, spaces removed) -> NeXus-style key (deg).
GONIOMETER: dict[str, str] = {
    "phi": "sample/phi",
    "chi": "sample/chi",
    "omega": "sample/omega", "om": "sample/omega", "omg": "sample/omega",
    "th": "sample/theta", "theta": "sample/theta",
    "kappa": "sample/kappa", "kap": "sample/kappa",
    "mu": "sample/mu",
    "tth": "instrument/detector/two_theta", "twotheta": "instrument/detector/two_theta",
    "2theta": "instrument/detector/two_theta",
    "del": "instrument/detector/delta", "delta": "instrument/detector/delta",
    "nu": "instrument/detector/nu",
}

_TEMPERATURE_NAMES = {
    "temp", "temperature", "sampletemp", "sampletemperature", "tsample", "tsam", "tsamp",
    "temps", "tempsample", "sampt",
}
_TEMPERATURE = re.compile(
    r"^(?P<name>.*?)[\s_]*(?:[(\[]\s*(?P<u1>K|C|degC|°C|kelvin|celsius)\s*[)\]]|_(?P<u2>K|C))?$",
    re.IGNORECASE,
)
_TRAILING_NUMBER = re.compile(r"^(?P<stem>.*?)[_\-. ]*(?P<number>\d+)$")
_BLOCK = re.compile(rb"^#([SFE])(?=[ \t\r\n])", re.M)
_SAMPLE = re.compile(r"\bsample(?:[ _]?name)?\s*[:=]\s*(?P<name>\S.*?)\s*$", re.IGNORECASE)


# ------------------------------------------------------------------ which scan


def scan_number(key: str) -> tuple[str, int] | None:
    """``(stem, number)`` for a scan key ending in a number, else None.

    >>> scan_number("lab6_0012")
    ('lab6', 12)
    """
    m = _TRAILING_NUMBER.match(key)
    if not m:
        return None
    return m["stem"], int(m["number"])


def spec_file_for(directory: Path, key: str) -> tuple[Path | None, int | None, str | None]:
    """``(SPEC file, scan number, problem)`` for scan ``key`` in ``directory``.

    ``(None, None, None)`` when no SPEC file applies; a problem (and no file)
    when several could and none is named after the scan (rule 2 above).
    """
    found = scan_number(key)
    if found is None:
        return None, None, None
    stem, number = found
    try:
        mtime = directory.stat().st_mtime_ns
        if time.time_ns() - mtime < 2_000_000_000:  # changed just now: a coarse clock could hide
            mtime = -time.monotonic_ns()             # a later change at the same mtime; list afresh
        specs = [directory / name for name in _spec_names(str(directory), mtime)]
    except OSError:
        return None, None, None
    named = [p for p in specs if p.stem == stem]
    if named:
        return named[0], number, None
    if len(specs) == 1:
        return specs[0], number, None
    if len(specs) > 1:
        names = ", ".join(p.name for p in specs)
        return None, number, (
            f"{key}: {len(specs)} SPEC files ({names}) and none is {stem}{SUFFIX}; "
            "no SPEC metadata taken"
        )
    return None, None, None


@functools.lru_cache(maxsize=64)
def _spec_names(directory: str, mtime_ns: int) -> tuple[str, ...]:
    """``*.spec`` file names in ``directory`` (cached while its entries are unchanged:
    a detector directory can hold 100,000 frames, and every scan in it asks)."""
    with os.scandir(directory) as entries:
        return tuple(sorted(e.name for e in entries if e.name.lower().endswith(SUFFIX)
                            and not e.name.startswith(".") and e.is_file()))


# ------------------------------------------------------------------ index


@dataclass(frozen=True)
class _Block:
    """Byte ranges of one scan and of the file header it follows (-1: none)."""

    number: int
    line: int  # 1-based line number of the #S line
    start: int
    end: int
    header_start: int
    header_end: int


@dataclass(frozen=True)
class _Index:
    scans: dict[int, list[_Block]] = field(default_factory=dict)
    bad_lines: tuple[int, ...] = ()  # '#S' lines without a scan number
    has_hash: bool = False  # any line starting with '#'


@functools.lru_cache(maxsize=16)
def _index_cached(path: str, size: int, mtime_ns: int, inode: int) -> _Index:
    with open(path, "rb") as f:
        data = f.read(size)
    return _index_bytes(data)


def _index_bytes(data: bytes) -> _Index:
    marks = [(m.start(), m.group(1)) for m in _BLOCK.finditer(data)]
    scans: dict[int, list[_Block]] = {}
    bad: list[int] = []
    header = (-1, -1)
    previous = b"S"
    header_open = -1
    for k, (start, kind) in enumerate(marks):
        end = marks[k + 1][0] if k + 1 < len(marks) else len(data)
        if kind in (b"F", b"E"):
            if previous == b"S" or header_open < 0:
                header_open = start
            previous = kind
            continue
        if previous != b"S" and header_open >= 0:
            header = (header_open, start)  # a header block ends where its first scan starts
        previous = b"S"
        line_end = data.find(b"\n", start)
        words = data[start: line_end if line_end >= 0 else len(data)].split()
        line = data.count(b"\n", 0, start) + 1
        if len(words) < 2 or not words[1].isdigit():
            bad.append(line)
            continue
        number = int(words[1])
        scans.setdefault(number, []).append(_Block(number, line, start, end, *header))
    return _Index(scans, tuple(bad), data.startswith(b"#") or b"\n#" in data[:65536])


def _index(path: Path) -> _Index:
    st = path.stat()
    return _index_cached(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _read(path: Path, block: _Block) -> tuple[str, str]:
    """(header text, scan text) of ``block``."""
    with open(path, "rb") as f:
        header = b""
        if block.header_start >= 0:
            f.seek(block.header_start)
            header = f.read(block.header_end - block.header_start)
        f.seek(block.start)
        body = f.read(block.end - block.start)
    return _text(header), _text(body)


def _text(raw: bytes) -> str:
    # NUL would be refused by PostgreSQL's JSONB; SPEC is ASCII anyway.
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def fingerprint(path: Path, number: int) -> list[Any]:
    """What registration compares to see if scan ``number`` of ``path`` changed.

    ``[bytes, digest]`` of the scan's block and its file header, not the
    whole file's size and mtime: a SPEC file is shared by many scans and grows
    with each, and only the scan's own lines should make it be harvested again.
    ``[0, "absent"]`` if the scan is not (yet) in the file.
    """
    try:
        blocks = _index(path).scans.get(number)
    except OSError as err:
        return [0, f"unreadable: {err.strerror}"]
    if not blocks:
        return [0, "absent"]
    header, body = _read(path, blocks[-1])
    header, body = header.rstrip(), body.rstrip()  # the blank line before the next scan is not the scan's
    digest = hashlib.blake2b((header + "\0" + body).encode(), digest_size=8).hexdigest()
    return [len(body), digest]


def read_spec_scan(path: Path, number: int) -> tuple[dict, list[str]]:
    """Harvested metadata of scan ``number`` in SPEC file ``path``, plus problems."""
    try:
        index = _index(path)
    except OSError as err:
        return {}, [f"{path.name}: cannot read the SPEC file ({err.strerror})"]
    problems: list[str] = []
    if not index.scans:
        what = "no '#S' scan lines" if index.has_hash else "no SPEC '#' lines at all"
        return {}, [f"{path.name}: not a SPEC data file ({what}); no SPEC metadata taken"]
    for line in index.bad_lines[:MAX_LINE_PROBLEMS]:
        problems.append(f"{path.name} line {line}: '#S' without a scan number; that scan is skipped")
    blocks = index.scans.get(number)
    if not blocks:
        return {}, problems + [f"{path.name}: no scan {number} ('#S {number}') in the file"]
    if len(blocks) > 1:
        lines = ", ".join(str(b.line) for b in blocks)
        problems.append(
            f"{path.name}: scan {number} appears {len(blocks)} times (lines {lines}); "
            f"the last (line {blocks[-1].line}) is used"
        )
    block = blocks[-1]
    header, body = _read(path, block)
    md, more = parse_scan(header, body, f"{path.name} scan {number}", first_line=block.line)
    md.setdefault("spec", {})["file"] = path.name
    return md, problems + more


# ------------------------------------------------------------------ parsing


def _lines(text: str) -> list[str]:
    """Complete lines of ``text``; a last line without its newline (SPEC still
    writing it) is left out."""
    lines = text.split("\n")
    lines.pop()  # '' after a final newline, or a partial line
    return [line.rstrip("\r") for line in lines]


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split()]


def _names(text: str) -> list[str]:
    """SPEC separates names (which may hold single spaces) by two or more spaces."""
    return [n for n in re.split(r"\s{2,}|\t", text.strip()) if n]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def temperature_unit(name: str) -> str | None:
    """``"K"`` or ``"C"`` if ``name`` is a temperature (kelvin when it names no
    unit), else None.

    >>> [temperature_unit(n) for n in ("Temp", "Temp (C)", "sample_temp_K", "Theta")]
    ['K', 'C', 'K', None]
    """
    m = _TEMPERATURE.match(name.strip())
    if not m:
        return None
    base = re.sub(r"[^a-z0-9]", "", m["name"].lower())
    if base not in _TEMPERATURE_NAMES:
        return None
    unit = (m["u1"] or m["u2"] or "K").lower()
    return "C" if unit in ("c", "degc", "°c", "celsius") else "K"


def _names_unit(name: str) -> bool:
    m = _TEMPERATURE.match(name.strip())
    return bool(m and (m["u1"] or m["u2"]))


def _spec_date(text: str) -> str | None:
    """SPEC's ``ctime`` date (``Tue Nov 25 08:05:00 2026``) as ISO 8601, or None."""
    try:
        return datetime.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y").isoformat()
    except ValueError:
        return None


def parse_scan(header: str, body: str, label: str, *, first_line: int = 1) -> tuple[dict, list[str]]:
    """Metadata of one SPEC scan (``body``: from its ``#S`` line) after its file ``header``.

    ``label`` names the scan in problems (``"lab6.spec scan 12"``); ``first_line``
    is the file line number of the ``#S`` line, for messages.
    """
    problems: list[str] = []
    line_problems: list[str] = []
    o_lines: dict[int, str] = {}
    mnemonic_lines: dict[int, str] = {}
    header_comments: list[str] = []
    header_date = None
    for line in _lines(header):
        tag, _, rest = line.partition(" ")
        if re.fullmatch(r"#O\d+", tag):
            o_lines[int(tag[2:])] = rest
        elif re.fullmatch(r"#o\d+", tag):
            mnemonic_lines[int(tag[2:])] = rest
        elif tag == "#C":
            header_comments.append(rest.strip())
        elif tag == "#D":
            header_date = rest.strip()

    spec: dict[str, Any] = {}
    p_lines: dict[int, str] = {}
    geometry: dict[str, list[float]] = {}
    ub_lines: dict[int, str] = {}
    comments: list[str] = []
    labels: list[str] = []
    n_declared: int | None = None
    rows: list[list[float | None]] = []
    date = None
    in_mca = False
    for k, line in enumerate(_lines(body)):
        where = f"{label}, line {first_line + k}"
        if in_mca:  # continuation of an @A line
            in_mca = line.endswith("\\")
            continue
        if not line.strip():
            continue
        if line.startswith("@A"):
            in_mca = line.endswith("\\")
            continue
        if not line.startswith("#"):
            if not labels:
                line_problems.append(f"{where}: data before any '#L' column names; skipped")
                continue
            try:
                values = [_finite(v) for v in _numbers(line)]
            except ValueError:
                line_problems.append(f"{where}: data line is not numbers; skipped")
                continue
            if len(values) != len(labels):
                line_problems.append(
                    f"{where}: {len(values)} values for {len(labels)} '#L' columns; skipped")
                continue
            rows.append(values)
            continue
        tag, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if tag == "#S":
                words = rest.split(None, 1)
                spec["scan_number"] = int(words[0])
                spec["command"] = words[1] if len(words) > 1 else ""
            elif tag == "#D":
                date = rest
            elif tag == "#T":
                put(spec, "count_time", float(rest.split()[0]), "s")
            elif tag == "#M":
                spec["monitor_preset"] = float(rest.split()[0])
            elif tag == "#Q":
                spec["hkl"] = _numbers(rest) if rest else []
            elif tag == "#N":
                n_declared = int(rest.split()[0])
            elif tag == "#L":
                labels = _names(rest)
                if n_declared is not None and len(labels) != n_declared and len(rest.split()) == n_declared:
                    labels = rest.split()  # single-space separated names
            elif tag == "#C":
                comments.append(rest)
            elif re.fullmatch(r"#P\d+", tag):
                p_lines[int(tag[2:])] = rest
            elif re.fullmatch(r"#G\d+", tag):
                geometry[tag[1:]] = _numbers(rest)
            elif re.fullmatch(r"#UB\d*", tag):
                ub_lines[int(tag[3:] or 0)] = rest
        except (ValueError, IndexError):
            problems.append(f"{where}: malformed '{tag}' line ({line[:60]!r}); ignored")

    md: dict[str, Any] = {}
    # Motors: names from #O (and mnemonics from #o), positions from #P.
    names = [n for _, text in sorted(o_lines.items()) for n in _names(text)]
    mnemonics = [n for _, text in sorted(mnemonic_lines.items()) for n in text.split()]
    positions: list[float | None] = []
    for index, text in sorted(p_lines.items()):
        for word in text.split():
            try:
                positions.append(_finite(float(word)))
            except ValueError:
                problems.append(f"{label}: '#P{index}' position {word!r} is not a number")
                positions.append(None)
    if names and positions and len(names) != len(positions):
        single = [n for _, text in sorted(o_lines.items()) for n in text.split()]
        if len(single) == len(positions):
            names = single
        else:
            problems.append(
                f"{label}: {len(positions)} '#P' positions for {len(names)} '#O' motors; "
                f"paired in order up to {min(len(names), len(positions))}"
            )
    if positions and not names:
        problems.append(f"{label}: '#P' positions but no '#O' motor names in the file header")
    positioners = dict(zip(names, positions))
    if positioners:
        spec["positioners"] = positioners
    for i, (name, value) in enumerate(zip(names, positions)):
        if value is None:
            continue
        keys = {name.lower().replace(" ", "")}
        if i < len(mnemonics):
            keys.add(mnemonics[i].lower())
        target = next((GONIOMETER[k] for k in keys if k in GONIOMETER), None)
        if target:
            put(md, target, value, "deg")

    # Columns and data.
    if labels:
        spec["columns"] = labels
        spec["points"] = len(rows)
        if n_declared is not None and n_declared != len(labels):
            problems.append(f"{label}: '#N {n_declared}' but '#L' names {len(labels)} columns")
        if rows and len(rows) * len(labels) <= MAX_VALUES:
            spec["data"] = {name: [row[j] for row in rows] for j, name in enumerate(labels)}
    if len(line_problems) > MAX_LINE_PROBLEMS:
        extra = len(line_problems) - MAX_LINE_PROBLEMS
        line_problems = line_problems[:MAX_LINE_PROBLEMS] + [f"{label}: {extra} more bad data lines skipped"]
    problems += line_problems

    # Temperature: a column (its mean), else a positioner.
    found = None
    for j, name in enumerate(labels):
        unit = temperature_unit(name)
        values = [row[j] for row in rows if row[j] is not None]
        if unit and values:
            found = (sum(values) / len(values), unit, name, f"column {name!r}, mean of {len(values)} points")
            break
    if found is None:
        for name, value in positioners.items():
            unit = temperature_unit(name)
            if unit and value is not None:
                found = (value, unit, name, f"positioner {name!r}")
                break
    if found is not None:
        value, unit, name, origin = found
        kelvin, canonical = to_canonical(value, unit, "temperature")
        put(md, "sample/temperature", kelvin, canonical)
        if not _names_unit(name):
            origin += "; no unit in the name: kelvin assumed"
        spec["temperature_from"] = origin

    # Sample name, dates.
    for text in [*comments, *header_comments]:
        m = _SAMPLE.search(text)
        if m:
            put(md, "sample/name", m["name"])
            break
    date = date or header_date
    if date:
        spec["date"] = date
        iso = _spec_date(date)
        if iso:
            md["start_time"] = iso
    if comments:
        spec["comments"] = comments[:20]

    # Orientation.
    if geometry:
        spec["geometry"] = geometry
    ub = None
    if ub_lines:
        try:
            values = [v for _, text in sorted(ub_lines.items()) for v in _numbers(text)]
        except ValueError:
            values = []
        if len(values) == 9:
            ub = values
        else:
            problems.append(f"{label}: '#UB' lines hold {len(values)} numbers, not the 9 of a 3x3 matrix")
    elif len(geometry.get("G3", [])) == 9:
        ub = geometry["G3"]
    if ub is not None:
        spec["ub_matrix"] = [ub[0:3], ub[3:6], ub[6:9]]
    _nexus_orientation(md, geometry.get("G1", []), ub)

    if spec:
        md["spec"] = {**md.get("spec", {}), **spec}
    return md, problems


def _nexus_orientation(md: dict, g1: list[float], ub: list[float] | None) -> None:
    """Unit cell and NeXus ``ub_matrix`` from ``#G1``/UB, only when they check out.

    ``#G1`` starts with the direct cell (a, b, c in Å, angles in deg) and the
    reciprocal one (2π included) in four-circle geometries; other geometries
    use it differently, so the cell is taken only if the two agree. The UB is
    taken (divided by 2π) only if ``UBᵀ·UB = Bᵀ·B`` for that cell (U orthogonal).
    """
    if len(g1) < 9:
        return
    import numpy as np

    from ..reduction.geometry import busing_levy_b

    try:
        bmat = busing_levy_b(*g1[:6])
    except Exception:  # not a cell: a geometry that uses #G1 otherwise
        return
    if not np.allclose(np.linalg.norm(bmat, axis=0), g1[6:9], rtol=1e-3):
        return  # |B e_j| = |a_j*| (2π included): #G1's reciprocal lengths
    put(md, "sample/unit_cell_abc", [float(x) for x in g1[0:3]], "angstrom")
    put(md, "sample/unit_cell_alphabetagamma", [float(x) for x in g1[3:6]], "deg")
    if ub is None:
        return
    u_b = np.array(ub, dtype=float).reshape(3, 3)
    if np.allclose(u_b.T @ u_b, bmat.T @ bmat, rtol=1e-2, atol=1e-3 * float(np.abs(bmat).max())):
        put(md, "sample/ub_matrix", (u_b / (2 * math.pi)).round(12).tolist(), "1/angstrom")
