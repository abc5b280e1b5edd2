"""Build the Tiled server: our catalog tree, configs, and a loopback runner.

``catalog(...)`` is the tree factory named in ``server_config/*.yml``
(``tree: scatterbroker.server:catalog``): Tiled's SQL catalog with every
installed adapter plug-in, each bound to the configured readable roots. The
app itself is Tiled's (``build_app_from_config``), not a fork.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .adapters import registry
from .adapters.roots import normalize_roots

#: Where ``scatterbroker serve`` keeps its catalog and written data by default.
DEFAULT_DATA_DIR = Path(os.environ.get("SCATTERBROKER_DATA", "scatterbroker-data"))


def catalog(
    uri: str,
    readable_storage: list[str] | None = None,
    writable_storage: list[str] | None = None,
    init_if_not_exists: bool = True,
    **kwargs: Any,
):
    """Tiled catalog (SQLite or PostgreSQL ``uri``) serving our adapter plug-ins.

    ``readable_storage`` are the readable roots: registered files, and every
    link or external source inside an HDF5 file, must resolve inside them.
    Writable storage is readable too (products live there).
    """
    from tiled.catalog import from_uri

    roots = normalize_roots(
        [_path(s) for s in [*(readable_storage or []), *(writable_storage or [])] if _is_path(s)]
    )
    adapters = registry.bind_roots(registry.adapters_by_mimetype(), roots)
    adapters.update(kwargs.pop("adapters_by_mimetype", None) or {})
    return from_uri(
        uri,
        readable_storage=readable_storage,
        writable_storage=writable_storage,
        init_if_not_exists=init_if_not_exists,
        adapters_by_mimetype=adapters,
        **kwargs,
    )


def _is_path(storage: str) -> bool:
    return "://" not in storage or storage.startswith("file:")


def _path(storage: str) -> str:
    from tiled.utils import path_from_uri

    return str(path_from_uri(storage)) if storage.startswith("file:") else storage


def local_config(
    data_dir: Path,
    roots: list[Path],
    *,
    api_key: str | None,
    public: bool = False,
) -> dict[str, Any]:
    """Config for one machine: embedded SQLite catalog in ``data_dir``.

    ``public`` (the demo profile only) lets anonymous clients read; writing
    always needs the API key.
    """
    data_dir = Path(data_dir).resolve()
    (data_dir / "files").mkdir(parents=True, exist_ok=True)
    return {
        "trees": [
            {
                "path": "/",
                "tree": "scatterbroker.server:catalog",
                "args": {
                    "uri": f"sqlite:///{data_dir / 'catalog.db'}",
                    "readable_storage": [str(Path(r).resolve()) for r in roots],
                    "writable_storage": [
                        str(data_dir / "files"),
                        f"duckdb:///{data_dir / 'tables.duckdb'}",
                    ],
                    "init_if_not_exists": True,
                },
            }
        ],
        "authentication": {
            "single_user_api_key": api_key or new_api_key(),
            "allow_anonymous_access": public,
        },
    }


def new_api_key() -> str:
    """A random alphanumeric key (Tiled requires alphanumeric single-user keys)."""
    return secrets.token_hex(16)


def build_app(config: dict[str, Any] | str | os.PathLike[str]):
    """The ASGI app for a config dict or a YAML config file/directory."""
    from tiled.config import parse_configs
    from tiled.server.app import build_app_from_config

    if isinstance(config, dict):
        return build_app_from_config(config)
    return build_app_from_config(parse_configs(config))


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn on a background thread; yield its base URL.

    Used by tests and benchmarks: a real HTTP server on a real socket.
    """
    import uvicorn
    from tiled.server.simple import ThreadedServer

    server = ThreadedServer(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    with server.run_in_thread() as url:
        yield url
