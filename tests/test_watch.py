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
