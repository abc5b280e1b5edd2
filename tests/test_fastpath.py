"""The fast data route (/api/v1/sb/...) and its client class, against real servers.

Every access path must return exactly what h5py / fabio / tifffile return for
the same selection: same dtype (byte order included), same shape, same bytes,
through ``tiled.client.from_uri`` (which picks ``FastArrayClient`` by spec) and
through raw httpx with every codec. Bad requests are 4xx with a message and
the server keeps serving; security is Tiled's (401 without a key, roots
confinement, access through the catalog).
"""

from __future__ import annotations

import threading
from pathlib import Path

import fabio
import h5py
import hdf5plugin
import httpx
import numpy as np
import pytest
import tifffile
from conftest import API_KEY, SQLITE, make_frames, start_server, write_cbf

from scatterbroker import _wire

N = 11  # frames: odd, so a 3-frame HDF5 chunk grid has a partial last chunk
SHAPE = (24, 32)
AUTH = {"Authorization": f"Apikey {API_KEY}"}

# (node path below "data/", local reader) -- filled by write_files
SELECTIONS = [
    (),
    np.s_[3],
    np.s_[-1],
    np.s_[2:9],
    np.s_[2:9:3, 5],
    np.s_[:, 5:17, 7:20],
    np.s_[::-1, ::-2, 3],
    np.s_[..., 7],
    np.s_[4, ..., 1:30:4],
    np.s_[8:3],           # empty
    np.s_[5:500],         # numpy clips out-of-range slice bounds
    np.s_[-100:3, -3:],
]


