"""Read-only adapters turning detector and NeXus files into Tiled structures.

Format modules (``cbf``, ``tiff``, ``nexus``) import their heavy libraries
themselves; they are found through :mod:`.registry` (entry points), so nothing
is imported here.
"""
