"""The ingest watcher against a real server: frames land, become readable, restarts resume."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """A Watcher on a background thread, stopped on exit."""

    def __init__(self, client, directory, prefix="raw", **kw):
        from scatterbroker.catalog.watch import Watcher

        self.watcher = Watcher(client, directory, prefix, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watcher.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.watcher.ready.wait(30), "watcher did not start"
        return self.watcher

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def n_frames(client, path="raw/scan/frames"):
    try:
        return client[path].shape[0]
    except KeyError:
        return 0


@pytest.fixture
def setup(tmp_path):
    from tiled.client import from_uri

    raw = tmp_path / "raw"
    raw.mkdir()
    with start_server(tmp_path / "db", [raw]) as url:
        yield from_uri(url, api_key=API_KEY), raw, url


def test_frames_appear_one_by_one_and_subscribers_hear(setup):
    client, raw, _ = setup
    frames = make_frames(6)
    with Running(client, raw):
        write_cbf(raw / "scan_00001.cbf", frames[0], 1)
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        heard = []
        sub = client["raw/scan/frames"].subscribe()
        errors = []

        def hear(update):  # runs on the subscription's thread: keep its errors
            try:
                heard.append(update.data())
            except Exception as err:
                errors.append(err)

        sub.new_data.add_callback(hear)
        sub.start_in_thread()
        try:
            for i in range(2, 7):
                write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
                wait_for(lambda i=i: n_frames(client) == i, what=f"frame {i}")
                assert np.array_equal(client["raw/scan/frames"][i - 1], frames[i - 1])
            wait_for(lambda: len(heard) >= 5 or errors, what="5 subscription messages")
            assert not errors, errors
        finally:
            sub.disconnect()
    assert np.array_equal(np.concatenate(heard[:5]), frames[1:6])
    table = client["raw/scan/headers"].read()
    assert list(table["frame"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(table["start_angle"], 10 + 0.1 * np.arange(1, 7))
    assert client["raw/scan"].metadata["scan"]["frames"] == 6


def test_half_written_file_waits_until_complete(setup):
    client, raw, _ = setup
    frames = make_frames(2)
    write_cbf(raw / "scan_00001.cbf", frames[0], 1)
    write_cbf(raw / "whole.tmpdata", frames[1], 2)  # not a frame name: a staging copy
    whole = (raw / "whole.tmpdata").read_bytes()
    (raw / "whole.tmpdata").unlink()
    with Running(client, raw, settle=0.2) as watcher:
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        with open(raw / "scan_00002.cbf", "wb") as f:  # the detector is still writing ...
            f.write(whole[: len(whole) // 2])
            f.flush()
            time.sleep(1.5)  # ... for longer than the settle time
            assert n_frames(client) == 1, "a half-written frame was registered"
            f.write(whole[len(whole) // 2:])
        wait_for(lambda: n_frames(client) == 2, what="completed frame")
        assert watcher.stats.problems == 0
    assert np.array_equal(client["raw/scan/frames"][1], frames[1])


def test_restart_resumes_without_duplicates_or_gaps(setup):
    client, raw, _ = setup
    frames = make_frames(8)
    with Running(client, raw):
        for i in range(1, 4):
            write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
        wait_for(lambda: n_frames(client) == 3, what="3 frames")
    for i in range(4, 7):  # written while no watcher runs
        write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
    with Running(client, raw):
        wait_for(lambda: n_frames(client) == 6, what="catch-up after restart")
        for i in range(7, 9):
            write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
        wait_for(lambda: n_frames(client) == 8, what="new frames after restart")
    assert np.array_equal(client["raw/scan/frames"].read(), frames)
    assert list(client["raw/scan/headers"].read()["frame"]) == list(range(1, 9))


def test_bad_frames_are_recorded_and_the_next_keep_flowing(setup):
    client, raw, _ = setup
    frames = make_frames(4)
    with Running(client, raw, settle=0.2) as watcher:
        write_cbf(raw / "scan_00001.cbf", frames[0], 1)
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        write_cbf(raw / "scan_00002.cbf", frames[1][:10], 2)  # another shape
        write_cbf(raw / "scan_00003.cbf", frames[2], 3)
        wait_for(lambda: n_frames(client) == 2, what="good frame after a bad one")
        wait_for(lambda: watcher.stats.problems >= 1, what="problem recorded")
    problems = client["raw/scan"].metadata["problems"]
    assert any("scan_00002.cbf" in p and "differs" in p for p in problems)
    assert list(client["raw/scan/headers"].read()["frame"]) == [1, 3]


def test_checksums_catch_a_modified_raw_file(setup):
    import subprocess
    import sys

    from scatterbroker.catalog.register import register
    from scatterbroker.catalog.verify import verify

    client, raw, url = setup
    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    write_cbf(raw / "single.cbf", frames[0], 1)
    register(client, raw, prefix="raw")
    assert verify(client["raw"]) == (4, [])
    damaged = bytearray((raw / "scan_00002.cbf").read_bytes())
    damaged[-10] ^= 0xFF  # one flipped byte in the pixel data
    (raw / "scan_00002.cbf").write_bytes(bytes(damaged))
    (raw / "single.cbf").unlink()
    checked, bad = verify(client["raw"])
    assert checked == 4
    assert sorted(m.path.name for m in bad) == ["scan_00002.cbf", "single.cbf"]
    out = subprocess.run([sys.executable, "-m", "scatterbroker", "verify", url, "raw", "--api-key", API_KEY],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "MODIFIED" in out.stderr and "scan_00002.cbf" in out.stderr


def test_watch_command_line(setup, tmp_path):
    import os
    import subprocess
    import sys

    client, raw, url = setup
    frames = make_frames(3)
    log = open(tmp_path / "watch.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scatterbroker", "watch", str(raw), "--uri", url, "--prefix", "raw"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SCATTERBROKER_API_KEY": API_KEY},
    )
    try:
        wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), what="watcher start")
        for i, frame in enumerate(frames, start=1):
            write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
        wait_for(lambda: n_frames(client) == 3, what="frames from the CLI watcher")
        assert np.array_equal(client["raw/scan/frames"].read(), frames)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    assert "frames/s" in (tmp_path / "watch.log").read_text()


def test_watcher_stacks_an_idle_scan_with_a_wrapper(tmp_path):
    import h5py
    import hdf5plugin  # noqa: F401  (Bitshuffle-LZ4 for plain h5py)
    from tiled.client import from_uri

    raw, scans = tmp_path / "raw", tmp_path / "scans"
    raw.mkdir()
    scans.mkdir()
    frames = make_frames(5)
    with start_server(tmp_path / "db", [raw, scans]) as url:
        client = from_uri(url, api_key=API_KEY)
        with Running(client, raw, stack_to=scans, stack_after=0.5) as watcher:
            for i, frame in enumerate(frames, start=1):
                write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
            wait_for(lambda: n_frames(client) == 5, what="5 frames")
            wait_for(lambda: "scans" in client and "scan_wrapper" in client["scans"], timeout=60,
                     what="stacked scan and wrapper registered")
            watcher.stacked(60)
        with h5py.File(scans / "scan.nxs", "r") as f:
            assert np.array_equal(f["entry/data/data"][()], frames)
        assert np.array_equal(client["scans/scan/entry/data/data"][2], frames[2])
        assert np.array_equal(client["scans/scan_wrapper/entry/data/data"][4], frames[4])
        assert client["raw/scan/frames"].shape == (5, 24, 32)  # the per-frame node keeps working


# ---------------------------------------------------------------- bad input while watching


def problems_of(client, path="raw/scan"):
    try:
        return list(client[path].metadata.get("problems", []))
    except KeyError:
        return []


def test_truncated_frame_is_reported_and_joins_when_completed(setup):
    """A frame that stops growing short of its header's size: reported on the scan
    after incomplete_after seconds, the next frames flow; completed later, it joins."""
    client, raw, _ = setup
    frames = make_frames(4)
    write_cbf(raw / "whole.tmpdata", frames[1], 2)
    whole = (raw / "whole.tmpdata").read_bytes()
    (raw / "whole.tmpdata").unlink()
    with Running(client, raw, settle=0.2, incomplete_after=1.0) as watcher:
        write_cbf(raw / "scan_00001.cbf", frames[0], 1)
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        (raw / "scan_00002.cbf").write_bytes(whole[: len(whole) * 2 // 3])  # the detector died
        write_cbf(raw / "scan_00003.cbf", frames[2], 3)
        write_cbf(raw / "scan_00004.cbf", frames[3], 4)
        wait_for(lambda: n_frames(client) == 3, what="frames after the truncated one")
        wait_for(lambda: any("scan_00002.cbf" in p for p in problems_of(client)), what="problem recorded")
        (problem,) = [p for p in problems_of(client) if "scan_00002.cbf" in p]
        assert "truncated CBF frame" in problem and "left out" in problem
        wait_for(lambda: watcher.stats.backlog == 0, what="nothing left waiting")
        (raw / "scan_00002.cbf").write_bytes(whole)  # rewritten complete
        wait_for(lambda: n_frames(client) == 4, what="the completed frame")
    assert np.array_equal(client["raw/scan/frames"].read(), frames)
    assert list(client["raw/scan/headers"].read()["frame"]) == [1, 3, 4, 2]  # rows in arrival order


def test_corrupt_frames_are_recorded_on_their_scan(setup):
    client, raw, _ = setup
    frames = make_frames(3)
    with Running(client, raw, settle=0.2, incomplete_after=1.0) as watcher:
        # The scan's first frame is garbage: held until the scan exists, then recorded.
        (raw / "scan_00001.cbf").write_bytes(b"this is not a CBF file" * 40)
        write_cbf(raw / "scan_00002.cbf", frames[1], 2)
        wait_for(lambda: n_frames(client) == 1, what="the good frame")
        (raw / "scan_00003.cbf").write_bytes(b"###CBF: VERSION 1.5\n" + b"\x00\xff" * 300)  # no binary header
        write_cbf(raw / "scan_00004.cbf", frames[2], 4)
        wait_for(lambda: n_frames(client) == 2, what="the frame after the corrupt one")
        wait_for(lambda: len(problems_of(client)) >= 2, what=f"both problems ({problems_of(client)})")
        assert watcher.stats.problems >= 2
    problems = problems_of(client)
    assert any("scan_00001.cbf" in p and "does not match its extension" in p for p in problems), problems
    assert any("scan_00003.cbf" in p and "left out" in p for p in problems), problems
    assert list(client["raw/scan/headers"].read()["frame"]) == [2, 4]


def test_frame_of_another_dtype_is_left_out(setup):
    import tifffile

    client, raw, _ = setup
    frames = make_frames(4, dtype="uint16")
    with Running(client, raw, settle=0.2):
        tifffile.imwrite(raw / "img_0001.tif", frames[0])
        wait_for(lambda: n_frames(client, "raw/img/frames") == 1, what="first frame")
        tifffile.imwrite(raw / "img_0002.tif", frames[1].astype(np.float32))  # another dtype
        tifffile.imwrite(raw / "img_0003.tif", frames[2])
        wait_for(lambda: n_frames(client, "raw/img/frames") == 2, what="the frame after")
        wait_for(lambda: problems_of(client, "raw/img"), what="problem recorded")
    (problem,) = problems_of(client, "raw/img")
    assert problem == ("img_0002.tif: frame (24, 32) float32 differs from the scan's (24, 32) uint16; "
                       "left out")
    assert np.array_equal(client["raw/img/frames"].read(), frames[[0, 2]])


def test_duplicate_frame_numbers_are_reported_not_registered(setup):
    """Another spelling of a number already in the scan, a number spelled unlike the
    scan's, and a frame written twice: each reported on the scan, never registered
    twice; registration of the same directory says the same."""
    from scatterbroker.catalog.register import register

    client, raw, _ = setup
    frames = make_frames(5)
    with Running(client, raw, settle=0.2) as watcher:
        for i in (1, 2, 3):
            write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
        wait_for(lambda: n_frames(client) == 3, what="3 frames")
        write_cbf(raw / "scan_2.cbf", frames[4], 2)  # frame 2 again, unpadded
        write_cbf(raw / "scan_7.cbf", frames[4], 7)  # a new number, unpadded
        write_cbf(raw / "scan_00002.cbf", frames[4], 2)  # frame 2 written again
        write_cbf(raw / "scan_00004.cbf", frames[3], 4)
        wait_for(lambda: n_frames(client) == 4, what="the next frame")
        wait_for(lambda: len(problems_of(client)) >= 3, what=f"3 problems ({problems_of(client)})")
        # nothing left pending (the stats follow the catalog at the end of the watcher's batch)
        wait_for(lambda: watcher.stats.backlog == 0, what=f"an empty backlog ({watcher.stats})")
    problems = problems_of(client)
    assert "scan_2.cbf: duplicate frame number 2 (scan_00002.cbf is that frame); left out" in problems
    assert "scan_7.cbf: frame number not written like the rest of the scan (scan_00007.cbf); left out" \
        in problems
    assert any(p.startswith("scan_00002.cbf: frame 2 was written again") for p in problems), problems
    assert list(client["raw/scan/headers"].read()["frame"]) == [1, 2, 3, 4]
    # A restarted watcher reports nothing twice.
    with Running(client, raw, settle=0.2) as watcher:
        wait_for(lambda: watcher.stats.backlog == 0, what="reconciled")
    assert problems_of(client) == problems
    # Registration: the same files, the same verdicts.
    report = register(client, raw, prefix="again")
    assert report.created == ["again/scan"]
    why = [w for _, w in report.failed]
    assert "scan_2.cbf: duplicate frame number 2 (scan_00002.cbf is that frame); left out" in why
    assert any(w.startswith("scan_7.cbf: frame number not written like") for w in why)
    assert set(why) <= set(problems_of(client, "again/scan"))
    assert client["again/scan/frames"].shape[0] == 4


# ---------------------------------------------------------------- sidecars while watching

SPEC_HEADER = """#F lab6.spec
#E 1764057600
#D Tue Nov 25 08:00:00 2026
#O0 Theta  Chi
"""


def test_sidecars_edited_while_watching_are_harvested_frames_untouched(setup):
    """A SPEC scan growing point by point and an edited YAML sidecar update the scan's
    metadata in place: no frame is registered again, and a later register finds the
    watcher's source record current (unchanged), before and after a restart."""
    from scatterbroker.catalog.register import register

    client, raw, _ = setup
    frames = make_frames(4)
    spec = raw / "lab6.spec"
    spec.write_text(SPEC_HEADER + "\n#S 12  ascan  th 0 1 3 1\n#P0 1.5 90\n#N 2\n#L Theta  Temp\n0 250\n")
    path = "raw/lab6_0012"
    with Running(client, raw, settle=0.2) as watcher:
        for i in (1, 2):
            write_cbf(raw / f"lab6_0012_{i:05d}.cbf", frames[i - 1], i)
        wait_for(lambda: n_frames(client, f"{path}/frames") == 2, what="2 frames")
        md = client[path].metadata
        assert md["sample"]["temperature"] == 250.0 and md["spec"]["points"] == 1
        with open(spec, "a") as f:  # SPEC writes the next points
            f.write("0.5 260\n1 270\n")
        wait_for(lambda: client[path].metadata["spec"]["points"] == 3, what="SPEC points harvested")
        assert client[path].metadata["sample"]["temperature"] == pytest.approx(260.0)
        (raw / "lab6_0012.yaml").write_text("sample:\n  name: LaB6\n")
        wait_for(lambda: client[path].metadata["sample"].get("name") == "LaB6", what="YAML harvested")
        write_cbf(raw / "lab6_0012_00003.cbf", frames[2], 3)
        wait_for(lambda: n_frames(client, f"{path}/frames") == 3, what="frame 3")
        assert watcher.stats.problems == 0
    md = client[path].metadata
    assert md["sample"]["temperature"] == pytest.approx(260.0) and md["sample"]["name"] == "LaB6"
    assert md["scan"]["frames"] == 3 and md["instrument"]["detector"]["distance"] == 500.0
    assert list(client[f"{path}/headers"].read()["frame"]) == [1, 2, 3]
    assert set(md["source"]["sidecars"]) == {"lab6.spec#S12", "lab6_0012.yaml"}
    report = register(client, raw, prefix="raw")
    assert report.unchanged == 1 and report.updated == [] and report.created == [], report
    # Edited while no watcher runs: the restarted watcher harvests it, frames untouched.
    (raw / "lab6_0012.yaml").write_text("sample:\n  name: LaB6 SRM 660c\n")
    with Running(client, raw, settle=0.2) as watcher:
        wait_for(lambda: client[path].metadata["sample"].get("name") == "LaB6 SRM 660c",
                 what="sidecar edited offline harvested")
        write_cbf(raw / "lab6_0012_00004.cbf", frames[3], 4)
        wait_for(lambda: n_frames(client, f"{path}/frames") == 4, what="frame 4")
    assert list(client[f"{path}/headers"].read()["frame"]) == [1, 2, 3, 4]
    assert np.array_equal(client[f"{path}/frames"].read(), frames)
    assert register(client, raw, prefix="raw").unchanged == 1


