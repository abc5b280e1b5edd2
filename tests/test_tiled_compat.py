"""The seam to Tiled's internals (scatterbroker/server/tiled_compat.py).

For each piece, a real server is started in its own process (patches are
process-wide: a piece applied by an earlier test could not be shown falling
back) with the piece's recorded fingerprint changed -- the simulated upgrade.
A performance piece must log one "falling back to stock behaviour" line, leave
Tiled's own code in place (the child reports what Tiled's objects are after the
app was built) and the server must serve: registration of CBF frames, a node's
metadata, the frames through the fast client and ``/array/full``. A
security-relevant piece must stop the server from starting. With the real
fingerprints nothing falls back and every piece is applied.

Run as a script (``python test_tiled_compat.py MISMATCH DATA_DIR ROOT``) this
module is that child server.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FALLBACK = "falling back to stock behaviour"


# ------------------------------------------------------------------ the child server


def _wrapped_by(function) -> set[str]:
    """The file names of the functions along a chain of ``functools.wraps`` wrappers."""
    names = set()
    while function is not None:
        names.add(Path(function.__code__.co_filename).name)
        function = getattr(function, "__wrapped__", None)
    return names


def _applied(app) -> dict[str, bool]:
    """Per piece, whether its replacement is in place, read off Tiled's and the libraries' objects."""
    import aiosqlite.core
    import fastapi.dependencies.utils
    import tiled.catalog.adapter
    import tiled.server.router
    from pydantic._internal import _generics
    from starlette.middleware.base import BaseHTTPMiddleware
    from tiled.media_type_registration import default_compression_registry, default_serialization_registry

    tree = app.state.root_tree
    duckdb = [s for s in tree.context.writable_storage.values() if getattr(s, "dialect", "") == "duckdb"]
    middleware = [m.cls for m in app.user_middleware]
    return {
        "request-layers": BaseHTTPMiddleware not in middleware,
        "dependant-memo": fastapi.dependencies.utils.get_dependant.__module__ != "fastapi.dependencies.utils",
        "generic-models": type(_generics._GENERIC_TYPES_CACHE).__name__ == "DeepChainMap",
        "node-aliases": tiled.catalog.adapter.node_from_segments.__module__ != "tiled.catalog.adapter",
        "sqlite-reads": aiosqlite.core.Connection._execute.__module__ != "aiosqlite.core",
        "duckdb-pool": bool(duckdb) and all(
            type(s.__dict__.get("_connection_pool")).__name__ == "QueuePool" for s in duckdb),
        "entry-cache": tiled.server.router.get_entry.__module__ != "tiled.server.dependencies",
        "read-cache-routes": any(cls.__name__ == "ResponseCache" for cls in middleware),
        "bounded-stream-cache": type(tree.context.streaming_cache._datastore).__name__ == "BoundedMemoryDatastore",
        "blosc-typesize": default_compression_registry.dispatch(
            "application/octet-stream", "blosc2").__module__ != "tiled.media_type_registration",
        "empty-array-serializer": default_serialization_registry.dispatch(
            "array", "application/octet-stream").__module__ != "tiled.serialization.array",
        "registration-guard": "guard.py" in _wrapped_by(tiled.catalog.adapter.CatalogNodeAdapter.put_data_source),
        "job-records": getattr(tiled.catalog.adapter.CatalogNodeAdapter, "_scatterbroker_job_records", False),
        "fast-route-auth": True,  # no replacement to see: the fast route runs only if the check passed
        "proposal-access": True,  # likewise: the policy is built only if the check passed
    }


def _child(mismatch: str, data_dir: str, root: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from scatterbroker.server import tiled_compat

    if mismatch.startswith("version:"):  # a library outside its tested series
        tiled_compat.TESTED[mismatch.split(":", 1)[1]] = "==0.0.1"
    elif mismatch != "-":  # the piece's original changed: its first recorded fingerprint differs
        recorded = tiled_compat.FINGERPRINTS[mismatch]
        recorded[next(iter(recorded))] = "0" * 64
    from conftest import API_KEY

    from scatterbroker.server.app import build_app, local_config, serve_in_thread

    config = local_config(Path(data_dir), [Path(root)], api_key=API_KEY)
    config["access_control"] = {"access_policy": "scatterbroker.server.access:ProposalAccessPolicy", "args": {}}
    app = build_app(config)
    with serve_in_thread(app) as url:
        print(json.dumps({"url": url, "applied": _applied(app)}), flush=True)
        sys.stdin.readline()  # until the test closes our stdin


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    from conftest import make_frames, write_cbf

    root = tmp_path_factory.mktemp("compat")
    scan = root / "raw" / "p1" / "s1"
    scan.mkdir(parents=True)
    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        write_cbf(scan / f"scan1_{i:05d}.cbf", frame, i)
    return root, frames


class Child:
    def __init__(self, mismatch: str, data_dir: Path, root: Path) -> None:
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, __file__, mismatch, str(data_dir), str(root)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        line = self.proc.stdout.readline()
        self.info = json.loads(line) if line else None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def serve(tmp_path, mismatch, frames_dir):
    root, _ = frames_dir
    return Child(mismatch, tmp_path / "data", root)


def reads_correctly(url: str, root: Path, frames: np.ndarray) -> None:
    """Register the frames, read the node's metadata, and the frames three ways, over HTTP."""
    import httpx
    from conftest import API_KEY
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    client = from_uri(url, api_key=API_KEY)
    register(client, root / "raw", prefix="raw")
    headers = {"Authorization": f"Apikey {API_KEY}"}
    with httpx.Client(base_url=url + "/api/v1/", headers=headers) as http:
        meta = http.get("metadata/raw/p1/s1/scan1/frames")
        assert meta.status_code == 200, meta.text
        assert meta.json()["data"]["attributes"]["structure"]["shape"] == list(frames.shape)
        full = http.get("array/full/raw/p1/s1/scan1/frames", headers={"Accept": "application/octet-stream"})
        assert full.status_code == 200, full.text
        np.testing.assert_array_equal(np.frombuffer(full.content, frames.dtype).reshape(frames.shape), frames)
    node = client["raw/p1/s1/scan1/frames"]
    assert type(node).__name__ == "FastArrayClient"
    np.testing.assert_array_equal(node.read(), frames)  # the fast route
    np.testing.assert_array_equal(node[1], frames[1])


