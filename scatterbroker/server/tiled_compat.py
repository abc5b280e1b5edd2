"""The one seam between scatterbroker and the internals of Tiled, FastAPI, starlette, pydantic and aiosqlite.

Several server modules replace or wrap a piece of those libraries (for speed,
or to close a hole Tiled leaves open). Each such *piece* is registered here
(:data:`PIECES`): the originals it replaces or depends on (dotted paths), the
sha256 of ``inspect.getsource`` of each original as shipped in the versions
it was written for (:data:`FINGERPRINTS`, recorded from Tiled 0.2.20 and the
versions in :data:`TESTED`), and whether it is security-relevant.

A module never patches on its own: it hands its patch to :func:`install`,
which runs it only if :func:`check` finds the installed versions inside
:data:`TESTED` and every original's source unchanged. Otherwise:

* a performance piece is skipped, and the server logs one line
  (``... falling back to stock behaviour``) and serves with Tiled's own code;
* a security-relevant piece (the registration guard, the job-record guard,
  the fast route's authentication, the CSRF layer, the proposal access
  condition) raises :class:`SeamMismatch` ("refusing to start: ...") while
  the app is built: running the old copy, or Tiled's code without the guard,
  could let a request through that the tested code refuses.

Every private name of those libraries that our modules use is reached
through :func:`private` / :func:`set_private` or a function here, so
``tests/test_tiled_compat.py`` can check that no other module touches one.
(The fast array client, on the other side of the layers, cannot import the
server: its one private read, the Tiled context's TLS ``verify``, carries
the fingerprint recorded here as :data:`CLIENT_VERIFY_FINGERPRINTS`; the
test checks that both agree.)

After a Tiled upgrade: run ``tests/test_tiled_compat.py``; for each piece
that falls back, read what changed in the named originals, port the piece,
and record the new fingerprints (:func:`recorded`). docs/architecture.md
("The seam to Tiled's internals") lists the pieces.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["PIECES", "FINGERPRINTS", "TESTED", "Piece", "SeamMismatch", "check", "install", "mismatches",
           "private", "set_private", "actual_fingerprint", "recorded"]

logger = logging.getLogger(__name__)

#: the versions each library's pieces were written and fingerprinted for (minor series)
TESTED: dict[str, str] = {
    "tiled": ">=0.2.20,<0.3",
    "fastapi": "~=0.165.0",
    "starlette": "~=1.10.0",
    "pydantic": "~=2.14.0",
    "aiosqlite": "~=0.22.0",
}


@dataclass(frozen=True)
class Piece:
    """One replaced or wrapped part of a library (see the module docstring)."""

    name: str
    module: str  # our module that applies it
    replaces: tuple[str, ...]  # dotted paths of the originals it replaces or depends on
    security: bool
    why: str
    #: an environment variable that turns the piece off (documented in the operator guide):
    #: named in the refusal of a security piece as the way to run Tiled's own code instead
    override: str | None = None

    @property
    def libraries(self) -> tuple[str, ...]:
        return tuple(sorted({t.split(".")[0] for t in self.replaces}))


_ADAPTER = "tiled.catalog.adapter.CatalogNodeAdapter"
_AUTH = "tiled.server.authentication."

PIECES: dict[str, Piece] = {p.name: p for p in (
    Piece("request-layers", "scatterbroker.server.tiled_layers",
          ("tiled.server.app.build_app", "tiled.server._backcompat.raw_python_tiled_client_version",
           "tiled.server.metrics.capture_request_metrics"),
          security=True, override="SCATTERBROKER_PLAIN_MIDDLEWARE",
          why="Tiled's six @app.middleware layers (CSRF check, client version, cookies, timing, "
              "Prometheus) as one ASGI middleware: x1.07 requests/s, p99 x0.94 under load"),
    Piece("fast-route-auth", "scatterbroker.server.fastpath",
          ("fastapi.dependencies.utils.solve_dependencies", "tiled.server.settings.get_settings",
           _AUTH + "get_current_principal", _AUTH + "get_session_state", _AUTH + "get_current_access_tags",
           _AUTH + "get_current_scopes", _AUTH + "check_scopes", "tiled.server.router.get_router"),
          security=True,
          why="the fast route evaluates the dependencies Tiled's /array/full declares without FastAPI "
              "re-inspecting every signature per request"),
    Piece("registration-guard", "scatterbroker.server.guard",
          (_ADAPTER, _ADAPTER + ".create_node", _ADAPTER + ".put_data_source", _ADAPTER + ".replace_metadata"),
          security=True,
          why="refuse bad node keys, NUL metadata and assets outside the readable roots or in writable "
              "storage when they are registered (Tiled stores them)"),
    Piece("job-records", "scatterbroker.server.job_records",
          (_ADAPTER, _ADAPTER + ".create_node", _ADAPTER + ".replace_metadata", _ADAPTER + ".delete",
           _ADAPTER + ".put_data_source"),
          security=True,
          why="job records are written only by the server: generic catalog writes under /jobs get 403"),
    Piece("proposal-access", "scatterbroker.server.access",
          ("tiled.catalog.adapter.in_or_not_in", "tiled.catalog.adapter.in_or_not_in_sqlite",
           "tiled.catalog.adapter.in_or_not_in_postgresql"),
          security=True,
          why="a proposal key sees its job records by metadata job.proposal: Tiled's JSON 'In' condition, "
              "taken as the last condition Tiled's query handler appends"),
    Piece("empty-array-serializer", "scatterbroker.server.guard", ("tiled.serialization.array.as_buffer",),
          security=False,
          why="an empty 2-D selection as application/octet-stream answers b'' instead of Tiled's 500"),
    Piece("dependant-memo", "scatterbroker.server.request_overhead",
          ("fastapi.dependencies.utils.get_dependant", "fastapi.dependencies.utils.solve_dependencies"),
          security=False,
          why="FastAPI rebuilds every dependency's Dependant per request once overrides exist "
              "(about a fifth of a small request's CPU)"),
    Piece("generic-models", "scatterbroker.server.request_overhead",
          ("pydantic._internal._generics.DeepChainMap", "pydantic._internal._generics.LimitedDict",
           "pydantic._internal._generics._generic_cache_get", "pydantic._internal._generics._generic_cache_set"),
          security=False,
          why="pydantic re-creates Tiled's parametrized response models after each GC (about 5% of CPU)"),
    Piece("node-aliases", "scatterbroker.server.request_overhead", ("tiled.catalog.adapter.node_from_segments",),
          security=False,
          why="Tiled's path-to-node SELECT from aliases made once per depth (about 9% of a small request's CPU)"),
    Piece("sqlite-reads", "scatterbroker.server.sqlite_reads", ("aiosqlite.core.Connection",),
          security=False,
          why="a WAL catalog's SELECTs run on the event loop, not queued to aiosqlite's thread "
              "(~2.5 ms wait per call under load)"),
    Piece("duckdb-pool", "scatterbroker.server.app",
          ("tiled.storage.SQLStorage._connection_pool", "tiled.storage.SQLStorage._adbc_connection"),
          security=False,
          why="DuckDB table storage used by one thread at a time (Tiled's StaticPool shares one connection: "
              "500s, then SIGSEGV)"),
    Piece("entry-cache", "scatterbroker.server.entry_cache",
          ("tiled.server.dependencies.get_entry", "tiled.server.router.get_router"),
          security=False,
          why="nodes Tiled's routes find by walking the catalog are reused per principal until a write"),
    Piece("read-cache-routes", "scatterbroker.server.response_cache",
          ("tiled.server.router.get_router",),
          security=False,
          why="the response cache and write log know Tiled's node routes (which reads to keep, which "
              "writes touch which node)"),
    Piece("bounded-stream-cache", "scatterbroker.server.streaming", ("tiled.server.streaming.TTLCacheDatastore",),
          security=False,
          why="Tiled's in-memory streaming cache bounded by bytes (it kept 1000 messages of any size: "
              "+11.5 MB/min while a scan was ingested)"),
    Piece("blosc-typesize", "scatterbroker.server.compression", ("tiled.media_type_registration.BloscBuffer",),
          security=False,
          why="Blosc2 answers shuffled by the array's item size (Tiled's used 1: 16 ms and 1.9 MB "
              "instead of 3 ms and 1.0 MB per frame)"),
)}

#: per piece, sha256 of ``inspect.getsource`` of each original it replaces or depends on, as shipped
#: in the tested versions (an original shared by two pieces is recorded for each)
FINGERPRINTS: dict[str, dict[str, str]] = {
    "request-layers": {
        "tiled.server.app.build_app":
            "500818aa1a1fed5bd7d08cf11a984f4b8516da4fa2f9c73f05bd88263bcde39c",
        "tiled.server._backcompat.raw_python_tiled_client_version":
            "502297c9bcebda3447f30967ed36abce908c61af5666d19a590eab6eae8de774",
        "tiled.server.metrics.capture_request_metrics":
            "2b8950dec94ed0f4cf4b3a4bd1f10b83e761bfa36df725d92cacb0ef63ce83be",
    },
    "fast-route-auth": {
        "fastapi.dependencies.utils.solve_dependencies":
            "19825365bd06b12b6f052bb2c17d9471a9661824b502176f3ba177307a81e202",
        "tiled.server.settings.get_settings":
            "75b5612b91fb97653c88709f70779ef80a96f7d387a15f13dbf20db347cbc952",
        "tiled.server.authentication.get_current_principal":
            "d0f85767705bc002a58cbfbcb5bd67d6490ba0585aaf1aeef3fe092c13090cdf",
        "tiled.server.authentication.get_session_state":
            "99912c09ba274703dc988ebe564d86956b5a91dcc16976c97451bfbe2b302c92",
        "tiled.server.authentication.get_current_access_tags":
            "6cb7ce598c516431440688cdba9d86878a3ada1a13c52157a58edbebf90b3066",
        "tiled.server.authentication.get_current_scopes":
            "3a7ebe15fda02e7b241517593791ddd3380129afe60975478937a65288a804b5",
        "tiled.server.authentication.check_scopes":
            "ad3567068275de8ab48be93836e28761fcb1d2cdca7eaaab5cbbb2ae96ad789b",
        "tiled.server.router.get_router":
            "fd278918ec556fbe8132af09cd74525f73e7aca2c8d72cb828b2e57b08ffda16",
    },
    "registration-guard": {
        "tiled.catalog.adapter.CatalogNodeAdapter":
            "52640ecf2e92fcc95f0f798fb2057357c96fb10eaa247c4b35a6fedcb81f4a9c",
        "tiled.catalog.adapter.CatalogNodeAdapter.create_node":
            "2a5c7c6a6207cce3e94c22601cca980c4212ee2b133c8a2583739df02271e2c1",
        "tiled.catalog.adapter.CatalogNodeAdapter.put_data_source":
            "df0e65ef6be12a4419c1db1b49162717a2cda7dcd7bbf43d45e55d9a46394c72",
        "tiled.catalog.adapter.CatalogNodeAdapter.replace_metadata":
            "36c9b8f02b576e0537deb2be0ab77c15a10ec7bd7be5f82805325a33de5ba634",
    },
    "job-records": {
        "tiled.catalog.adapter.CatalogNodeAdapter":
            "52640ecf2e92fcc95f0f798fb2057357c96fb10eaa247c4b35a6fedcb81f4a9c",
        "tiled.catalog.adapter.CatalogNodeAdapter.create_node":
            "2a5c7c6a6207cce3e94c22601cca980c4212ee2b133c8a2583739df02271e2c1",
        "tiled.catalog.adapter.CatalogNodeAdapter.replace_metadata":
            "36c9b8f02b576e0537deb2be0ab77c15a10ec7bd7be5f82805325a33de5ba634",
        "tiled.catalog.adapter.CatalogNodeAdapter.delete":
            "780597da05b96a67aa42a5193709279867192fc32c1ef0d23a2c7f3a7c45b4dd",
        "tiled.catalog.adapter.CatalogNodeAdapter.put_data_source":
            "df0e65ef6be12a4419c1db1b49162717a2cda7dcd7bbf43d45e55d9a46394c72",
    },
    "proposal-access": {
        "tiled.catalog.adapter.in_or_not_in":
            "83ba187454b0fbc4f2261452d7602d6351d66476fe1110f9d06879a2b69c08c5",
        "tiled.catalog.adapter.in_or_not_in_sqlite":
            "84c8769e00c58c8c4e4ade26a8d76bf15aba3ae276d98d2d8dab24b10a9575ed",
        "tiled.catalog.adapter.in_or_not_in_postgresql":
            "8b2d2a1b763d70d5104cfb4f14bb29c9e23a3268f842c2a88adcd87d8faaedf8",
    },
    "empty-array-serializer": {
        "tiled.serialization.array.as_buffer":
            "397cd496db506a3f21a28b39d0624ca93131c45c0a97a509109d9b7a4b39c48c",
    },
    "dependant-memo": {
        "fastapi.dependencies.utils.get_dependant":
            "76cf742e38a93604fba4766476b6d886534db2de5dfe09f84ae3a44bbf53bd66",
        "fastapi.dependencies.utils.solve_dependencies":
            "19825365bd06b12b6f052bb2c17d9471a9661824b502176f3ba177307a81e202",
    },
    "generic-models": {
        "pydantic._internal._generics.DeepChainMap":
            "9e1717d1d7f700ae8cc8f4acb91038910e9c51e1cfdcf7b6d5ea0a6af29a8b70",
        "pydantic._internal._generics.LimitedDict":
            "ce1824e64c73e1b53c9504eb0c709f174fc3889406b7e1e2e2f6099b4116de53",
        "pydantic._internal._generics._generic_cache_get":
            "4aec740e7a27bceca5fc56a0a7d82264ca23cab71bdcfea6824924ec83d53f4a",
        "pydantic._internal._generics._generic_cache_set":
            "b317140792704e18380f0c581edd571de05ca199d03fa0b0cc4047c970a3e9b2",
    },
    "node-aliases": {
        "tiled.catalog.adapter.node_from_segments":
            "ec145f25f8aacc523bdc943d3cac3182daa4491278ef5274ef75bdca5f114930",
    },
    "sqlite-reads": {
        "aiosqlite.core.Connection":
            "648644bef40ab600edf63b2cf3a5e907f7bbef06f8378a50d12d0a72d82497ee",
    },
    "duckdb-pool": {
        "tiled.storage.SQLStorage._connection_pool":
            "fcdce3d73a1b9500eed1e910d15354fb9eb78236acd573f336aff933ccefaf56",
        "tiled.storage.SQLStorage._adbc_connection":
            "0a31389e9cb6831aff40a36d8a630e6cbe9028605945ad6bb17bd5add7935fa2",
    },
    "entry-cache": {
        "tiled.server.dependencies.get_entry":
            "a549c525cf662a1df1bdff41534549e60d8f18daa675056cc96ef331b35c6ba5",
        "tiled.server.router.get_router":
            "fd278918ec556fbe8132af09cd74525f73e7aca2c8d72cb828b2e57b08ffda16",
    },
    "read-cache-routes": {
        "tiled.server.router.get_router":
            "fd278918ec556fbe8132af09cd74525f73e7aca2c8d72cb828b2e57b08ffda16",
    },
    "bounded-stream-cache": {
        "tiled.server.streaming.TTLCacheDatastore":
            "39b5ded50bf216f61d1c88de8b8cce60ffabe270dcab2d9313e42102d46b6aca",
    },
    "blosc-typesize": {
        "tiled.media_type_registration.BloscBuffer":
            "db90b55b854beb2fa0b40cb7e8ba71e65e00c65dc8cfa2a67d5c2788767ccb94",
    },
}

#: the originals behind the fast array client's read of the Tiled context's ``_verify``
#: (scatterbroker/clients/fast_array.py keeps the same values; a test checks they agree)
CLIENT_VERIFY_FINGERPRINTS: dict[str, str] = {
    "tiled.client.context.Context.__init__":
        "2b7075186e781428b760d74a5c51652237cb8ca4962d72369c5c39ecfcd6bc06",
    "tiled.client.context.Context.__setstate__":
        "d107854e1bb82a4db1a4b29ba45cdaf530ddd529620355192cd7544fcbf2b8d9",
}


class SeamMismatch(RuntimeError):
    """A security-relevant piece does not match the installed libraries: the server does not start."""


# ------------------------------------------------------------------ private names


def private(obj: Any, name: str, *default: Any) -> Any:
    """``getattr(obj, name)`` for a private name of a library object (the one place they are read)."""
    return getattr(obj, name, *default)


def set_private(obj: Any, name: str, value: Any) -> None:
    """``setattr(obj, name, value)`` for a private name of a library object or class."""
    setattr(obj, name, value)


def instance_private(obj: Any, name: str) -> Any:
    """What ``obj`` holds itself under a private name (``obj.__dict__``: a cached property not yet made is None)."""
    return obj.__dict__.get(name)


def set_instance_private(obj: Any, name: str, value: Any) -> None:
    """Put ``value`` in ``obj.__dict__`` under a private name (e.g. in place of a cached property)."""
    obj.__dict__[name] = value


def class_private(cls: type, name: str) -> Any:
    """What ``cls`` defines itself under a private name (its ``__dict__``: descriptors as they are)."""
    return cls.__dict__.get(name)


def pydantic_generics() -> Any:
    """pydantic's ``_internal._generics`` module (parametrized-model cache)."""
    return importlib.import_module("pydantic._internal._generics")