# ---------------------------------------------------------------- a watcher killed mid-scan


def test_watcher_killed_mid_scan_resumes_exactly(setup, tmp_path):
    """kill -9 of the watcher while frames land; a new watcher registers each frame once."""
    import os
    import signal
    import subprocess
    import sys

    client, raw, url = setup
    frames = make_frames(20)
    log = open(tmp_path / "watch.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scatterbroker", "watch", str(raw), "--uri", url, "--prefix", "raw"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SCATTERBROKER_API_KEY": API_KEY},
    )
    try:
        wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), what="watcher start")
        for i in range(1, 11):
            write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
            time.sleep(0.05)
        wait_for(lambda: n_frames(client) >= 3, what="some frames registered")
        os.kill(proc.pid, signal.SIGKILL)  # mid-scan, frames still landing
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    for i in range(11, 21):
        write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
    with Running(client, raw, settle=0.2) as watcher:
        wait_for(lambda: n_frames(client) == 20, what="all 20 frames after the restart")
        wait_for(lambda: watcher.stats.backlog == 0, what="nothing waiting")
    assert np.array_equal(client["raw/scan/frames"].read(), frames)
    table = client["raw/scan/headers"].read()
    assert sorted(table["frame"]) == list(range(1, 21)) and len(table) == 20
    assert client["raw/scan"].metadata["scan"]["frames"] == 20


