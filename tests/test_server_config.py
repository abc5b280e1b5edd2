"""The shipped YAML configs build a working server (SQLite here; PostgreSQL in test_postgres)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
from conftest import API_KEY, make_frames, write_cbf

CONFIGS = Path(__file__).resolve().parent.parent / "server_config"


def test_demo_yml_serves_anonymous_reads_and_keyed_writes(tmp_path, monkeypatch):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.server.app import build_app, serve_in_thread

    raw = tmp_path / "demo" / "raw"
    raw.mkdir(parents=True)
    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    (tmp_path / "files").mkdir()
    monkeypatch.setenv("SCATTERBROKER_DATA", str(tmp_path))
    monkeypatch.setenv("SCATTERBROKER_API_KEY", API_KEY)
    with serve_in_thread(build_app(CONFIGS / "demo.yml")) as url:
        register(from_uri(url, api_key=API_KEY), raw, prefix="raw")
        assert np.array_equal(from_uri(url)["raw/scan/frames"][1], frames[1])
        assert httpx.post(f"{url}/api/v1/metadata/", json={}).status_code in (401, 403)


# facility.yml (multi-user, per-proposal keys) runs in its own process: tests/test_keys.py