def raw_python_tiled_client_version(request: Any) -> Any:
    """Tiled's reading of the ``python-tiled/<version>`` User-Agent (``tiled.server._backcompat``)."""
    from tiled.server import _backcompat

    return _backcompat.raw_python_tiled_client_version(request)


# ------------------------------------------------------------------ fingerprints

_actual: dict[str, str | None] = {}
_lock = threading.Lock()
_reported: set[str] = set()


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    else:
        raise ImportError(dotted)
    for part in parts[i:]:
        # a class's own attribute as defined (a cached_property, not what it computes)
        obj = obj.__dict__[part] if isinstance(obj, type) and part in obj.__dict__ else getattr(obj, part)
    return getattr(obj, "func", None) or getattr(obj, "fget", None) or obj


def _fingerprint_now(dotted: str) -> str | None:
    try:
        # getsource follows __wrapped__: a function we wrapped still shows the original
        return hashlib.sha256(inspect.getsource(_resolve(dotted)).encode()).hexdigest()
    except (ImportError, AttributeError, KeyError, OSError, TypeError):
        return None


def actual_fingerprint(dotted: str) -> str | None:
    """sha256 of the installed original's source (None: not found). Taken once per process, the first
    time any piece is checked, for every registered original: before any piece has patched one."""
    with _lock:
        if not _actual:
            for name in sorted({t for p in PIECES.values() for t in p.replaces} | set(CLIENT_VERIFY_FINGERPRINTS)):
                _actual[name] = _fingerprint_now(name)
        if dotted not in _actual:
            _actual[dotted] = _fingerprint_now(dotted)
        return _actual[dotted]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def mismatches(piece: str | Piece) -> list[str]:
    """What differs between the installed libraries and what ``piece`` was written for (empty: nothing)."""
    p = PIECES[piece] if isinstance(piece, str) else piece
    found = []
    for library in p.libraries:
        version, tested = _version(library), TESTED.get(library)
        if version is None:
            found.append(f"{library} not installed")
        elif tested is None or Version(version) not in SpecifierSet(tested):
            found.append(f"{library} {version} is not the tested {tested}")
    for dotted in p.replaces:
        actual = actual_fingerprint(dotted)
        if actual is None:
            found.append(f"{dotted} not found")
        elif actual != FINGERPRINTS.get(p.name, {}).get(dotted):
            tested = FINGERPRINTS.get(p.name, {}).get(dotted) or "none"
            found.append(f"{dotted} changed (source sha256 {actual[:12]}, tested {tested[:12]})")
    return found