def write_files(root: Path) -> dict[str, tuple]:
    """Write every layout the route handles; return node -> (array, file, reader)."""
    frames = make_frames(N, seed=5, dtype="uint32")
    out: dict[str, tuple] = {}
    h5 = root / "h5"
    h5.mkdir(parents=True)

    def dataset(name: str, data: np.ndarray, **kwargs) -> None:
        with h5py.File(h5 / f"{name}.h5", "w") as f:
            f.create_dataset("data", data=data, **kwargs)
        out[f"h5/{name}/data"] = (name, h5 / f"{name}.h5")

    dataset("bslz4", frames, chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4"))
    dataset("bslz4_3", frames, chunks=(3, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4"))
    dataset("chunked", frames, chunks=(1, *SHAPE))
    dataset("contiguous_be", frames.astype(">i2"))
    dataset("gzip", frames.astype("<f8"), chunks=(1, *SHAPE), compression="gzip")
    dataset("tiles", frames, chunks=(1, 8, 8))
    dataset("plane", frames[0].astype("<f4"))
    dataset("line", np.arange(1000, dtype="<i8"), chunks=(100,))
    dataset("scalar", np.float64(2.5))

    cbf = make_frames(N, seed=6)
    scan = root / "cbf" / "p1" / "s1"
    scan.mkdir(parents=True)
    for i, frame in enumerate(cbf, start=1):
        write_cbf(scan / f"scan1_{i:05d}.cbf", frame, i)
    out["cbf/p1/s1/scan1/frames"] = ("cbf", sorted(scan.glob("*.cbf")))

    tif = root / "tif"
    tif.mkdir()
    tifffile.imwrite(tif / "stack.tif", make_frames(7, seed=8, dtype="uint16"))
    out["tif/stack"] = ("tif", tif / "stack.tif")
    return out


def local(kind_file: tuple) -> np.ndarray:
    """The whole array as h5py / fabio / tifffile return it."""
    kind, where = kind_file
    if kind == "cbf":
        return np.stack([fabio.open(str(p)).data for p in where])
    if kind == "tif":
        return tifffile.imread(where)
    with h5py.File(where, "r") as f:
        return f["data"][()]


def local_select(kind_file: tuple, key) -> np.ndarray:
    """``key`` applied by the library itself where it can (h5py), else by numpy."""
    kind, where = kind_file
    if kind not in ("cbf", "tif"):
        with h5py.File(where, "r") as f:
            d = f["data"]
            try:
                return np.asarray(d[key]) if key != () else d[()]
            except (ValueError, TypeError, IndexError):
                pass  # h5py refuses negative steps / reversed ranges: numpy semantics
            return d[()][key]
    return local(kind_file)[key]


def same(got: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    assert got.dtype.str == expected.dtype.str, (what, "byte order", got.dtype.str, expected.dtype.str)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert got.tobytes() == expected.tobytes(), what


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-data")
    return root, write_files(root)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory, backend):
    """A scatterbroker server with everything registered under ``data/``."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    root, nodes = files
    with start_server(tmp_path_factory.mktemp("fast-catalog"), [root], backend=backend) as url:
        report = register(from_uri(url, api_key=API_KEY), root, prefix="data")
        assert not report.failed, report.failed
        yield url, nodes


@pytest.fixture
def client(server):
    from tiled.client import from_uri

    return from_uri(server[0], api_key=API_KEY)


def _raw(http: httpx.Client, node: str, slice_text: str, codec: str = "none") -> np.ndarray:
    r = http.get(f"/api/v1/sb/frames/data/{node}", params={"slice": slice_text, "codec": codec})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == _wire.MEDIA_TYPE
    assert "etag" not in r.headers
    shape = tuple(int(s) for s in r.headers[_wire.H_SHAPE].split(",") if s)
    out = np.empty(shape, dtype=np.dtype(r.headers[_wire.H_DTYPE]))
    from scatterbroker.clients.fast_array import decode_body

    one_item = slice_text.split(",")[0].strip().lstrip("-").isdigit()
    decode_body(r.headers[_wire.H_CODEC], r.content, {k.lower(): v for k, v in r.headers.items()}, out,
                one_item=one_item)
    return out


# ------------------------------------------------------------------ client


def test_nodes_open_as_the_fast_client(client, server):
    from scatterbroker.clients.fast_array import FastArrayClient

    for node in server[1]:
        arr = client[f"data/{node}"]
        assert type(arr) is FastArrayClient, node
        assert "sb-array" in [s.name for s in arr.specs]


@pytest.mark.parametrize("key", SELECTIONS, ids=repr)
def test_client_returns_what_the_library_returns(client, server, key):
    for node, source in server[1].items():
        arr = client[f"data/{node}"]
        if len(arr.shape) < 2 and key not in ((), np.s_[3], np.s_[-1], np.s_[2:9], np.s_[5:500], np.s_[8:3]):
            continue
        if len(arr.shape) < 3 and key in (np.s_[:, 5:17, 7:20], np.s_[::-1, ::-2, 3], np.s_[4, ..., 1:30:4],
                                          np.s_[2:9:3, 5], np.s_[-100:3, -3:]):
            continue
        if arr.shape == ():
            if key == ():
                same(arr.read(), local(source), node)
            continue
        got = arr.read() if key == () else arr[key]
        same(got, local_select(source, key), f"{node} {key!r}")


def test_whole_reads_split_into_blocks_are_exact(client, server, monkeypatch):
    """Force many small block requests (and chunk alignment) on every node."""
    import scatterbroker.clients.fast_array as sc

    monkeypatch.setattr(sc, "BLOCK_BYTES", 3000)
    for node, source in server[1].items():
        arr = client[f"data/{node}"]
        same(arr.read(), local(source), node)
        if len(arr.shape) == 3:
            same(arr[1:10:2, 3:20], local(source)[1:10:2, 3:20], node)


def test_read_block_and_numpy_protocol(client, server):
    arr = client["data/h5/bslz4/data"]
    ref = local(server[1]["h5/bslz4/data"])
    same(arr.read_block((4, 0, 0)), ref[4:5], "block")
    same(arr.read_block((4, 0, 0), slice=np.s_[0, 2:5]), ref[4:5][0, 2:5], "block slice")
    same(np.asarray(arr), ref, "__array__")
    with pytest.raises(IndexError):
        arr.read_block((N, 0, 0))
    with pytest.raises(IndexError):
        arr[N]


def test_client_codecs(client, server):
    ref = local(server[1]["h5/chunked/data"])
    arr = client["data/h5/chunked/data"]
    for codec in ("lz4", "zstd", "blosc2", "none"):
        arr.codec = codec
        same(arr[2:7], ref[2:7], codec)


# ------------------------------------------------------------------ raw httpx


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "blosc2", "bslz4", "bslz4,lz4", "cbf", "bslz4,cbf,zstd"])
def test_raw_http_every_codec(server, codec):
    url, nodes = server
    cases = [("", ()), ("3", np.s_[3]), (":", np.s_[:]), ("0:7", np.s_[0:7]), ("1:7:2,3:20,0:32:5", np.s_[1:7:2, 3:20, 0:32:5]),
             ("-1", np.s_[-1]), ("3:6", np.s_[3:6])]
    with httpx.Client(base_url=url, headers=AUTH) as http:
        for node, source in nodes.items():
            ref = local(source)
            for text, key in cases:
                if ref.ndim < 3 and "," in text:
                    continue
                if ref.ndim == 0 and text:
                    continue
                same(_raw(http, node, text, codec), ref[key], f"{node} [{text}] {codec}")


def test_stored_chunks_are_sent_as_stored(server):
    """Bitshuffle-LZ4 chunks covering the request go out undecoded (codec bslz4)."""
    url, nodes = server
    with httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/api/v1/sb/frames/data/h5/bslz4_3/data", params={"slice": "3:11", "codec": "bslz4,none"})
        assert r.headers[_wire.H_CODEC] == "bslz4"
        assert r.headers[_wire.H_CHUNK_FRAMES] == "3,3,2"  # the last chunk is partial
        with h5py.File(nodes["h5/bslz4_3/data"][1], "r") as f:
            stored = b"".join(f["data"].id.read_direct_chunk((c, 0, 0))[1] for c in (3, 6, 9))
        assert r.content == stored
        # not aligned to chunks: decoded on the server instead
        r = http.get("/api/v1/sb/frames/data/h5/bslz4_3/data", params={"slice": "2:5", "codec": "bslz4,none"})
        assert r.headers[_wire.H_CODEC] == "none"
        info = http.get("/api/v1/sb/info/data/h5/bslz4_3/data").json()
        assert info["storage"]["chunk_shape"] == [3, *SHAPE] and "bslz4" in info["codecs"]
        assert info["dtype"] == "<u4" and info["shape"] == [N, *SHAPE]


def stored_sections(paths) -> bytes:
    """The byte-offset sections of CBF files as stored: after the binary-section marker,
    X-Binary-Size bytes (the size as fabio reads the header)."""
    out = []
    for path in paths:
        raw = Path(path).read_bytes()
        start = raw.index(b"\x0c\x1a\x04\xd5") + 4
        out.append(raw[start:start + int(fabio.open(str(path)).header["X-Binary-Size"])])
    return b"".join(out)


def test_whole_frames_are_sent_as_their_files_store_them(client, server):
    """A CBF scan's frames go out as their byte-offset sections (codec cbf), single frames of
    a Bitshuffle-LZ4 stack as their chunks; the client asks for them and decodes them."""
    url, nodes = server
    cbf = nodes["cbf/p1/s1/scan1/frames"][1]
    with httpx.Client(base_url=url + "/api/v1/sb/", headers=AUTH) as http:
        r = http.get("frames/data/cbf/p1/s1/scan1/frames", params={"slice": "2:5", "codec": "cbf,none"})
        assert r.headers[_wire.H_CODEC] == "cbf" and r.headers[_wire.H_CHUNK_FRAMES] == "1,1,1"
        assert r.content == stored_sections(cbf[2:5])
        assert [int(n) for n in r.headers[_wire.H_CHUNKS].split(",")] == [len(stored_sections([p])) for p in cbf[2:5]]
        r = http.get("frames/data/cbf/p1/s1/scan1/frames", params={"slice": "-1", "codec": "cbf,none"})
        assert r.headers[_wire.H_CODEC] == "cbf" and r.content == stored_sections(cbf[-1:])
        # part of a frame, or a client that does not decode CBF: decoded on the server
        for params in ({"slice": "3,0:5", "codec": "cbf,none"}, {"slice": "3", "codec": "bslz4,none"}):
            assert http.get("frames/data/cbf/p1/s1/scan1/frames", params=params).headers[_wire.H_CODEC] == "none"
        r = http.get("frames/data/h5/bslz4/data", params={"slice": "3", "codec": "bslz4,cbf,none"})
        assert r.headers[_wire.H_CODEC] == "bslz4"
        with h5py.File(nodes["h5/bslz4/data"][1], "r") as f:
            assert r.content == f["data"].id.read_direct_chunk((3, 0, 0))[1]
        offered = {node: http.get(f"info/data/{node}").json()["codecs"] for node in nodes}
    assert "cbf" in offered["cbf/p1/s1/scan1/frames"] and "bslz4" not in offered["cbf/p1/s1/scan1/frames"]
    assert "bslz4" in offered["h5/bslz4/data"] and "cbf" not in offered["h5/bslz4/data"]
    assert not {"cbf", "bslz4"} & set(offered["h5/chunked/data"])
    arr = client["data/cbf/p1/s1/scan1/frames"]
    assert arr._stored_codecs() == ["cbf"] and client["data/h5/bslz4/data"]._stored_codecs() == ["bslz4"]
    blocks = arr._split(*_wire.normalize(3, arr.shape)[:1], arr.shape[1:], 4, limit=100, whole=True)
    assert len(blocks) == 1  # a whole frame is one request, however small the block size
    same(arr[3], local(nodes["cbf/p1/s1/scan1/frames"])[3], "one CBF frame")


def test_a_corrupt_stored_frame_is_an_error_naming_it(tmp_path):
    """A CBF frame whose header is sound but whose data is not reaches the client undecoded
    (codec cbf): the client refuses it, naming the problem; the server decoding it answers 422."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = tmp_path / "scan"
    d.mkdir()
    frames = make_frames(3, seed=4)
    for i, frame in enumerate(frames, start=1):
        write_cbf(d / f"scan1_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "db", [d]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, d, prefix="d")
        bad = d / "scan1_00002.cbf"
        raw = bytearray(bad.read_bytes())
        start = raw.index(b"\x0c\x1a\x04\xd5") + 4
        raw[start:start + 64] = b"\x80" * 64  # byte-offset escapes with no value after them
        bad.write_bytes(bytes(raw))
        arr = client["d/scan1/frames"]
        with pytest.raises(ValueError, match="corrupt CBF data"):
            arr[1]
        same(arr[2], frames[2], "the next frame")
        r = httpx.get(f"{url}/api/v1/sb/frames/d/scan1/frames", params={"slice": "1", "codec": "none"},
                      headers=AUTH)
        assert r.status_code == 422 and "scan1_00002.cbf" in r.text and "corrupt CBF data" in r.text


def test_the_router_path_equals_the_fast_lane(server):
    """A browser-style request (Origin header) goes through Tiled's middleware and the router."""
    url, nodes = server
    with httpx.Client(base_url=url, headers=AUTH) as http:
        a = http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "2:5,3"})
        b = http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "2:5,3"},
                     headers={"Origin": "http://example.org"})
        assert a.status_code == b.status_code == 200
        assert a.content == b.content and a.headers[_wire.H_SHAPE] == b.headers[_wire.H_SHAPE]
        assert "x-tiled-request-id" in b.headers  # it did pass Tiled's middleware
        bad = http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "1:2:-1"},
                       headers={"Origin": "http://example.org"})
        assert bad.status_code == 400 and "positive steps" in bad.json()["detail"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("text, status, words", [
    ("abc", 400, "malformed"),
    ("1:2:3:4", 400, "malformed"),
    ("0,,1", 400, "malformed"),
    ("1:2:-1", 400, "positive steps"),
    ("::0", 400, "positive steps"),
    ("11", 400, "out of range"),
    ("-12", 400, "out of range"),
    ("0:12", 400, "out of range"),
    ("0,24", 400, "out of range"),
    ("5:2", 400, "stop before start"),
    ("0,0,0,0", 400, "too many indices"),
    ("...,...", 400, "one '...'"),
    ("9" * 30, 400, "malformed"),
    ("0:1," * 800, 422, ""),  # longer than the route accepts
])
def test_bad_slices_are_4xx_with_a_message(server, text, status, words):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": text})
        assert r.status_code in (status, 400, 414, 422), r.text
        assert r.status_code < 500
        if words:
            assert words in r.json()["detail"]
        # ... and the server keeps serving
        assert http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "1"}).status_code == 200


