"""Stacking frames into NeXus scan files: layout, codecs, bad input, atomicity, parallelism, CLI."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the filters for reading)
import numpy as np
import pytest
from conftest import API_KEY, start_server, write_cbf

from scatterbroker.catalog.stacking import stack_scan
from scatterbroker.reduction import stack as S
from scatterbroker.reduction.stack import (
    DiskFull,
    DuplicateFrames,
    MissingFrames,
    StackError,
    stack_files,
)

SHAPE = (64, 80)
N = 12


def frames(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.poisson(0.5, (n, *SHAPE)).astype(np.int32)
    out[:, 10, 20] = np.arange(n) * 1000 + 17  # tells frames apart
    out[:, 30, 40] = 900_000  # a strong peak
    return out


@pytest.fixture
def scan(tmp_path) -> tuple[Path, np.ndarray]:
    """scan_00001.cbf ... scan_00012.cbf (angle 10 + 0.1*i deg) in tmp_path/raw."""
    raw = tmp_path / "raw"
    raw.mkdir()
    data = frames()
    for i, frame in enumerate(data, start=1):
        write_cbf(raw / f"scan_{i:05d}.cbf", frame, i)
    return raw, data


def filter_ids(dset) -> list[int]:
    plist = dset.id.get_create_plist()
    return [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]


def test_layout_and_read_back(scan, tmp_path):
    from nexusformat.nexus import nxload

    raw, data = scan
    out = tmp_path / "scan.nxs"
    report = stack_files(str(raw / "scan_*.cbf"), out, workers=1)
    assert report.path == out and report.n_frames == N and report.missing == []
    assert report.frame_shape == SHAPE and report.dtype == "int32" and report.codec == "bitshuffle-lz4"
    assert report.bytes_raw == data.nbytes and report.bytes_out == out.stat().st_size
    assert report.bytes_read == sum(p.stat().st_size for p in raw.iterdir())
    assert "12 frames (64x80 int32)" in report.summary() and "no missing frames" in report.summary()
    assert not list(tmp_path.glob(".*.part"))
    with h5py.File(out, "r") as f:
        assert f.attrs["NX_class"] == "NXroot" and f["entry"].attrs["NX_class"] == "NXentry"
        assert f["entry"].attrs["default"] == "data"
        dset = f["entry/instrument/detector/data"]
        assert f["entry/instrument"].attrs["NX_class"] == "NXinstrument"
        assert f["entry/instrument/detector"].attrs["NX_class"] == "NXdetector"
        assert f["entry/sample"].attrs["NX_class"] == "NXsample"
        assert dset.shape == (N, *SHAPE) and dset.dtype == np.int32 and dset.chunks == (1, *SHAPE)
        assert filter_ids(dset) == [32008]  # Bitshuffle
        assert np.array_equal(dset[()], data)
        nxdata = f["entry/data"]
        assert nxdata.attrs["NX_class"] == "NXdata" and nxdata.attrs["signal"] == "data"
        assert list(nxdata.attrs["axes"]) == ["rotation_angle", ".", "."]
        assert nxdata["data"].id == dset.id  # hard link, not a copy
        assert np.allclose(nxdata["rotation_angle"][()], 10 + 0.1 * np.arange(1, N + 1))
        assert nxdata["rotation_angle"].attrs["units"] == "deg"
        assert list(nxdata["frame_number"][()]) == list(range(1, N + 1))
        assert f["entry/instrument/detector/missing_frames"].shape == (0,)
        # Harvested header metadata, canonical units.
        assert f["entry/instrument/detector/distance"][()] == pytest.approx(500.0)
        assert f["entry/instrument/detector/distance"].attrs["units"] == "mm"
        assert f["entry/instrument/monochromator/wavelength"].attrs["units"] == "angstrom"
    root = nxload(str(out), "r")
    assert np.array_equal(root["entry/data/data"].nxdata, data)
    assert root["entry/data"].nxsignal.nxname == "data"
    assert root["entry/data"].nxaxes[0].nxname == "rotation_angle"


def test_parallel_equals_serial(scan, tmp_path):
    raw, data = scan
    serial = stack_files(str(raw / "scan_*.cbf"), tmp_path / "serial.nxs", workers=1)
    parallel = stack_files(str(raw / "scan_*.cbf"), tmp_path / "parallel.nxs", workers=2)
    assert serial.executor == "serial" and parallel.executor == "2 processes"
    with h5py.File(tmp_path / "serial.nxs") as a, h5py.File(tmp_path / "parallel.nxs") as b:
        da, db = a["entry/data/data"], b["entry/data/data"]
        assert np.array_equal(da[()], db[()]) and np.array_equal(db[()], data)
        for i in range(N):  # same compressed bytes, chunk by chunk
            assert da.id.read_direct_chunk((i, 0, 0)) == db.id.read_direct_chunk((i, 0, 0))
        assert np.array_equal(a["entry/data/rotation_angle"][()], b["entry/data/rotation_angle"][()])


@pytest.mark.parametrize("dtype", ["int32", "uint16", "float32", "int64"])
@pytest.mark.parametrize("shape", [(3, 5), (64, 80), (7, 1001)])
def test_fast_bitshuffle_matches_the_hdf5_filter(shape, dtype):
    from scatterbroker import bitshuffle

    frame = np.random.default_rng(1).poisson(3.0, shape).astype(dtype)
    filters = S.BitshuffleLZ4().filters()
    assert bitshuffle.compress_lz4(frame, lambda f: S._encode_with_hdf5(f, filters)[1]) is not None, \
        "the hdf5plugin bitshuffle library was not usable"
    assert S.BitshuffleLZ4().encode(frame) == S._encode_with_hdf5(frame, filters)


@pytest.mark.parametrize("codec,filter_id", [("gzip", 1), ("zstd", 32015), ("lz4", 32004), ("none", None)])
def test_other_codecs(scan, tmp_path, codec, filter_id):
    raw, data = scan
    out = tmp_path / f"{codec}.nxs"
    stack_files(sorted(raw.glob("*.cbf")), out, codec=codec, workers=2)
    with h5py.File(out) as f:
        dset = f["entry/data/data"]
        assert np.array_equal(dset[()], data)
        assert filter_ids(dset) == ([filter_id] if filter_id else [])
        # Chunks are what the HDF5 filter itself stores for these frames.
        mask, chunk = dset.id.read_direct_chunk((4, 0, 0))
        assert (mask, chunk) == S._encode_with_hdf5(data[4], S.CODECS[codec].filters())


def _break_some(raw: Path) -> None:
    """Frame 3: not CBF; 5: gone; 8: truncated; 10: another shape."""
    (raw / "scan_00003.cbf").write_bytes(b"this is not a CBF file at all" * 10)
    (raw / "scan_00005.cbf").unlink()
    whole = (raw / "scan_00008.cbf").read_bytes()
    (raw / "scan_00008.cbf").write_bytes(whole[: len(whole) * 2 // 3])
    write_cbf(raw / "scan_00010.cbf", np.ones((32, 40), np.int32), 10)


def test_bad_frames_int32_keep_their_slot_as_minus_one(scan, tmp_path):
    raw, data = scan
    _break_some(raw)
    out = tmp_path / "scan.nxs"
    report = stack_files(str(raw / "scan_*.cbf"), out, workers=2)
    assert [n for n, _ in report.missing] == [3, 5, 8, 10]
    why = dict(report.missing)
    assert "scan_00003.cbf" in why[3] and "not a CBF" in why[3]
    assert "gap in the frame numbers" in why[5]  # the glob cannot find it
    assert "scan_00008.cbf" in why[8] and "truncated" in why[8]
    assert "scan_00010.cbf" in why[10] and "shape (32, 40)" in why[10]
    assert "4 missing frames: 3, 5, 8, 10" in report.summary()
    with h5py.File(out) as f:
        stacked = f["entry/data/data"][()]
        assert stacked.dtype == np.int32 and stacked.shape == (N, *SHAPE)
        for i in range(N):  # no frame shifted: frame i+1 stays at position i
            expected = np.full(SHAPE, -1, np.int32) if i + 1 in why else data[i]
            assert np.array_equal(stacked[i], expected), i
        assert list(f["entry/instrument/detector/missing_frames"][()]) == [3, 5, 8, 10]
        reasons = [r.decode() for r in f["entry/instrument/detector/missing_frames_reasons"][()]]
        assert reasons == [why[n] for n in (3, 5, 8, 10)]
        # Angles of missing frames are interpolated; the axis stays regular.
        assert np.allclose(f["entry/data/rotation_angle"][()], 10 + 0.1 * np.arange(1, N + 1))


def test_bad_frames_float32_become_nan(scan, tmp_path):
    raw, data = scan
    _break_some(raw)
    out = tmp_path / "scan.nxs"
    report = stack_files(str(raw / "scan_*.cbf"), out, dtype="float32", workers=1)
    assert report.dtype == "float32" and [n for n, _ in report.missing] == [3, 5, 8, 10]
    with h5py.File(out) as f:
        stacked = f["entry/data/data"][()]
    assert stacked.dtype == np.float32
    bad = np.array([i + 1 in (3, 5, 8, 10) for i in range(N)])
    assert np.isnan(stacked[bad]).all()
    assert np.array_equal(stacked[~bad], data[~bad].astype(np.float32))


def test_any_format_with_a_sequence_adapter(tmp_path):
    """TIFF frames via the registry; a frame of another dtype is reported, its slot
    reads as the unsigned type's maximum."""
    import tifffile

    data = frames(6).astype(np.uint16)
    for i, frame in enumerate(data, start=1):
        tifffile.imwrite(tmp_path / f"img_{i:04d}.tif", frame.astype(np.float32) if i == 4 else frame)
    report = stack_files(tmp_path, tmp_path / "tif.nxs", workers=2)  # a directory with one scan
    assert report.dtype == "uint16" and report.missing == [
        (4, "img_0004.tif: frame dtype float32 differs from the scan's uint16")
    ]
    with h5py.File(tmp_path / "tif.nxs") as f:
        stacked = f["entry/data/data"][()]
        assert list(f["entry/data"].attrs["axes"]) == ["frame_number", ".", "."]  # no angles in plain TIFFs
    assert np.array_equal(stacked[[0, 1, 2, 4, 5]], data[[0, 1, 2, 4, 5]])
    assert (stacked[3] == 65535).all()


