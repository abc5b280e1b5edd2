"""A corpus of bad files, generated here, through registration and a real server.

For every bad file: registration reports it (naming the file and the problem)
and registers the rest of the tree; reading it answers 4xx with a message
naming the problem; the server keeps serving the good nodes afterwards. Runs
on both catalog backends (SQLite, PostgreSQL). Hypothesis fuzzes the
``slice=`` parameter of ``/api/v1/array/full`` (malformed or out-of-range:
4xx, never 500) and miniCBF headers (``parse_header`` raises nothing but
``UnreadableFile``/``IncompleteFile``, and what it harvests is storable JSON).
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import httpx
import numpy as np
import pytest
from conftest import API_KEY, FRAME_SHAPE, make_frames, start_server, write_cbf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scatterbroker.adapters.minicbf import BINARY_START, parse_header
from scatterbroker.errors import IncompleteFile, UnreadableFile

OCTET = {"Accept": "application/octet-stream"}
HUGE2D = (2**40, 2**20)  # 1 EiB of int8, declared, chunked, never written
HUGE3D = (2**34, 16, 16)


# ------------------------------------------------------------------ the corpus


def binary_section(raw: bytes) -> tuple[int, int]:
    """(offset, X-Binary-Size) of a CBF file's binary data."""
    size = int(re.search(rb"X-Binary-Size:\s*(\d+)", raw).group(1))
    return raw.index(BINARY_START) + len(BINARY_START), size


def with_binary_size(raw: bytes, size: int) -> bytes:
    """The same CBF bytes with the ``X-Binary-Size:`` header value replaced."""
    return re.sub(rb"(X-Binary-Size:\s*)\d+", lambda m: m.group(1) + str(size).encode(), raw,
                  count=1)


def bad_tiff(good: bytes) -> bytes:
    """A little-endian TIFF whose first-IFD offset points past the end of the file."""
    assert good[:4] == b"II*\x00"
    return good[:4] + struct.pack("<I", len(good) + 4096) + good[8:]


