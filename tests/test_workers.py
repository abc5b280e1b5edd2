"""Several server processes on one catalog (operator guide §7): uvicorn's
``--workers`` with ``scatterbroker.server.app:app_factory``, PostgreSQL for the
catalog and the tables. Every request, whichever worker takes it, sees the same
catalog; jobs started by one worker are reported by all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import yaml
from conftest import API_KEY, Backend, make_frames, write_cbf
from postgres import free_port

HEADERS = {"Authorization": f"Apikey {API_KEY}"}


def _workers(pid: int) -> list[int]:
    """uvicorn's worker processes (its other child is multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return []
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:  # whole, unlike ps's 80 columns
                if b"spawn_main" in f.read():
                    workers.append(child)
        except OSError:
            pass
    return workers


def test_two_workers_share_one_postgresql_catalog(tmp_path: Path, postgres) -> None:
    raw = tmp_path / "raw" / "s1"
    raw.mkdir(parents=True)
    frames = make_frames(6)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan1_{i:05d}.cbf", frame, i)
    config = Backend("postgresql", postgres).config(tmp_path / "db", [tmp_path / "raw"])
    config_file = tmp_path / "config.yml"
    config_file.write_text(yaml.safe_dump(config))
    # Several workers must not all initialize an empty database at once (they race to
    # create the same PostgreSQL extension and one dies): initialize it first, as the
    # operator guide says.
    tiled = Path(sys.executable).with_name("tiled")
    init = subprocess.run([str(tiled), "catalog", "init", config["trees"][0]["args"]["uri"]],
                          capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "scatterbroker.server.app:app_factory",
         "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "SCATTERBROKER_CONFIG": str(config_file)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                if httpx.get(f"{url}/api/v1/", timeout=2).status_code == 200 and len(_workers(proc.pid)) == 2:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)

        from tiled.client import from_uri

        from scatterbroker.catalog.register import register

        report = register(from_uri(url, api_key=API_KEY), tmp_path / "raw", prefix="raw")
        assert not report.failed, report.failed

        def read(i: int) -> tuple[int, np.ndarray, np.ndarray]:
            # a new connection per request, so the kernel hands them to both workers
            with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as http:
                fast = http.get("/api/v1/sb/frames/raw/s1/scan1/frames", params={"slice": f"{i % 6}"})
                tiled = http.get("/api/v1/array/full/raw/s1/scan1/frames",
                                 params={"slice": f"{i % 6}"}, headers={"Accept": "application/octet-stream"})
            assert fast.status_code == 200, fast.text
            assert tiled.status_code == 200, tiled.text
            return i % 6, np.frombuffer(fast.content, "<i4"), np.frombuffer(tiled.content, "<i4")

        cpu_before = {pid: _cpu(pid) for pid in _workers(proc.pid)}
        with ThreadPoolExecutor(8) as pool:
            for i, fast, tiled in pool.map(read, range(48)):
                np.testing.assert_array_equal(fast.reshape(frames[i].shape), frames[i])
                np.testing.assert_array_equal(tiled.reshape(frames[i].shape), frames[i])
        busy = [pid for pid, before in cpu_before.items() if _cpu(pid) > before]
        assert len(busy) == 2, "one worker served every request"

        # a job started by whichever worker takes the POST is reported by every worker
        body = {"operation": "project", "inputs": [f"{url}/api/v1/metadata/raw/s1/scan1"],
                "parameters": {"kind": "sum", "axis": 0}, "output": "reduced/s1/sum"}
        r = httpx.post(f"{url}/api/v1/jobs", json=body, headers=HEADERS, timeout=30)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while True:
            with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as http:
                record = http.get(f"/api/v1/jobs/{job_id}").json()
            if record["state"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert record["state"] == "done", record
        product = from_uri(url, api_key=API_KEY)["reduced/s1/sum/data"].read()
        np.testing.assert_array_equal(product, frames.astype(np.float64).sum(axis=0))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cpu(pid: int) -> int:
    """Clock ticks of CPU a process has used so far (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
