"""NeXus scan and wrapper files registered in the catalog and read through the server."""

from __future__ import annotations

import h5py
import httpx
import numpy as np
import pytest
from conftest import API_KEY, N_FRAMES, start_server


def test_scan_file_is_one_node_per_group_with_nx_class_specs(client):
    scan = client["scans/s1/scan1"]
    assert "entry" in scan
    entry = scan["entry"]
    assert [s.name for s in entry.specs] == ["NXentry"]
    assert [s.name for s in entry["data"].specs] == ["NXdata"]
    assert [s.name for s in entry["instrument/detector"].specs] == ["NXdetector"]
    assert entry["data"].metadata["signal"] == "data"
    # A group carries its own attributes, not the file root's.
    assert "creator" in scan.metadata and "creator" not in entry.metadata


def test_scan_file_data_equals_h5py_and_the_frames(client, tree, served):
    root, arrays = tree
    data = client["scans/s1/scan1/entry/data/data"]
    assert data.shape == (N_FRAMES, 24, 32) and data.dtype == np.int32
    with h5py.File(root / "scans/s1/scan1.nxs", "r") as f:
        direct = f["entry/data/data"][()]  # hdf5plugin is imported by the adapter module
    assert np.array_equal(direct, arrays["cbf"])
    assert np.array_equal(data[2:5, 3:9, ::2], direct[2:5, 3:9, ::2])
    temperature = client["scans/s1/scan1/entry/sample/temperature"]
    assert temperature.shape == () and temperature.read() == 250.0
    assert temperature.metadata["units"] == "K"


def test_nexus_summary_is_searchable(client):
    from tiled.queries import Key

    node = client["scans/s1"]
    assert "scan1" in node.search(Key("sample.temperature") > 200)
    assert "scan1" not in node.search(Key("sample.temperature") > 300)
    md = client["scans/s1/scan1"].metadata
    assert md["instrument"]["monochromator"]["wavelength@units"] == "angstrom"


def test_wrapper_external_link_into_sibling_directory(client, served):
    _, _, arrays = served
    linked = client["wrappers/s1/scan1/entry/data/data"]
    assert linked.shape == (N_FRAMES, 24, 32)
    assert np.array_equal(linked[N_FRAMES - 1], arrays["cbf"][-1])


def _write_wrapper_with_links(path, inside_target, outside_target):
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["good"] = h5py.ExternalLink(inside_target, "/entry/data/data")
        entry["broken"] = h5py.ExternalLink("missing.nxs", "/entry/data/data")
        entry["escape"] = h5py.ExternalLink(outside_target, "/secret")
        entry["title"] = "links"


def test_broken_and_escaping_links_are_reported_and_refused(tmp_path, tree, backend):
    """Through registration and the server: siblings read, the escape is a 403."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    root, arrays = tree
    outside = tmp_path / "outside"
    outside.mkdir()
    with h5py.File(outside / "secret.h5", "w") as f:
        f["secret"] = np.arange(10)
    served_dir = tmp_path / "wrappers"
    served_dir.mkdir()
    relative_escape = "../outside/secret.h5"  # relative to the wrapper: leaves the root
    _write_wrapper_with_links(served_dir / "w.nxs", str(root / "scans/s1/scan1.nxs"), relative_escape)
    with start_server(tmp_path / "db", [served_dir, root / "scans"], backend=backend) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, served_dir, prefix="w")
        assert report.created == ["w/w"], report.failed
        entry = client["w/w/entry"]
        assert set(entry) >= {"good", "broken", "escape", "title"}
        assert np.array_equal(entry["good"][3], arrays["cbf"][3])
        assert "error" in entry["broken"].metadata["link"]
        assert "outside" in entry["escape"].metadata["link"]["error"]
        h = {"Authorization": f"Apikey {API_KEY}"}
        r = httpx.get(f"{url}/api/v1/metadata/w/w/entry/escape/secret", headers=h)
        assert r.status_code == 403, r.text
        assert "outside the readable roots" in r.json()["detail"]
        r = httpx.get(f"{url}/api/v1/array/full/w/w/entry/good", params={"slice": "0,0,0:3"}, headers=h)
        assert r.status_code == 200


@pytest.mark.parametrize("node", ["", "raw/p1/s1/scan1", "scans/s1/scan1/entry"])
def test_web_ui_and_listing_respond(http, node):
    assert http.get("/ui/").status_code == 200
    assert http.get(f"/api/v1/search/{node}").status_code == 200
