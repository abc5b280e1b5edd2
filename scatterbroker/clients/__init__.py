"""What runs on a scientist's machine: clients of a scatterbroker (or any Tiled) server.

:func:`follow` (:mod:`.live`: call a function once per new frame of a
live scan), :mod:`.fast_array` (the ``sb-array`` client class Tiled's ``from_uri`` picks
for frame stacks and NeXus arrays), :mod:`.nexus` (nexusformat trees whose
fields slice through global URIs, ``nxload``, wrappers), :mod:`.upload`,
:mod:`.nexpy_plugin` (NeXpy's "Catalog" menu) and :mod:`.intake_reader`.

Layers: clients import ``catalog``, ``adapters`` and the core modules, never
the server.
"""

from .live import follow

__all__ = ["follow"]