def truncated_hdf5(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def write_small_nexus(path: Path, frames: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        d = e.create_group("data")
        d.attrs.update(NX_class="NXdata", signal="data")
        d.create_dataset("data", data=frames, chunks=(1, *frames.shape[1:]))


def build_corpus(root: Path) -> SimpleNamespace:
    import tifffile

    frames = make_frames(4)
    cbf = root / "cbf"
    cbf.mkdir(parents=True)
    for i, frame in enumerate(frames, start=1):
        write_cbf(cbf / f"scan_{i:05d}.cbf", frame, i)
    write_cbf(cbf / "single.cbf", frames[3], 4)  # pixel (5, 7) = 3017: escaped, > 1 byte
    good = (cbf / "single.cbf").read_bytes()
    offset, size = binary_section(good)
    n_pixels = FRAME_SHAPE[0] * FRAME_SHAPE[1]
    assert size > n_pixels + 2  # byte-offset data: at least one byte per pixel
    (cbf / "truncated.cbf").write_bytes(good[: offset + size // 2])
    (cbf / "size_too_big.cbf").write_bytes(with_binary_size(good, size + 10_000))
    (cbf / "size_too_small.cbf").write_bytes(with_binary_size(good, n_pixels // 2))
    (cbf / "size_short.cbf").write_bytes(with_binary_size(good, size - 2))
    noise = np.random.default_rng(7).bytes(size)
    (cbf / "random_data.cbf").write_bytes(good[:offset] + noise + good[offset + size:])
    (cbf / "nul_header.cbf").write_bytes(good.replace(b"PILATUS 2M", b"PILATUS\x002M", 1))
    (cbf / "empty.cbf").write_bytes(b"")

    tif = root / "tiff"
    tif.mkdir()
    image = make_frames(1, dtype="uint16")[0]
    tifffile.imwrite(tif / "good.tif", image)
    (tif / "bad_ifd.tif").write_bytes(bad_tiff((tif / "good.tif").read_bytes()))
    (tif / "empty.tif").write_bytes(b"")

    h5 = root / "hdf5"
    h5.mkdir()
    write_small_nexus(h5 / "good.nxs", frames)
    (h5 / "truncated.nxs").write_bytes(truncated_hdf5(h5 / "good.nxs"))
    (h5 / "empty.h5").write_bytes(b"")
    with h5py.File(h5 / "cyclic.nxs", "w") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e["x"] = np.arange(3)
        e["loop_a"] = h5py.SoftLink("/entry/loop_b")
        e["loop_b"] = h5py.SoftLink("/entry/loop_a")
        e["self_loop"] = h5py.SoftLink("/entry/self_loop")
        e["again"] = e  # a hard-link cycle: entry/again/again/... is entry
    with h5py.File(h5 / "shapes.nxs", "w") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e["scalar"] = 2.5
        e.create_dataset("null", data=h5py.Empty("f8"))
        e.create_dataset("huge2d", shape=HUGE2D, dtype="i1", chunks=(1024, 1024))
        e.create_dataset("huge3d", shape=HUGE3D, dtype="i4", chunks=(1, 16, 16))
    with h5py.File(h5 / "attrs.nxs", "w") as f:
        f.attrs["latin1"] = np.bytes_(b"caf\xe9")          # fixed-length, not UTF-8
        f.attrs.create("vlen", b"\xff\xfe", dtype=h5py.string_dtype("utf-8"))
        f.attrs["nul"] = np.bytes_(b"a\x00b")               # embedded NUL
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e["title"] = np.bytes_(b"t\x00itle\xff")

    damaged = root / "damaged"  # registered good, damaged afterwards
    damaged.mkdir()
    for i, frame in enumerate(frames, start=1):
        write_cbf(damaged / f"frame_{i:05d}.cbf", frame, i)
    write_cbf(damaged / "single.cbf", frames[1], 2)
    tifffile.imwrite(damaged / "image.tif", image)
    write_small_nexus(damaged / "scan.nxs", frames)
    return SimpleNamespace(root=root, frames=frames, image=image)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def server(corpus, backend, tmp_path_factory):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    dirs = [corpus.root / d for d in ("cbf", "tiff", "hdf5", "damaged")]
    with start_server(tmp_path_factory.mktemp("db"), dirs, backend=backend) as url:
        client = from_uri(url, api_key=API_KEY)
        reports = {d.name: register(client, d, prefix=d.name) for d in dirs}
        with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                          headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            yield SimpleNamespace(url=url, client=client, http=http, reports=reports)


def still_serving(server, corpus) -> None:
    """The good nodes read correctly (after whatever the test did)."""
    r = server.http.get("/array/full/cbf/scan/frames", params={"slice": "2,0:3,0:4"},
                        headers=OCTET)
    assert r.status_code == 200, r.text
    got = np.frombuffer(r.content, "<i4").reshape(3, 4)
    assert np.array_equal(got, corpus.frames[2, 0:3, 0:4])
    r = server.http.get("/array/full/hdf5/good/entry/data/data", params={"slice": "1,5,7"},
                        headers=OCTET)
    assert r.status_code == 200, r.text
    assert np.frombuffer(r.content, "<i4")[0] == corpus.frames[1, 5, 7]


# ------------------------------------------------------------------ registration


@pytest.mark.parametrize("directory, name, problem", [
    ("cbf", "truncated.cbf", "truncated CBF"),
    ("cbf", "size_too_big.cbf", "header promises"),
    ("cbf", "size_too_small.cbf", "cannot fit in X-Binary-Size"),
    ("cbf", "empty.cbf", "empty file (0 bytes)"),
    ("tiff", "bad_ifd.tif", "no readable image directory"),
    ("tiff", "empty.tif", "empty file (0 bytes)"),
    ("hdf5", "truncated.nxs", "not a readable HDF5 file"),
    ("hdf5", "empty.h5", "empty file (0 bytes)"),
])
def test_registration_reports_each_bad_file(server, directory, name, problem):
    failed = {Path(path).name: why for path, why in server.reports[directory].failed}
    assert name in failed, failed
    assert name in failed[name] and problem in failed[name], failed[name]


def test_registration_registers_the_rest(server):
    created = {d: set(r.created) for d, r in server.reports.items()}
    assert created["cbf"] == {"cbf/scan", "cbf/single", "cbf/size_short", "cbf/random_data",
                              "cbf/nul_header"}
    assert created["tiff"] == {"tiff/good"}
    assert created["hdf5"] == {"hdf5/good", "hdf5/cyclic", "hdf5/shapes", "hdf5/attrs"}
    assert created["damaged"] == {"damaged/frame", "damaged/single", "damaged/image",
                                  "damaged/scan"}
    assert len(server.reports["cbf"].failed) == 4


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("node, problem", [
    ("cbf/size_short", "corrupt CBF data"),
    ("cbf/random_data", "corrupt CBF data"),
])
def test_corrupt_cbf_data_reads_as_422(server, corpus, node, problem):
    r = server.http.get(f"/array/full/{node}", headers=OCTET)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert node.split("/")[1] + ".cbf" in detail and problem in detail
    still_serving(server, corpus)


def test_nul_and_non_utf8_text_is_stored_on_every_backend(server):
    """Harvested text with NUL / undecodable bytes: stored as U+FFFD, not a 500
    (PostgreSQL's JSONB refuses NUL)."""
    md = server.client["cbf/nul_header"].metadata
    assert md["instrument"]["detector"]["description"].startswith("PILATUS\ufffd2M")
    md = server.client["hdf5/attrs"].metadata
    assert md["nul"] == "a\ufffdb"
    assert md["latin1"].startswith("caf") and "\ufffd" in md["latin1"]
    assert "\ufffd" in md["vlen"]
    assert md["title"].startswith("t\ufffditle")
    r = server.http.get("/array/full/hdf5/attrs/entry/title", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json().startswith("t"), r.text


def test_metadata_with_nul_from_a_raw_client_is_a_422(server):
    from tiled.client.utils import ClientError

    with pytest.raises(ClientError) as info:
        server.client.create_container(key="nul_md", metadata={"a": "x\x00y"})
    assert "422" in str(info.value) and "NUL" in str(info.value)
    assert "nul_md" not in server.client


@pytest.mark.parametrize("name", ["loop_a", "loop_b", "self_loop"])
def test_cyclic_soft_links_are_broken_link_nodes(server, corpus, name):
    start = time.monotonic()
    attrs = server.http.get(f"/metadata/hdf5/cyclic/entry/{name}").json()["data"]["attributes"]
    assert attrs["specs"] == [{"name": "BrokenLink", "version": None}]
    assert "loop" in attrs["metadata"]["link"]["error"]
    r = server.http.get(f"/metadata/hdf5/cyclic/entry/{name}/x")
    assert r.status_code == 404 and "loop" in r.json()["detail"]
    assert time.monotonic() - start < 5
    still_serving(server, corpus)


def test_hard_link_cycle_lists_and_reads_without_hanging(server):
    start = time.monotonic()
    r = server.http.get("/search/hdf5/cyclic/entry", params={"page[limit]": 100})
    assert r.status_code == 200
    assert {item["id"] for item in r.json()["data"]} >= {"x", "again", "loop_a"}
    r = server.http.get("/metadata/hdf5/cyclic/entry")  # inlines contents: depth-bounded
    assert r.status_code == 200
    deep = "/".join(["again"] * 12)
    r = server.http.get(f"/array/full/hdf5/cyclic/entry/{deep}/x",
                        headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.json() == [0, 1, 2], r.text
    assert time.monotonic() - start < 10


def test_zero_dimensional_and_empty_datasets(server):
    json_ = {"Accept": "application/json"}
    for node, shape, value in [("scalar", [], 2.5), ("null", [0], [])]:
        attrs = server.http.get(f"/metadata/hdf5/shapes/entry/{node}").json()["data"]["attributes"]
        assert attrs["structure"]["shape"] == shape
        r = server.http.get(f"/array/full/hdf5/shapes/entry/{node}", headers=json_)
        assert r.status_code == 200 and r.json() == value, r.text


def test_huge_declared_dataset_lists_and_refuses_huge_reads(server, corpus):
    start = time.monotonic()
    attrs = server.http.get("/metadata/hdf5/shapes/entry/huge2d").json()["data"]["attributes"]
    assert attrs["structure"]["shape"] == list(HUGE2D)
    attrs = server.http.get("/metadata/hdf5/shapes/entry/huge3d").json()["data"]["attributes"]
    assert attrs["structure"]["shape"] == list(HUGE3D)
    chunks = attrs["structure"]["chunks"]
    assert sum(chunks[0]) == HUGE3D[0] and len(chunks[0]) <= 10_000  # not 2**34 blocks
    r = server.http.get("/array/full/hdf5/shapes/entry/huge2d", params={"slice": "0:2,0:3"},
                        headers=OCTET)
    assert r.status_code == 200 and r.content == bytes(6)  # never written: fill value
    for path, key in [("huge2d", ""), ("huge2d", "0:100000,0:100000"), ("huge3d", "")]:
        r = server.http.get(f"/array/full/hdf5/shapes/entry/{path}", params={"slice": key},
                            headers=OCTET)
        assert r.status_code == 413, (path, key, r.text)
        assert "limit" in r.json()["detail"] and path in r.json()["detail"]
    r = server.http.get("/array/block/hdf5/shapes/entry/huge2d", params={"block": "0,0"},
                        headers=OCTET)
    assert r.status_code == 413, r.text
    assert time.monotonic() - start < 10
    still_serving(server, corpus)


def test_files_damaged_after_registration_read_as_422(server, corpus):
    import tifffile

    damaged = corpus.root / "damaged"
    good = (damaged / "frame_00002.cbf").read_bytes()
    cases = [
        ("frame_00002.cbf", b"", "frame", "1", "empty file"),
        ("frame_00003.cbf", good[:300], "frame", "2", "truncated CBF"),
        ("single.cbf", with_binary_size(good, 99), "single", "", "cannot fit"),
        ("image.tif", bad_tiff((damaged / "image.tif").read_bytes()), "image", "",
         "no readable image directory"),
    ]
    try:
        for name, content, node, key, problem in cases:
            (damaged / name).write_bytes(content)
            path = f"damaged/{node}" + ("/frames" if node == "frame" else "")
            r = server.http.get(f"/array/full/{path}", params={"slice": key}, headers=OCTET)
            assert r.status_code == 422, (name, r.text)
            assert name in r.json()["detail"] and problem in r.json()["detail"], r.text
            still_serving(server, corpus)
        # Replaced by a truncated copy (a new inode, as a copy or a restore would do).
        (damaged / "scan.tmp").write_bytes(truncated_hdf5(damaged / "scan.nxs"))
        (damaged / "scan.tmp").rename(damaged / "scan.nxs")
        r = server.http.get("/metadata/damaged/scan/entry")
        assert r.status_code == 422 and "scan.nxs" in r.json()["detail"], r.text
        r = server.http.get("/array/full/damaged/scan/entry/data/data", headers=OCTET)
        assert r.status_code == 422 and "scan.nxs" in r.json()["detail"], r.text
        (damaged / "image.tif").write_bytes(b"")
        r = server.http.get("/array/full/damaged/image", headers=OCTET)
        assert r.status_code == 422 and "empty file" in r.json()["detail"], r.text
        still_serving(server, corpus)
    finally:  # other tests in this module must not depend on these files
        for i, frame in enumerate(corpus.frames, start=1):
            write_cbf(damaged / f"frame_{i:05d}.cbf", frame, i)
        write_cbf(damaged / "single.cbf", corpus.frames[1], 2)
        tifffile.imwrite(damaged / "image.tif", corpus.image)
        write_small_nexus(damaged / "scan.nxs", corpus.frames)


# ------------------------------------------------------------------ fuzzing

# Array nodes of every adapter: CBF sequence, single CBF, single TIFF, NeXus 3-D,
# NeXus huge 2-D, NeXus scalar.
FUZZ_NODES = ["cbf/scan/frames", "cbf/single", "tiff/good", "hdf5/good/entry/data/data",
              "hdf5/shapes/entry/huge2d", "hdf5/shapes/entry/scalar"]

_int = st.one_of(st.integers(-40, 40), st.integers(-(2**80), 2**80))
_opt = st.one_of(st.just(""), _int.map(str))
_dim = st.one_of(
    _int.map(str),
    st.tuples(_opt, _opt).map(":".join),
    st.tuples(_opt, _opt, _opt).map(":".join),
    st.just("..."),
    st.just("::0"),
)
SLICES = st.one_of(
    st.lists(_dim, min_size=0, max_size=6).map(",".join),   # well-formed, often out of range
    st.text(alphabet="0123456789-:,.() []x", max_size=25),  # anything near the syntax
    st.text(max_size=10),                                   # anything at all
)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=st.sampled_from(FUZZ_NODES), key=SLICES)
def test_fuzzed_slices_never_give_500(server, node, key):
    r = server.http.get(f"/array/full/{node}", params={"slice": key}, headers=OCTET)
    assert r.status_code < 500, (node, key, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.json()["detail"], (node, key)


def test_server_still_serves_after_fuzzing(server, corpus):
    assert server.http.get("/").status_code == 200
    still_serving(server, corpus)


_number = st.one_of(
    st.floats(allow_nan=False).map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1e999", "-1e999", "nan", "", "0", "-0", "1e-400", "0x10", "١٢"]),
)
_unit = st.sampled_from(["m", "mm", "A", "deg.", "s", "furlong", "", "°", "K"])
_header_line = st.one_of(
    st.tuples(st.sampled_from(["Exposure_time", "Wavelength", "Detector_distance",
                               "Start_angle", "Angle_increment", "Phi", "Chi", "Omega"]),
              _number, _unit).map(lambda t: f"# {t[0]} {t[1]} {t[2]}"),
    st.tuples(_number, _unit, _number, _unit).map(
        lambda t: f"# Pixel_size {t[0]} {t[1]} x {t[2]} {t[3]}"),
    st.tuples(_number, _number).map(lambda t: f"# Beam_xy ({t[0]}, {t[1]}) pixels"),
    st.text(max_size=40).map(lambda s: "# Detector: " + s),
    st.text(max_size=60),
)
_mime_value = st.one_of(_number, st.text(max_size=12))
_element = st.sampled_from(['"signed 32-bit integer"', '"unsigned 16-bit integer"',
                            '"signed 64-bit real IEEE"', '"complex"', "", '"signed 32-bit'])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    lines=st.lists(_header_line, max_size=8),
    size=_mime_value, fast=_mime_value, second=_mime_value, element=_element,
    compression=st.sampled_from(["x-CBF_BYTE_OFFSET", "x-CBF_NONE", "x-CBF_PACKED", ""]),
    data=st.binary(max_size=64), file_size=st.integers(0, 2**40),
    cut=st.integers(0, 2000),
)
def test_fuzzed_minicbf_headers_raise_only_named_errors(lines, size, fast, second, element,
                                                         compression, data, file_size, cut):
    text = "\n".join(["###CBF: VERSION 1.5", "data_x", "_array_data.header_contents", ";",
                      *lines, ";", "_array_data.data", ";", "--CIF-BINARY-FORMAT-SECTION--",
                      f'Content-Type: application/octet-stream; conversions="{compression}"',
                      f"X-Binary-Size: {size}", f"X-Binary-Element-Type: {element}",
                      f"X-Binary-Size-Fastest-Dimension: {fast}",
                      f"X-Binary-Size-Second-Dimension: {second}", "", ""])
    head = text.encode("utf-8", "surrogatepass") + BINARY_START + data
    for chunk in (head, head[:cut]):
        try:
            header = parse_header(chunk, max(file_size, 0), Path("fuzz.cbf"))
        except (UnreadableFile, IncompleteFile):
            continue
        assert header.shape[0] > 0 and header.shape[1] > 0 and header.binary_size > 0
        # What registration harvests from it must be storable JSON.
        json.dumps([header.summary(), header.frame_row()], allow_nan=False)
