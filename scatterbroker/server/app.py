"""Build the Tiled server: our catalog tree, configs, and a loopback runner.

``catalog(...)`` is the tree factory named in ``server_config/*.yml``
(``tree: scatterbroker.server.app:catalog``): Tiled's SQL catalog with every
installed adapter plug-in, each bound to the configured readable roots. The
app itself is Tiled's (``build_app_from_config``), not a fork.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scatterbroker.server import compression, request_overhead, sqlite_reads, tiled_compat
from scatterbroker.adapters import registry
from scatterbroker.adapters.roots import normalize_roots
from scatterbroker.server.guard import guard
from scatterbroker.environment import check_environment, env_flag
from scatterbroker.server.streaming import memory_config

#: Where ``scatterbroker serve`` keeps its catalog and written data by default.
DEFAULT_DATA_DIR = Path(os.environ.get("SCATTERBROKER_DATA", "scatterbroker-data"))


def catalog(
    uri: str,
    readable_storage: list[str] | None = None,
    writable_storage: list[str] | None = None,
    init_if_not_exists: bool = True,
    cache_config: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """Tiled catalog (SQLite or PostgreSQL ``uri``) serving our adapter plug-ins.

    ``readable_storage`` are the readable roots: registered files, and every
    link or external source inside an HDF5 file, must resolve inside them.
    Writable storage is readable too (products live there).

    ``cache_config`` is Tiled's streaming cache (websocket subscriptions, so a
    client following a scan hears of each new frame): in-process memory by
    default, bounded by bytes (:mod:`scatterbroker.server.streaming`: ``max_bytes``,
    ``data_ttl``); ``{"uri": "redis://host:6379"}`` when several workers serve.
    (Tiled fills this only for its own tree factories, so configs name it here.)
    """
    from tiled.catalog import from_uri

    roots = normalize_roots(
        [_path(s) for s in [*(readable_storage or []), *(writable_storage or [])] if _is_path(s)]
    )
    adapters = registry.bind_roots(registry.adapters_by_mimetype(), roots)
    # This tree serves the fast data route (below): datasets inside files say so
    # with a spec, which makes the Python client use it (scatterbroker.clients.fast_array).
    from tiled.structures.core import Spec

    adapters = {
        mt: type(cls.__name__, (cls,), {"field_specs": (Spec("sb-array"),)})
        if hasattr(cls, "field_specs") else cls
        for mt, cls in adapters.items()
    }
    adapters.update(kwargs.pop("adapters_by_mimetype", None) or {})
    tree = from_uri(
        uri,
        readable_storage=readable_storage,
        writable_storage=writable_storage,
        init_if_not_exists=init_if_not_exists,
        adapters_by_mimetype=adapters,
        cache_config=memory_config(cache_config),
        **kwargs,
    )
    _duckdb_one_at_a_time(tree)
    sqlite_reads.enable_wal(uri)  # Tiled means to, but its PRAGMA runs inside a transaction
    # Tiled mounts a tree's ``include_routers`` under /api/v1 (and /custom): the
    # fast data route (scatterbroker.server.fastpath) comes with every scatterbroker tree.
    from scatterbroker.server.fastpath import install as check_fast_route_auth, router
    from scatterbroker.server.jobs_api import router as jobs_router

    check_fast_route_auth()  # refuses to start if Tiled's authentication is not the one it evaluates

    tree.include_routers = [*getattr(tree, "include_routers", []), router, jobs_router]
    # Job records are written by the jobs API only, never through the generic
    # write routes (scatterbroker/server/job_records.py).
    from scatterbroker.server.job_records import install as job_records_only_by_the_server

    job_records_only_by_the_server(tree)
    # Refuse bad node keys, and assets outside the roots, when they are registered
    # (stock Tiled stores them and fails only on read): see scatterbroker/server/guard.py.
    return guard(tree, roots)


def _duckdb_one_at_a_time(tree: Any) -> None:
    """Let one thread at a time use the tree's DuckDB table storage (scan ``headers`` tables).

    Tiled 0.2.20 pools DuckDB with a ``StaticPool``: every request thread gets the
    same ADBC connection at once. Two requests reading a table concurrently (a live
    display reading a scan's headers while the watcher appends rows) then fail with
    "Attempting to execute an unsuccessful or closed pending query result" (500),
    and soon the server dies with SIGSEGV inside DuckDB (tests/test_table_concurrency.py,
    found by benchmarks/load.py). A ``QueuePool`` of one connection (the same clone
    Tiled would make, opened lazily) makes each checkout wait for the previous one to
    be returned; every use is one short query. PostgreSQL/SQLite storage is untouched.
    Only on the Tiled it was written for (:mod:`scatterbroker.server.tiled_compat`, piece
    ``duckdb-pool``; else Tiled's pool, and one line in the log).
    """
    tiled_compat.install("duckdb-pool", lambda: _one_duckdb_connection(tree))


def _one_duckdb_connection(tree: Any) -> None:
    import sqlalchemy.pool
    from tiled.storage import SQLStorage

    for storage in tree.context.writable_storage.values():
        if isinstance(storage, SQLStorage) and storage.dialect == "duckdb" and not isinstance(
                tiled_compat.instance_private(storage, "_connection_pool"), sqlalchemy.pool.QueuePool):
            tiled_compat.set_instance_private(storage, "_connection_pool", sqlalchemy.pool.QueuePool(
                lambda storage=storage: tiled_compat.private(storage, "_adbc_connection").adbc_clone(),
                pool_size=1, max_overflow=0, timeout=60))


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
    catalog_uri: str | None = None,
) -> dict[str, Any]:
    """Config for one machine: embedded SQLite catalog in ``data_dir``.

    ``public`` (the demo profile only) lets anonymous clients read; writing
    always needs the API key. ``catalog_uri`` replaces the SQLite file with
    another catalog database, e.g. ``postgresql+asyncpg://user@host:5432/db``.
    """
    data_dir = Path(data_dir).resolve()
    (data_dir / "files").mkdir(parents=True, exist_ok=True)
    return {
        "trees": [
            {
                "path": "/",
                "tree": "scatterbroker.server.app:catalog",
                "args": {
                    "uri": catalog_uri or f"sqlite:///{data_dir / 'catalog.db'}",
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
        # Tiled's raw-file download routes (/asset/bytes, /asset/manifest) bypass the
        # readable roots: they follow symlinks and, in 0.2.20, `relative_path=../..`.
        "expose_raw_assets": False,
    }


def new_api_key() -> str:
    """A random alphanumeric key (Tiled requires alphanumeric single-user keys)."""
    return secrets.token_hex(16)


#: bytes from which glibc serves an allocation with its own mmap (so freeing it
#: returns it to the system); 0 leaves glibc's default, see release_large_buffers
MMAP_THRESHOLD = int(os.environ.get("SCATTERBROKER_MMAP_THRESHOLD") or 1 << 20)


def release_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make freed frame-sized buffers go back to the system (glibc only; True if set).

    glibc serves a large allocation with mmap, but after the first such block is
    freed it raises that threshold to the block's size, so later 10 MB frames
    come from the heaps of the server's many threads and stay there: under 32
    concurrent clients the server's RSS grew ~100 MB/min (benchmarks/load.py).
    A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) turns the adjustment off.
    """
    if threshold <= 0:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


def arrow_buffers_from_malloc() -> str | None:
    """Have pyarrow take its buffers (table reads: DuckDB results, their pandas
    conversion) from malloc, so :func:`release_large_buffers` applies to them too;
    the pool's backend, or None if ``ARROW_DEFAULT_MEMORY_POOL`` chose one (it wins).

    pyarrow's default pool (mimalloc in pyarrow 26) keeps what it frees in its own
    segments: under ``benchmarks/load.py`` its 1 GiB reservation grew ~10 MB/min
    (``/proc/<pid>/smaps``) while the server's RSS grew +12.1 +- 1.6 MB/min over
    300 s; with the system allocator, +5.9 +- 4.8 over 150 s (2026-12-02).
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return None
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return pyarrow.default_memory_pool().backend_name


def build_app(config: Any, *, response_cache: bool | None = None, entry_cache: bool | None = None,
              freeze_gc: bool = False):
    """The ASGI app for a config dict, a parsed Tiled ``Config``, or a YAML file/directory.

    Also sets the process's allocator to give frame-sized buffers back
    (:func:`release_large_buffers`, with Arrow's buffers on it:
    :func:`arrow_buffers_from_malloc`), and has FastAPI build each route's
    dependencies and response models once instead of on every request
    (:mod:`scatterbroker.server.request_overhead`), Blosc2-compress array answers
    shuffled by their item size (:mod:`scatterbroker.server.compression`), and run an
    SQLite catalog's reads on the event loop (:mod:`scatterbroker.server.sqlite_reads`).
    Tiled's per-request middleware becomes one plain ASGI layer
    (:mod:`scatterbroker.server.tiled_layers`).

    ``response_cache`` keeps answers of Tiled's read routes until a write
    touches their node (:mod:`scatterbroker.server.response_cache`): right only when
    every write reaches this one process. Default: ``$SCATTERBROKER_RESPONSE_CACHE``
    if set, else on (:func:`app_factory`, for several workers, turns it off).
    ``entry_cache`` likewise keeps the nodes Tiled's routes find by walking the
    catalog (:mod:`scatterbroker.server.entry_cache`; ``$SCATTERBROKER_ENTRY_CACHE``).

    ``freeze_gc`` (``scatterbroker serve``, :func:`app_factory`): once the app
    has started, see :func:`freeze_after_startup` (``SCATTERBROKER_GC_FREEZE=0``
    turns it off).
    """
    release_large_buffers()
    arrow_buffers_from_malloc()
    request_overhead.install()
    compression.install()
    sqlite_reads.install()
    from tiled.config import Config, parse_configs
    from tiled.server.app import build_app_from_config

    if isinstance(config, (dict, Config)):
        app = build_app_from_config(config)
    else:
        check_environment(config)
        app = build_app_from_config(parse_configs(config))
    from scatterbroker.server.tiled_layers import flatten

    flatten(app)  # Tiled's six @app.middleware("http") layers as one plain ASGI middleware
    # Requests to the fast data route skip Tiled's middleware stack (see
    # scatterbroker.server.fastpath.FastLane); everything else is Tiled's app.
    from scatterbroker.server.fastpath import FastLane
    from scatterbroker.server import entry_cache as entries
    from scatterbroker.server.response_cache import ResponseCache
    from scatterbroker.server.write_log import WriteLog, WriteMarks, enabled_by_default

    if response_cache is None:
        response_cache = enabled_by_default(one_process=True)
    if entry_cache is None:
        entry_cache = enabled_by_default(one_process=True, variable="SCATTERBROKER_ENTRY_CACHE")
    if (response_cache or entry_cache) and not tiled_compat.install("read-cache-routes", lambda: None):
        response_cache = entry_cache = False  # both rely on the write log's table of Tiled's routes
    log = WriteLog()
    app.state.write_log = log  # the jobs API marks the record writes it makes in-process
    if response_cache:
        app.add_middleware(ResponseCache, log=log)
    if entry_cache:
        entry_cache = entries.install(app, log) is not None
    if response_cache or entry_cache:
        app.add_middleware(WriteMarks, log=log, cascading_metadata=cascading_metadata(app))
    app.add_middleware(FastLane)  # added last: outermost
    if freeze_gc and env_flag("SCATTERBROKER_GC_FREEZE", True):
        freeze_after_startup(app)
    app.add_exception_handler(OSError, _storage_full)
    return app


def cascading_metadata(app: Any) -> tuple[str, ...]:
    """Where a metadata write may change access below its node, for the read caches
    (:func:`scatterbroker.server.write_log.write_kind`): nowhere without an access policy,
    the job records with :class:`~scatterbroker.server.access.ProposalAccessPolicy` (it
    decides by path, and by ``job.proposal`` under ``/jobs``), everywhere with
    any other policy."""
    from scatterbroker.server.access import JOBS_TREE, ProposalAccessPolicy

    policy = getattr(app.state, "access_policy", None)
    if policy is None:
        return ()
    return (JOBS_TREE,) if type(policy) is ProposalAccessPolicy else ("*",)


def freeze_after_startup(app: Any) -> None:
    """After the app's start-up, collect garbage once and move every object left to
    the garbage collector's permanent generation (``gc.freeze``).

    A server holds ~400 000 long-lived objects (modules, SQLAlchemy and pydantic
    machinery, Tiled's routes). Python's full collections walk all of them: under
    32 clients one ran every ~2.5 s and held the GIL ~200 ms, 7% of the server's
    CPU and a pause every request in flight waited out (benchmarks/load.py with a
    gc callback). Frozen, they are skipped; objects made later are collected as
    before (reference counting frees the frozen ones too, only their cycles stay).
    For server processes only: a process that starts and stops many apps keeps
    the cycles of stopped ones.
    """
    import contextlib
    import gc

    started = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any):
        async with started(app_) as state:
            gc.collect()
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan


#: errors of a write that did not fit: the file system is full, a quota or the
#: process's file-size limit (RLIMIT_FSIZE) is reached
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large"}


async def _storage_full(request, exc: OSError):
    """507 Insufficient Storage, naming the cause, for a write that hit a full disk,
    a quota or a file-size limit (Tiled answers 500 "Internal server error");
    any other OSError goes on to the usual 500."""
    if exc.errno not in _FULL:
        raise exc
    import logging

    from starlette.responses import JSONResponse

    logging.getLogger("scatterbroker.server.app").error(
        "%s %s: the server's storage is full: %s", request.method, request.url.path, exc)
    return JSONResponse(status_code=507, content={
        "detail": f"the server's writable storage is full ({_FULL[exc.errno]}): nothing was stored; "
                  "ask the facility to free space"})


def app_factory():
    """The app for multi-process serving, from the YAML config in ``$SCATTERBROKER_CONFIG``
    (else ``$TILED_CONFIG``, else ``./config.yml``).

    Each worker process builds its own app (own handle caches, own thread
    pools), so requests spread over CPUs and no lock is shared between them::

        SCATTERBROKER_CONFIG=server_config/facility.yml \\
            uvicorn --factory scatterbroker.server.app:app_factory --workers 4 --port 8000
        # or: gunicorn -k uvicorn.workers.UvicornWorker -w 4 'scatterbroker.server.app:app_factory()'
    """
    from scatterbroker.server.write_log import enabled_by_default

    # Each worker sees only its own writes: no worker may replay answers (unless told to).
    return build_app(os.environ.get("SCATTERBROKER_CONFIG") or os.environ.get("TILED_CONFIG", "config.yml"),
                     response_cache=enabled_by_default(one_process=False),
                     entry_cache=enabled_by_default(one_process=False, variable="SCATTERBROKER_ENTRY_CACHE"),
                     freeze_gc=True)


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
