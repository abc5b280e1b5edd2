"""Shared fixtures: real files written by fabio/tifffile/h5py, a real server on loopback.

The session server serves ``raw/``, ``scans/`` and ``wrappers/`` of one data
tree, registered the way ``scatterbroker serve DIR...`` does it. Tests that
change files or the catalog make their own tree and server.

Every server runs once per catalog backend (fixture ``backend``): embedded
SQLite (catalog file + DuckDB tables) and a real throwaway PostgreSQL (one new
database for the catalog and one for tables per server; see ``postgres.py``).
Without PostgreSQL binaries the PostgreSQL runs are skipped, or fail when the
``CI`` environment variable is set.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore")

pytest_plugins = ["pytester"]  # test_postgres runs a pytest session without PostgreSQL

# Tiled keeps the single-user key in process-global settings, so every server
# started inside the test process must use this one key.
API_KEY = "testkey"
FRAME_SHAPE = (24, 32)  # (ny, nx), small: the code paths are the same as 2463 x 2527
N_FRAMES = 12

CBF_HEADER = """# Detector: PILATUS 2M, 24-0111
# 2026-11-25T08:00:{second:02d}.000
# Pixel_size 172e-6 m x 172e-6 m
# Exposure_time 0.1000000 s
# Exposure_period 0.1000000 s
# Wavelength 0.7293 A
# Detector_distance 0.5000 m
# Beam_xy (700.00, 800.00) pixels
# Start_angle {angle:.4f} deg.
# Angle_increment 0.1000 deg.
# Phi {angle:.4f} deg.
# Chi 0.0000 deg.
# Omega 0.0000 deg."""


def write_cbf(path: Path, frame: np.ndarray, index: int = 0) -> None:
    """A Pilatus-style CBF frame written by fabio; angle = 10 + 0.1*index deg."""
    import fabio.cbfimage

    header = CBF_HEADER.format(second=index % 60, angle=10 + 0.1 * index)
    fabio.cbfimage.CbfImage(
        data=frame,
        header={"_array_data.header_convention": "PILATUS_1.2",
                "_array_data.header_contents": header},
    ).write(str(path))


def files_that_change(directory: Path, frames: np.ndarray) -> None:
    """``grow.h5`` (dataset ``data``: the first 2 of ``frames``) and ``one.cbf`` (frame 0)."""
    import h5py

    with h5py.File(directory / "grow.h5", "w") as f:
        f.create_dataset("data", data=frames[:2])
    write_cbf(directory / "one.cbf", frames[0])


def change_files(directory: Path, frames: np.ndarray) -> None:
    """Replace both files of :func:`files_that_change` on disk (atomic rename, as a copy tool
    does): ``grow.h5`` then holds all of ``frames``, ``one.cbf`` frame 2."""
    import h5py

    with h5py.File(directory / ".grow.tmp", "w") as f:
        f.create_dataset("data", data=frames)
    (directory / ".grow.tmp").replace(directory / "grow.h5")
    write_cbf(directory / ".one.tmp", frames[2])
    (directory / ".one.tmp").replace(directory / "one.cbf")


