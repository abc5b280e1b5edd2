"""Readable roots, end to end: registration, a malicious raw Tiled client, reads.

One server per catalog backend serves the root ``data/``; next to it lie
``outside/`` (a secret the server must never read) and ``data-sibling/`` (a
directory whose path starts with the root's: a prefix check is not enough).
Each test registers its own subdirectory of ``data/``. Link confinement inside
HDF5 files is tested in test_nexus.py and test_nexus_served.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import h5py
import httpx
import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf
from tiled.client.utils import ClientError
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management

from scatterbroker.adapters.roots import normalize_roots
from scatterbroker.catalog.register import register
from scatterbroker.errors import InvalidName, OutsideRoots

OCTET = {"Accept": "application/octet-stream"}
FRAME = make_frames(1)[0]
OUTSIDE = "outside the readable roots"


@pytest.fixture(scope="module")
def site(tmp_path_factory, backend):
    base = tmp_path_factory.mktemp(f"site-{backend}")
    data, outside, sibling = base / "data", base / "outside", base / "data-sibling"
    for d in (data, outside, sibling):
        d.mkdir()
    secret = make_frames(1, seed=99)[0]
    write_cbf(outside / "secret.cbf", secret)
    write_cbf(sibling / "secret.cbf", secret)
    import tifffile

    tifffile.imwrite(outside / "secret.tif", secret.astype("uint16"))
    with h5py.File(outside / "secret.nxs", "w") as f:
        f["entry/secret"] = np.arange(3)
    (outside / "frames").mkdir()
    for i in (1, 2):
        write_cbf(outside / "frames" / f"scan_{i:05d}.cbf", secret, i)
    (outside / "notes.csv").write_text("a,b\n1,2\n")
    return SimpleNamespace(base=base, data=data, outside=outside, sibling=sibling,
                           roots=normalize_roots([data]), secret=secret)


@pytest.fixture(scope="module")
def server(site, backend, tmp_path_factory):
    from tiled.client import from_uri

    db = tmp_path_factory.mktemp("db")
    with start_server(db, [site.data], backend=backend) as url:
        with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                          headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            # writable: the server's writable file storage (local_config's data_dir/files)
            yield SimpleNamespace(url=url, http=http, client=from_uri(url, api_key=API_KEY),
                                  writable=db.resolve() / "files")


def make_dir(site, name: str) -> Path:
    d = site.data / name
    d.mkdir()
    return d


def array_source(uri: str, mimetype: str = "image/x-cbf", *, directory: bool = False,
                 parameters: dict | None = None, shape=(24, 32)) -> DataSource:
    """What a client sends to register one file (or a directory of frames)."""
    structure = ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype("<i4")),
        shape=shape, chunks=tuple((n,) for n in shape))
    return DataSource(
        structure_family=StructureFamily.array, mimetype=mimetype, structure=structure,
        parameters=parameters or {}, management=Management.external,
        assets=[Asset(data_uri=uri, is_directory=directory, parameter="data_uri")])


# ------------------------------------------------------------------ register(..., roots=)


@pytest.mark.parametrize("how", ["dotdot", "symlink", "absolute", "sibling-prefix"])
def test_register_refuses_a_path_outside_the_roots(server, site, how):
    d = make_dir(site, f"reg-{how}")
    path = {
        "dotdot": d / ".." / ".." / "outside",
        "symlink": d / "link",
        "absolute": site.outside,
        "sibling-prefix": site.sibling,
    }[how]
    if how == "symlink":
        path.symlink_to(site.outside)
    with pytest.raises(OutsideRoots) as info:
        register(server.client, path, prefix=f"reg-{how}", roots=site.roots)
    message = str(info.value)
    # the problem and the path's name, never the server's absolute path
    assert OUTSIDE in message and Path(os.path.realpath(path)).name in message
    assert str(site.base) not in message
    assert info.value.status_code == 403
    assert f"reg-{how}" not in server.client  # refused before anything was created


# ------------------------------------------------------------------ the server


@pytest.mark.parametrize("case", [
    "absolute", "dotdot", "sibling-prefix", "symlink-in-root", "device-in-root",
    "fifo-in-root", "frames-directory", "stock-csv-adapter",
])
def test_server_refuses_assets_outside_the_roots_at_registration(server, site, case):
    """A client with the API key registering whatever it likes, with the raw Tiled
    client (no scatterbroker code on its side): 403 before anything is stored."""
    d = make_dir(site, f"asset-{case}")
    outside = site.outside
    if case == "symlink-in-root":
        (d / "evil.cbf").symlink_to(outside / "secret.cbf")
    if case == "device-in-root":
        (d / "zero.tif").symlink_to("/dev/zero")
    if case == "fifo-in-root":
        os.mkfifo(d / "pipe.cbf")
    source = {
        "absolute": lambda: array_source((outside / "secret.cbf").as_uri()),
        "dotdot": lambda: array_source(f"file://localhost{d}/../../outside/secret.cbf"),
        "sibling-prefix": lambda: array_source((site.sibling / "secret.cbf").as_uri()),
        "symlink-in-root": lambda: array_source((d / "evil.cbf").as_uri()),
        "device-in-root": lambda: array_source((d / "zero.tif").as_uri(), "image/tiff"),
        "fifo-in-root": lambda: array_source((d / "pipe.cbf").as_uri()),
        "frames-directory": lambda: array_source(
            (outside / "frames").as_uri(), "multipart/related;type=image/x-cbf",
            directory=True, shape=(2, 24, 32),
            parameters={"prefix": "scan_", "width": 5, "suffix": ".cbf", "ranges": [[1, 2]]}),
        "stock-csv-adapter": lambda: DataSource(
            structure_family=StructureFamily.table, mimetype="text/csv", structure=None,
            parameters={}, management=Management.external,
            assets=[Asset(data_uri=f"file://localhost{d}/../../outside/notes.csv",
                          is_directory=False, parameter="data_uris", num=0)]),
    }[case]()
    key = f"asset-{case}"
    with pytest.raises(ClientError) as info:
        server.client.new(structure_family=source.structure_family, data_sources=[source],
                          key=key, metadata={})
    message = str(info.value)
    assert message.startswith("403"), message
    assert (OUTSIDE in message) or ("not a regular file" in message), message
    assert key not in server.client


def test_server_refuses_an_outside_asset_from_plain_http(server, site):
    body = {"id": "plain-http", "structure_family": "array", "metadata": {}, "specs": [],
            "data_sources": [asdict(array_source((site.outside / "secret.cbf").as_uri()))]}
    # (POST /metadata/ refuses any external asset, though Tiled 0.2.20 answers 500 there.)
    r = server.http.post("/register/", json=body)
    assert r.status_code == 403, r.text
    assert OUTSIDE in r.json()["detail"]
    assert "plain-http" not in server.client


@pytest.mark.parametrize("case", [
    "bare-path-outside", "bare-path-inside", "x-file", "http", "other-host",
    "percent-dotdot", "percent-slash", "query", "fragment",
])
def test_server_refuses_asset_uris_it_cannot_confine_on_arrival(server, site, case):
    """Asset URIs that are not plain local file: URIs are refused when they arrive
    (they used to be stored and refused only when read), through Tiled's
    ``POST /register`` and through the Tiled client."""
    d = make_dir(site, f"uri-{case}")
    write_cbf(d / "good.cbf", FRAME)
    secret = site.outside / "secret.cbf"
    uri = {
        "bare-path-outside": str(secret),
        "bare-path-inside": str(d / "good.cbf"),
        "x-file": f"x-file://localhost{secret}",
        "http": "http://127.0.0.1:9/secret.cbf",
        "other-host": f"file://fileserver.example{d}/good.cbf",
        "percent-dotdot": f"file://localhost{d}/%2E%2E/%2e%2e/outside/secret.cbf",
        "percent-slash": f"file://localhost{d}/..%2F..%2Foutside%2Fsecret.cbf",
        "query": f"file://localhost{d}/good.cbf?../../outside/secret.cbf",
        "fragment": f"file://localhost{d}/good.cbf#../../outside/secret.cbf",
    }[case]
    key = f"uri-{case}"
    body = {"id": key, "structure_family": "array", "metadata": {}, "specs": [],
            "data_sources": [asdict(array_source(uri))]}
    r = server.http.post("/register/", json=body)
    assert r.status_code == 403, (uri, r.status_code, r.text)
    detail = r.json()["detail"]
    assert f"node '{key}'" in detail and str(site.base) not in detail, detail
    with pytest.raises(ClientError) as info:
        server.client.new(structure_family="array", data_sources=[array_source(uri)],
                          key=key, metadata={})
    assert str(info.value).startswith("403"), info.value
    assert key not in server.client


def test_writable_storage_cannot_be_registered_as_data_files(server, site):
    """Any write key can put bytes of its choosing into the writable storage (here:
    an array written through Tiled, and an HDF5 file standing for uploaded bytes);
    none of it may be registered as a data file, by any route, though the storage
    is readable. The refusal names the node path, not the server's directory."""
    server.client.create_container("uploads").write_array(np.arange(6), key="arr")
    stored = server.writable / "uploads" / "arr"
    assert stored.is_dir()  # Tiled's Zarr directory for the array just written
    planted = server.writable / "uploads" / "planted.h5"
    with h5py.File(planted, "w") as f:
        f["entry/data"] = np.arange(4)
    attempts = [
        ("planted", array_source(planted.as_uri(), "application/x-hdf5", shape=(4,))),
        ("zarr", array_source(stored.as_uri(), "application/x-zarr", directory=True, shape=(6,))),
        ("dotdot", array_source(f"file://localhost{site.data}/../../{server.writable.parent.name}"
                                f"/files/uploads/planted.h5", "application/x-hdf5", shape=(4,))),
    ]
    for key, source in attempts:
        body = {"id": key, "structure_family": "array", "metadata": {}, "specs": [],
                "data_sources": [asdict(source)]}
        r = server.http.post("/register/uploads", json=body)
        assert r.status_code == 403, (key, r.text)
        detail = r.json()["detail"]
        assert "writable storage" in detail and f"node 'uploads/{key}'" in detail, detail
        assert str(server.writable) not in detail, detail
        assert key not in server.client["uploads"]
    # scatterbroker's own registration of the writable storage: every file refused
    report = register(server.client, server.writable / "uploads", prefix="from-storage")
    assert report.created == [], report
    failed = {Path(p).name: why for p, why in report.failed}
    assert "writable storage" in failed["planted.h5"], failed
    assert "node 'from-storage/planted'" in failed["planted.h5"], failed
    # nor can a good node's data source be replaced by one in writable storage
    d = make_dir(site, "replace-writable")
    write_cbf(d / "good.cbf", FRAME)
    register(server.client, d, prefix="replace-writable", roots=site.roots)
    attrs = server.http.get("/metadata/replace-writable/good",
                            params={"include_data_sources": True}).json()["data"]["attributes"]
    (source,) = attrs["data_sources"]
    source["assets"][0]["data_uri"] = planted.as_uri()
    r = server.http.put("/data_source/replace-writable/good", json={"data_source": source})
    assert r.status_code == 403 and "writable storage" in r.json()["detail"], r.text


