"""NexusAdapter against a real Tiled server on loopback, with real HDF5/NeXus files.

The reference for the tree is nexusformat's ``nxload`` (an independent reader)
and h5py for the data. Links, VDS sources and external raw storage that leave
the readable root must be refused (HTTP 403) while the rest of the file serves.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import h5py
import hdf5plugin
import httpx
import numpy as np
import pytest
import uvicorn
from nexusformat.nexus import NXfield, NXgroup, nxload
from starlette.responses import JSONResponse
from tiled.adapters.mapping import MapAdapter
from tiled.catalog import in_memory
from tiled.client import from_uri
from tiled.config import Authentication
from tiled.server.app import build_app
from tiled.server.simple import ThreadedServer
from tiled.structures.core import Spec, StructureFamily
from tiled.queries import Key
from tiled.structures.data_source import Asset, DataSource, Management

from scatterbroker.adapters.nexus import NexusAdapter, NexusErrorNode, NexusField, summary
from scatterbroker.adapters import registry
from scatterbroker.adapters.registry import bind_roots
from scatterbroker.adapters.roots import normalize_roots
from scatterbroker.errors import (
    BrokenLink,
    OutsideRoots,
    ScatterbrokerError,
    UnreadableFile,
)

from conftest import API_KEY  # one key per process: Tiled keeps it in global settings
OCTET = {"Accept": "application/octet-stream"}
FRAMES = np.arange(5 * 16 * 20, dtype=np.int32).reshape(5, 16, 20) * 3 - 7
IMAGE = np.linspace(-1, 1, 30 * 40).reshape(30, 40)


# ------------------------------------------------------------------ the files


def _write_scan(path):
    """A realistic two-entry NeXus file (everything inside one file)."""
    with h5py.File(path, "w") as f:
        f.attrs.update(NX_class="NXroot", creator="pytest", root_only="yes",
                       default="entry1")
        # a non-UTF-8 attribute, fixed-length and variable-length
        f.attrs["weird_fixed"] = np.bytes_(b"bad\xff\xfe")
        f.attrs.create("weird_vlen", b"caf\xe9", dtype=h5py.string_dtype("utf-8"))
        e = f.create_group("entry1")
        e.attrs.update(NX_class="NXentry", default="data")
        e["title"] = "Scan 1 of LaB6"
        e["start_time"] = "2026-01-01T10:00:00+01:00"
        e["duration"] = np.int64(42)
        e["notes"] = "héllo wörld"
        s = e.create_group("sample")
        s.attrs["NX_class"] = "NXsample"
        s["name"] = "LaB6"
        s["temperature"] = 25.0
        s["temperature"].attrs["units"] = "C"
        s["labels"] = np.array(["a", "bé", "ccc"], dtype=h5py.string_dtype())
        s["description"] = np.bytes_(b"standard powder")  # fixed-length string
        ins = e.create_group("instrument")
        ins.attrs["NX_class"] = "NXinstrument"
        mono = ins.create_group("monochromator")
        mono.attrs["NX_class"] = "NXmonochromator"
        mono["wavelength"] = 0.1
        mono["wavelength"].attrs["units"] = "nm"
        det = ins.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        for name, value, units in [
            ("distance", 0.5, "m"), ("x_pixel_size", 75.0, "um"),
            ("y_pixel_size", 0.075, "mm"), ("beam_center_x", 512.5, "pixel"),
            ("beam_center_y", 256.0, "furlong"), ("count_time", 100.0, "ms"),
        ]:
            det[name] = value
            det[name].attrs["units"] = units
        d = det.create_dataset("data", data=FRAMES, chunks=(1, 16, 20),
                               **hdf5plugin.Bitshuffle(cname="lz4"))
        d.attrs.update(units="counts", long_name="detector counts")
        det.create_dataset("image", data=IMAGE, chunks=(10, 10))
        nxd = e.create_group("data")
        nxd.attrs.update(NX_class="NXdata", signal="data", axes=["frame", "y", "x"])
        nxd["data"] = h5py.SoftLink("/entry1/instrument/detector/data")
        nxd["frame"] = np.arange(5.0)
        nxd["frame"].attrs["units"] = "deg"
        nxd["y"] = np.arange(16)
        nxd["x"] = np.arange(20)
        # unsupported types: object references, variable-length integers
        e.create_dataset("refs", data=[e.ref, s.ref], dtype=h5py.ref_dtype)
        e.create_dataset("ragged", (2,), dtype=h5py.vlen_dtype(np.int32))
        e2 = f.create_group("entry2")
        e2.attrs["NX_class"] = "NXentry"
        e2["title"] = "second"
        s2 = e2.create_group("sample")
        s2.attrs["NX_class"] = "NXsample"
        s2["temperature"] = 300.0
        s2["temperature"].attrs["units"] = "K"
        old = e2.create_group("plot")
        old.attrs["NX_class"] = "NXdata"
        old["counts"] = np.array([1, 4, 9, 16])
        old["counts"].attrs.update(signal=1, axes="two_theta")
        old["two_theta"] = np.array([10.0, 20.0, 30.0, 40.0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("nexus")
    root, outside = base / "root", base / "outside"
    for d in (root / "scans", root / "ext", outside):
        d.mkdir(parents=True)
    p = SimpleNamespace(base=base, root=root, outside=outside,
                        scan=root / "scans" / "scan1.nxs",
                        links=root / "scans" / "links.nxs",
                        detector=root / "ext" / "detector.h5",
                        src=root / "ext" / "src.h5",
                        secret=outside / "secret.h5")
    _write_scan(p.scan)
    with h5py.File(p.secret, "w") as f:
        f["data"] = np.full(10, 666)
    (np.arange(10, dtype="<i8") * 111).tofile(outside / "raw.bin")
    (np.arange(10, dtype="<i8") + 1000).tofile(root / "scans" / "raw_in.bin")
    with h5py.File(p.src, "w") as f:
        f["d"] = np.arange(10) * 2
    with h5py.File(p.detector, "w") as f:
        det = f.create_group("entry/instrument/detector")
        det.attrs["NX_class"] = "NXdetector"
        det["data"] = FRAMES[:, ::-1, :] + 1
        det["distance"] = 250.0
        # a nested external link from the target file, escaping the root
        f["entry/to_secret"] = h5py.ExternalLink("../../outside/secret.h5", "/data")
    (root / "scans" / "evil.h5").symlink_to(p.secret)
    with h5py.File(p.links, "w", libver="latest") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        e["good"] = np.arange(10)
        e["ext_abs"] = h5py.ExternalLink(str(p.detector), "/entry/instrument/detector")
        e["ext_rel"] = h5py.ExternalLink("../ext/detector.h5",
                                         "/entry/instrument/detector/data")
        e["missing"] = h5py.ExternalLink("nothere.h5", "/x")
        e["missing_path"] = h5py.ExternalLink("../ext/detector.h5", "/nope")
        e["escape"] = h5py.ExternalLink("../" * 12 + "etc/passwd", "/x")
        e["escape_abs"] = h5py.ExternalLink(str(p.secret), "/data")
        e["escape_symlink"] = h5py.ExternalLink("evil.h5", "/data")
        e["escape_nested"] = h5py.ExternalLink("../ext/detector.h5", "/entry/to_secret")
        e["soft_to_escape"] = h5py.SoftLink("/entry/escape")
        e["loop_a"] = h5py.SoftLink("/entry/loop_b")
        e["loop_b"] = h5py.SoftLink("/entry/loop_a")
        e["self_loop"] = h5py.SoftLink("self_loop")
        e["dangling"] = h5py.SoftLink("/entry/nothing")
        for name, source in [("vds_in", "../ext/src.h5"), ("vds_out", str(p.secret)),
                             ("vds_out_rel", "../../outside/secret.h5")]:
            layout = h5py.VirtualLayout((10,), dtype="i8")
            layout[:] = h5py.VirtualSource(source, "d" if name == "vds_in" else "data",
                                           shape=(10,))
            e.create_virtual_dataset(name, layout)
        e.create_dataset("store_out", (10,), dtype="<i8",
                         external=[(str(outside / "raw.bin"), 0, h5py.h5f.UNLIMITED)])
        e.create_dataset("store_in", (10,), dtype="<i8",
                         external=[("raw_in.bin", 0, h5py.h5f.UNLIMITED)])
    return p


# ------------------------------------------------------------------ the server


def _handler(request, exc):
    return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})


@pytest.fixture(scope="module")
def server(files):
    Bound = bind_roots({"m": NexusAdapter}, normalize_roots([files.root]))["m"]
    tree = MapAdapter({
        "scan1": Bound.from_uris(files.scan.as_uri()),
        "links": Bound.from_uris(str(files.links)),
    })
    app = build_app(tree, authentication=Authentication(single_user_api_key=API_KEY))
    for cls in (ScatterbrokerError, OutsideRoots, BrokenLink, UnreadableFile):
        app.add_exception_handler(cls, _handler)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    with ThreadedServer(config).run_in_thread() as url:
        with httpx.Client(base_url=f"{url}/api/v1",
                          headers={"Authorization": f"Apikey {API_KEY}"},
                          timeout=20) as http:
            yield SimpleNamespace(url=url, http=http,
                                  client=from_uri(url, api_key=API_KEY))


def _md(server, path):
    r = server.http.get(f"/metadata/{path}")
    assert r.status_code == 200, r.text
    return r.json()["data"]["attributes"]


def _array(server, path, **params):
    r = server.http.get(f"/array/full/{path}", params=params, headers=OCTET)
    assert r.status_code == 200, r.text
    attrs = _md(server, path)
    dtype = np.dtype(_dtype_str(attrs["structure"]["data_type"]))
    return np.frombuffer(r.content, dtype=dtype)


def _dtype_str(dt):
    return {"little": "<", "big": ">", "not_applicable": "|"}[dt["endianness"]] + \
        dt["kind"] + str(dt["itemsize"] // (4 if dt["kind"] == "U" else 1))


# ------------------------------------------------------------------ the tree


def _walk(client_node, nx_group, path=""):
    """Compare one group of the served tree with nexusformat's, recursively."""
    served, reference = set(client_node), set(nx_group.keys())
    # nexusformat drops fields it cannot represent; ours keeps them with an error
    assert reference <= served, (path, reference - served)
    assert {s.name for s in client_node.specs} == {nx_group.nxclass} - {"NXgroup"}
    for name in sorted(reference):
        ref, got = nx_group[name], client_node[name]
        if isinstance(ref, NXgroup):
            assert got.structure_family == StructureFamily.container, path + name
            _walk(got, ref, f"{path}/{name}")
        else:
            assert isinstance(ref, NXfield)
            if "error" in got.metadata:  # unsupported types: only object-typed ones
                assert np.asarray(ref.nxdata).dtype == object, (path, name)
                assert name in ("refs", "ragged"), (path, name)
                continue
            value = got.read()
            expected = np.asarray(ref.nxdata)
            if expected.dtype.kind in "SUO":
                flat = [v.decode() if isinstance(v, bytes) else str(v)
                        for v in expected.ravel().tolist()]
                expected = np.array(flat, dtype=str).reshape(expected.shape)
                assert value.dtype.kind == "U", (path, name)
            assert value.shape == expected.shape, (path, name)
            np.testing.assert_array_equal(value, expected)
            for attr, nxattr in ref.attrs.items():
                want = nxattr.nxvalue
                have = got.metadata[attr]
                if isinstance(want, np.ndarray):
                    want = want.tolist()
                assert have == want, (path, name, attr)


