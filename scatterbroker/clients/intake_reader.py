"""intake 2 reader: open a catalog node by its global URI as a NeXus tree.

intake imports this module at start-up (entry point ``intake.imports``), which
registers :class:`ScatterbrokerNeXus` next to intake's own Tiled readers:

* ``ScatterbrokerNeXus`` (this module) reads a :class:`ScatterbrokerNode`
  (or intake's ``TiledDataset``) into a ``nexusformat`` ``NXroot`` through
  :func:`scatterbroker.clients.nexus.nxload`: groups, attributes and small fields
  read at once, large fields lazy (:class:`~scatterbroker.clients.nexus.RemoteField`);
* intake's ``TiledClient`` reads the same data type into a Tiled client node,
  whose specs carry the NX_class (``read(as_client=False)`` gives numpy).

Readers go into intake catalogs (YAML) by URI only: the API key comes from
``options={"api_key": ...}`` or, better for shared catalogs,
``$SCATTERBROKER_API_KEY``.

Examples
--------
>>> from scatterbroker.clients.intake_reader import open_node                       # doctest: +SKIP
>>> root = open_node("http://host:8000/api/v1/metadata/scans/s1/scan1").read()  # doctest: +SKIP
>>> root.entry.data.data[0].shape                                           # doctest: +SKIP
(1679, 1475)
"""

from __future__ import annotations

from typing import Any

from intake.readers.datatypes import TiledDataset
from intake.readers.readers import BaseReader

__all__ = ["ScatterbrokerNode", "ScatterbrokerNeXus", "open_node"]


class ScatterbrokerNode(TiledDataset):
    """A scatterbroker catalog node, named by its global URI (``…/api/v1/metadata/<path>``).

    ``to_reader("TiledClient")`` gives intake's Tiled client reader and
    ``to_reader()`` this package's :class:`ScatterbrokerNeXus`, every time:
    intake takes the positional argument as an *output* type, finds none named
    so, and falls back to the first reader it knows, whose order follows the
    import order of its plug-ins (it returned either reader, by run).
    """

    filepattern = "/api/v1/metadata/"

    def to_reader_cls(self, outtype: Any = None, reader: Any = None) -> type:
        if isinstance(outtype, str) and reader is None:
            named = [cls for cls in self.possible_readers["importable"]
                     if cls.__name__.lower() == outtype.lower()]
            if named:
                return named[0]
        if outtype is None and reader is None:
            return ScatterbrokerNeXus
        return super().to_reader_cls(outtype, reader)


class ScatterbrokerNeXus(BaseReader):
    """A catalog node as a ``nexusformat`` tree with lazily read large fields."""

    implements = {TiledDataset}
    imports = {"nexusformat", "tiled"}
    output_instance = "nexusformat.nexus.tree:NXroot"
    func = "scatterbroker.clients.nexus:nxload"

    def _read(self, data: Any, **kwargs: Any) -> Any:
        from scatterbroker.clients.nexus import nxload

        options = {**(data.options or {}), **kwargs}
        return nxload(data.url, api_key=options.get("api_key"),
                      local=options.get("local", True))


def open_node(uri: str, api_key: str | None = None, **options: Any) -> ScatterbrokerNeXus:
    """The intake reader for the node at ``uri`` (``.read()`` gives the NXroot).

    ``api_key`` is kept in the reader's options: leave it out of readers you
    save into shared catalogs and set ``$SCATTERBROKER_API_KEY`` instead.
    """
    if api_key:
        options["api_key"] = api_key
    return ScatterbrokerNeXus(data=ScatterbrokerNode(url=uri, options=options))