def test_refusals_show_no_server_path_or_pid(server, site):
    """A 403 names the problem and the node, never a resolved server path: a link to
    /proc/self/environ resolved to /proc/<the server's PID>/environ."""
    d = make_dir(site, "nopaths")
    (d / "environ.cbf").symlink_to("/proc/self/environ")
    (d / "secret.cbf").symlink_to(site.outside / "secret.cbf")
    write_cbf(d / "good.cbf", FRAME)
    write_cbf(d / "swapped.cbf", FRAME)
    register(server.client, d, prefix="nopaths", roots=site.roots)
    assert "swapped" in server.client["nopaths"]
    (d / "swapped.cbf").unlink()
    (d / "swapped.cbf").symlink_to("/proc/self/environ")
    details = []
    for name in ("environ", "secret"):
        body = {"id": f"direct-{name}", "structure_family": "array", "metadata": {}, "specs": [],
                "data_sources": [asdict(array_source((d / f"{name}.cbf").as_uri()))]}
        r = server.http.post("/register/nopaths", json=body)
        assert r.status_code == 403, r.text
        details.append(r.json()["detail"])
        assert f"node 'nopaths/direct-{name}'" in details[-1]
    r = server.http.get("/array/full/nopaths/swapped", headers=OCTET)
    assert r.status_code == 403, r.text
    details.append(r.json()["detail"])
    for detail in details:
        assert OUTSIDE in detail, detail
        assert str(site.base) not in detail and "/proc" not in detail and "/tmp" not in detail, detail
        assert str(os.getpid()) not in detail, detail  # the server runs in this process