def test_other_bad_requests(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH) as http:
        r = http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "1", "codec": "gzip9"})
        assert r.status_code == 400 and "codec" in r.json()["detail"]
        assert http.get("/api/v1/sb/frames/data/h5/nope/data").status_code == 404
        r = http.get("/api/v1/sb/frames/data/h5/chunked")  # a container, not an array
        assert r.status_code == 404
        assert http.get("/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "1"}).status_code == 200


def test_more_than_the_configured_response_size_is_413(files, tmp_path):
    from scatterbroker.server.app import build_app, serve_in_thread
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    root, nodes = files
    config = SQLITE.config(tmp_path / "db", [root])
    config["response_bytesize_limit"] = 5 * 24 * 32 * 4  # five frames
    with serve_in_thread(build_app(config)) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, root / "h5", prefix="h5")
        with httpx.Client(base_url=url, headers=AUTH) as http:
            r = http.get("/api/v1/sb/frames/h5/chunked/data", params={"slice": "0:6"})
            assert r.status_code == 413 and "response limit" in r.json()["detail"]
            assert http.get("/api/v1/sb/frames/h5/chunked/data", params={"slice": "0:5"}).status_code == 200
            assert http.get("/api/v1/sb/info/h5/chunked/data").json()["max_bytes"] == 5 * 24 * 32 * 4
        # the client splits large reads into requests under the limit
        import scatterbroker.clients.fast_array as sc

        old = sc.BLOCK_BYTES
        sc.BLOCK_BYTES = 4 * 24 * 32 * 4
        try:
            same(client["h5/chunked/data"].read(), local(nodes["h5/chunked/data"]), "split under limit")
        finally:
            sc.BLOCK_BYTES = old


