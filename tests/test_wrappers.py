"""Portable NeXus wrappers through global URIs, and uploading them back (real server).

``scatterbroker wrap`` writes a wrapper on one server; copied where its
external links do not resolve, ``scatterbroker.clients.nexus.nxload`` reads the same
slices over HTTP; a customised copy goes back with ``scatterbroker upload``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import API_KEY, N_FRAMES, SQLITE, write_tree
from typer.testing import CliRunner


# ------------------------------------------------------------------ servers


@functools.lru_cache(maxsize=1)
def _template_catalog() -> Path:
    """An empty, initialised SQLite catalog, made once per test process: copying
    it saves each server the ``tiled catalog init`` subprocess (seconds)."""
    import atexit
    import tempfile

    from tiled.commandline._catalog import init

    directory = Path(tempfile.mkdtemp(prefix="sb-template-"))
    atexit.register(shutil.rmtree, directory, True)
    init(f"sqlite:///{directory / 'catalog.db'}", if_not_exists=True)
    return directory / "catalog.db"


@contextlib.contextmanager
def quick_server(data_dir: Path, roots: list[Path], *, public: bool = False, port: int = 0):
    """A real scatterbroker server on loopback (SQLite catalog), started in about a second.

    Same config as ``conftest.start_server`` except that a new catalog database
    is a copy of an initialised template. An existing ``data_dir`` is served
    as it is (a restart).
    """
    from scatterbroker.server.app import build_app, serve_in_thread

    data_dir.mkdir(parents=True, exist_ok=True)
    config = SQLITE.config(data_dir, roots, public=public)
    if not (data_dir / "catalog.db").exists():
        try:
            shutil.copy(_template_catalog(), data_dir / "catalog.db")
            config["trees"][0]["args"]["init_if_not_exists"] = False
        except ImportError:  # Tiled moved its init command: let the server initialise
            pass
    with serve_in_thread(build_app(config), port=port) as url:
        yield url


@dataclass
class Site:
    url: str
    client: object
    root: Path           # the facility's file system (test tree + server data)
    arrays: dict

    def uri(self, path: str) -> str:
        return f"{self.url}/api/v1/metadata/{path}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    root = tmp_path_factory.mktemp("facility")
    arrays = write_tree(root / "beamline")
    dirs = [root / "beamline" / name for name in ("raw", "scans", "wrappers")]
    with quick_server(root / "server", dirs) as url:
        client = from_uri(url, api_key=API_KEY)
        for d in dirs:
            register(client, d, prefix=d.name)
        yield Site(url, client, root, arrays)


@pytest.fixture(scope="module")
def scan_wrapper(site, tmp_path_factory) -> Path:
    """A wrapper of scans/s1/scan1 written by ``scatterbroker wrap`` (copy it before changing it)."""
    return make_wrapper(site, "scans/s1/scan1", tmp_path_factory.mktemp("wrapped") / "scan1.nxs")


def run_cli(*args: str):
    from scatterbroker.cli import app

    return CliRunner().invoke(app, list(args), env={"SCATTERBROKER_API_KEY": API_KEY})


def make_wrapper(site: Site, path: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_cli("wrap", site.uri(path), str(out))
    assert result.exit_code == 0, result.output
    return out


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------- wrap


def test_wrap_writes_metadata_tree_links_and_uri_placeholders(site, tmp_path):
    out = make_wrapper(site, "scans/s1/scan1", tmp_path / "mine" / "scan1.nxs")
    assert out.stat().st_size < 100_000  # small: no frame data inside
    with h5py.File(out, "r") as f:
        assert f.attrs["NX_class"] == "NXroot"
        assert f.attrs["uri"] == site.uri("scans/s1/scan1")
        assert f["entry"].attrs["NX_class"] == "NXentry"
        data = f["entry/data"]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
        # The large field: facility-local external link (relative to the wrapper) ...
        link = data.get("data", getlink=True)
        assert isinstance(link, h5py.ExternalLink)
        assert link.path == "/entry/data/data"
        assert (out.parent / link.filename).resolve() == (site.root / "beamline/scans/s1/scan1.nxs").resolve()
        # ... and its global URI, shape, dtype as attributes of a placeholder field.
        placeholder = data["data_uri"]
        assert placeholder.shape == (0,)
        assert placeholder.attrs["uri"] == site.uri("scans/s1/scan1/entry/data/data")
        assert tuple(placeholder.attrs["shape"]) == (N_FRAMES, 24, 32)
        assert placeholder.attrs["dtype"] == "<i4" and placeholder.attrs["field"] == "data"
        # Small fields are inline, with their attributes.
        assert f["entry/sample/temperature"][()] == 250.0
        assert f["entry/sample/temperature"].attrs["units"] == "K"
        assert f["entry/data/rotation_angle"].shape == (N_FRAMES,)
        assert f["entry/data/rotation_angle"].attrs["units"] == "deg"
        assert f["entry/sample/name"].asstr()[()] == "s1"


def test_copied_wrapper_reads_the_same_slices_over_http(site, scan_wrapper, tmp_path):
    from scatterbroker.clients.nexus import RemoteField, nxload

    frames = site.arrays["cbf"]
    out = scan_wrapper
    here = nxload(out, api_key=API_KEY).entry.data.data
    assert isinstance(here, RemoteField) and here.local_path is not None
    assert np.array_equal(here[3].nxdata, frames[3]) and here.last_source == "local"

    away = tmp_path / "laptop" / "deep" / "er"
    away.mkdir(parents=True)
    shutil.copy(out, away / "copy.nxs")
    assert not (away / h5py.File(out, "r")["entry/data"].get("data", getlink=True).filename).exists()
    root = nxload(away / "copy.nxs", api_key=API_KEY)
    data = root.entry.data.data
    assert isinstance(data, RemoteField) and data.local_path is None
    assert data.shape == (N_FRAMES, 24, 32) and data.dtype == np.int32
    assert data.last_source is None  # nothing read on loading
    for index in [3, np.s_[2:5, 3:9, ::2], np.s_[::-1, -1], np.s_[..., 7], np.s_[-2:, 5, 7]]:
        assert np.array_equal(data[index].nxdata, frames[index]), index
        assert data.last_source == "remote"
    assert np.array_equal(np.asarray(data), frames)
    assert int(data.sum()) == int(frames.sum())
    assert root.entry.data.nxsignal.nxname == "data"
    assert np.array_equal(root.entry.data.nxsignal[1].nxdata, frames[1])
    detector = root.entry.instrument.detector.data
    assert detector.uri == site.uri("scans/s1/scan1/entry/instrument/detector/data")
    # small fields came inline
    assert root.entry.sample.temperature.nxvalue == 250.0
    assert root.entry.sample.temperature.attrs["units"] == "K"


def test_field_without_a_file_is_wrapped_by_uri_only(site, tmp_path):
    """Raw CBF frames have no HDF5 file to link: only the placeholder, under its own name."""
    from scatterbroker.clients.nexus import nxload

    out = make_wrapper(site, "raw/p1/s1/scan1", tmp_path / "raw-scan1.nxs")
    with h5py.File(out, "r") as f:
        frames = f["scan1/frames"]
        assert frames.shape == (0,) and frames.attrs["uri"] == site.uri("raw/p1/s1/scan1/frames")
        assert f["scan1/headers"].attrs["NX_class"] == "NXcollection"
        assert list(f["scan1/headers/start_angle"][:3]) == pytest.approx([10.1, 10.2, 10.3])
    data = nxload(out, api_key=API_KEY).scan1.frames
    assert np.array_equal(data[4:6, :, 3].nxdata, site.arrays["cbf"][4:6, :, 3])


def test_nxload_of_a_uri_loads_the_whole_tree_with_lazy_large_fields(site):
    from nexusformat.nexus import NXroot

    from scatterbroker.clients.nexus import RemoteField, nxload

    root = nxload(site.uri("scans/s1/scan1"), api_key=API_KEY, local=False)
    assert isinstance(root, NXroot) and root.attrs["creator"] == "scatterbroker"
    entry = root.entry
    assert entry.nxclass == "NXentry" and entry.data.nxclass == "NXdata"
    assert entry.instrument.detector.nxclass == "NXdetector"
    assert entry.data.attrs["signal"] == "data"
    assert entry.sample.temperature.nxvalue == 250.0 and entry.sample.temperature.attrs["units"] == "K"
    assert entry.instrument.monochromator.wavelength.nxvalue == pytest.approx(0.7293)
    assert np.allclose(entry.data.rotation_angle.nxdata, 10 + 0.1 * np.arange(1, N_FRAMES + 1))
    data = entry.data.data
    assert isinstance(data, RemoteField) and data.last_source is None
    assert np.array_equal(data[5, 2:4].nxdata, site.arrays["cbf"][5, 2:4])
    assert data.last_source == "remote"
    # At the facility (server's file reachable here) the same field reads the file directly.
    local = nxload(site.uri("scans/s1/scan1"), api_key=API_KEY).entry.data.data
    assert np.array_equal(local[5].nxdata, site.arrays["cbf"][5]) and local.last_source == "local"
    # An array node's URI gives the field itself; a group's URI an NXroot holding it.
    field = nxload(site.uri("scans/s1/scan1/entry/data/data"), api_key=API_KEY, local=False)
    assert isinstance(field, RemoteField) and np.array_equal(field[0].nxdata, site.arrays["cbf"][0])
    group = nxload(site.uri("scans/s1/scan1/entry/sample"), api_key=API_KEY)
    assert group.sample.nxclass == "NXsample" and group.sample.name.nxvalue == "s1"


def test_saving_a_loaded_tree_writes_placeholders_not_data(site, tmp_path):
    from scatterbroker.clients.nexus import RemoteField, nxload

    root = nxload(site.uri("scans/s1/scan1"), api_key=API_KEY, local=False)
    root.save(tmp_path / "saved.nxs")
    assert (tmp_path / "saved.nxs").stat().st_size < 100_000
    with h5py.File(tmp_path / "saved.nxs", "r") as f:
        assert f["entry/data/data"].shape == (0,)
        assert f["entry/data/data"].attrs["uri"] == site.uri("scans/s1/scan1/entry/data/data")
    again = nxload(tmp_path / "saved.nxs", api_key=API_KEY).entry.data.data
    assert isinstance(again, RemoteField)
    assert np.array_equal(again[-1].nxdata, site.arrays["cbf"][-1])


# ------------------------------------------------------------------- upload


def customise(path: Path) -> None:
    """What a scientist does: add a fit result, a note, an attribute."""
    from nexusformat.nexus import NXdata, NXfield, NXnote, NXprocess

    from scatterbroker.clients.nexus import nxload

    root = nxload(path, "rw")
    root.entry.fit = NXprocess(program="lmfit", version="1.3")
    root.entry.fit.chi2 = 1.25
    root.entry.fit.peak = NXdata(NXfield(np.linspace(0, 1, 50), name="intensity"),
                                 NXfield(np.arange(50.0), name="q", units="1/angstrom"))
    root.entry.notes = NXnote(description="peak at q=12")
    root.entry.sample.temperature.attrs["checked_by"] = "ana"


def test_customised_wrapper_uploads_back_without_copying_data(site, scan_wrapper, tmp_path):
    from scatterbroker.clients.nexus import RemoteField, nxload

    before = tree_digest(site.root / "beamline")
    out = scan_wrapper
    copy = tmp_path / "home" / "custom.nxs"
    copy.parent.mkdir()
    shutil.copy(out, copy)
    customise(copy)
    storage = site.root / "server" / "files"
    stored_before = sum(p.stat().st_size for p in storage.rglob("*") if p.is_file())

    result = run_cli("upload", str(copy), site.url, "users/ana/custom1")
    assert result.exit_code == 0, result.output
    node = site.client["users/ana/custom1"]
    assert [s.name for s in node.specs] == ["NXroot"]
    assert node.metadata["upload"]["file"] == "custom.nxs"
    assert [s.name for s in node["entry/fit"].specs] == ["NXprocess"]
    assert node["entry/fit/chi2"].read() == 1.25
    assert node["entry/sample/temperature"].metadata["checked_by"] == "ana"
    link = node["entry/data/data"]
    assert [s.name for s in link.specs] == ["sb-link"]
    assert link.metadata["link"]["uri"] == site.uri("scans/s1/scan1/entry/data/data")
    assert link.metadata["link"]["shape"] == [N_FRAMES, 24, 32]
    # Small data went to the server's writable storage; no frame was copied, raw untouched.
    stored = sum(p.stat().st_size for p in storage.rglob("*") if p.is_file()) - stored_before
    assert 0 < stored < site.arrays["cbf"].nbytes
    assert tree_digest(site.root / "beamline") == before

    root = nxload(site.uri("users/ana/custom1"), api_key=API_KEY, local=False)
    assert root.entry.fit.nxclass == "NXprocess" and root.entry.fit.chi2.nxvalue == 1.25
    assert root.entry.fit.peak.nxsignal.nxname == "intensity"
    assert root.entry.notes.description.nxvalue == "peak at q=12"
    data = root.entry.data.data
    assert isinstance(data, RemoteField)
    assert np.array_equal(data[2:4].nxdata, site.arrays["cbf"][2:4])


@pytest.mark.parametrize("target, refusal", [
    ("users/ana/taken", "exists already"),                    # no overwrite
    ("raw/p1/mine", "raw data"),                              # raw storage
    ("raw/p1/s1/scan1/mine", "raw data"),
    ("scans/s1/scan1/entry/mine", "registered data"),         # inside a registered file
    ("wrappers/s1/scan1/mine", "registered data"),
])
def test_upload_refuses_overwriting_and_raw_locations(site, scan_wrapper, target, refusal):
    from scatterbroker.clients.upload import NodeExists, ReadOnlyLocation, upload

    out = scan_wrapper
    if "taken" in target and "taken" not in site.client["users/ana"]:
        upload(out, site.uri(target), api_key=API_KEY)
    parent = target.rsplit("/", 1)[0]
    listing = sorted(site.client[parent]) if parent in site.client or parent == "" else None
    with pytest.raises((NodeExists, ReadOnlyLocation), match=refusal):
        upload(out, site.uri(target), api_key=API_KEY)
    if listing is not None and not target.startswith(("scans", "wrappers")):
        assert sorted(site.client[parent]) == listing
    result = run_cli("upload", str(out), site.uri(target))
    assert result.exit_code != 0 and refusal in (result.output + str(result.exception))


def test_upload_refuses_large_datasets_and_non_nexus_files(site, tmp_path):
    from scatterbroker.clients.upload import UploadRefused, UploadTooLarge, upload

    big = tmp_path / "big.nxs"
    with h5py.File(big, "w") as f:
        f.create_group("entry").attrs["NX_class"] = "NXentry"
        f["entry/image"] = np.zeros((64, 64))
    with pytest.raises(UploadTooLarge, match="entry/image"):
        upload(big, site.uri("users/ana/big"), api_key=API_KEY, max_bytes=1000)
    assert "big" not in site.client["users"]["ana"] if "ana" in site.client["users"] else True
    (tmp_path / "notes.nxs").write_text("not HDF5")
    with pytest.raises(UploadRefused, match="not a readable NeXus"):
        upload(tmp_path / "notes.nxs", site.uri("users/ana/notes"), api_key=API_KEY)


# --------------------------------------------------------------- bad input


def test_dead_server_or_removed_node_names_the_uri_and_local_fields_still_read(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.clients.nexus import RemoteDataError, nxload, wrap

    arrays = write_tree(tmp_path / "beamline")
    scans = tmp_path / "beamline" / "scans"
    away = tmp_path / "away" / "deeper"  # where the wrappers' relative links do not resolve
    away.mkdir(parents=True)
    with quick_server(tmp_path / "server", [scans]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, scans, prefix="scans")
        register(client, scans, prefix="gone")
        kept, gone = (f"{url}/api/v1/metadata/{p}/s1/scan1" for p in ("scans", "gone"))
        for name, uri in (("kept", kept), ("gone", gone)):
            wrap(uri, tmp_path / "w" / f"{name}.nxs", api_key=API_KEY)
            shutil.copy(tmp_path / "w" / f"{name}.nxs", away / f"{name}.nxs")
        client.delete_contents("gone", recursive=True, external_only=False)

        root = nxload(away / "gone.nxs", api_key=API_KEY)  # opening needs no server
        with pytest.raises(RemoteDataError) as err:
            root.entry.data.data[0]
        assert f"{gone}/entry/data/data" in str(err.value) and "removed" in str(err.value)
        assert root.entry.sample.temperature.nxvalue == 250.0

    # The server is down now.
    copy = nxload(away / "kept.nxs", api_key=API_KEY)
    with pytest.raises(RemoteDataError) as err:
        copy.entry.data.data[1:3]
    assert err.value.uri == f"{kept}/entry/data/data" and "not reachable" in str(err.value)
    assert copy.entry.sample.temperature.nxvalue == 250.0
    assert np.allclose(copy.entry.data.rotation_angle.nxdata, 10 + 0.1 * np.arange(1, N_FRAMES + 1))
    # Where the external link resolves, the field still reads (locally, no server).
    here = nxload(tmp_path / "w" / "kept.nxs", api_key=API_KEY).entry.data.data
    assert np.array_equal(here[1:3].nxdata, arrays["cbf"][1:3]) and here.last_source == "local"
    # The command line says the same in one line.
    result = run_cli("wrap", kept, str(tmp_path / "never.nxs"))
    assert result.exit_code != 0 and kept in str(result.exception) and not (tmp_path / "never.nxs").exists()
    # Back up (restarted on its port, same catalog): the same wrapper field reads again.
    port = int(url.rsplit(":", 1)[1])
    with quick_server(tmp_path / "server", [scans], port=port) as again:
        assert again == url
        assert np.array_equal(copy.entry.data.data[1:3].nxdata, arrays["cbf"][1:3])