def test_tree_matches_nexusformat(server, files):
    reference = nxload(str(files.scan))
    served = server.client["scan1"]
    assert set(served) == {"entry1", "entry2"}
    _walk(served, reference)
    # spot checks that must hold whatever the walk did
    assert served["entry1"].specs == [Spec("NXentry")]
    assert served["entry1/instrument/detector"].specs == [Spec("NXdetector")]
    assert served["entry1/data"].specs == [Spec("NXdata")]
    assert set(served["entry1/instrument/detector"]) == {
        "distance", "x_pixel_size", "y_pixel_size", "beam_center_x",
        "beam_center_y", "count_time", "data", "image"}


def test_group_metadata_is_own_attributes_only(server):
    root = _md(server, "scan1")["metadata"]
    assert root["root_only"] == "yes" and root["creator"] == "pytest"
    entry = _md(server, "scan1/entry1")
    assert entry["metadata"] == {"NX_class": "NXentry", "default": "data"}
    assert entry["specs"] == [{"name": "NXentry", "version": None}]
    det = _md(server, "scan1/entry1/instrument/detector")["metadata"]
    assert det == {"NX_class": "NXdetector"}
    field = _md(server, "scan1/entry1/instrument/detector/data")
    assert field["metadata"] == {"units": "counts", "long_name": "detector counts"}
    assert field["specs"] == []