# ------------------------------------------------------------------ security


def test_unauthenticated_is_401(server):
    url, _ = server
    for path in ("/api/v1/sb/frames/data/h5/chunked/data", "/api/v1/sb/info/data/h5/chunked/data"):
        r = httpx.get(url + path, params={"slice": "1"})
        assert r.status_code == 401, r.text
        r = httpx.get(url + path, params={"slice": "1"}, headers={"Authorization": "Apikey wrongkey"})
        assert r.status_code == 401
        r = httpx.get(url + path, params={"slice": "1"}, headers={"Authorization": "Bearer not-a-token"})
        assert r.status_code == 401
        assert r.content and b"\x00" not in r.content[:20]  # a JSON message, not data
    # the key in the query string works as it does for Tiled's own routes
    r = httpx.get(url + "/api/v1/sb/frames/data/h5/chunked/data", params={"slice": "1", "api_key": API_KEY})
    assert r.status_code == 200


def test_anonymous_reads_follow_the_server_setting(files, tmp_path):
    root, nodes = files
    with start_server(tmp_path / "db", [root / "h5"], public=True) as url:
        from tiled.client import from_uri

        from scatterbroker.catalog.register import register

        register(from_uri(url, api_key=API_KEY), root / "h5", prefix="h5")
        r = httpx.get(url + "/api/v1/sb/frames/h5/chunked/data", params={"slice": "2"})
        assert r.status_code == 200  # anonymous read allowed, as by /array/full
        anon = from_uri(url)
        same(anon["h5/chunked/data"][2], local(nodes["h5/chunked/data"])[2], "anonymous")


