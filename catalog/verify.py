"""Re-check raw files against the checksums recorded when they were registered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiled.utils import path_from_uri

from .checksum import ALGORITHM, file_checksum


@dataclass(frozen=True)
class Mismatch:
    """A raw file whose bytes are not what was registered (``actual`` None: missing)."""

    node: str
    path: Path
    expected: str
    actual: str | None

    def __str__(self) -> str:
        what = "missing" if self.actual is None else f"{ALGORITHM} {self.actual} != recorded {self.expected}"
        return f"{self.node}: {self.path}: {what}"


def verify(node: Any, progress: Callable[[int], None] | None = None) -> tuple[int, list[Mismatch]]:
    """Check every raw file under ``node``; return (files checked, mismatches).

    Walks directory containers and scans; a file node is checked against
    ``metadata["checksum"]``, a scan against its ``headers`` table.
    """
    checked, bad = 0, []
    for label, path, expected in _recorded(node):
        try:
            actual = file_checksum(path)
        except FileNotFoundError:
            actual = None
        checked += 1
        if actual != expected:
            bad.append(Mismatch(label, path, expected, actual))
        if progress:
            progress(1)
    return checked, bad


def _recorded(node: Any) -> Iterator[tuple[str, Path, str]]:
    label = "/".join(node.path_parts)
    specs = {s.name for s in getattr(node, "specs", [])}
    metadata = node.metadata
    if "scan" in specs and "headers" in node:
        (ds,) = node["frames"].include_data_sources().item["attributes"]["data_sources"]
        (asset,) = [a for a in ds["assets"] if a["parameter"] == "data_uri"]
        directory = Path(path_from_uri(asset["data_uri"]))
        table = node["headers"].read()
        if ALGORITHM in table:
            for name, digest in zip(table["file"], table[ALGORITHM]):
                yield label, directory / name, digest
        return
    if "checksum" in metadata and "source" in metadata:
        yield label, Path(metadata["source"]["path"]), metadata["checksum"][ALGORITHM]
        return
    if node.structure_family == "container" and not node.include_data_sources().item["attributes"].get("data_sources"):
        for _, child in node.items():
            yield from _recorded(child)
