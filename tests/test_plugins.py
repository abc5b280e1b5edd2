"""Adapter plug-ins are found through entry points, with no change to scatterbroker.

The worked example of docs/adapters.md (``tests/plugin_example/sb_edf.py``) is
made an installed distribution without pip: a ``*.dist-info`` directory with
METADATA and entry_points.txt next to the module, on ``sys.path``, is what
``importlib.metadata`` finds, exactly as after ``pip install``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server

from scatterbroker.adapters import registry

PLUGIN = Path(__file__).resolve().parent / "plugin_example" / "sb_edf.py"
EDF = "image/x-edf"
EDF_SEQUENCE = "multipart/related;type=image/x-edf"
N = 5


def install_dist(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """Write the ``.dist-info`` of distribution ``name`` 0.1 into ``site``."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[scatterbroker.adapters]\n{lines}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site directory holding the scatterbroker-edf distribution, on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    install_dist(site, "scatterbroker-edf",
                 {"edf": "sb_edf:EDFAdapter", "edf-sequence": "sb_edf:EDFSequenceAdapter"})
    shutil.copy(PLUGIN, site / "sb_edf.py")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield site
    registry.refresh()
    sys.modules.pop("sb_edf", None)


def write_edf(path: Path, frame: np.ndarray, header: dict) -> None:
    import fabio.edfimage

    fabio.edfimage.EdfImage(data=frame, header={k: str(v) for k, v in header.items()}).write(str(path))


@pytest.fixture
def edf_dir(tmp_path):
    """5 numbered EDF frames with per-frame omega/exposure, one single dark frame,
    and one truncated file."""
    data = tmp_path / "data"
    data.mkdir()
    frames = make_frames(N, seed=3, dtype="uint16")
    for i, frame in enumerate(frames, start=1):
        write_edf(data / f"sample_{i:05d}.edf", frame, {
            "SampleDistance": 0.75, "WaveLength": 1.0e-10, "PSize_1": 172e-6, "PSize_2": 172e-6,
            "Center_1": 700.5, "Center_2": 800.25, "ExposureTime": 0.05 * i,
            "motor_mne": "omega phi", "motor_pos": f"{10 + 0.5 * i} 45.0",
        })
    dark = make_frames(1, seed=4, dtype="float32")[0]
    write_edf(data / "dark.edf", dark, {"ExposureTime": 1.0})
    whole = (data / "dark.edf").read_bytes()
    (data / "broken.edf").write_bytes(whole[: len(whole) - 100])
    return data, frames, dark


def test_entry_points_register_the_edf_adapters(site):
    adapters = registry.adapters_by_mimetype()
    assert adapters[EDF].__name__ == "EDFAdapter" and adapters[EDF].__module__ == "sb_edf"
    assert adapters[EDF_SEQUENCE].__name__ == "EDFSequenceAdapter"
    assert "image/x-cbf" in adapters  # ours are still there
    assert registry.sequence_mimetype(EDF) == EDF_SEQUENCE
    assert ".edf" in registry.extensions()


def test_without_the_plugin_edf_is_unknown(tmp_path):
    from scatterbroker.errors import UnknownFormat

    registry.refresh()
    assert EDF not in registry.adapters_by_mimetype()
    (tmp_path / "a.edf").write_bytes(b"{\nDim_1 = 1 ;\n}\n")
    with pytest.raises(UnknownFormat, match="no installed adapter"):
        registry.mimetype_for(tmp_path / "a.edf")