def test_strict_refuses_and_writes_nothing(scan, tmp_path):
    raw, _ = scan
    (raw / "scan_00004.cbf").unlink()
    out = tmp_path / "scan.nxs"
    with pytest.raises(MissingFrames, match=r"1 of 12 frames missing .*nothing written"):
        stack_files(str(raw / "scan_*.cbf"), out, strict=True, workers=1)
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


def test_all_frames_unreadable(tmp_path):
    for i in range(1, 4):
        (tmp_path / f"scan_{i:05d}.cbf").write_bytes(b"###CBF: VERSION 1.5\n" + b"x" * 100)
    with pytest.raises(StackError, match="none of the 3 frames is readable"):
        stack_files(str(tmp_path / "scan_*.cbf"), tmp_path / "out.nxs")
    assert not (tmp_path / "out.nxs").exists()


def test_duplicate_frame_numbers_are_refused(scan, tmp_path):
    raw, _ = scan
    shutil.copy(raw / "scan_00002.cbf", raw / "scan_0002.cbf")
    with pytest.raises(DuplicateFrames, match="frame 2 appears twice: scan_00002.cbf and scan_0002.cbf"):
        stack_files(str(raw / "scan_*.cbf"), tmp_path / "out.nxs")
    with pytest.raises(DuplicateFrames, match="listed twice"):
        stack_files([raw / "scan_00001.cbf", raw / "scan_00001.cbf"], tmp_path / "out.nxs")
    assert not (tmp_path / "out.nxs").exists()