def _pieces(security: bool) -> list[str]:
    from scatterbroker.server.tiled_compat import PIECES

    return [name for name, piece in PIECES.items() if piece.security is security]


def test_with_the_recorded_fingerprints_nothing_falls_back(tmp_path, frames_dir):
    child = serve(tmp_path, "-", frames_dir)
    try:
        assert child.info is not None, child.stderr
        assert FALLBACK not in child.stderr and "refusing" not in child.stderr
        assert all(child.info["applied"].values()), child.info["applied"]
        reads_correctly(child.info["url"], *frames_dir)
    finally:
        child.stop()


@pytest.mark.parametrize("piece", _pieces(security=False))
def test_a_changed_original_falls_back_and_the_server_serves(tmp_path, frames_dir, piece):
    child = serve(tmp_path, piece, frames_dir)
    try:
        assert child.info is not None, child.stderr
        lines = [line for line in child.stderr.splitlines() if FALLBACK in line]
        assert len(lines) == 1, child.stderr
        assert repr(piece) in lines[0] and "changed" in lines[0]
        applied = child.info["applied"]
        assert applied[piece] is False, f"{piece} was applied despite the mismatch"
        # the entry cache needs the write log's route table too: without it, neither cache runs
        off = {piece, "entry-cache"} if piece == "read-cache-routes" else {piece}
        assert not any(applied[name] for name in off)
        assert all(v for name, v in applied.items() if name not in off), applied
        reads_correctly(child.info["url"], *frames_dir)
    finally:
        child.stop()


@pytest.mark.parametrize("piece", _pieces(security=True))
def test_a_changed_original_of_a_security_piece_refuses_to_start(tmp_path, frames_dir, piece):
    child = serve(tmp_path, piece, frames_dir)
    code = child.stop()
    assert child.info is None and code != 0, "the server started"
    refusals = [line for line in child.stderr.splitlines() if "refusing to start" in line]
    assert refusals and repr(piece) in refusals[-1], child.stderr


def test_a_library_outside_its_tested_series_falls_back(tmp_path, frames_dir):
    child = serve(tmp_path, "version:aiosqlite", frames_dir)
    try:
        assert child.info is not None, child.stderr
        lines = [line for line in child.stderr.splitlines() if FALLBACK in line]
        assert len(lines) == 1 and "'sqlite-reads'" in lines[0] and "aiosqlite" in lines[0], child.stderr
        assert child.info["applied"]["sqlite-reads"] is False
        reads_correctly(child.info["url"], *frames_dir)
    finally:
        child.stop()


def test_another_tiled_series_refuses_to_start(tmp_path, frames_dir):
    child = serve(tmp_path, "version:tiled", frames_dir)
    assert child.stop() != 0 and child.info is None
    assert "refusing to start" in child.stderr


# ------------------------------------------------------------------ the client's piece


