"""Registration and serving of CBF/TIFF frames through a real server on loopback."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import API_KEY, N_FRAMES, make_frames, start_server, write_cbf

SCAN = "raw/p1/s1/scan1"


def test_registration_reports_bad_files_and_registers_the_rest(served):
    _, reports, _ = served
    raw = reports["raw"]
    failed = dict(raw.failed)
    assert any("broken.cbf" in p and "truncated CBF" in why for p, why in failed.items())
    assert any("empty.tif" in p for p in failed), failed
    assert any("notes.xyz" in p and "no installed adapter" in why for p, why in failed.items())
    assert set(raw.created) >= {"raw/p1/s1/scan1", "raw/p1/s2/img", "raw/p1/s2/stack"}


def test_scan_node_layout_and_harvested_metadata(client):
    scan = client[SCAN]
    assert [s.name for s in scan.specs] == ["scan"]
    assert set(scan) == {"frames", "headers"}
    md = scan.metadata
    det = md["instrument"]["detector"]
    assert det["distance"] == pytest.approx(500.0) and det["distance@units"] == "mm"
    assert det["x_pixel_size"] == pytest.approx(0.172) and det["x_pixel_size@units"] == "mm"
    assert (det["beam_center_x"], det["beam_center_y"]) == (700.0, 800.0)
    assert det["count_time"] == pytest.approx(0.1)
    assert md["instrument"]["monochromator"]["wavelength"] == pytest.approx(0.7293)
    assert md["scan"]["frames"] == N_FRAMES
    assert md["scan"]["start_angle"] == pytest.approx(10.1)
    assert md["start_time"] == "2026-11-25T08:00:01.000"


def test_frame_sequence_is_one_array_with_one_frame_per_chunk(client, served):
    frames = client[f"{SCAN}/frames"]
    assert frames.shape == (N_FRAMES, 24, 32)
    assert frames.dtype == np.int32
    assert frames.chunks[0] == (1,) * N_FRAMES


@pytest.mark.parametrize(
    "key",
    [
        np.s_[3],
        np.s_[2:5],
        np.s_[::-2, 4:9, -3:],
        np.s_[-1, 5, :],
        np.s_[1:11:3, 5:6, 7:8],
        np.s_[...],
    ],
)
def test_sequence_slices_equal_fabio(client, tree, key):
    import fabio

    root, arrays = tree
    files = [root / "raw/p1/s1" / f"scan1_{i:05d}.cbf" for i in range(1, N_FRAMES + 1)]
    direct = np.stack([fabio.open(str(f)).data for f in files])
    assert np.array_equal(direct, arrays["cbf"])  # the files hold what we wrote
    got = client[f"{SCAN}/frames"][key]
    assert got.dtype == np.int32
    assert np.array_equal(got, direct[key])


def test_headers_table_has_one_row_per_frame(client):
    table = client[f"{SCAN}/headers"].read()
    assert list(table["frame"]) == list(range(1, N_FRAMES + 1))
    np.testing.assert_allclose(table["start_angle"], 10 + 0.1 * np.arange(1, N_FRAMES + 1))
    assert table["file"].iloc[0] == "scan1_00001.cbf"


def test_raw_http_full_and_block(http, served):
    _, _, arrays = served
    r = http.get(f"/api/v1/array/full/{SCAN}/frames", params={"slice": "4,2:6,1:9"},
                 headers={"Accept": "application/octet-stream"})
    assert r.status_code == 200, r.text
    got = np.frombuffer(r.content, dtype="<i4").reshape(4, 8)
    assert np.array_equal(got, arrays["cbf"][4, 2:6, 1:9])
    r = http.get(f"/api/v1/array/block/{SCAN}/frames", params={"block": "7,0,0"},
                 headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert np.array_equal(np.array(r.json()), arrays["cbf"][7:8])
    r = http.get(f"/api/v1/metadata/{SCAN}")
    assert r.json()["data"]["attributes"]["metadata"]["scan"]["frames"] == N_FRAMES


def test_tiff_sequence_and_multipage(client, served):
    _, _, arrays = served
    seq = client["raw/p1/s2/img/frames"]
    assert seq.shape == (8, 24, 32) and seq.dtype == np.uint16
    assert np.array_equal(seq[2:6, ::3, 1], arrays["tif"][2:6, ::3, 1])
    stack = client["raw/p1/s2/stack"]
    assert stack.shape == (5, 24, 32) and stack.dtype == np.float32
    assert stack.chunks[0] == (1,) * 5
    assert np.array_equal(stack[1:4:2, 3:5], arrays["pages"][1:4:2, 3:5])
    assert np.array_equal(stack.read(), arrays["pages"])


def test_search_by_harvested_metadata(client):
    from tiled.queries import Key

    hits = client["raw/p1/s1"].search(Key("instrument.detector.distance") > 300)
    assert "scan1" in hits
    assert "scan1" not in client["raw/p1/s1"].search(Key("instrument.detector.distance") < 300)


def test_api_key_required_for_non_demo_server(served):
    import httpx

    r = httpx.get(f"{served[0]}/api/v1/metadata/{SCAN}")
    assert r.status_code == 401
    r = httpx.get(f"{served[0]}/api/v1/metadata/{SCAN}", headers={"Authorization": f"Apikey {API_KEY}"})
    assert r.status_code == 200


def test_unreadable_frame_gives_4xx_and_the_rest_keeps_serving(tmp_path, backend):
    """A frame truncated after registration: its read is a 422 naming the file."""
    import httpx
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = make_frames(4)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "db", [raw], backend=backend) as url:
        register(from_uri(url, api_key=API_KEY), raw, prefix="raw")
        whole = (raw / "scan_00003.cbf").read_bytes()
        (raw / "scan_00003.cbf").write_bytes(whole[:1000])  # the detector file got damaged
        h = {"Authorization": f"Apikey {API_KEY}", "Accept": "application/octet-stream"}
        r = httpx.get(f"{url}/api/v1/array/full/raw/scan/frames", params={"slice": "2"}, headers=h)
        assert r.status_code == 422
        assert "scan_00003.cbf" in r.json()["detail"] and "truncated" in r.json()["detail"]
        r = httpx.get(f"{url}/api/v1/array/full/raw/scan/frames", params={"slice": "1"}, headers=h)
        assert r.status_code == 200
        assert np.array_equal(np.frombuffer(r.content, "<i4").reshape(24, 32), frames[1])


def test_huge_slice_is_refused_with_413(tmp_path, monkeypatch, backend):
    import httpx
    from tiled.client import from_uri

    from scatterbroker.adapters import sequence
    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, frame in enumerate(make_frames(4), start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    monkeypatch.setattr(sequence, "MAX_READ_BYTES", 2 * 24 * 32 * 4)  # two frames
    with start_server(tmp_path / "db", [raw], backend=backend) as url:
        register(from_uri(url, api_key=API_KEY), raw, prefix="raw")
        h = {"Authorization": f"Apikey {API_KEY}"}
        r = httpx.get(f"{url}/api/v1/array/full/raw/scan/frames", headers=h)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = httpx.get(f"{url}/api/v1/array/full/raw/scan/frames", params={"slice": "0:2"}, headers=h)
        assert r.status_code == 200


def test_registration_is_incremental(tmp_path, backend):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw" / "sample"
    raw.mkdir(parents=True)
    frames = make_frames(6)
    for i, frame in enumerate(frames[:4], start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "db", [tmp_path / "raw"], backend=backend) as url:
        client = from_uri(url, api_key=API_KEY)
        first = register(client, tmp_path / "raw", prefix="raw")
        assert first.created == ["raw/sample/scan"]
        again = register(client, tmp_path / "raw", prefix="raw")
        assert (again.created, again.updated, again.unchanged) == ([], [], 1)
        for i in (5, 6):
            write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
        write_cbf(raw / "other_00001.cbf", frames[0], 1)
        third = register(client, tmp_path / "raw", prefix="raw")
        assert third.updated == ["raw/sample/scan"] and third.created == ["raw/sample/other_00001"]
        assert np.array_equal(client["raw/sample/scan/frames"][4:], frames[4:])


def test_registration_outside_roots_is_refused(tmp_path):
    from scatterbroker.adapters.roots import normalize_roots
    from scatterbroker.catalog.register import register
    from scatterbroker.errors import OutsideRoots

    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "link").symlink_to(outside)
    with pytest.raises(OutsideRoots):
        register(None, inside / "link", roots=normalize_roots([inside]))
    with pytest.raises(OutsideRoots):
        register(None, inside / ".." / "out", roots=normalize_roots([inside]))


def test_frame_of_another_shape_is_left_out_and_reported(tmp_path, backend):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = make_frames(5)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame if i != 3 else frame[:10], i)
    with start_server(tmp_path / "db", [raw], backend=backend) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert report.created == ["raw/scan"]
        (bad,) = report.failed
        assert "scan_00003.cbf" in bad[1] and "differs" in bad[1]
        stack = client["raw/scan/frames"]
        assert stack.shape == (4, 24, 32)
        assert np.array_equal(stack.read(), frames[[0, 1, 3, 4]])
        assert list(client["raw/scan/headers"].read()["frame"]) == [1, 2, 4, 5]


def test_cbf_frames_without_a_minicbf_header_register(tmp_path):
    """Frames with no Pilatus header lines: columns that are empty in every frame still store."""
    import fabio.cbfimage
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        fabio.cbfimage.CbfImage(data=frame).write(str(raw / f"bare_{i:05d}.cbf"))
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert report.created == ["raw/bare"] and report.failed == []
        assert list(client["raw/bare/headers"].read()["frame"]) == [1, 2, 3]
        assert np.array_equal(client["raw/bare/frames"].read(), frames)