def test_hard_links_are_served_unless_the_operator_refuses_them(server, site, monkeypatch):
    """A hard link inside a root to a file outside it is the file itself: no path
    leads out, so confinement cannot see it and it is served. With
    SCATTERBROKER_REFUSE_HARD_LINKS=1 every file with more than one link is refused,
    at registration and when read."""
    d = make_dir(site, "hardlinks")
    target = site.base / "outside-linked" / "secret.cbf"  # not in outside/: other tests list it
    target.parent.mkdir()
    write_cbf(target, site.secret)
    for name in ("shown", "refused"):
        os.link(target, d / f"{name}.cbf")
    monkeypatch.delenv("SCATTERBROKER_REFUSE_HARD_LINKS", raising=False)
    report = register(server.client, d, prefix="hardlinks", roots=site.roots)
    assert sorted(report.created) == ["hardlinks/refused", "hardlinks/shown"]
    r = server.http.get("/array/full/hardlinks/shown", headers=OCTET)
    assert r.status_code == 200  # the documented hole: the outside file is served
    assert np.array_equal(np.frombuffer(r.content, "<i4").reshape(FRAME.shape), site.secret)
    monkeypatch.setenv("SCATTERBROKER_REFUSE_HARD_LINKS", "1")
    r = server.http.get("/array/full/hardlinks/refused", headers=OCTET)
    assert r.status_code == 403, r.text
    assert "hard links" in r.json()["detail"] and str(site.base) not in r.json()["detail"]
    os.link(target, d / "later.cbf")
    report = register(server.client, d, prefix="hardlinks", roots=site.roots)
    assert "hardlinks/later" not in report.created
    assert any("hard links" in why for _, why in report.failed), report.failed
    # a file with one link reads as before
    write_cbf(d / "single.cbf", FRAME)
    register(server.client, d, prefix="hardlinks", roots=site.roots)
    r = server.http.get("/array/full/hardlinks/single", headers=OCTET)
    assert r.status_code == 200
    assert np.array_equal(np.frombuffer(r.content, "<i4").reshape(FRAME.shape), FRAME)


