"""Reduction jobs against a real server: products written back, provenance, failures, restarts."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf


@pytest.fixture
def scan(tmp_path):
    """A served 10-frame CBF scan; yields (client, scan URI, frames, base URL)."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw" / "s1"
    raw.mkdir(parents=True)
    frames = make_frames(10)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan1_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "db", [tmp_path / "raw"]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, tmp_path / "raw", prefix="raw")
        yield client, client["raw/s1/scan1"].uri, frames, url


def transform_parameters(grid_step=0.25, ub_scale=1.0):
    from scatterbroker.reduction.geometry import Geometry, Grid, UB

    geometry = Geometry(wavelength=0.7293, distance=100.0, beam_center=(16.0, 12.0),
                        pixel_size=(0.172, 0.172))
    ub = UB.from_lattice(4.0 * ub_scale, 4.0, 4.0, 90, 90, 90)
    grid = Grid.from_ranges(H=(-1, 1), K=(-1, 1), L=(-1, 1), step=grid_step)
    return {"geometry": geometry.to_dict(), "ub": ub.to_dict(), "grid": grid.to_dict()}


def test_projection_job_writes_a_product_with_provenance(scan):
    from tiled.client import from_uri

    from scatterbroker.server import jobs

    client, uri, frames, _ = scan
    job = jobs.submit(client, "project", [uri], {"kind": "sum", "axis": 0, "slab": "2:8"})
    product_uri = jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1))
    assert product_uri.endswith("/api/v1/metadata/reduced/s1/scan1/project")
    product = from_uri(product_uri, api_key=API_KEY)
    expected = frames[2:8].astype(np.float64).sum(axis=0)  # by hand, independently
    assert np.array_equal(product["data"].read(), expected)
    md = product.metadata
    assert md["complete"] is True
    assert md["provenance"]["inputs"] == [uri] and md["provenance"]["parameters"]["slab"] == "2:8"
    assert md["provenance"]["job"] == job.item["id"] and "tiled" in md["provenance"]["software"]
    assert jobs.status(client["jobs"][job.item["id"]])["state"] == "done"


def test_roi_statistics_and_radial_profile(scan):
    from tiled.client import from_uri

    from scatterbroker.server import jobs

    client, uri, frames, _ = scan
    job = jobs.submit(client, "project", [uri], {"kind": "roi", "slab": ":,3:9,4:12"}, output="reduced/s1/roi")
    product = from_uri(jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1)), api_key=API_KEY)
    roi = frames[:, 3:9, 4:12].reshape(10, -1)
    assert np.array_equal(product["sum"].read(), roi.sum(1))
    assert np.array_equal(product["max"].read(), roi.max(1))


