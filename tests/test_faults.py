"""Faults (issue #7, item 5): kill -9 of the server, and a full disk.

Every server here is a process of its own (the app from ``local_config``, run
by uvicorn on a free loopback port), so it can be killed with SIGKILL
mid-request and restarted on the same catalog and port. Each test fails if
the protection it checks is removed (section 8 of docs/security.md lists
them). A watcher killed mid-scan is tested in test_watch.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import API_KEY, SQLITE, Backend, start_server, write_cbf
from postgres import free_port

HEADERS = {"Authorization": f"Apikey {API_KEY}"}


def _serve(config: dict, port: int, log: str, fsize_limit: int, env: dict[str, str]) -> None:
    """Body of a server process: initialise the catalog if new, then run uvicorn.

    Runs in a child of a multiprocessing fork server that has already imported
    Tiled and scatterbroker (a cold start costs 5-10 s on a shared 2-core machine,
    and Tiled initialises a catalog in yet another Python process). The child
    is a process of its own: SIGKILL ends it mid-request like any server.
    """
    os.setsid()  # its own process group: a job's worker processes go with it
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    # Modules the fork server imported read their settings before these were set.
    from tiled.client import utils as client_utils

    client_utils.TILED_RETRY_ATTEMPTS = int(os.environ.get("TILED_RETRY_ATTEMPTS", "10"))
    client_utils.TILED_RETRY_TIMEOUT = float(os.environ.get("TILED_RETRY_TIMEOUT", "45"))
    if "scatterbroker.server.jobs" in sys.modules:  # job heartbeat settings
        import importlib

        importlib.reload(sys.modules["scatterbroker.server.jobs"])
    if fsize_limit:  # writes beyond this size fail with EFBIG instead of killing the process
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    import uvicorn
    from tiled.commandline._catalog import init

    from scatterbroker.server.app import build_app

    args = config["trees"][0]["args"]
    init(database=args["uri"], if_not_exists=True)  # what init_if_not_exists does, in-process
    config = {**config, "trees": [{**config["trees"][0], "args": {**args, "init_if_not_exists": False}}]}
    uvicorn.run(build_app(config), host="127.0.0.1", port=port, log_level="warning")


def _fork_server_context():
    """A multiprocessing context whose fork server has the server's modules imported."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["uvicorn", "tiled.config", "tiled.server.app", "tiled.catalog", "tiled.client",
                                "tiled.commandline._catalog", "scatterbroker.server.app", "httpx", "numpy"])
    return ctx


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


#: Job records: heartbeat every 0.3 s, dead after 2 s of silence (defaults: 2 s, 20 s).
SERVER_ENV = {"SCATTERBROKER_JOB_HEARTBEAT": "0.3", "SCATTERBROKER_JOB_STALE": "2"}