def make_frames(n: int = N_FRAMES, seed: int = 0, dtype="int32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = rng.poisson(3.0, (n, *FRAME_SHAPE)).astype(dtype)
    frames[:, 5, 7] = np.arange(n) * 1000 + 17  # a pixel that tells frames apart
    return frames


def write_tree(root: Path) -> dict:
    """Write the standard test tree; return the arrays written, for comparison."""
    import tifffile

    from scatterbroker.reduction.stack import write_scan
    from scatterbroker.reduction.wrapper import write_wrapper

    cbf = make_frames()
    s1 = root / "raw" / "p1" / "s1"
    s1.mkdir(parents=True)
    for i, frame in enumerate(cbf, start=1):
        write_cbf(s1 / f"scan1_{i:05d}.cbf", frame, i)
    # A truncated frame on its own: registration must report it and go on.
    whole = (s1 / "scan1_00001.cbf").read_bytes()
    (s1 / "broken.cbf").write_bytes(whole[: len(whole) // 2])

    tif = make_frames(8, seed=1, dtype="uint16")
    s2 = root / "raw" / "p1" / "s2"
    s2.mkdir(parents=True)
    for i, frame in enumerate(tif, start=1):
        tifffile.imwrite(s2 / f"img_{i:04d}.tif", frame)
    pages = make_frames(5, seed=2, dtype="float32")
    tifffile.imwrite(s2 / "stack.tif", pages)
    (s2 / "empty.tif").write_bytes(b"")
    (s2 / "notes.xyz").write_text("not a detector file")

    scans = root / "scans" / "s1"
    scans.mkdir(parents=True)
    metadata = {"sample": {"name": "s1", "temperature": 250.0, "temperature@units": "K"},
                "instrument": {"monochromator": {"wavelength": 0.7293, "wavelength@units": "angstrom"}}}
    write_scan(scans / "scan1.nxs", cbf, angles=10 + 0.1 * np.arange(1, N_FRAMES + 1), metadata=metadata)
    wrappers = root / "wrappers" / "s1"
    wrappers.mkdir(parents=True)
    write_wrapper(wrappers / "scan1.nxs", scans / "scan1.nxs", metadata=metadata)
    return {"cbf": cbf, "tif": tif, "pages": pages}


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("beamline")
    return root, write_tree(root)


@dataclass(frozen=True)
class Backend:
    """Where a test server keeps its catalog: ``"sqlite"`` or ``"postgresql"``."""

    name: str
    postgres: object = None  # postgres.PostgresServer for "postgresql"

    def __str__(self) -> str:
        return self.name

    def config(self, data_dir: Path, roots: list[Path], *, public: bool = False) -> dict:
        """``local_config`` for one new server, with fresh databases on PostgreSQL."""
        from scatterbroker.server.app import local_config

        if self.name == "sqlite":
            return local_config(data_dir, roots, api_key=API_KEY, public=public)
        pg = self.postgres
        config = local_config(data_dir, roots, api_key=API_KEY, public=public,
                              catalog_uri=pg.uri(pg.create_database("catalog")))
        # Tables (scan headers) in PostgreSQL too, as in server_config/facility.yml.
        storage = config["trees"][0]["args"]["writable_storage"]
        storage[:] = [s for s in storage if not s.startswith("duckdb:")]
        storage.append(pg.uri(pg.create_database("tables"), driver="postgresql"))
        return config


SQLITE = Backend("sqlite")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the whole session (see postgres.py)."""
    from postgres import PostgresError, PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        why = ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
               "/usr/lib/postgresql/*/bin; install them (apt-get install postgresql)")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {why}", pytrace=False)
        pytest.skip(f"PostgreSQL catalog tests skipped: {why}")
    try:
        server = PostgresServer(bindir).start()
    except PostgresError as err:
        pytest.fail(str(err), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request) -> Backend:
    """The catalog backend: every test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return SQLITE
    return Backend("postgresql", request.getfixturevalue("postgres"))


@contextmanager
def five_scans_read_once(monkeypatch, data_dir: Path, **build):
    """A server (``build_app(..., **build)``) whose read caches keep things 0.5 s, with
    ``scan0`` ... ``scan4`` created at its root and each one's metadata read once;
    yields ``(app, http)`` (an httpx client on ``/api/v1/`` with the key)."""
    import httpx
    from tiled.client import from_uri

    from scatterbroker.server.app import build_app, local_config, serve_in_thread

    monkeypatch.setenv("SCATTERBROKER_RESPONSE_CACHE_TTL", "0.5")
    app = build_app(local_config(data_dir, [], api_key=API_KEY), **build)
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url + "/api/v1/", headers={"Authorization": f"Apikey {API_KEY}"}) as http:
        top = from_uri(url, api_key=API_KEY)
        for i in range(5):
            top.create_container(f"scan{i}")
        for i in range(5):
            assert http.get(f"metadata/scan{i}").status_code == 200
        yield app, http


def start_server(data_dir: Path, roots: list[Path], *, public: bool = False,
                 backend: Backend = SQLITE):
    """Context manager: a real scatterbroker server on a free loopback port,
    its catalog in ``backend`` (pass the ``backend`` fixture)."""
    from scatterbroker.server.app import build_app, serve_in_thread

    return serve_in_thread(build_app(backend.config(data_dir, roots, public=public)))


@pytest.fixture(scope="session")
def served(tree, tmp_path_factory, backend):
    """(base URL, registration reports by directory name, arrays written)."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    root, arrays = tree
    dirs = [root / "raw", root / "scans", root / "wrappers"]
    with start_server(tmp_path_factory.mktemp("catalog"), dirs, backend=backend) as url:
        client = from_uri(url, api_key=API_KEY)
        reports = {d.name: register(client, d, prefix=d.name) for d in dirs}
        yield url, reports, arrays


@pytest.fixture
def client(served):
    from tiled.client import from_uri

    return from_uri(served[0], api_key=API_KEY)


@pytest.fixture
def http(served):
    import httpx

    with httpx.Client(base_url=served[0], headers={"Authorization": f"Apikey {API_KEY}"}) as c:
        yield c


def _environ_restored():
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


# Undo environment changes a test module (or a library it imports) leaves behind,
# e.g. ipykernel sets FORCE_COLOR=1, which makes later CLI subprocesses print colour.
_restore_environ_per_module = pytest.fixture(scope="module", autouse=True)(_environ_restored)
_restore_environ = pytest.fixture(autouse=True)(_environ_restored)


@pytest.fixture(autouse=True)
def _clean_cwd(monkeypatch, tmp_path):
    # Run every test from an empty directory: nothing may depend on, or write to, the cwd.
    monkeypatch.chdir(tmp_path)