def test_server_refuses_replacing_a_data_source_with_an_outside_one(server, site):
    d = make_dir(site, "replace")
    write_cbf(d / "good.cbf", FRAME)
    register(server.client, d, prefix="replace", roots=site.roots)
    attrs = server.http.get("/metadata/replace/good", params={"include_data_sources": True}
                            ).json()["data"]["attributes"]
    (source,) = attrs["data_sources"]
    source["assets"][0]["data_uri"] = (site.outside / "secret.cbf").as_uri()
    r = server.http.put("/data_source/replace/good", json={"data_source": source})
    assert r.status_code == 403 and OUTSIDE in r.json()["detail"], r.text
    r = server.http.get("/array/full/replace/good", headers=OCTET)
    assert r.status_code == 200
    assert np.array_equal(np.frombuffer(r.content, "<i4").reshape(FRAME.shape), FRAME)


def test_cli_style_registration_without_roots_is_refused_by_the_server(server, site):
    """`scatterbroker register URL PATH` passes no roots: the server still refuses,
    file by file, and registration reports each one."""
    report = register(server.client, site.outside, prefix="no-roots")
    assert report.created == []
    failed = dict(report.failed)
    assert any("secret.cbf" in p for p in failed), failed
    refused = {p: why for p, why in failed.items() if not p.endswith(".csv")}
    assert len(refused) == 4 and all(OUTSIDE in why for why in refused.values()), failed