def test_non_utf8_attributes_do_not_crash(server):
    md = _md(server, "scan1")["metadata"]
    assert md["weird_fixed"].startswith("bad") and "\ufffd" in md["weird_fixed"]
    assert md["weird_vlen"].startswith("caf") and "\ufffd" in md["weird_vlen"]


def test_nxdata_signal_and_axes(server):
    new = _md(server, "scan1/entry1/data")["metadata"]
    assert new["signal"] == "data" and new["axes"] == ["frame", "y", "x"]
    old = _md(server, "scan1/entry2/plot")["metadata"]
    assert old["signal"] == "counts" and old["axes"] == ["two_theta"]


def test_summary_is_harvested_in_canonical_units(server, files):
    md = _md(server, "scan1")["metadata"]
    assert md["sample"]["name"] == "LaB6"
    assert md["sample"]["temperature"] == pytest.approx(298.15)
    assert md["sample"]["temperature@units"] == "K"
    mono = md["instrument"]["monochromator"]
    assert (mono["wavelength"], mono["wavelength@units"]) == (pytest.approx(1.0), "angstrom")
    det = md["instrument"]["detector"]
    assert det["distance"] == pytest.approx(500.0) and det["distance@units"] == "mm"
    assert det["x_pixel_size"] == pytest.approx(0.075)
    assert det["y_pixel_size"] == pytest.approx(0.075)
    assert det["beam_center_x"] == 512.5 and det["beam_center_x@units"] == "pixel"
    assert "beam_center_y" not in det  # "furlong" cannot be converted: skipped
    assert det["count_time"] == pytest.approx(0.1) and det["count_time@units"] == "s"
    assert md["title"] == "Scan 1 of LaB6"
    assert md["start_time"] == "2026-01-01T10:00:00+01:00"
    direct = summary(files.scan)
    assert direct["sample"] == {k: md["sample"][k] for k in direct["sample"]}
    with h5py.File(files.scan, "r") as f:
        assert summary(f) == direct


