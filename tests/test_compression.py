"""Array answers compressed with Blosc2 are shuffled by the array's item size
(scatterbroker.server.compression), and read back exactly by Tiled's own client."""

from __future__ import annotations

import blosc2
import httpx
import numpy as np
import pytest

from conftest import API_KEY

from scatterbroker.server.compression import type_size
from scatterbroker.server.app import build_app, local_config, serve_in_thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = build_app(local_config(tmp_path_factory.mktemp("blosc") / "data", [], api_key=API_KEY))
    with serve_in_thread(app) as url:
        yield url


@pytest.mark.parametrize("dtype", ["<i4", "<u2", "<f8", "|u1"])
def test_array_answers_are_shuffled_by_item_size(server, dtype):
    from tiled.client import from_uri

    rng = np.random.default_rng(1)
    data = rng.poisson(5, (64, 96)).astype(dtype)
    node = from_uri(server, api_key=API_KEY).write_array(data, key=f"a{dtype[1:]}")
    with httpx.stream("GET", f"{server}/api/v1/array/full/{node.item['id']}",
                      headers={"Authorization": f"Apikey {API_KEY}", "Accept": "application/octet-stream",
                               "Accept-Encoding": "blosc2"}) as r:
        assert r.status_code == 200 and r.headers["content-encoding"] == "blosc2", r.headers
        body = b"".join(r.iter_raw())  # as sent (Tiled's client teaches httpx to decode blosc2)
    assert body[3] == np.dtype(dtype).itemsize  # byte 3 of a Blosc chunk header: its type size
    assert np.array_equal(np.frombuffer(blosc2.decompress(body), dtype).reshape(data.shape), data)
    # and Tiled's own client (which asks for blosc2 and decodes it) reads the same numbers
    assert np.array_equal(node.read(), data)


def test_type_size_of_bodies():
    frame = np.zeros((3, 5), "<i4")
    assert type_size(memoryview(np.ascontiguousarray(frame)).cast("B")) == 4  # Tiled's array bytes
    assert type_size(b"x" * 12) == 1  # streamed chunks
    assert type_size(memoryview(np.zeros(3, "<f8"))) == 8