def test_symlinks_escaping_the_root_are_reported_by_registration(server, site):
    d = make_dir(site, "escaping")
    write_cbf(d / "good.cbf", FRAME)
    (d / "evil.cbf").symlink_to(site.outside / "secret.cbf")
    (d / "evil_dir").symlink_to(site.outside)
    report = register(server.client, d, prefix="escaping", roots=site.roots)
    assert report.created == ["escaping/good"]
    failed = {Path(p).name: why for p, why in report.failed}
    assert OUTSIDE in failed["evil.cbf"]
    assert "not followed" in failed["evil_dir"]
    assert "evil" not in server.client["escaping"]


# ------------------------------------------------------------------ reads


def test_files_swapped_for_links_after_registration_are_refused_when_read(server, site):
    """Registered while good; then replaced by a symlink leaving the root, or to a
    device. Every adapter confines before it opens: 403, and the rest still reads."""
    import tifffile

    d = make_dir(site, "swapped")
    for i in (1, 2, 3):
        write_cbf(d / f"scan_{i:05d}.cbf", FRAME + i, i)
    write_cbf(d / "single.cbf", FRAME)
    tifffile.imwrite(d / "image.tif", FRAME.astype("uint16"))
    tifffile.imwrite(d / "device.tif", FRAME.astype("uint16"))
    for i in (1, 2):
        tifffile.imwrite(d / f"tiles_{i:03d}.tif", FRAME.astype("uint16"))
    with h5py.File(d / "nexus.nxs", "w") as f:
        f["entry/x"] = np.arange(3)
    report = register(server.client, d, prefix="swapped", roots=site.roots)
    assert set(report.created) == {"swapped/scan", "swapped/single", "swapped/image",
                                   "swapped/device", "swapped/tiles", "swapped/nexus"}, report

    def swap(name: str, target: str | Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to(target)

    swap("scan_00002.cbf", site.outside / "secret.cbf")
    swap("single.cbf", site.outside / "secret.cbf")
    swap("image.tif", site.outside / "secret.tif")
    swap("device.tif", "/dev/zero")  # outside the roots, and a device
    (d / "tiles_002.tif").unlink()
    null_device_in_root(d / "tiles_002.tif")  # inside the root: refused as a device
    swap("nexus.nxs", site.outside / "secret.nxs")
    refused = [
        ("/array/full/swapped/scan/frames", {"slice": "1"}, OUTSIDE),
        ("/array/full/swapped/single", {}, OUTSIDE),
        ("/array/full/swapped/image", {}, OUTSIDE),
        ("/array/full/swapped/device", {}, OUTSIDE),
        ("/array/full/swapped/tiles/frames", {"slice": "1"}, "not a regular file"),
        ("/metadata/swapped/nexus/entry", {}, OUTSIDE),
    ]
    for route, params, problem in refused:
        r = server.http.get(route, params=params, headers=OCTET)
        assert r.status_code == 403, (route, r.text)
        assert problem in r.json()["detail"], (route, r.text)
    for route, params, expected in [
        ("/array/full/swapped/scan/frames", {"slice": "0"}, FRAME + 1),
        ("/array/full/swapped/scan/frames", {"slice": "2"}, FRAME + 3),
        ("/array/full/swapped/tiles/frames", {"slice": "0"}, FRAME),
    ]:
        r = server.http.get(route, params=params, headers=OCTET)
        assert r.status_code == 200, r.text
        dtype = "<u2" if "tiles" in route else "<i4"
        assert np.array_equal(np.frombuffer(r.content, dtype).reshape(FRAME.shape), expected)


def null_device_in_root(path: Path) -> None:
    """A character device (a clone of /dev/null) at ``path``, inside the root; a
    FIFO where device nodes cannot be made (not root)."""
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)