def _http_job(url: str, body: dict) -> dict:
    """POST a job to the server and poll it until it ends (120 s at most); its record."""
    h = {"Authorization": f"Apikey {API_KEY}"}
    r = httpx.post(f"{url}/api/v1/jobs", json=body, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while True:
        record = httpx.get(f"{url}/api/v1/jobs/{r.json()['id']}", headers=h).json()
        if record["state"] in ("done", "failed") or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def test_transform_job_over_http_opens_from_another_process(scan):
    from scatterbroker.reduction.transform import transform

    client, uri, frames, url = scan
    params = {**transform_parameters(), "frames_per_task": 3}
    record = _http_job(url, {"operation": "transform", "inputs": [uri], "parameters": params})
    assert record["state"] == "done", record
    code = (
        "import sys, numpy as np; from tiled.client import from_uri; "
        f"p = from_uri(sys.argv[1], api_key='{API_KEY}'); d = p['data'][:]; "
        "np.save(sys.stdout.buffer, np.stack([d, p['weights'][:]]))"
    )
    out = subprocess.run([sys.executable, "-c", code, record["product"]], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    import io

    data, weights = np.load(io.BytesIO(out.stdout))
    from scatterbroker.reduction.geometry import TransformParams

    direct = transform(frames, *TransformParams.from_dict(transform_parameters()).__dict__.values())
    np.testing.assert_array_equal(weights, direct.n)  # any split of the frames gives the same grid
    np.testing.assert_allclose(data, direct.data, rtol=1e-12, equal_nan=True)
    assert weights.sum() > 0


def test_http_job_reads_this_servers_frames_without_http(scan, monkeypatch):
    """A job POSTed to the server reads the frames of an input the server holds
    straight from its adapter (found with the submitter's key); an input named by
    another host is refused, unless it is an allowed peer: then it is read over HTTP.
    Both give the sum numpy gives."""
    from scatterbroker.server import job_inputs

    client, uri, frames, url = scan
    reads: list[bool] = []
    original = job_inputs.ServerFrames.__getitem__

    def counted(self, key):
        reads.append(self._entry is not None)
        return original(self, key)

    monkeypatch.setattr(job_inputs.ServerFrames, "__getitem__", counted)
    expected = frames.astype(np.float64).sum(axis=0)  # by hand, independently
    body = {"operation": "project", "parameters": {"kind": "sum", "axis": 0}}
    record = _http_job(url, {**body, "inputs": [uri], "output": "reduced/s1/inside"})
    assert record["state"] == "done", record
    assert reads and all(reads), "the job did not read its frames inside the server"
    np.testing.assert_array_equal(client["reduced/s1/inside/data"].read(), expected)

    reads.clear()
    elsewhere = uri.replace("127.0.0.1", "localhost")  # the same data, but not this server's URI
    r = httpx.post(f"{url}/api/v1/jobs", json={**body, "inputs": [elsewhere]},
                   headers={"Authorization": f"Apikey {API_KEY}"})
    assert r.status_code == 422 and "SCATTERBROKER_PEER_SERVERS" in r.json()["detail"], r.text
    # ... unless the operator lists it as a peer server: then it is read there, over HTTP
    monkeypatch.setattr(job_inputs, "PEER_SERVERS", (url.replace("127.0.0.1", "localhost"),))
    record = _http_job(url, {**body, "inputs": [elsewhere], "output": "reduced/s1/over-http"})
    assert record["state"] == "done", record
    assert reads == []
    np.testing.assert_array_equal(client["reduced/s1/over-http/data"].read(), expected)


def test_transform_job_takes_the_ub_from_the_scans_nexus_sample(tmp_path, monkeypatch):
    """No 'ub' in the parameters: the job reads it from the NXsample of the input's NeXus entry
    (orientation_matrix = U, times B of unit_cell), over HTTP -- or, for a job POSTed to the
    server holding the scan, inside the server -- and records where it came from."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.server import jobs
    from scatterbroker.reduction.geometry import TransformParams, UB, rotation_matrix
    from scatterbroker.reduction.stack import write_scan
    from scatterbroker.reduction.transform import transform

    scans = tmp_path / "scans"
    scans.mkdir()
    frames = make_frames(6)
    u = rotation_matrix([1.0, 0.3, 0.2], 17.0)
    cell = [4.0, 4.5, 5.0, 90.0, 95.0, 90.0]
    write_scan(scans / "s2.nxs", frames, angles=0.1 * np.arange(6),
               metadata={"sample": {"name": "x", "orientation_matrix": u, "unit_cell": np.array(cell)}})
    params = transform_parameters()
    del params["ub"]
    with start_server(tmp_path / "db", [scans]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, scans, prefix="scans")
        data_uri = client["scans/s2/entry/instrument/detector/data"].uri
        job = jobs.submit(client, "transform", [data_uri], params, output="reduced/s2/transform")
        product = from_uri(jobs.run(client, job, API_KEY), api_key=API_KEY)
        assert product.metadata["ub_source"] == client["scans/s2/entry/sample"].uri
        direct = transform(frames, TransformParams.from_dict(transform_parameters()).geometry,
                           UB.from_lattice(*cell, U=u), params["grid"])
        np.testing.assert_array_equal(product["weights"].read(), direct.n)
        np.testing.assert_allclose(product["data"].read(), direct.data, rtol=1e-12, equal_nan=True)
        assert direct.n.sum() > 0
        np.testing.assert_allclose(product.metadata["ub"], UB.from_lattice(*cell, U=u).array, rtol=1e-12)

        # the same job POSTed to the server: the sample is found and read in the server
        seen: list = []
        scan_ub = jobs.scan_ub

        def spied(node, uri):
            seen.append(getattr(node, "nexus_sample", None))
            return scan_ub(node, uri)

        monkeypatch.setattr(jobs, "scan_ub", spied)
        record = _http_job(url, {"operation": "transform", "inputs": [data_uri], "parameters": params,
                                 "output": "reduced/s2/posted"})
        assert record["state"] == "done", record
        assert len(seen) == 1 and seen[0] is not None, "the UB was not read in the server"
        assert set(seen[0][0]) == {"orientation_matrix", "unit_cell"}
        posted = client["reduced/s2/posted"]
        assert posted.metadata["ub_source"] == client["scans/s2/entry/sample"].uri
        np.testing.assert_allclose(posted.metadata["ub"], UB.from_lattice(*cell, U=u).array, rtol=1e-12)
        np.testing.assert_array_equal(posted["weights"].read(), direct.n)

        # a file without an NXsample: the job fails, saying what is missing
        write_scan(scans / "bare.nxs", frames)
        register(client, scans, prefix="scans")
        bare = client["scans/bare/entry/instrument/detector/data"].uri
        job = jobs.submit(client, "transform", [bare], params)
        with pytest.raises(jobs.JobError):
            jobs.run(client, job, API_KEY)
        assert "no 'ub'" in jobs.status(client["jobs"][job.item["id"]])["error"]


def test_bad_jobs_fail_clearly_and_leave_no_product(scan):
    from scatterbroker.server import jobs

    client, uri, _, url = scan
    h = {"Authorization": f"Apikey {API_KEY}"}
    r = httpx.post(f"{url}/api/v1/jobs", json={"operation": "nonsense", "inputs": [uri]}, headers=h)
    assert r.status_code == 422 and "unknown operation" in r.json()["detail"]
    for unknown in ("000000000000", "a.b", "%2E%2E"):  # no such job; not a job id
        r = httpx.get(f"{url}/api/v1/jobs/{unknown}", headers=h)
        assert r.status_code == 404 and "no job" in r.json()["detail"], (unknown, r.text)
    singular = transform_parameters()
    singular["ub"] = {"matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 0]]}
    job = jobs.submit(client, "transform", [uri], singular)
    with pytest.raises(Exception):
        jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1))
    record = jobs.status(client["jobs"][job.item["id"]])
    assert record["state"] == "failed" and "singular" in record["error"].lower()
    headers_uri = client["raw/s1/scan1/headers"].uri
    job = jobs.submit(client, "project", [headers_uri], {"kind": "sum"})
    with pytest.raises(jobs.JobError):
        jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1))
    assert "not a frame stack" in jobs.status(client["jobs"][job.item["id"]])["error"]
    assert "reduced" not in client or "scan1" not in client["reduced/s1"]


def test_jobs_need_write_scope(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with start_server(tmp_path / "db", [raw], public=True) as url:
        r = httpx.post(f"{url}/api/v1/jobs", json={"operation": "project", "inputs": [f"{url}/api/v1/metadata/x"]})
        assert r.status_code in (401, 403)


def test_interrupted_job_is_reported_failed_not_running(scan, monkeypatch):
    from scatterbroker.server import jobs

    client, uri, _, _ = scan
    job = jobs.submit(client, "project", [uri], {"kind": "sum"})
    jobs._update(job, state="running", heartbeat="2000-01-01T00:00:00+00:00")  # its process died long ago
    record = jobs.status(client["jobs"][job.item["id"]])
    assert record["state"] == "failed" and "interrupted" in record["error"]
    assert client["jobs"][job.item["id"]].metadata["job"]["state"] == "failed"  # recorded, not just shown


def test_job_the_server_never_started_is_reported_failed_not_queued(scan):
    from scatterbroker.server import jobs

    client, uri, _, _ = scan
    later = jobs.submit(client, "project", [uri], {"kind": "sum"})  # to be run later by its submitter
    jobs._update(later, submitted="2000-01-01T00:00:00+00:00")
    assert jobs.status(client["jobs"][later.item["id"]])["state"] == "queued"
    job = jobs.submit(client, "project", [uri], {"kind": "sum"}, starting=True)
    assert jobs.status(client["jobs"][job.item["id"]])["state"] == "queued"  # its heartbeat is fresh
    jobs._update(job, heartbeat="2000-01-01T00:00:00+00:00")  # the server died before its thread ran
    record = jobs.status(client["jobs"][job.item["id"]])
    assert record["state"] == "failed" and "before it started" in record["error"]
    assert client["jobs"][job.item["id"]].metadata["job"]["state"] == "failed"


def test_dask_executor_gives_the_same_grid(scan):
    distributed = pytest.importorskip("distributed")
    from scatterbroker.server import jobs

    client, uri, _, _ = scan
    params = {**transform_parameters(), "frames_per_task": 4}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as dask_client:
        job = jobs.submit(client, "transform", [uri], params, output="reduced/s1/dask")
        dask_uri = jobs.run(client, job, API_KEY, executor=jobs.DaskExecutor(dask_client))
    job = jobs.submit(client, "transform", [uri], {**params, "frames_per_task": 10}, output="reduced/s1/local")
    local_uri = jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1))
    from tiled.client import from_uri

    a, b = from_uri(dask_uri, api_key=API_KEY), from_uri(local_uri, api_key=API_KEY)
    np.testing.assert_array_equal(a["weights"].read(), b["weights"].read())
    np.testing.assert_array_equal(a["data"].read(), b["data"].read())


def test_transform_and_jobs_commands(scan, tmp_path):
    import json
    import os

    client, uri, _, url = scan
    (tmp_path / "params.json").write_text(json.dumps(transform_parameters(grid_step=0.5)))
    env = {**os.environ, "SCATTERBROKER_API_KEY": API_KEY}
    out = subprocess.run([sys.executable, "-m", "scatterbroker", "transform", uri, "--params",
                          f"@{tmp_path / 'params.json'}", "--output", "reduced/s1/cli"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    assert f"{url}/api/v1/metadata/reduced/s1/cli" in out.stdout
    assert client["reduced/s1/cli/data"].shape == (5, 5, 5)
    out = subprocess.run([sys.executable, "-m", "scatterbroker", "jobs", "ls", url],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "transform" in out.stdout and "done" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "scatterbroker", "transform", uri, "--params", "{not json"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode != 0 and "valid JSON" in bad.stderr


def test_job_history_survives_a_server_restart(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.server import jobs

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = make_frames(4)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, raw, prefix="raw")
        job = jobs.submit(client, "project", [client["raw/scan"].uri], {"kind": "mean"})
        jobs.run(client, job, API_KEY, executor=jobs.LocalExecutor(1))
        stuck = jobs.submit(client, "project", [client["raw/scan"].uri], {"kind": "sum"})
        jobs._update(stuck, state="running", heartbeat="2000-01-01T00:00:00+00:00")  # died mid-run
    with start_server(tmp_path / "db", [raw]) as url:  # same catalog database, new process state
        client = from_uri(url, api_key=API_KEY)
        states = {rec["id"]: rec["state"] for rec in jobs.list_jobs(client)}
        assert states == {job.item["id"]: "done", stuck.item["id"]: "failed"}
        product = client["reduced/scan/project/data"].read()
        assert np.allclose(product, frames.mean(axis=0))