def test_edf_served_through_a_real_server(site, edf_dir, tmp_path):
    import fabio
    from tiled.client import from_uri
    from tiled.queries import Key

    from scatterbroker.catalog.register import register

    data, frames, dark = edf_dir
    direct = np.stack([fabio.open(str(data / f"sample_{i:05d}.edf")).data for i in range(1, N + 1)])
    assert np.array_equal(direct, frames)  # the files hold what we wrote
    with start_server(tmp_path / "db", [data]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, data, prefix="raw")
        assert sorted(report.created) == ["raw/dark", "raw/sample"], report.failed
        (failed,) = report.failed
        assert "broken.edf" in failed[0] and "truncated EDF" in failed[1]

        scan = client["raw/sample"]
        assert [s.name for s in scan.specs] == ["scan"] and set(scan) == {"frames", "headers"}
        stack = scan["frames"]
        assert stack.shape == (N, 24, 32) and stack.dtype == np.uint16
        assert stack.chunks[0] == (1,) * N
        for key in (np.s_[2], np.s_[1:4, 5:9, ::3], np.s_[::-2, -1, :], np.s_[...]):
            assert np.array_equal(stack[key], direct[key]), key

        det = scan.metadata["instrument"]["detector"]
        assert det["distance"] == pytest.approx(750.0) and det["distance@units"] == "mm"
        assert det["x_pixel_size"] == pytest.approx(0.172) and det["beam_center_y"] == 800.25
        wavelength = scan.metadata["instrument"]["monochromator"]
        assert wavelength["wavelength"] == pytest.approx(1.0) and wavelength["wavelength@units"] == "angstrom"
        assert scan.metadata["scan"]["frames"] == N

        table = scan["headers"].read()
        assert list(table["frame"]) == list(range(1, N + 1))
        assert list(table["file"]) == [f"sample_{i:05d}.edf" for i in range(1, N + 1)]
        np.testing.assert_allclose(table["omega"], 10 + 0.5 * np.arange(1, N + 1))
        np.testing.assert_allclose(table["exposure_time"], 0.05 * np.arange(1, N + 1))
        np.testing.assert_allclose(table["phi"], 45.0)

        single = client["raw/dark"]
        assert single.shape == (24, 32) and single.dtype == np.float32
        assert np.array_equal(single.read(), fabio.open(str(data / "dark.edf")).data)
        assert np.array_equal(single.read(), dark)
        assert single.metadata["edf"]["ExposureTime"] == "1.0"

        assert "sample" in client["raw"].search(Key("instrument.detector.distance") > 700)
        assert "sample" not in client["raw"].search(Key("instrument.detector.distance") < 700)

        h = {"Authorization": f"Apikey {API_KEY}", "Accept": "application/octet-stream"}
        r = httpx.get(f"{url}/api/v1/array/full/raw/sample/frames", params={"slice": "3,2:6,1:9"}, headers=h)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.frombuffer(r.content, "<u2").reshape(4, 8), direct[3, 2:6, 1:9])
        r = httpx.get(f"{url}/api/v1/array/block/raw/sample/frames", params={"block": "4,0,0"}, headers=h)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.frombuffer(r.content, "<u2").reshape(1, 24, 32), direct[4:5])
        r = httpx.get(f"{url}/api/v1/array/full/raw/dark", params={"slice": "0:2,0:3"}, headers=h)
        assert np.array_equal(np.frombuffer(r.content, "<f4").reshape(2, 3), dark[:2, :3])

        # A frame damaged after registration: a 422 naming it, the other frames still read.
        whole = (data / "sample_00002.edf").read_bytes()
        (data / "sample_00002.edf").write_bytes(whole[:600])
        r = httpx.get(f"{url}/api/v1/array/full/raw/sample/frames", params={"slice": "1"}, headers=h)
        assert r.status_code == 422 and "sample_00002.edf" in r.json()["detail"]
        r = httpx.get(f"{url}/api/v1/array/full/raw/sample/frames", params={"slice": "2"}, headers=h)
        assert r.status_code == 200
        assert np.array_equal(np.frombuffer(r.content, "<u2").reshape(24, 32), direct[2])


def test_a_broken_plugin_only_warns(site):
    install_dist(site, "scatterbroker-broken", {"broken": "sb_missing_module:Adapter"})
    registry.refresh()
    with pytest.warns(UserWarning, match="failed to load"):
        adapters = dict(registry.adapters_by_mimetype())
    assert "image/x-cbf" in adapters and "multipart/related;type=image/x-cbf" in adapters
    assert EDF in adapters and EDF_SEQUENCE in adapters


def test_docs_show_the_example_module_unchanged():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "adapters.md").read_text()
    assert f"```python\n{PLUGIN.read_text()}```" in doc, "docs/adapters.md and sb_edf.py differ"
