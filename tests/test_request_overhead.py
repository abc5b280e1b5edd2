"""The server builds FastAPI dependants, pydantic response models and SQL aliases once,
not on every request (scatterbroker.server.request_overhead), and behaves the same."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

# Counts, over 15 requests after warm-up (a metadata read and two listings, x5,
# with a garbage collection after each round), how often the per-request work
# happens: a dependant's signature taken, a generic response model created, a
# column proxy built for a new SQL alias.
PROBE = """
import collections, gc, sys, tempfile
from pathlib import Path
from fastapi.dependencies import utils
from pydantic._internal import _generics
from sqlalchemy.sql import schema

counts = collections.Counter()

def counting(owner, name, label):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        counts[label] += 1
        return fn(*a, **k)
    setattr(owner, name, wrapper)

counting(utils, "get_typed_signature", "signatures")
counting(_generics, "create_generic_submodel", "models")
counting(schema.Column, "_make_proxy", "column_proxies")

from fastapi.testclient import TestClient
from scatterbroker.server.app import build_app, local_config

config = local_config(Path(tempfile.mkdtemp()) / "data", [], api_key="k")
if sys.argv[1] == "scatterbroker":
    app = build_app(config, response_cache=False)  # replayed answers would do no work at all
else:
    from tiled.server.app import build_app_from_config
    app = build_app_from_config(config)
paths = ("/api/v1/metadata/a", "/api/v1/search/a", "/api/v1/search/")
with TestClient(app) as client:
    h = {"Authorization": "Apikey k"}
    r = client.post("/api/v1/metadata/", headers=h, json={
        "metadata": {}, "structure_family": "container", "specs": [], "data_sources": [], "id": "a"})
    assert r.status_code == 200, r.text
    for path in paths:
        assert client.get(path, headers=h).status_code == 200
    gc.collect()
    counts.clear()
    for _ in range(5):
        for path in paths:
            r = client.get(path, headers=h)
            assert r.status_code == 200, r.text
        gc.collect()
print({k: counts[k] for k in ("signatures", "models", "column_proxies")})
"""


def probe(kind: str, tmp_path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, kind], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_repeated_requests_rebuild_nothing(tmp_path):
    stock = probe("tiled", tmp_path)
    ours = probe("scatterbroker", tmp_path)
    # the same app without the fixes redoes all three on every request ...
    assert stock["signatures"] > 15 and stock["models"] > 0 and stock["column_proxies"] > 0, stock
    # ... ours on none of them
    assert ours == {"signatures": 0, "models": 0, "column_proxies": 0}, ours


def test_dependency_overrides_still_apply():
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from scatterbroker.server import request_overhead

    assert request_overhead.memoize_dependants()

    def settings() -> str:
        return "stock"

    def who(s: str = Depends(settings)) -> str:
        return f"user of {s}"

    app = FastAPI()

    @app.get("/")
    def root(w: str = Depends(who)) -> str:
        return w

    app.dependency_overrides[settings] = lambda: "first"
    with TestClient(app) as client:
        assert client.get("/").json() == "user of first"
        assert client.get("/").json() == "user of first"
        app.dependency_overrides[settings] = lambda: "second"  # changed while serving
        assert client.get("/").json() == "user of second"
        app.dependency_overrides[who] = lambda: "nobody"
        assert client.get("/").json() == "nobody"
        app.dependency_overrides.clear()
        assert client.get("/").json() == "user of stock"


@pytest.mark.parametrize("segments, root_id", [([], 0), (["a"], 0), (["raw", "p1", "scan"], 7)])
def test_node_lookup_statement_is_tiled_s(segments, root_id):
    from tiled.catalog import adapter

    from scatterbroker.server import request_overhead

    assert request_overhead.reuse_node_aliases()
    ours = adapter.node_from_segments(segments, root_id=root_id)
    stock = adapter.node_from_segments.__wrapped__(segments, root_id=root_id)
    compiled = [s.compile(compile_kwargs={"literal_binds": True}) for s in (ours, stock)]
    assert str(compiled[0]) == str(compiled[1])
    # the second statement of the same depth reuses the aliases and still says what it is asked
    again = adapter.node_from_segments([s + "x" for s in segments], root_id=root_id + 1)
    text = str(again.compile(compile_kwargs={"literal_binds": True}))
    assert all(f"'{s}x'" in text for s in segments) and f"= {root_id + 1}" in text
