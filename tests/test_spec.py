"""SPEC data files as scan sidecars: the mapping rule, the parser, and search across formats.

Expected values are read off the SPEC text below by hand, not taken from the parser.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf

from scatterbroker.catalog import spec as S
from scatterbroker.catalog.sidecar import fingerprint, sidecar_for

HEADER = """\
#F /data/lab6.spec
#E 1764057600
#D Tue Nov 25 08:00:00 2026
#C lab6  User = operator
#O0 Two Theta  Theta  Chi  Phi
#O1 samx  samy  Temp (C)
#o0 tth th chi phi
#o1 samx samy tempc
"""

SCAN1 = """
#S 1  ascan  th 10 11 2 0.1
#D Tue Nov 25 08:01:00 2026
#T 0.1  (Seconds)
#Q 0 0 0
#P0 20.5 10.25 90 0
#P1 1.5 -0.5 20
#N 4
#L Theta  Epoch  Seconds  Detector
10 1 0.1 100
10.5 2 0.1 120
11 3 0.1 90
#C Tue Nov 25 08:01:05 2026.  Scan completed.
"""

# Si cell (a = 5.431 A), U = 30 deg about z; #G3 is SPEC's UB (2 pi included):
# 2 pi / 5.431 = 1.156906; cos 30 * 1.156906 = 1.001910; sin 30 * 1.156906 = 0.578453.
SCAN12 = """
#S 12  ascan  th 10 11 4 0.1
#D Wed Nov 26 09:30:15 2026
#T 0.5  (Seconds)
#G0 0 0 1 0 0 1 0 -1 0 0 0 0 0 0 0 0 0 0
#G1 5.431 5.431 5.431 90 90 90 1.156906 1.156906 1.156906 90 90 90 1 1 1 0 0 0 60 30 0 0 0 0 1.54 1.54
#G3 1.001910 -0.578453 0 0.578453 1.001910 0 0 0 1.156906
#Q 1 1 1
#P0 41.2 20.6 45 -90
#P1 2.5 -1.25 -23.15
#C sample: LaB6 SRM 660c
#N 5
#L Theta  Epoch  Temp  Seconds  Detector
10 100 250 0.5 1000
10.25 101 251 0.5 1100
10.5 102 252 0.5 1200
@A 1 2 3 \\
4 5 6
10.75 103 251 0.5 1150
11 104 250 0.5 1050
"""


def write_spec(path, *scans: str) -> None:
    path.write_text(HEADER + "".join(scans))


# ------------------------------------------------------------------ no server


def test_which_spec_scan_belongs_to_which_frames(tmp_path):
    assert S.scan_number("lab6_0012") == ("lab6", 12)
    assert S.scan_number("scan3") == ("scan", 3)
    assert S.scan_number("warm") is None
    write_spec(tmp_path / "other.spec", SCAN1)
    # The only *.spec file in the directory.
    assert S.spec_file_for(tmp_path, "lab6_0012") == (tmp_path / "other.spec", 12, None)
    assert S.spec_file_for(tmp_path, "warm") == (None, None, None)  # no number: no SPEC scan
    # <stem>.spec wins over any other.
    write_spec(tmp_path / "lab6.spec", SCAN1)
    assert S.spec_file_for(tmp_path, "lab6_0012") == (tmp_path / "lab6.spec", 12, None)
    # Several, none named after the stem: nothing guessed, a problem says why.
    path, number, problem = S.spec_file_for(tmp_path, "si_0003")
    assert path is None and number == 3
    assert "2 SPEC files (lab6.spec, other.spec) and none is si.spec" in problem
    merged, problems = sidecar_for(tmp_path, "si_0003")
    assert merged == {} and problems == [problem]


def test_scan_twelve_by_hand(tmp_path):
    write_spec(tmp_path / "lab6.spec", SCAN1, SCAN12)
    md, problems = S.read_spec_scan(tmp_path / "lab6.spec", 12)
    assert problems == []
    sample, spec = md["sample"], md["spec"]
    assert spec["file"] == "lab6.spec" and spec["scan_number"] == 12
    assert spec["command"].split() == ["ascan", "th", "10", "11", "4", "0.1"]
    assert md["start_time"] == "2026-11-26T09:30:15" and spec["date"] == "Wed Nov 26 09:30:15 2026"
    assert spec["count_time"] == 0.5 and spec["count_time@units"] == "s"
    assert spec["hkl"] == [1, 1, 1]
    # Motors: '#O0 Two Theta  Theta  Chi  Phi' / '#O1 samx  samy  Temp (C)' with '#P0'/'#P1'.
    assert spec["positioners"] == {"Two Theta": 41.2, "Theta": 20.6, "Chi": 45.0, "Phi": -90.0,
                                   "samx": 2.5, "samy": -1.25, "Temp (C)": -23.15}
    assert (sample["theta"], sample["chi"], sample["phi"]) == (20.6, 45.0, -90.0)
    assert sample["theta@units"] == "deg"
    assert md["instrument"]["detector"]["two_theta"] == 41.2
    # Columns; the '@A' MCA line and its continuation are not data rows.
    assert spec["columns"] == ["Theta", "Epoch", "Temp", "Seconds", "Detector"] and spec["points"] == 5
    assert spec["data"]["Detector"] == [1000, 1100, 1200, 1150, 1050]
    assert spec["data"]["Theta"] == [10, 10.25, 10.5, 10.75, 11]
    # Temperature: the 'Temp' column (no unit in its name: K), mean of 250 251 252 251 250.
    assert sample["temperature"] == pytest.approx(1254 / 5) and sample["temperature@units"] == "K"
    assert "column 'Temp'" in spec["temperature_from"] and "kelvin assumed" in spec["temperature_from"]
    assert sample["name"] == "LaB6 SRM 660c"  # '#C sample: ...'
    # Orientation: raw SPEC UB, and the NeXus one (no 2 pi) because #G1's cell checks out.
    g3 = [1.001910, -0.578453, 0, 0.578453, 1.001910, 0, 0, 0, 1.156906]
    assert spec["ub_matrix"] == [g3[0:3], g3[3:6], g3[6:9]]
    assert sample["unit_cell_abc"] == [5.431] * 3 and sample["unit_cell_alphabetagamma"] == [90] * 3
    expected = np.array([[math.cos(math.pi / 6), -0.5, 0], [0.5, math.cos(math.pi / 6), 0], [0, 0, 1]]) / 5.431
    np.testing.assert_allclose(sample["ub_matrix"], expected, atol=2e-6)
    assert sample["ub_matrix@units"] == "1/angstrom"


def test_scan_one_temperature_from_a_positioner_in_celsius(tmp_path):
    write_spec(tmp_path / "lab6.spec", SCAN1, SCAN12)
    md, problems = S.read_spec_scan(tmp_path / "lab6.spec", 1)
    assert problems == []
    # 'Temp (C)' positioner at 20 (#P1 third value): 293.15 K.
    assert md["sample"]["temperature"] == pytest.approx(293.15)
    assert md["spec"]["temperature_from"] == "positioner 'Temp (C)'"
    assert "name" not in md["sample"]  # '#C lab6  User = operator' names no sample
    assert "ub_matrix" not in md["spec"] and "unit_cell_abc" not in md["sample"]
    assert md["start_time"] == "2026-11-25T08:01:00"


def test_temperature_names():
    assert S.temperature_unit("Temp") == "K"
    assert S.temperature_unit("temperature") == "K"
    assert S.temperature_unit("T_sample") == "K"
    assert S.temperature_unit("sample_temp_C") == "C"
    assert S.temperature_unit("Temp [K]") == "K"
    assert S.temperature_unit("Theta") is None
    assert S.temperature_unit("Tc") is None
    assert S.temperature_unit("Epoch") is None


def test_fingerprint_follows_the_scan_not_the_file(tmp_path):
    path = tmp_path / "lab6.spec"
    write_spec(path, SCAN1, SCAN12)
    before = fingerprint(tmp_path, "lab6_0012")
    assert list(before) == ["lab6.spec#S12"]
    with open(path, "a") as f:  # SPEC starts scan 13: scan 12 is as it was
        f.write("\n#S 13  ascan  th 10 11 4 0.1\n#D Wed Nov 26 09:40:00 2026\n")
    assert fingerprint(tmp_path, "lab6_0012") == before
    assert fingerprint(tmp_path, "lab6_0013")["lab6.spec#S13"] != [0, "absent"]
    assert fingerprint(tmp_path, "lab6_0014") == {"lab6.spec#S14": [0, "absent"]}
    write_spec(path, SCAN1, SCAN12.replace("11 104 250", "11 104 260"))  # a value edited
    assert fingerprint(tmp_path, "lab6_0012") != before


def test_a_line_still_being_written_is_not_data(tmp_path):
    path = tmp_path / "lab6.spec"
    write_spec(path, SCAN12.rstrip("\n").rsplit("\n", 1)[0] + "\n11 104 2")  # SPEC mid-line
    md, problems = S.read_spec_scan(path, 12)
    assert problems == [] and md["spec"]["points"] == 4
    assert md["sample"]["temperature"] == pytest.approx((250 + 251 + 252 + 251) / 4)


def test_malformed_spec_lines_are_problems_and_the_rest_is_kept(tmp_path):
    path = tmp_path / "bad.spec"
    path.write_text(
        HEADER
        + "\n#S 3  ascan  th 0 1 2 1\n#P0 1.0 abc 3 4\n#P1 1 2\n#N 3\n#L Theta  Temp\n"
        + "0 300\n0.5 301 7\nxx yy\n1 302\n#S oops\n"
        + SCAN1 + SCAN1  # scan 1 twice: the last one is used
    )
    md, problems = S.read_spec_scan(path, 3)
    text = "\n".join(problems)
    assert "bad.spec line 19: '#S' without a scan number" in text
    assert "'#P0' position 'abc' is not a number" in text
    # '#P0' 4 values + '#P1' 2 for 4 + 3 motors ('Two Theta' and 'Temp (C)' hold a space):
    assert "6 '#P' positions for 7 '#O' motors; paired in order up to 6" in text
    assert "'#N 3' but '#L' names 2 columns" in text
    assert "bad.spec scan 3, line 16: 3 values for 2 '#L' columns; skipped" in text
    assert "bad.spec scan 3, line 17: data line is not numbers; skipped" in text
    assert md["spec"]["points"] == 2 and md["spec"]["data"]["Temp"] == [300, 302]
    assert md["sample"]["temperature"] == pytest.approx(301)
    assert md["spec"]["positioners"]["Two Theta"] == 1.0 and md["spec"]["positioners"]["Theta"] is None
    md, problems = S.read_spec_scan(path, 1)
    assert any("scan 1 appears 2 times" in p and "the last" in p for p in problems)
    md, problems = S.read_spec_scan(path, 7)
    assert md == {} and any("no scan 7 ('#S 7')" in p for p in problems)
    (tmp_path / "junk.spec").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    md, problems = S.read_spec_scan(tmp_path / "junk.spec", 1)
    assert md == {} and problems == ["junk.spec: not a SPEC data file (no SPEC '#' lines at all); "
                                     "no SPEC metadata taken"]


# ------------------------------------------------------------------ served


def _scans(raw):
    """CBF scans lab6_0001 and lab6_0012 (SPEC scans 1 and 12), TIFF scans warm/cold (YAML)."""
    import tifffile

    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"lab6_0012_{i:05d}.cbf", frame, i)
        write_cbf(raw / f"lab6_0001_{i:05d}.cbf", frame, i)
        tifffile.imwrite(raw / f"warm_{i:04d}.tif", frame.astype(np.uint16))
        tifffile.imwrite(raw / f"cold_{i:04d}.tif", frame.astype(np.uint16))
    write_spec(raw / "lab6.spec", SCAN1, SCAN12)
    (raw / "warm.yaml").write_text("sample:\n  name: ice\n  temperature: {value: -50, units: C}\n")
    (raw / "cold.yaml").write_text("sample:\n  temperature: {value: 20, units: K}\n")
    return frames


def test_spec_and_yaml_sidecars_are_searchable_together(tmp_path):
    from tiled.client import from_uri
    from tiled.queries import Key

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = _scans(raw)
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert sorted(report.created) == ["raw/cold", "raw/lab6_0001", "raw/lab6_0012", "raw/warm"]
        assert report.failed == []  # lab6.spec is a sidecar, not an unknown file
        scan = client["raw/lab6_0012"]
        md = scan.metadata
        assert md["sample"]["temperature"] == pytest.approx(250.8)
        assert md["sample"]["name"] == "LaB6 SRM 660c"
        assert md["spec"]["positioners"]["samx"] == 2.5
        assert md["instrument"]["detector"]["distance"] == 500.0  # the CBF header is still there
        assert md["source"]["sidecars"]["lab6.spec#S12"][0] > 0
        assert np.array_equal(scan["frames"][1], frames[1])
        assert client["raw/warm"].metadata["sample"]["temperature"] == pytest.approx(223.15)
        found = sorted(client["raw"].search(Key("sample.temperature") > 200))
        assert found == ["lab6_0001", "lab6_0012", "warm"]  # 293.15, 250.8, 223.15 K; cold is 20 K
        assert sorted(client["raw"].search(Key("sample.temperature") > 260)) == ["lab6_0001"]
        assert list(client["raw"].search(Key("spec.positioners.samx") == 2.5)) == ["lab6_0012"]


def test_edited_sidecars_are_harvested_again_in_place(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    _scans(raw)
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, raw, prefix="raw")
        again = register(client, raw, prefix="raw")
        assert again.unchanged == 4 and again.updated == [] and again.created == []
        # SPEC starts scan 13 (scan 12 untouched), the warm YAML is edited, and
        # the last point of scan 12 gets a new temperature.
        with open(raw / "lab6.spec", "a") as f:
            f.write("\n#S 13  ascan  th 10 11 4 0.1\n#D Wed Nov 26 09:40:00 2026\n")
        assert register(client, raw, prefix="raw").unchanged == 4
        (raw / "warm.yaml").write_text("sample:\n  name: ice\n  temperature: {value: -10.5, units: C}\n")
        text = (raw / "lab6.spec").read_text().replace("11 104 250 0.5 1050", "11 104 255 0.5 1050")
        (raw / "lab6.spec").write_text(text)
        report = register(client, raw, prefix="raw")
        assert sorted(report.updated) == ["raw/lab6_0012", "raw/warm"] and report.unchanged == 2
        assert report.failed == []
        assert client["raw/warm"].metadata["sample"]["temperature"] == pytest.approx(262.65)
        md = client["raw/lab6_0012"].metadata
        assert md["sample"]["temperature"] == pytest.approx((250 + 251 + 252 + 251 + 255) / 5)
        assert md["spec"]["data"]["Temp"][-1] == 255
        assert md["scan"]["frames"] == 3 and md["instrument"]["detector"]["distance"] == 500.0
        assert len(client["raw/lab6_0012/headers"].read()) == 3
        assert register(client, raw, prefix="raw").unchanged == 4


def test_malformed_spec_is_reported_and_registration_continues(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir()
    frames = make_frames(2)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / "a" / f"run_0003_{i:05d}.cbf", frame, i)
        write_cbf(raw / "b" / f"run_0003_{i:05d}.cbf", frame, i)
    (raw / "a" / "run.spec").write_bytes(b"\x00\x01 not spec at all \xff" * 50)
    (raw / "b" / "run.spec").write_text(HEADER + "\n#S 3  ascan\n#N 2\n#L Theta  Temp\n0 300\n1 2 3\n")
    with start_server(tmp_path / "db", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        report = register(client, raw, prefix="raw")
        assert sorted(report.created) == ["raw/a/run_0003", "raw/b/run_0003"]
        why = [w for _, w in report.failed]
        assert any("run.spec: not a SPEC data file" in w for w in why)
        assert any("run.spec scan 3, line 14: 3 values for 2 '#L' columns" in w for w in why)
        a, b = client["raw/a/run_0003"], client["raw/b/run_0003"]
        assert any("not a SPEC data file" in p for p in a.metadata["problems"])
        assert any("3 values for 2" in p for p in b.metadata["problems"])
        assert b.metadata["sample"]["temperature"] == 300.0  # what could be read is kept
        assert np.array_equal(a["frames"].read(), frames) and np.array_equal(b["frames"].read(), frames)
