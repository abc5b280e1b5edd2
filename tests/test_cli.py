"""The ``scatterbroker`` console script, run as a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import API_KEY, make_frames, start_server, write_cbf

EXE = [sys.executable, "-m", "scatterbroker"]


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EXE, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "scatterbroker"]
    assert ep.value == "scatterbroker.cli:main"


def test_info_lists_adapter_plugins():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "image/x-cbf" in out.stdout and "multipart/related;type=image/x-cbf" in out.stdout


def test_register_and_ls(tmp_path, backend):
    raw = tmp_path / "raw" / "sample"
    raw.mkdir(parents=True)
    for i, frame in enumerate(make_frames(3), start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    (raw / "truncated.cbf").write_bytes((raw / "scan_00001.cbf").read_bytes()[:500])
    with start_server(tmp_path / "db", [tmp_path / "raw"], backend=backend) as url:
        out = run("register", url, str(tmp_path / "raw"), "--prefix", "raw/p42",
                  env={"SCATTERBROKER_API_KEY": API_KEY})
        assert out.returncode == 0, out.stderr
        assert "1 nodes created" in out.stderr and "truncated.cbf" in out.stderr
        out = run("ls", url, "raw/p42/sample", "--api-key", API_KEY)
        assert out.returncode == 0, out.stderr
        assert "scan" in out.stdout and f"{url}/api/v1/metadata/raw/p42/sample/scan" in out.stdout
        out = run("ls", url, "raw/p42/sample/scan", "--api-key", API_KEY)
        assert "(3, 24, 32) int32" in out.stdout


def test_errors_are_one_line(tmp_path, backend):
    out = run("ls", "http://127.0.0.1:9", "--api-key", "x")  # nothing listens on port 9
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "cannot connect" in out.stderr and "Traceback" not in out.stderr
    with start_server(tmp_path / "db", [tmp_path], backend=backend) as url:
        out = run("ls", url, env={"SCATTERBROKER_API_KEY": ""})
        assert out.returncode == 1 and "API key" in out.stderr and "Traceback" not in out.stderr
        out = run("ls", url, "no/such/node", "--api-key", API_KEY)
        assert out.returncode == 1 and "no/such/node" in out.stderr and "Traceback" not in out.stderr


def test_serve_demo_then_slice_with_python_and_curl(tmp_path):
    """The README's first command, end to end: serve --demo, then read a frame."""
    from tiled.client import from_uri

    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [*EXE, "serve", "--demo", "--port", "0"], stdout=f, stderr=subprocess.STDOUT,
            env={**os.environ, "SCATTERBROKER_DATA": str(tmp_path / "data")}, cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ready." not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        url = re.search(r"serving (http://\S+)", text).group(1)
        key = re.search(r"API key: (\w+)", text).group(1)
        # Demo profile: anonymous read on loopback ...
        client = from_uri(url)
        frames = client["raw/demo-2026/sample1/scan1/frames"]
        assert frames.shape == (30, 195, 487)
        from scatterbroker.server.demo import demo_frames

        assert np.array_equal(frames[7], demo_frames(seed=0)[7])
        r = httpx.get(f"{url}/api/v1/array/full/raw/demo-2026/sample1/scan1/frames",
                      params={"slice": "7,0:3,0:4"}, headers={"Accept": "application/json"})
        assert r.status_code == 200 and np.array_equal(r.json(), demo_frames(seed=0)[7, :3, :4])
        # ... but writing needs the key.
        r = httpx.post(f"{url}/api/v1/metadata/", json={})
        assert r.status_code in (401, 403)
        from_uri(url, api_key=key).create_container("notes")
        assert "notes" in from_uri(url)
    finally:
        proc.terminate()
        proc.wait(30)
    # A restart registers nothing new: the catalog persists in SCATTERBROKER_DATA.
    assert (tmp_path / "data" / "catalog.db").exists()


def test_anonymous_profiles_refuse_to_bind_beyond_loopback(tmp_path):

    demo_yml = Path(__file__).resolve().parent.parent / "server_config" / "demo.yml"
    env = {"SCATTERBROKER_DATA": str(tmp_path)}
    out = run("serve", "--demo", "--host", "0.0.0.0", env=env)
    assert out.returncode == 2 and "loopback" in out.stderr
    out = run("serve", "--config", str(demo_yml), "--host", "0.0.0.0", env=env)
    assert out.returncode == 2 and "loopback" in out.stderr