def test_scan_directory_swapped_for_a_link_is_refused(server, site):
    d = make_dir(site, "dirswap")
    scan = d / "run"
    scan.mkdir()
    for i in (1, 2):
        write_cbf(scan / f"scan_{i:05d}.cbf", FRAME, i)
    register(server.client, d, prefix="dirswap", roots=site.roots)
    for p in scan.iterdir():
        p.unlink()
    scan.rmdir()
    scan.symlink_to(site.outside / "frames")
    r = server.http.get("/array/full/dirswap/run/scan/frames", params={"slice": "0"},
                        headers=OCTET)
    assert r.status_code == 403 and OUTSIDE in r.json()["detail"], r.text


# ------------------------------------------------------------------ odd trees


def test_symlink_loops_and_devices_in_a_tree_are_reported_not_followed(server, site):
    d = make_dir(site, "loops")
    for i in (1, 2):
        write_cbf(d / f"good_{i:05d}.cbf", FRAME, i)
    (d / "a.cbf").symlink_to("b.cbf")
    (d / "b.cbf").symlink_to("a.cbf")
    (d / "self.cbf").symlink_to("self.cbf")
    (d / "dangling.cbf").symlink_to("nothing.cbf")
    (d / "zero.tif").symlink_to("/dev/zero")
    os.mkfifo(d / "pipe.cbf")  # opening it would block forever
    sub = d / "sub"
    sub.mkdir()
    (sub / "up").symlink_to("..")
    (sub / "here").symlink_to(".")
    (sub / "root").symlink_to(site.data)
    start = time.monotonic()
    report = register(server.client, d, prefix="loops", roots=site.roots)
    assert time.monotonic() - start < 30
    assert report.created == ["loops/good"]
    failed = {Path(p).name: why for p, why in report.failed}
    for name in ("a.cbf", "b.cbf", "self.cbf"):
        assert "cannot be resolved" in failed[name] and "symbolic links" in failed[name]
    assert "cannot be resolved" in failed["dangling.cbf"]
    assert "not a regular file" in failed["zero.tif"]
    assert "not a regular file" in failed["pipe.cbf"]
    for name in ("up", "here", "root"):
        assert "not followed" in failed[name]


@pytest.mark.parametrize("prefix, problem", [
    ("..", "cannot name a catalog node"),
    ("a/../b", "cannot name a catalog node"),
    ("x\x00y", "forbidden character"),
    ("a\\b", "forbidden character"),
    ("z" * 300, "longer than 255"),
])
def test_register_refuses_bad_node_names(server, site, prefix, problem):
    d = site.data / "names-prefix"
    d.mkdir(exist_ok=True)
    with pytest.raises(InvalidName, match=problem):
        register(server.client, d, prefix=prefix, roots=site.roots)


def test_files_with_bad_names_are_reported_and_the_rest_registers(server, site):
    d = make_dir(site, "names")
    write_cbf(d / "good.cbf", FRAME)
    write_cbf(d / "new\nline.cbf", FRAME)
    write_cbf(d / "back\\slash.cbf", FRAME)
    (d / "tab\tdir").mkdir()
    write_cbf(d / "tab\tdir" / "inner.cbf", FRAME)
    report = register(server.client, d, prefix="names", roots=site.roots)
    assert report.created == ["names/good"]
    failed = dict(report.failed)
    assert len(failed) == 3 and all("forbidden character" in why for why in failed.values())


