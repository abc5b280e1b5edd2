"""One detector file as one array: the part every single-file format shares.

A format subclasses :class:`SingleFileAdapter` and implements
``inspect_file(path) -> (structure, header metadata)`` plus ``read`` and
``read_block``. The base confines the path to the readable roots, reads the
header only when the catalog has no stored structure, and merges header and
caller metadata (caller wins), as Tiled's own file adapters do.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

from tiled.adapters.core import Adapter
from tiled.adapters.utils import init_adapter_from_catalog
from tiled.structures.array import ArrayStructure
from tiled.structures.core import StructureFamily
from tiled.utils import path_from_uri

from .roots import confine


class SingleFileAdapter(Adapter[ArrayStructure]):
    """Base of the single-file array adapters (CBF, TIFF)."""

    structure_family = StructureFamily.array
    readable_roots = None

    def __init__(
        self,
        data_uri: str,
        structure: ArrayStructure | None = None,
        *,
        metadata: dict | None = None,
        specs: list | None = None,
    ) -> None:
        path = Path(path_from_uri(data_uri))
        if self.readable_roots is not None:
            path = confine(path, self.readable_roots, what="file")
        self._path = path
        self._header_md: dict = {}
        if structure is None:
            structure, self._header_md = self.inspect_file(path)
        super().__init__(structure, metadata=metadata, specs=specs)

    @classmethod
    @abstractmethod
    def inspect_file(cls, path: Path) -> tuple[ArrayStructure, dict]:
        """Structure and harvested header metadata of one file, from its header."""

    @classmethod
    def from_uris(cls, data_uri: str, **kwargs: Any):
        return cls(data_uri, **kwargs)

    @classmethod
    def from_catalog(cls, data_source, node, /, **kwargs: Any):
        return init_adapter_from_catalog(cls, data_source, node, **kwargs)

    def metadata(self) -> dict:
        return {**self._header_md, **self._metadata}