# ------------------------------------------------------------------ data


def test_slices_equal_h5py(server, files):
    path = "scan1/entry1/instrument/detector/data"
    attrs = _md(server, path)["structure"]
    assert attrs["shape"] == [5, 16, 20]
    assert attrs["chunks"] == [[1] * 5, [16], [20]]
    assert attrs["data_type"]["kind"] == "i" and attrs["data_type"]["itemsize"] == 4
    with h5py.File(files.scan, "r") as f:
        ref = f["entry1/instrument/detector/data"]
        got = _array(server, path, slice="0:2,5:9").reshape(2, 4, 20)
        np.testing.assert_array_equal(got, ref[0:2, 5:9])
        got = _array(server, path, slice="4,::-3,1:-1:2")
        np.testing.assert_array_equal(got, ref[4][::-1][::3][:, 1:-1:2].ravel())
        r = server.http.get(f"/array/block/{path}", params={"block": "3,0,0"}, headers=OCTET)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.frombuffer(r.content, "<i4").reshape(1, 16, 20),
                                      ref[3:4])
        client = server.client[path]
        assert client.dtype == ref.dtype and client.shape == ref.shape
        np.testing.assert_array_equal(client[1:3, ::2, 3], ref[1:3, ::2, 3])
        np.testing.assert_array_equal(client.read(), ref[()])
        # through the NXdata soft link too
        np.testing.assert_array_equal(server.client["scan1/entry1/data/data"][2], ref[2])
        image = _md(server, "scan1/entry1/instrument/detector/image")["structure"]
        assert image["chunks"] == [[10, 10, 10], [10, 10, 10, 10]]
        r = server.http.get("/array/block/scan1/entry1/instrument/detector/image",
                            params={"block": "1,2"}, headers=OCTET)
        np.testing.assert_array_equal(np.frombuffer(r.content, "<f8").reshape(10, 10),
                                      f["entry1/instrument/detector/image"][10:20, 20:30])