def check(piece: str | Piece) -> bool:
    """Whether the installed versions and every original's fingerprint match what ``piece`` was written for."""
    return not mismatches(piece)


def install(piece: str, apply: Callable[[], Any]) -> bool:
    """Run ``apply()`` if ``piece`` matches the installed libraries (True); else log one line and
    return False (stock behaviour), or raise :class:`SeamMismatch` for a security-relevant piece."""
    p = PIECES[piece]
    found = mismatches(p)
    if not found:
        apply()
        return True
    what = "; ".join(found)
    if p.security:
        way_out = (f"; set {p.override}=0 to run Tiled's own code instead" if p.override else "")
        message = (f"refusing to start: Tiled seam piece {p.name!r} ({p.module}, security-relevant) does not "
                   f"match the installed libraries: {what}; port it and record the new fingerprints "
                   f"(scatterbroker/server/tiled_compat.py) or install the tested versions{way_out}")
        logger.error(message)
        raise SeamMismatch(message)
    if p.name not in _reported:
        _reported.add(p.name)
        logger.warning("Tiled seam piece %r (%s) does not match the installed libraries: %s; "
                       "falling back to stock behaviour", p.name, p.module, what)
    return False


def recorded() -> dict[str, dict[str, str | None]]:
    """The fingerprints of the installed originals, per piece: :data:`FINGERPRINTS` once ported."""
    return {p.name: {t: actual_fingerprint(t) for t in p.replaces} for p in PIECES.values()}
