"""scatterbroker: a catalog and data-access layer for scattering facilities, on Tiled.

Serve raw detector frames (CBF, TIFF), NeXus scan and wrapper files uniformly
over HTTP with chunked slicing; read them with ``tiled.client.from_uri``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scatterbroker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