def test_reads_touch_only_the_selection(files):
    root = NexusAdapter.from_uris(str(files.scan))
    field = root["entry1"]["instrument"]["detector"]["data"]
    assert isinstance(field, NexusField)
    np.testing.assert_array_equal(field.read_block((2, 0, 0)), FRAMES[2:3])
    np.testing.assert_array_equal(field.read((slice(1, 2), 3)), FRAMES[1:2, 3])
    np.testing.assert_array_equal(field.read_block((4, 0, 0), (0, slice(0, 3))), FRAMES[4, 0:3])
    with pytest.raises(IndexError):
        field.read_block((5, 0, 0))


def test_scalars_and_strings(server, files):
    md = _md(server, "scan1/entry1/duration")
    assert md["structure"]["shape"] == [] and md["metadata"]["value"] == 42
    duration = server.client["scan1/entry1/duration"].read()
    assert duration.shape == () and duration.dtype == np.int64 and duration == 42
    temp = _md(server, "scan1/entry1/sample/temperature")["metadata"]
    assert temp == {"units": "C", "value": 25.0}
    notes = server.client["scan1/entry1/notes"]
    assert notes.metadata["value"] == "héllo wörld"
    value = notes.read()
    assert value.shape == () and value.dtype.kind == "U" and value.item() == "héllo wörld"
    labels = server.client["scan1/entry1/sample/labels"]
    assert labels.read().tolist() == ["a", "bé", "ccc"]
    assert labels.metadata["value"] == ["a", "bé", "ccc"]
    desc = server.client["scan1/entry1/sample/description"].read()
    assert desc.item() == "standard powder" and isinstance(desc.item(), str)


def test_unsupported_dtype_is_listed_with_error(server):
    for name in ("refs", "ragged"):
        md = _md(server, f"scan1/entry1/{name}")
        assert md["structure_family"] == "array"
        assert "cannot be served" in md["metadata"]["error"]
        r = server.http.get(f"/array/full/scan1/entry1/{name}", headers=OCTET)
        assert r.status_code == 422, r.text
        assert name in r.json()["detail"]
    # siblings are fine
    assert server.client["scan1/entry1/duration"].read() == 42


def test_registered_for_nexus_and_hdf5(files, tmp_path):
    found = registry.adapters_by_mimetype()
    assert found["application/x-nexus"] is NexusAdapter
    assert found["application/x-hdf5"] is NexusAdapter
    assert registry.mimetype_for(files.scan) == "application/x-nexus"
    assert registry.mimetype_for(files.src) == "application/x-nexus"


def test_corrupt_file_raises_unreadable(files, tmp_path):
    bad = tmp_path / "truncated.nxs"
    bad.write_bytes(files.scan.read_bytes()[:3000])
    assert NexusAdapter.sniff(bad) and NexusAdapter.sniff(files.scan)
    with pytest.raises(UnreadableFile, match="truncated.nxs"):
        NexusAdapter.from_uris(bad.as_uri())
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all")
    assert not NexusAdapter.sniff(text)
    with pytest.raises(UnreadableFile, match="notes.h5"):
        NexusAdapter.from_uris(str(text))
    userblock = tmp_path / "ub.h5"
    with h5py.File(userblock, "w", userblock_size=512) as f:
        f["x"] = 1
    assert NexusAdapter.sniff(userblock)


# ------------------------------------------------------------------ links


def test_external_links_resolve(server, files):
    linked = server.client["links/entry/ext_abs"]
    assert linked.specs == [Spec("NXdetector")]
    assert set(linked) == {"data", "distance"}
    with h5py.File(files.detector, "r") as f:
        ref = f["entry/instrument/detector/data"][()]
    np.testing.assert_array_equal(linked["data"][1:3], ref[1:3])
    got = _array(server, "links/entry/ext_rel", slice="0:2,5:9").reshape(2, 4, 20)
    np.testing.assert_array_equal(got, ref[0:2, 5:9])
    assert linked["distance"].metadata["value"] == 250.0