def test_the_client_reads_tls_verify_only_from_the_tiled_it_knows(tmp_path, monkeypatch, caplog):
    from conftest import API_KEY, start_server
    from tiled.client import from_uri

    from scatterbroker.clients import fast_array
    from scatterbroker.server import tiled_compat

    assert fast_array.VERIFY_FINGERPRINTS == tiled_compat.CLIENT_VERIFY_FINGERPRINTS
    with start_server(tmp_path / "data", []) as url:
        context = from_uri(url, api_key=API_KEY).context
        https = "https://127.0.0.1:9/api/v1/sb/frames/x"
        monkeypatch.setattr(fast_array, "_verify_known", None)
        assert fast_array._Transport(context, https).raw  # its own connections, with the context's TLS
        monkeypatch.setattr(fast_array, "_verify_known", None)
        monkeypatch.setitem(fast_array.VERIFY_FINGERPRINTS, next(iter(fast_array.VERIFY_FINGERPRINTS)), "0" * 64)
        assert not fast_array._Transport(context, https).raw  # stock: the context's httpx client
        assert [r for r in caplog.records if FALLBACK in r.getMessage()]
        assert fast_array._Transport(context, url + "/api/v1/sb/frames/x").raw  # plain http is unaffected
    monkeypatch.setattr(fast_array, "_verify_known", None)


# ------------------------------------------------------------------ no private name outside the seam

LIBRARIES = ("tiled", "fastapi", "starlette", "pydantic", "aiosqlite")
SOURCES = [ROOT / d for d in ("scatterbroker", "adapters", "catalog", "reduction")]
SEAM = ROOT / "scatterbroker" / "server" / "tiled_compat.py"
#: private library names read on instances (not reachable through an imported name); outside the
#: seam only fast_array's documented client-side read of ``_verify`` is allowed
INSTANCE_PRIVATES = {"_verify", "_data_cache", "_pubsub", "_connection_pool", "_adbc_connection", "_running",
                     "_connection", "_execute", "_connect", "_GENERIC_TYPES_CACHE", "_datastore", "_settings"}
ALLOWED = {("clients/fast_array.py", "_verify"),
           ("clients/fast_array.py", "_connection")}  # _Transport's own method of that name


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not name.startswith(("_sb", "_scatterbroker"))


def _library(module: str) -> bool:
    return module.split(".")[0] in LIBRARIES


def private_touches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT / "scatterbroker") if path.is_relative_to(ROOT / "scatterbroker") else path
    found, imported = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _library(alias.name):
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{rel}:{node.lineno}: import {alias.name}")
                    imported.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and _library(node.module or ""):
            if any(_private(p) for p in node.module.split(".")):
                found.append(f"{rel}:{node.lineno}: from {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{rel}:{node.lineno}: from {node.module} import {alias.name}")
                imported.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported and any(_private(a) for a in chain):
                found.append(f"{rel}:{node.lineno}: {base.id}.{'.'.join(reversed(chain))}")
            if node.attr in INSTANCE_PRIVATES and (str(rel), node.attr) not in ALLOWED:
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value in INSTANCE_PRIVATES \
                    and (str(rel), name.value) not in ALLOWED:
                found.append(f"{rel}:{node.lineno}: {node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "__dict__":
            found.append(f"{rel}:{node.lineno}: .__dict__[...] (a library object's own attributes)")
    return found


def test_no_private_library_name_outside_the_seam():
    files = [p for d in SOURCES for p in d.rglob("*.py") if p != SEAM]
    assert len(files) > 40
    touches = [t for p in files for t in private_touches(p)]
    assert touches == [], "\n".join(touches)


def test_the_check_finds_what_the_modules_did_before_the_seam(tmp_path):
    """The walk above sees each kind of touch the patching modules used to make."""
    before = tmp_path / "before.py"
    before.write_text(
        "from aiosqlite.core import Connection\n"
        "from tiled.server._backcompat import raw_python_tiled_client_version\n"
        "from pydantic._internal import _generics as g\n"
        "import tiled.storage\n"
        "Connection._execute = None\n"
        "g._GENERIC_TYPES_CACHE = None\n"
        "x = tiled.storage.SQLStorage._connection_pool\n"
        "def f(storage, context, self):\n"
        "    storage.__dict__['_connection_pool'] = storage._adbc_connection\n"
        "    self._data_cache = getattr(context, '_verify', True)\n")
    touches = private_touches(before)
    for expected in ("from tiled.server._backcompat", "from pydantic._internal", "Connection._execute",
                     "g._GENERIC_TYPES_CACHE", "SQLStorage._connection_pool", "__dict__", "._adbc_connection",
                     "._data_cache", "'_verify'"):
        assert any(expected in t for t in touches), (expected, touches)


def test_every_piece_names_its_originals_and_fingerprints():
    from scatterbroker.server import tiled_compat

    assert set(tiled_compat.FINGERPRINTS) == set(tiled_compat.PIECES)
    for name, piece in tiled_compat.PIECES.items():
        assert set(tiled_compat.FINGERPRINTS[name]) == set(piece.replaces), name
        assert set(piece.libraries) <= set(tiled_compat.TESTED), name
        assert tiled_compat.check(name), (name, tiled_compat.mismatches(name))
    assert {p for p in tiled_compat.PIECES if tiled_compat.PIECES[p].security} == {
        "request-layers", "fast-route-auth", "registration-guard", "job-records", "proposal-access"}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _child(*sys.argv[1:4])