def test_watcher_killed_between_frames_and_rows_is_repaired(setup, monkeypatch):
    """The window a kill -9 can hit: frames extended, header rows not yet appended.
    The next watcher adds the missing rows and says so on the scan."""
    from tiled.client.dataframe import DataFrameClient

    client, raw, _ = setup
    frames = make_frames(5)
    real = DataFrameClient.append_partition
    calls = []

    def dies_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("killed")  # nothing after this line runs, as with SIGKILL
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DataFrameClient, "append_partition", dies_on_second)
    running = Running(client, raw, settle=0.2)
    with running:
        write_cbf(raw / "scan_00001.cbf", frames[0], 1)
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        write_cbf(raw / "scan_00002.cbf", frames[1], 2)
        running.thread.join(20)
        assert not running.thread.is_alive(), "the watcher should have died"
    assert n_frames(client) == 2 and list(client["raw/scan/headers"].read()["frame"]) == [1]
    monkeypatch.setattr(DataFrameClient, "append_partition", real)
    for i in (3, 4, 5):
        write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
    with Running(client, raw, settle=0.2):
        wait_for(lambda: n_frames(client) == 5, what="all frames")
    table = client["raw/scan/headers"].read()
    assert sorted(table["frame"]) == [1, 2, 3, 4, 5]
    assert table.set_index("frame").loc[2, "file"] == "scan_00002.cbf"
    assert table.set_index("frame").loc[2, "xxh3_64"] is not None
    assert any("no row for frame 2" in p for p in problems_of(client))
    md = client["raw/scan"].metadata
    assert md["scan"]["frames"] == 5 and md["source"]["files"] == 5