def test_listing_a_group_with_bad_links_never_fails(server):
    r = server.http.get("/search/links/entry", params={"page[limit]": 100})
    assert r.status_code == 200, r.text
    ids = {item["id"] for item in r.json()["data"]}
    assert {"good", "missing", "escape", "loop_a", "vds_out", "store_out"} <= ids
    assert len(server.client["links/entry"]) == len(ids)
    np.testing.assert_array_equal(server.client["links/entry/good"].read(), np.arange(10))


@pytest.mark.parametrize("name, target", [
    ("missing", "nothere.h5"),
    ("missing_path", "/nope"),
    ("dangling", "/entry/nothing"),
])
def test_broken_links_are_nodes_with_errors(server, name, target):
    attrs = _md(server, f"links/entry/{name}")
    assert attrs["specs"] == [{"name": "BrokenLink", "version": None}]
    link = attrs["metadata"]["link"]
    assert target in (link.get("file"), link.get("path"))
    assert "does not exist" in link["error"]
    r = server.http.get(f"/array/full/links/entry/{name}/data", headers=OCTET)
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    np.testing.assert_array_equal(server.client["links/entry/good"][2:4], [2, 3])


@pytest.mark.parametrize("name", [
    "escape", "escape_abs", "escape_symlink", "escape_nested", "soft_to_escape",
])
def test_escaping_links_are_refused(server, files, name):
    attrs = _md(server, f"links/entry/{name}")
    assert attrs["specs"] == [{"name": "BrokenLink", "version": None}]
    error = attrs["metadata"]["link"]["error"]
    assert "outside the readable roots" in error
    assert str(files.root) not in error.split("resolves to")[-1]
    for route in ("array/full", "metadata"):
        r = server.http.get(f"/{route}/links/entry/{name}/data", headers=OCTET)
        assert r.status_code == 403, r.text
        assert "outside the readable roots" in r.json()["detail"]
    with pytest.raises(Exception) as info:
        server.client["links/entry"][name]["data"]
    assert "403" in str(info.value) or "outside" in str(info.value)


def test_soft_link_loops_do_not_hang(server):
    start = time.monotonic()
    for name in ("loop_a", "loop_b", "self_loop"):
        attrs = _md(server, f"links/entry/{name}")
        assert attrs["specs"] == [{"name": "BrokenLink", "version": None}]
        assert "loop" in attrs["metadata"]["link"]["error"]
        r = server.http.get(f"/metadata/links/entry/{name}/x")
        assert r.status_code == 404
    assert time.monotonic() - start < 5


def test_default_root_is_the_files_own_directory(files):
    unbound = NexusAdapter.from_uris(str(files.links))
    node = unbound["entry"]["ext_abs"]  # ../ext is outside scans/ when unbound
    assert isinstance(node, NexusErrorNode) and isinstance(node.error, OutsideRoots)
    with pytest.raises(OutsideRoots):
        node["data"]
    assert unbound["entry"]["good"].read().tolist() == list(range(10))
    with pytest.raises(OutsideRoots):
        bind_roots({"m": NexusAdapter}, normalize_roots([files.root / "ext"]))[
            "m"].from_uris(str(files.links))


# ------------------------------------------------------------------ VDS / external storage


def test_virtual_dataset_inside_root_reads(server, files):
    with h5py.File(files.src, "r") as f:
        expected = f["d"][()]
    np.testing.assert_array_equal(server.client["links/entry/vds_in"].read(), expected)
    np.testing.assert_array_equal(_array(server, "links/entry/vds_in", slice="3:7"),
                                  expected[3:7])


@pytest.mark.parametrize("name, what", [
    ("vds_out", "virtual dataset source"),
    ("vds_out_rel", "virtual dataset source"),
    ("store_out", "external raw storage file"),
])
def test_storage_outside_root_is_refused(server, name, what):
    attrs = _md(server, f"links/entry/{name}")
    assert attrs["structure"]["shape"] == [10]  # still listed with its structure
    assert what in attrs["metadata"]["error"]
    assert "outside the readable roots" in attrs["metadata"]["error"]
    for route, params in (("array/full", {}), ("array/block", {"block": "0"})):
        r = server.http.get(f"/{route}/links/entry/{name}", params=params, headers=OCTET)
        assert r.status_code == 403, r.text
        assert what in r.json()["detail"]