@pytest.mark.parametrize("key", ["..", ".", "a/b", "/", "x\x00y", "tab\tkey", "z" * 256])
def test_server_refuses_bad_node_names_from_a_raw_client(server, key):
    with pytest.raises(ClientError) as info:
        server.client.create_container(key=key)
    assert str(info.value).startswith("422")
    assert key not in list(server.client)


# ------------------------------------------------------------------ never written


def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and \
                not p.is_symlink() else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def test_raw_data_is_never_written(server, site):
    """Registration, listing and reading every format leave the raw tree identical:
    no byte, size or mtime changed, no file (lock, sidecar, cache) added."""
    import tifffile

    d = make_dir(site, "readonly")
    for i in (1, 2, 3):
        write_cbf(d / f"scan_{i:05d}.cbf", FRAME, i)
        tifffile.imwrite(d / f"img_{i:03d}.tif", FRAME.astype("uint16"))
    with h5py.File(d / "scan.h5", "w") as f:
        f["entry/data"] = np.arange(12).reshape(3, 4)
        f["entry"].attrs["NX_class"] = "NXentry"
    before = _snapshot(d)
    time.sleep(0.01)
    register(server.client, d, prefix="readonly", roots=site.roots)
    for route in ("/array/full/readonly/scan/frames", "/array/full/readonly/img/frames",
                  "/array/full/readonly/scan.h5/entry/data", "/metadata/readonly/scan.h5/entry",
                  "/search/readonly"):
        r = server.http.get(route, headers=OCTET)
        assert r.status_code in (200, 404), (route, r.text)
    assert server.client["readonly/img/headers"].read() is not None
    assert _snapshot(d) == before


# ------------------------------------------------------------------ raw file routes


def test_raw_file_download_routes_are_off(tmp_path):
    """Tiled's /asset/bytes follows symlinks and (0.2.20) `relative_path=../..` out of
    any root: our configs turn the raw-asset routes off."""
    from tiled.client import from_uri
    from tiled.server.settings import get_settings

    # Tiled's settings are process-global: start from Tiled's default, as a fresh
    # server process would, so only our config can turn the routes off.
    get_settings().expose_raw_assets = True
    d = tmp_path / "assets"
    d.mkdir()
    for i in (1, 2):
        write_cbf(d / f"scan_{i:05d}.cbf", FRAME, i)
    with start_server(tmp_path / "db", [d]) as url:
        register(from_uri(url, api_key=API_KEY), d, prefix="assets")
        h = {"Authorization": f"Apikey {API_KEY}"}
        attrs = httpx.get(f"{url}/api/v1/metadata/assets/scan/frames", headers=h,
                          params={"include_data_sources": True}).json()["data"]["attributes"]
        asset_id = attrs["data_sources"][0]["assets"][0]["id"]
        for route, params in [
            ("asset/bytes", {"id": asset_id, "relative_path": "../../../../../../etc/passwd"}),
            ("asset/bytes", {"id": asset_id, "relative_path": "scan_00001.cbf"}),
            ("asset/manifest", {"id": asset_id}),
        ]:
            r = httpx.get(f"{url}/api/v1/{route}/assets/scan/frames", params=params, headers=h)
            assert r.status_code == 403, (route, r.status_code, r.text[:100])


def test_shipped_configs_turn_raw_file_routes_off(monkeypatch, tmp_path):
    from tiled.config import parse_configs

    configs = Path(__file__).resolve().parent.parent / "server_config"
    for var in ("SCATTERBROKER_DATA", "SCATTERBROKER_RAW_ROOT", "SCATTERBROKER_PRODUCTS_ROOT"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("SCATTERBROKER_CATALOG_URI", f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setenv("SCATTERBROKER_TABLES_URI", f"duckdb:///{tmp_path}/t.duckdb")
    monkeypatch.setenv("SCATTERBROKER_API_KEY", API_KEY)
    for name in ("demo.yml", "facility.yml"):
        assert parse_configs(configs / name).expose_raw_assets is False, name