def test_a_file_without_a_frame_number_is_refused(scan, tmp_path):
    raw, _ = scan
    shutil.copy(raw / "scan_00002.cbf", raw / "scan_final.cbf")
    with pytest.raises(StackError, match="scan_final.cbf: no frame number in the name"):
        stack_files(str(raw / "scan_*.cbf"), tmp_path / "out.nxs")


def test_never_writes_an_input_file(scan):
    raw, _ = scan
    target = raw / "scan_00003.cbf"
    before = target.read_bytes()
    with pytest.raises(StackError, match="raw files are never written"):
        stack_files(str(raw / "scan_*.cbf"), target)
    assert target.read_bytes() == before


def test_disk_full_keeps_the_old_file(scan, tmp_path, monkeypatch):
    raw, data = scan
    out = tmp_path / "scan.nxs"
    stack_files(str(raw / "scan_*.cbf"), out, workers=1)
    old = out.read_bytes()
    write = S._write_chunk
    calls = []

    def fill_up(dset, position, mask, chunk):
        calls.append(position)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(dset, position, mask, chunk)

    monkeypatch.setattr(S, "_write_chunk", fill_up)
    with pytest.raises(DiskFull, match="no space left .* partial file was removed; the existing scan.nxs is untouched"):
        stack_files(str(raw / "scan_*.cbf"), out, workers=2)
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "scan.nxs"]


