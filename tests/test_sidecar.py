"""Sidecar metadata (JSON/YAML from the beamline control system) joins the scan's metadata."""

from __future__ import annotations

import json

import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf


def test_sidecar_metadata_is_harvested_in_canonical_units_and_searchable(tmp_path):
    from tiled.client import from_uri
    from tiled.queries import Key

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, frame in enumerate(make_frames(3), start=1):
        write_cbf(raw / f"cold_{i:05d}.cbf", frame, i)
        write_cbf(raw / f"warm_{i:05d}.cbf", frame, i)
    (raw / "metadata.yaml").write_text("sample:\n  name: LaB6\n  temperature: {value: 20, units: K}\n")
    (raw / "warm.json").write_text(json.dumps({"sample": {"temperature": {"value": 25, "units": "C"}}}))
    (raw / "broken.yaml").write_text("a: [unclosed")  # not any scan's sidecar: ignored
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert sorted(report.created) == ["raw/cold", "raw/warm"], report.failed
        assert report.failed == []
        warm = client["raw/warm"].metadata["sample"]
        assert warm["name"] == "LaB6"  # from the directory-wide sidecar
        assert warm["temperature"] == pytest.approx(298.15) and warm["temperature@units"] == "K"
        assert client["raw/cold"].metadata["sample"]["temperature"] == 20.0
        assert list(client["raw"].search(Key("sample.temperature") > 200)) == ["warm"]


def test_malformed_sidecar_is_reported_and_the_scan_still_registers(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, frame in enumerate(make_frames(2), start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    (raw / "scan.json").write_text("{not json")
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert report.created == ["raw/scan"]
        assert any("scan.json" in why and "unreadable sidecar" in why for _, why in report.failed)
        assert any("scan.json" in p for p in client["raw/scan"].metadata["problems"])