class ServerProcess:
    """One scatterbroker server in a process of its own, on a fixed loopback port."""

    def __init__(self, config: dict, port: int, log: Path, *, fsize_limit: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.config, self.port, self.log_path = config, port, log
        self.fsize_limit = fsize_limit
        self.env = {**SERVER_ENV, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: Any = None

    def start(self, timeout: float = 60.0) -> str:
        """Start the process and wait until the server answers; return its URL."""
        self.proc = _fork_server_context().Process(
            target=_serve, args=(self.config, self.port, str(self.log_path), self.fsize_limit, self.env),
            daemon=True,
        )
        self.proc.start()

        def answers() -> bool:
            if not self.proc.is_alive():
                raise AssertionError(f"server exited with {self.proc.exitcode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/api/v1/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout, "the server to answer", interval=0.05)
        return self.url

    def kill(self) -> None:
        """SIGKILL the server process (the fault), then anything it started."""
        if self.proc is None:
            return
        pid = self.proc.pid
        self.proc.kill()
        self.proc.join(30)
        try:
            os.killpg(pid, signal.SIGKILL)  # orphaned job worker processes, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory of ServerProcess objects; every one is killed at teardown."""
    made: list[ServerProcess] = []

    def make(config: dict, **kw: Any) -> ServerProcess:
        server = ServerProcess(config, free_port(), tmp_path / f"server-{len(made)}.log", **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


def children(url: str, path: str) -> dict[str, dict] | None:
    """``{key: metadata}`` of a container's children over plain HTTP, or None if absent."""
    r = httpx.get(f"{url}/api/v1/search/{path}", params={"page[limit]": 300}, headers=HEADERS, timeout=10)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return {item["id"]: item["attributes"]["metadata"] for item in r.json()["data"]}


# -- kill -9 during registration -----------------------------------------------

SCANS = {"a": 25, "b": 35, "c": 30, "d": 40, "e": 20, "f": 30}  # scan key -> frames (180 files)


def write_scans(directory: Path, seed: int = 0) -> None:
    """Numbered CBF series ``<key>_00001.cbf`` ..., small frames, distinct per scan."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for s, (key, n) in enumerate(SCANS.items()):
        frames = rng.poisson(3.0, (n, 24, 32)).astype("int32")
        frames[:, 0, 0] = s * 10_000 + np.arange(n)  # tells scans and frames apart
        for i, frame in enumerate(frames, start=1):
            write_cbf(directory / f"{key}_{i:05d}.cbf", frame, i)


def fabio_stack(directory: Path, key: str) -> np.ndarray:
    import fabio

    return np.stack([fabio.open(str(p)).data for p in sorted(directory.glob(f"{key}_*.cbf"))])


def check_scan(client: Any, node: str, directory: Path, key: str) -> None:
    """The scan node ``node`` holds exactly the CBF series ``key``: frames, headers, source."""
    scan = client[node]
    n = SCANS[key]
    assert scan.metadata["source"]["files"] == n, scan.metadata["source"]
    assert scan["frames"].shape == (n, 24, 32)
    np.testing.assert_array_equal(scan["frames"].read(), fabio_stack(directory, key))
    assert list(scan["headers"].read()["frame"]) == list(range(1, n + 1))


def test_kill_9_during_registration_leaves_a_consistent_catalog(tmp_path, servers, backend: Backend,
                                                                monkeypatch):
    """Promise: a scan node that has its ``source`` record is complete; one caught
    half-way has none, and the next ``register`` rebuilds it. So after kill -9 and
    restart, listing works, nothing readable is wrong, and a re-run completes the
    catalog with nothing duplicated (protection: the source record goes on last,
    catalog/register.py::register_sequence)."""
    from tiled.client import from_uri

    raw = tmp_path / "raw"
    write_scans(raw / "p1")
    config = backend.config(tmp_path / "db", [raw])
    server = servers(config)
    url = server.start()

    # Register (on a thread, as a client of the server) and kill the server once two
    # scans are done and a third is half-way.
    from tiled.client import utils as tiled_client_utils

    from scatterbroker.catalog.register import register

    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(register(from_uri(url, api_key=API_KEY), raw, prefix="raw"))
        except BaseException as err:  # noqa: BLE001 -- the point: it must fail
            outcome.append(err)

    with monkeypatch.context() as patch:
        patch.setattr(tiled_client_utils, "TILED_RETRY_ATTEMPTS", 1)  # give up at once when the server is gone
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # The third scan's node has just been created: its frames, headers and source
        # record are still to come (the condition does not rely on the source record).
        wait_for(lambda: len(children(url, "raw/p1") or {}) >= 3, 60, "the third scan node", interval=0.005)
        server.kill()
        thread.join(60)
    assert outcome, "registration still running 60 s after the server died"
    assert isinstance(outcome[0], Exception) or outcome[0].failed, f"registration did not notice: {outcome}"

    url = server.start()  # same catalog, same port
    client = from_uri(url, api_key=API_KEY)
    nodes = children(url, "raw/p1")
    half = [k for k, md in nodes.items() if "source" not in md]
    complete = [k for k, md in nodes.items() if "source" in md]
    assert set(nodes) <= set(SCANS) and len(nodes) >= 3
    for key in complete:  # a node with a source record is whole and right
        check_scan(client, f"raw/p1/{key}", raw / "p1", key)
    assert len(half) == 1, f"expected the scan being registered to be there half-made: {nodes}"
    for key in half:  # a half node: what of it can be read is right
        scan = client[f"raw/p1/{key}"]
        if "frames" in scan:
            np.testing.assert_array_equal(scan["frames"].read(), fabio_stack(raw / "p1", key))
        if "headers" in scan:
            try:
                rows = list(scan["headers"].read()["frame"])
            except httpx.HTTPStatusError:  # a table created, its rows not yet appended
                rows = []
            assert rows in ([], list(range(1, SCANS[key] + 1))), rows

    # Re-running registration completes the catalog: the half scan is rebuilt,
    # the complete ones are left alone, the rest are added; every scan once, whole and right.
    report = register(client, raw, prefix="raw")
    assert report.failed == [], report.failed
    assert report.unchanged == len(complete)
    assert report.updated == [f"raw/p1/{key}" for key in half]
    assert sorted(report.created) == sorted(f"raw/p1/{key}" for key in set(SCANS) - set(nodes))
    nodes = children(url, "raw/p1")
    assert sorted(nodes) == sorted(SCANS)
    for key in SCANS:
        check_scan(client, f"raw/p1/{key}", raw / "p1", key)
    assert sorted(children(url, "raw")) == ["p1"]


# -- kill -9 during a job ----------------------------------------------------------


def register_scan(url: str, root: Path, n: int = 40, shape: tuple[int, int] = (48, 48)) -> str:
    """Write and register one CBF scan ``raw/s1/scan1``; return its node URI."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    directory = root / "s1"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        write_cbf(directory / f"scan1_{i:05d}.cbf", rng.poisson(3.0, shape).astype("int32"), i)
    client = from_uri(url, api_key=API_KEY)
    assert not register(client, root, prefix="raw").failed
    return client["raw/s1/scan1"].uri


def submit(url: str, operation: str, uri: str, parameters: dict, output: str) -> str:
    """POST a job; return its id."""
    r = httpx.post(f"{url}/api/v1/jobs", json={"operation": operation, "inputs": [uri],
                                               "parameters": parameters, "output": output},
                   headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def record(url: str, job_id: str) -> dict:
    """The job record as stored (plain metadata: no staleness check, fast to poll)."""
    r = httpx.get(f"{url}/api/v1/metadata/jobs/{job_id}", headers=HEADERS, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["attributes"]["metadata"]["job"]


def metadata(url: str, path: str) -> dict | None:
    """A node's metadata over plain HTTP, or None if there is no such node."""
    r = httpx.get(f"{url}/api/v1/metadata/{path}", headers=HEADERS, timeout=10)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    return r.json()["data"]["attributes"]["metadata"]


def finished(url: str, job_id: str, timeout: float = 60) -> dict:
    """Poll GET /api/v1/jobs/{id} (which applies the staleness check) until the job ends."""
    def ended() -> dict | None:
        rec = httpx.get(f"{url}/api/v1/jobs/{job_id}", headers=HEADERS, timeout=30).json()
        return rec if rec["state"] in ("done", "failed") else None

    return wait_for(ended, timeout, f"job {job_id} to end", interval=0.2)


def transform_parameters() -> dict:
    """A transform onto an 81^3 grid (4 MB arrays): about a second computing, one writing."""
    from scatterbroker.reduction.geometry import UB, Geometry, Grid

    geometry = Geometry(wavelength=0.7293, distance=100.0, beam_center=(24.0, 24.0), pixel_size=(0.172, 0.172))
    grid = Grid.from_ranges(H=(-1, 1), K=(-1, 1), L=(-1, 1), step=0.025)
    return {"geometry": geometry.to_dict(), "ub": UB.from_lattice(4.0, 4.0, 4.0, 90, 90, 90).to_dict(),
            "grid": grid.to_dict()}


@pytest.mark.parametrize("phase", ["computing", "writing"])
def test_kill_9_during_a_job_marks_it_failed_and_leaves_no_product(tmp_path, servers, phase: str):
    """Promise: a job whose server died is reported -- and recorded -- failed once
    its heartbeat is stale (scatterbroker/server/jobs.py::status), never running forever; its
    product is never marked complete, a half-written one is visibly
    ``complete: False`` until then and removed when the job is found interrupted
    (``partial_product`` on the record). A new job then runs normally."""
    from tiled.client import from_uri

    raw = tmp_path / "raw"
    raw.mkdir()
    server = servers(SQLITE.config(tmp_path / "db", [raw]))
    url = server.start()
    uri = register_scan(url, raw)
    # The kill is aimed at the phase, but lands a few milliseconds after it is seen:
    # what it hit is judged from the catalog after the restart, and every outcome
    # must be consistent. Another job is tried if it missed (the job had finished).
    hits = []
    for attempt in range(3):
        product = f"reduced/kill/{phase}-{attempt}"
        job_id = submit(url, "transform", uri, transform_parameters(), product)
        if phase == "computing":  # running, before the product exists
            wait_for(lambda u=url, j=job_id: record(u, j)["state"] == "running", 60, "the job to run",
                     interval=0.005)
        else:  # the product node exists: its arrays are being written
            wait_for(lambda u=url, p=product: metadata(u, p) is not None, 60, "the product node",
                     interval=0.005)
        server.kill()
        url = server.start()

        left = metadata(url, product)  # what a reader sees before anyone asks about the job
        hit = "computing" if left is None else "writing" if left["complete"] is False else "finished"
        hits.append(hit)
        rec = finished(url, job_id, timeout=30)
        if hit == "finished":  # complete before the kill: reported done, with every array
            assert rec["state"] == "done" and rec["product"].endswith(product), rec
            arrays = from_uri(url, api_key=API_KEY)[product]
            assert sorted(arrays) == ["H", "K", "L", "data", "weights"], f"'complete' product lacks arrays: {list(arrays)}"
            assert arrays["weights"].read().shape == (81, 81, 81)
            continue
        assert left is None or left["provenance"]["job"] == job_id, left
        assert rec["state"] == "failed", rec
        assert rec["error"].startswith("interrupted: the process running it stopped"), rec["error"]
        assert record(url, job_id)["state"] == "failed"  # recorded, not only shown
        assert metadata(url, product) is None, "the interrupted job's product is still there"
        assert not record(url, job_id).get("partial_product")
        if hit == "writing":
            assert f"incomplete product {product} was removed" in rec["error"], rec["error"]
        if hit == phase:
            break
    else:
        pytest.fail(f"the kill never landed while the job was {phase}: {hits}")
    assert not [p for p, md in (children(url, "reduced/kill") or {}).items() if not md.get("complete")]

    # The server works normally: a new job writes its product to the same place.
    again = submit(url, "project", uri, {"kind": "sum"}, product)
    rec = finished(url, again)
    assert rec["state"] == "done", f"{rec.get('error')!r}; record: {rec}"
    assert metadata(url, product)["complete"] is True


def test_storage_left_by_a_crash_does_not_block_its_path(tmp_path):
    """Promise: what a server killed mid-write leaves in its writable storage (Tiled
    creates a new array's Zarr directory before it commits the node) does not make
    that path unwritable: creating the node again succeeds, and the orphan is kept
    aside, not deleted. (The kill test above met this by chance, about one run in
    ten: its re-run job answered 500 "An array exists in store".)"""
    import zarr
    from tiled.client import from_uri

    data = tmp_path / "db"
    with start_server(data, []) as url:
        client = from_uri(url, api_key=API_KEY)
        parent = client.create_container("reduced").create_container("p")
        # the storage of reduced/p/data as a killed server leaves it: written, never committed
        orphan = data / "files" / "reduced" / "p" / "data"
        zarr.create_array(str(orphan), shape=(3,), dtype="f8")[:] = 7.0
        node = parent.write_array(np.arange(4.0), key="data")
        np.testing.assert_array_equal(node.read(), np.arange(4.0))
        np.testing.assert_array_equal(client["reduced/p/data"].read(), np.arange(4.0))
        kept = list((data / "files" / "reduced" / "p").glob("data.orphaned-*"))
        assert len(kept) == 1, kept
        np.testing.assert_array_equal(zarr.open_array(str(kept[0]), mode="r")[:], [7.0, 7.0, 7.0])
        # a node that does exist is still a collision, and its storage is left alone
        with pytest.raises(Exception, match="409|[Cc]ollision|exists"):
            parent.write_array(np.zeros(2), key="data")
        assert len(list((data / "files" / "reduced" / "p").glob("data.orphaned-*"))) == 1
        np.testing.assert_array_equal(client["reduced/p/data"].read(), np.arange(4.0))


# -- disk full while writing a product ------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs CAP_SYS_ADMIN, e.g. root in a container that allows mounts)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        why = f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})"
        pytest.skip(f"{why}; the RLIMIT_FSIZE variant of this test covers a full disk")
    try:
        yield mount
    finally:  # lazily: the server using it may be killed only after this (fixture order)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit"])
def test_full_disk_while_writing_a_product(tmp_path, servers, request, limit: str):
    """Promise: a product that cannot be written (ENOSPC on a full file system, or
    EFBIG beyond the process's file-size limit) fails its job with a message
    naming the array, the product and the cause; nothing is left registered (not
    even an incomplete node), and the server keeps serving and running jobs."""
    raw = tmp_path / "raw"
    raw.mkdir()
    config = SQLITE.config(tmp_path / "db", [raw])
    fsize_limit = 0
    if limit == "tmpfs":  # products go to a 1 MB file system; the catalog stays on the big one
        files = request.getfixturevalue("tiny_tmpfs")
        storage = config["trees"][0]["args"]["writable_storage"]
        storage[0] = str(files)
        config["trees"][0]["args"]["readable_storage"].append(str(files))
        cause, errno_text = "no space left on device", "[Errno 28] No space left on device"
    else:  # every file the server writes may grow to 2 MB
        fsize_limit = 2_000_000
        cause, errno_text = "file too large", "[Errno 27] File too large"
    # Two tries per request, not ten: the Tiled client retries a 500 for up to 45 s by
    # default. (Not one: after a failed upload the server resets the connection, and
    # the next request on it needs its retry, as it gets by default.)
    server = servers(config, fsize_limit=fsize_limit, env={"TILED_RETRY_ATTEMPTS": "2"})
    url = server.start()
    uri = register_scan(url, raw, n=4, shape=(24, 32))

    big = {"kind": "radial", "center": [16, 12], "bins": 500_000}  # three 4 MB arrays
    job_id = submit(url, "project", uri, big, "reduced/full/radial")
    rec = finished(url, job_id)
    assert rec["state"] == "failed", rec
    assert "ProductWriteError: writing array 'r' (4.0 MB) of the product reduced/full/radial failed" in rec["error"]
    assert cause in rec["error"], rec["error"]
    assert "server answered 507 Insufficient Storage: the server's writable storage is full" in rec["error"]
    assert errno_text in server.log()  # the server really hit the fault (traceback in its log)
    assert metadata(url, "reduced/full/radial") is None, "a product that could not be written is registered"
    assert not rec.get("partial_product")

    # The server still serves the data and runs a job whose product fits.
    from tiled.client import from_uri

    client = from_uri(url, api_key=API_KEY)
    assert client["raw/s1/scan1/frames"].read().shape == (4, 24, 32)
    small = submit(url, "project", uri, {"kind": "sum"}, "reduced/full/sum")
    rec = finished(url, small)
    assert rec["state"] == "done", rec
    assert client["reduced/full/sum/data"].shape == (24, 32) and metadata(url, "reduced/full/sum")["complete"]