def test_storage_outside_the_roots_is_refused_like_tiled_does(tmp_path):
    """External raw storage escaping the readable roots: 403 on both routes, no bytes."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    served, outside = tmp_path / "served", tmp_path / "outside"
    served.mkdir(), outside.mkdir()
    secret = np.arange(24 * 32 * 2, dtype="<u4").reshape(2, 24, 32)
    (outside / "secret.raw").write_bytes(secret.tobytes())
    with h5py.File(served / "ext.h5", "w") as f:
        f.create_dataset("data", shape=secret.shape, dtype="<u4",
                         external=[(str(outside / "secret.raw"), 0, secret.nbytes)])
        f["ok"] = np.arange(5)
    with start_server(tmp_path / "db", [served]) as url:
        register(from_uri(url, api_key=API_KEY), served, prefix="s")
        with httpx.Client(base_url=url, headers=AUTH) as http:
            fast = http.get("/api/v1/sb/frames/s/ext/data", params={"slice": "0"})
            stock = http.get("/api/v1/array/full/s/ext/data", params={"slice": "0"},
                             headers={"Accept": "application/octet-stream"})
            assert fast.status_code == stock.status_code == 403, (fast.text, stock.text)
            assert "outside the readable roots" in fast.json()["detail"]
            assert secret.tobytes()[:64] not in fast.content
            ok = http.get("/api/v1/sb/frames/s/ext/ok")
            assert ok.status_code == 200 and np.frombuffer(ok.content, "<i8").tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ files change


def test_a_changed_file_is_read_anew(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = tmp_path / "d"
    d.mkdir()
    first = make_frames(4, seed=1, dtype="uint32")
    for name, kwargs in (("raw", {}), ("bs", dict(hdf5plugin.Bitshuffle(cname="lz4")))):
        with h5py.File(d / f"{name}.h5", "w") as f:
            f.create_dataset("data", data=first, chunks=(1, *SHAPE), **kwargs)
    with start_server(tmp_path / "db", [d]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, d, prefix="d")
        for name, kwargs in (("raw", {}), ("bs", dict(hdf5plugin.Bitshuffle(cname="lz4")))):
            arr = client[f"d/{name}/data"]
            same(arr[1], first[1], name)
            second = first[::-1].copy()
            tmp = d / f".{name}.tmp"
            with h5py.File(tmp, "w") as f:  # replaced atomically, as stacking does
                f.create_dataset("data", data=second, chunks=(1, *SHAPE), **kwargs)
            tmp.replace(d / f"{name}.h5")
            same(arr[1], second[1], f"{name} after the file changed")
            same(arr.read(), second, f"{name} whole after the file changed")


def test_a_grown_dataset_is_read_at_its_new_shape_at_once(tmp_path):
    """The server reuses nodes for a moment; a client that saw a new shape must not get the old one."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = tmp_path / "d"
    d.mkdir()
    frames = make_frames(6, seed=4, dtype="uint32")
    with h5py.File(d / "grow.h5", "w") as f:
        f.create_dataset("data", data=frames[:4], chunks=(1, *SHAPE))
    with start_server(tmp_path / "db", [d]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, d, prefix="d")
        same(client["d/grow/data"].read(), frames[:4], "before")
        tmp = d / ".grow.tmp"
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=frames, chunks=(1, *SHAPE))
        tmp.replace(d / "grow.h5")
        grown = client["d/grow/data"]  # a fresh metadata request: 6 frames
        assert grown.shape == (6, *SHAPE)
        same(grown[5], frames[5], "new frame")
        same(grown.read(), frames, "after")