def test_half_made_scan_node_is_rebuilt(setup):
    """A scan node without its source record (a watcher or register killed while
    creating it) is rebuilt from the files, and says so."""
    client, raw, _ = setup
    frames = make_frames(3)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    client.create_container("raw").create_container("scan", metadata={"scan": {"frames": 1}})
    with Running(client, raw, settle=0.2):
        wait_for(lambda: n_frames(client) == 3, what="the rebuilt scan")
    assert np.array_equal(client["raw/scan/frames"].read(), frames)
    assert any("stopped half-way" in p for p in problems_of(client))


# ---------------------------------------------------------------- the disk fills while stacking


def test_disk_full_while_the_watcher_stacks(tmp_path):
    """The watcher (a process limited by ``ulimit -f``: EFBIG, as a full disk) fails to
    stack: a clear problem on the scan node, the old scan file intact, no partial file,
    and the next frames still flow."""
    import os
    import resource
    import subprocess
    import sys

    from tiled.client import from_uri

    raw, scans = tmp_path / "raw", tmp_path / "scans"
    raw.mkdir()
    scans.mkdir()
    old = b"an older stacked scan file" * 4
    (scans / "scan.nxs").write_bytes(old)
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 2**31, (8, 128, 128), dtype=np.int32)  # incompressible: 64 KB a frame

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    with start_server(tmp_path / "db", [raw, scans]) as url:
        client = from_uri(url, api_key=API_KEY)
        log = open(tmp_path / "watch.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "scatterbroker", "watch", str(raw), "--uri", url, "--prefix", "raw",
             "--stack-to", str(scans), "--stack-after", "0.5"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit,
            env={**os.environ, "SCATTERBROKER_API_KEY": API_KEY},
        )
        try:
            wait_for(lambda: "watching" in (tmp_path / "watch.log").read_text(), what="watcher start")
            for i, frame in enumerate(noise, start=1):
                write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
            wait_for(lambda: n_frames(client) == 8, what="8 frames")
            wait_for(lambda: any("stacking scan failed" in p for p in problems_of(client)), timeout=60,
                     what="the stacking failure on the scan node")
            (problem,) = [p for p in problems_of(client) if "stacking" in p]
            assert "file size limit was reached" in problem and "the existing scan.nxs is untouched" in problem
            assert (scans / "scan.nxs").read_bytes() == old
            assert sorted(p.name for p in scans.iterdir()) == ["scan.nxs"]  # no .scan.nxs.part
            write_cbf(raw / "scan_00009.cbf", noise[0], 9)
            wait_for(lambda: n_frames(client) == 9, what="a frame after the failure")
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def test_watcher_rides_out_a_server_restart(tmp_path, monkeypatch):
    """The server goes away mid-scan and comes back: the watcher waits, then carries on."""
    import socket

    import tiled.client.utils

    # Tiled's client retries a refused connection for up to ~45 s by itself; the
    # watcher's own retry is what is tested here, so make the client give up fast.
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_TIMEOUT", 1.0)

    from conftest import SQLITE
    from tiled.client import from_uri

    from scatterbroker.server.app import build_app, serve_in_thread

    raw = tmp_path / "raw"
    raw.mkdir()
    frames = make_frames(6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def server():
        return serve_in_thread(build_app(SQLITE.config(tmp_path / "db", [raw])), port=port)

    running = None
    try:
        with server() as url:
            running = Running(from_uri(url, api_key=API_KEY), raw)
            watcher = running.__enter__()
            for i in range(3):
                write_cbf(raw / f"scan_{i + 1:05d}.cbf", frames[i], i + 1)
            wait_for(lambda: n_frames(from_uri(url, api_key=API_KEY)) == 3, what="first frames")
        # server down: frames keep landing, the watcher says so and keeps running
        for i in range(3, 6):
            write_cbf(raw / f"scan_{i + 1:05d}.cbf", frames[i], i + 1)
        wait_for(lambda: watcher.stats.server_down != "", timeout=60, what="the watcher to notice")
        assert running.thread.is_alive() and "UNREACHABLE" in watcher.stats.line()
        with server() as url:
            client = from_uri(url, api_key=API_KEY)
            wait_for(lambda: n_frames(client) == 6, timeout=60, what="frames written while down")
            wait_for(lambda: watcher.stats.server_down == "", what="the watcher to see the server back")
            assert running.thread.is_alive()
            assert np.array_equal(client["raw/scan/frames"][:], frames)
            assert list(client["raw/scan/headers"].read()["frame"]) == [1, 2, 3, 4, 5, 6]
            running.__exit__(None, None, None)
            running = None
    finally:
        if running is not None:
            running.__exit__(None, None, None)


def test_follow_calls_back_once_per_frame_in_order_at_10_frames_per_second(setup):
    """The documented way to watch a live scan: scatterbroker.clients.follow. Tiled holds
    subscription callbacks weakly (an inline lambda never fired) and one update can carry
    several frames; follow() keeps its callback and calls it once per frame, in order."""
    import gc

    from scatterbroker.clients import follow

    client, raw, _ = setup
    n = 20
    frames = make_frames(n + 1)
    got: list[tuple[int, np.ndarray]] = []
    with Running(client, raw):
        write_cbf(raw / "scan_00001.cbf", frames[0], 1)
        wait_for(lambda: n_frames(client) == 1, what="first frame")
        from scatterbroker.clients import live as following

        follow(client["raw/scan/frames"], lambda i, frame: got.append((i, frame)))  # result dropped
        gc.collect()  # the follower and its inline lambda must survive this
        (follower,) = following._active
        try:
            for i in range(2, n + 2):  # 10 frames per second
                write_cbf(raw / f"scan_{i:05d}.cbf", frames[i - 1], i)
                time.sleep(0.1)
            wait_for(lambda: len(got) >= n or follower.errors, timeout=60, what=f"{n} frames followed")
            assert not follower.errors, follower.errors
        finally:
            follower.stop()
        assert not following._active
    assert [i for i, _ in got] == list(range(1, n + 1))  # each index once, in order
    for i, frame in got:
        assert np.array_equal(frame, frames[i]), i