def test_external_storage_resolves_next_to_the_file_not_the_cwd(server, files, tmp_path,
                                                                monkeypatch):
    decoy = np.full(10, -1, dtype="<i8")
    decoy.tofile(tmp_path / "raw_in.bin")
    monkeypatch.chdir(tmp_path)
    with h5py.File(files.links, "r") as f:  # plain h5py would read the decoy here
        np.testing.assert_array_equal(f["entry/store_in"][()], decoy)
    got = _array(server, "links/entry/store_in")
    np.testing.assert_array_equal(got, np.arange(10) + 1000)


def test_from_catalog_merges_node_metadata(files):
    Bound = bind_roots({"m": NexusAdapter}, normalize_roots([files.root]))["m"]
    source = DataSource(
        structure_family=StructureFamily.container, mimetype="application/x-nexus",
        structure=None,
        assets=[Asset(data_uri=files.scan.as_uri(), is_directory=False,
                      parameter="data_uri")],
    )
    node = SimpleNamespace(metadata_={"title": "from catalog", "proposal": 7},
                           specs=[Spec("Scan")])
    tree = Bound.from_catalog(source, node)
    md = tree.metadata()
    assert md["title"] == "from catalog" and md["proposal"] == 7
    assert md["root_only"] == "yes" and md["sample"]["name"] == "LaB6"
    assert tree.specs == [Spec("Scan"), Spec("NXroot")]
    field = Bound.from_catalog(source, node, dataset="entry1/duration")
    assert isinstance(field, NexusField) and field.read() == 42
    assert os.path.basename(str(files.scan)) in repr(field)


def test_search_and_sort_inside_a_file(server):
    found = server.client["scan1"].search(Key("NX_class") == "NXentry")
    assert sorted(found) == ["entry1", "entry2"]
    found = server.client["scan1/entry1"].search(Key("NX_class") == "NXsample")
    assert list(found) == ["sample"]
    detector = server.client["scan1/entry1/instrument/detector"]
    assert list(detector.sort(("_", -1))) == list(detector)[::-1]


# ------------------------------------------------------------------ catalog path


def test_catalog_registered_file_serves_inside(files):
    """The server path: a catalog node per file (searchable summary), tree via from_catalog."""
    Bound = bind_roots({"m": NexusAdapter}, normalize_roots([files.root]))["m"]
    catalog = in_memory(readable_storage=[str(files.root)],
                        adapters_by_mimetype={"application/x-nexus": Bound})
    app = build_app(catalog, authentication=Authentication(single_user_api_key=API_KEY))
    app.add_exception_handler(ScatterbrokerError, _handler)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    with ThreadedServer(config).run_in_thread() as url:
        client = from_uri(url, api_key=API_KEY)
        for key, path in (("scan1", files.scan), ("links", files.links)):
            client.new(
                structure_family=StructureFamily.container, key=key, specs=[],
                metadata=summary(path, roots=[files.root]),
                data_sources=[DataSource(
                    management=Management.external, mimetype="application/x-nexus",
                    structure_family=StructureFamily.container, structure=None,
                    assets=[Asset(data_uri=path.as_uri(), is_directory=False,
                                  parameter="data_uri")])],
            )
        assert list(client.search(Key("sample.temperature") > 290)) == ["scan1"]
        assert list(client.search(Key("instrument.detector.distance") == 500.0)) == ["scan1"]
        np.testing.assert_array_equal(
            client["scan1/entry1/instrument/detector/data"][1, 2:4], FRAMES[1, 2:4])
        assert client["scan1/entry1/instrument/detector"].specs == [Spec("NXdetector")]
        with httpx.Client(base_url=f"{url}/api/v1", timeout=20,
                          headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            r = http.get("/metadata/links/entry/escape/data")
            assert r.status_code == 403 and "outside the readable roots" in r.json()["detail"]
            r = http.get("/array/full/links/entry/store_out", headers=OCTET)
            assert r.status_code == 403 and "external raw storage" in r.json()["detail"]
            r = http.get("/search/links/entry")
            assert r.status_code == 200 and len(r.json()["data"]) == len(
                NexusAdapter.from_uris(str(files.links))["entry"])