# ------------------------------------------------------------------ concurrency / fallback


def test_concurrent_clients_get_their_own_bytes(server):
    url, nodes = server
    refs = {node: local(src) for node, src in nodes.items() if len(local(src).shape) == 3}
    errors: list = []

    def worker(node: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with httpx.Client(base_url=url, headers=AUTH) as http:
                for _ in range(15):
                    i = int(rng.integers(len(refs[node])))
                    same(_raw(http, node, str(i), "bslz4,none"), refs[node][i], f"{node} {i}")
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(node, k)) for k, node in enumerate(refs) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_falls_back_to_tiled_endpoints_without_the_route(tmp_path):
    """A plain Tiled server with an sb-array node: the client still reads, via /array/full."""
    import uvicorn
    from tiled.adapters.array import ArrayAdapter
    from tiled.adapters.mapping import MapAdapter
    from tiled.client import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app
    from tiled.server.simple import ThreadedServer
    from tiled.structures.core import Spec

    import scatterbroker.clients.fast_array as sc

    data = make_frames(6, seed=3, dtype="uint16")
    tree = MapAdapter({"a": ArrayAdapter.from_array(data, specs=[Spec("sb-array")])})
    app = build_app(tree, authentication=Authentication(single_user_api_key=API_KEY))
    with ThreadedServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")).run_in_thread() as url:
        arr = from_uri(url, api_key=API_KEY)["a"]
        assert type(arr) is sc.FastArrayClient
        same(arr[2:4, ::-1], data[2:4, ::-1], "fallback")
        same(arr.read(), data, "fallback whole")
        assert arr._fast() is None


# ------------------------------------------------------------------ bench-client


def test_bench_client_command(server):
    from typer.testing import CliRunner

    from scatterbroker.cli import app

    url, _ = server
    result = CliRunner().invoke(app, ["bench-client", url, "data/h5/bslz4/data", "--api-key", API_KEY,
                                      "--frames", "5", "--max-mb", "1"])
    assert result.exit_code == 0, result.output
    assert "ms" in result.output and "MB/s" in result.output and "fast route" in result.output