def test_file_size_limit_is_a_clear_disk_full_error(scan, tmp_path):
    """A real failed write, without root: ``ulimit -f`` in a child process makes the
    kernel refuse to grow the file (EFBIG; Python ignores SIGXFSZ). HDF5 reports it
    while closing the file, as a RuntimeError: it must still be a DiskFull."""
    raw, _ = scan
    out = tmp_path / "out" / "scan.nxs"
    out.parent.mkdir()
    out.write_bytes(b"old scan file" * 10)
    noise = np.random.default_rng(5).integers(0, 2**31, (10, *SHAPE), dtype=np.int32)
    for i, frame in enumerate(noise, start=1):  # incompressible: 10 x 20 KB
        write_cbf(raw / f"noise_{i:05d}.cbf", frame, i)
    child = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from scatterbroker.reduction.stack import DiskFull, stack_files
try:
    stack_files({str(raw / "noise_*.cbf")!r}, {str(out)!r}, codec="none", workers=int(sys.argv[1]))
except DiskFull as err:
    print("DiskFull:", err)
"""
    for workers in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", child, workers], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"DiskFull: the file size limit was reached (File too large) while writing scan.nxs in "
            f"{out.parent}: the partial file was removed; the existing scan.nxs is untouched"
        ), done.stdout + done.stderr
        assert out.read_bytes() == b"old scan file" * 10
        assert sorted(p.name for p in out.parent.iterdir()) == ["scan.nxs"]


def test_real_full_disk(scan, tmp_path):
    """A 600 KB tmpfs (needs root; skipped elsewhere): HDF5's own ENOSPC error."""
    raw, data = scan
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        out = mnt / "scan.nxs"
        out.write_bytes(b"old scan file" * 1000)
        big = raw.parent / "big"
        big.mkdir()
        noise = np.random.default_rng(5).integers(0, 2**31, (40, *SHAPE), dtype=np.int32)
        for i, frame in enumerate(noise, start=1):  # incompressible: 40 x 20 KB
            write_cbf(big / f"noise_{i:05d}.cbf", frame, i)
        with pytest.raises(DiskFull, match="untouched"):
            stack_files(str(big / "noise_*.cbf"), out, codec="none", workers=2)
        assert out.read_bytes() == b"old scan file" * 1000
        assert sorted(p.name for p in mnt.iterdir()) == ["scan.nxs"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_stack_scan_from_a_served_node(tmp_path):
    """Stack a registered scan node; register the result; the frame node keeps working."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "data" / "raw" / "p1" / "sampleA"
    raw.mkdir(parents=True)
    data = frames(8, seed=3)
    for i, frame in enumerate(data, start=1):
        write_cbf(raw / f"scan1_{i:05d}.cbf", frame, i)
    scans = tmp_path / "data" / "scans"
    scans.mkdir()
    with start_server(tmp_path / "db", [tmp_path / "data"]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, tmp_path / "data" / "raw", prefix="raw")
        node = client["raw/p1/sampleA/scan1"]
        out = scans / "scan1.nxs"
        report = stack_scan(node, out, workers=2)
        assert report.n_frames == 8 and report.missing == []
        with h5py.File(out) as f:
            assert np.array_equal(f["entry/data/data"][()], data)
            assert np.allclose(f["entry/data/rotation_angle"][()], 10 + 0.1 * np.arange(1, 9))
            assert f["entry/sample/name"][()].decode() == "sampleA"
            assert f["entry/instrument/detector/distance"].attrs["units"] == "mm"
            assert f["entry"].attrs["source"] == node.uri
        # The stacked file becomes a node; the per-frame node is untouched.
        result = register(client, out, prefix="scans/sampleA")
        assert result.created == ["scans/sampleA/scan1"], result.failed
        served = client["scans/sampleA/scan1/entry/data/data"]
        assert np.array_equal(served[2:5], data[2:5])
        assert np.array_equal(client["raw/p1/sampleA/scan1/frames"][6], data[6])
        # The same through the CLI, by global URI.
        cli = subprocess.run(
            [sys.executable, "-m", "scatterbroker", "stack", node.uri, str(scans / "cli.nxs"),
             "--api-key", API_KEY, "--float32", "--register", "scans/sampleA"],
            capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert "8 frames (64x80 float32) -> cli.nxs" in cli.stdout
        with h5py.File(scans / "cli.nxs") as f:
            assert np.array_equal(f["entry/data/data"][()], data.astype(np.float32))
        assert np.array_equal(client["scans/sampleA/cli/entry/data/data"][1], data[1].astype(np.float32))


def test_dask_executor(scan, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    raw, data = scan
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        monkeypatch.setenv(S.DASK_ADDRESS_ENV, cluster.scheduler_address)
        report = stack_files(str(raw / "scan_*.cbf"), tmp_path / "dask.nxs")
    assert report.executor.startswith("dask ")
    with h5py.File(tmp_path / "dask.nxs") as f:
        assert np.array_equal(f["entry/data/data"][()], data)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scatterbroker", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_stacks_a_directory_glob(scan, tmp_path):
    raw, data = scan
    (raw / "scan_00006.cbf").unlink()
    out = tmp_path / "cli.nxs"
    done = run_cli("stack", "--files", str(raw / "scan_*.cbf"), str(out), "--workers", "2")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.count("\n") == 0
    assert "12 frames (64x80 int32) -> cli.nxs" in line and "frames/s" in line and "MB/s raw" in line
    assert "% of raw (bitshuffle-lz4)" in line and "1 missing frames: 6" in line
    assert "missing frame 6" in done.stderr
    with h5py.File(out) as f:
        assert np.array_equal(f["entry/data/data"][:5], data[:5])
        assert list(f["entry/instrument/detector/missing_frames"][()]) == [6]


def test_cli_errors_are_one_line(scan, tmp_path):
    raw, _ = scan
    shutil.copy(raw / "scan_00002.cbf", raw / "scan_002.cbf")
    done = run_cli("stack", "--files", str(raw / "scan_*.cbf"), str(tmp_path / "x.nxs"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "DuplicateFrames: frame 2 appears twice" in done.stderr
    done = run_cli("stack", "--files", str(tmp_path / "nothing_*.cbf"), str(tmp_path / "x.nxs"))
    assert done.returncode == 1 and "no files match" in done.stderr
    assert not (tmp_path / "x.nxs").exists()
