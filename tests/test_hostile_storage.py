"""Files an HDF5 dataset names (external raw storage, virtual-dataset sources) are confined
on every read, not from a verdict reached at the first one (issue: a storage file swapped
for a symlink leaving the roots after the first read kept being served)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from conftest import API_KEY, start_server

SECRET = b"SB-SECRET-" * 64  # 640 bytes outside the roots


def write_files(root: Path, outside: Path) -> None:
    data = np.arange(160, dtype="<u4")
    (root / "raw.bin").write_bytes(data.tobytes())
    (root / "src.h5").unlink(missing_ok=True)
    with h5py.File(root / "ext.h5", "w") as f:
        f.create_dataset("data", shape=(160,), dtype="<u4", external=[("raw.bin", 0, 640)])
    with h5py.File(root / "src.h5", "w") as f:
        f.create_dataset("data", data=data)
    layout = h5py.VirtualLayout(shape=(160,), dtype="<u4")
    layout[:] = h5py.VirtualSource("src.h5", "data", shape=(160,))
    with h5py.File(root / "vds.h5", "w") as f:
        f.create_virtual_dataset("data", layout)
    (outside / "secret.bin").write_bytes(SECRET)
    with h5py.File(outside / "secret.h5", "w") as f:
        f.create_dataset("data", data=np.frombuffer(SECRET, dtype="<u4"))


def swap_for_symlink(path: Path, target: Path) -> None:
    tmp = path.with_name(path.name + ".swap")
    os.symlink(target, tmp)
    os.replace(tmp, path)  # atomic, as an attacker would


@pytest.mark.parametrize("name, storage, target", [
    ("ext", "raw.bin", "secret.bin"),
    ("vds", "src.h5", "secret.h5"),
])
def test_storage_swapped_after_the_first_read_is_refused(tmp_path, name: str, storage: str,
                                                         target: str) -> None:
    from scatterbroker.catalog.register import register
    from tiled.client import from_uri

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    write_files(root, outside)
    with start_server(tmp_path / "catalog", [root]) as url:
        register(from_uri(url, api_key=API_KEY), root, prefix="data")
        with httpx.Client(base_url=url, headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            array = f"/api/v1/array/full/data/{name}/data"
            fast = f"/api/v1/sb/frames/data/{name}/data"
            first = http.get(array, params={"slice": "0:160"}, headers={"Accept": "application/octet-stream"})
            assert first.status_code == 200, first.text
            assert np.frombuffer(first.content, "<u4").tolist() == list(range(160))
            assert http.get(fast, params={"slice": "0:160"}).status_code == 200

            swap_for_symlink(root / storage, outside / target)
            for path, params in [(array, {"slice": "0:160"}), (fast, {"slice": "0:160"}),
                                 (array, {"slice": "3:7"})]:
                r = http.get(path, params=params, headers={"Accept": "application/octet-stream"})
                assert r.status_code == 403, (path, r.status_code, r.content[:200])
                assert b"SB-SECRET" not in r.content
                assert "outside the readable roots" in r.text or "leaves the readable roots" in r.text
                assert str(outside) not in r.text  # node paths only, no server paths
            # the rest of the catalog keeps working
            assert http.get("/api/v1/metadata/data").status_code == 200


def test_registered_files_cannot_be_made_the_servers_to_delete(tmp_path) -> None:
    """A write key must not turn a registered (raw) file into writable storage: Tiled deletes
    the files of non-external data sources with their node or asset."""
    from scatterbroker.catalog.register import register
    from tiled.client import from_uri

    root = tmp_path / "root"
    root.mkdir()
    raw = root / "raw.h5"
    with h5py.File(raw, "w") as f:
        f.create_dataset("data", data=np.arange(10))
    before = raw.read_bytes()
    with start_server(tmp_path / "catalog", [root]) as url:
        register(from_uri(url, api_key=API_KEY), root, prefix="data")
        with httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            md = http.get("/metadata/data/raw", params={"include_data_sources": True}).json()
            (source,) = md["data"]["attributes"]["data_sources"]
            assert source["management"] == "external"
            source["management"] = "writable"
            r = http.put("/data_source/data/raw", json={"data_source": source})
            assert r.status_code == 403, r.text
            assert "management cannot be changed" in r.text
            # a new node naming the raw file as writable storage is refused too
            new = {"structure_family": "container", "metadata": {}, "specs": [],
                   "data_sources": [dict(source, id=None)]}
            r = http.post("/register/data", json={**new, "id": "copy"})
            assert r.status_code == 403, r.text
            assert "must be managed 'external'" in r.text
            # what a client may still do leaves the file alone
            for asset in source["assets"]:
                http.delete("/asset/data/raw", params={"id": asset["id"], "external_only": False})
            http.delete("/metadata/data/raw")
    assert raw.read_bytes() == before
