"""The one NeXus writer (reduction/nexus_file.py): complete or nothing, never over an input."""

from __future__ import annotations

import os

import h5py
import pytest

from scatterbroker.reduction import nexus_file
from scatterbroker.reduction.nexus_file import RawFileProtected, new_nexus_file


def test_renamed_into_place_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "scan.nxs"
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(nexus_file.os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    with new_nexus_file(out) as f:
        f["x"] = [1, 2, 3]
        assert not out.exists() and (tmp_path / ".scan.nxs.part").exists()
    assert synced and sorted(p.name for p in tmp_path.iterdir()) == ["scan.nxs"]
    with h5py.File(out, "r") as f:
        assert list(f["x"][()]) == [1, 2, 3]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failure_keeps_the_old_file_and_leaves_nothing(tmp_path, error):
    out = tmp_path / "scan.nxs"
    out.write_bytes(b"old")
    with pytest.raises(error):
        with new_nexus_file(out) as f:
            f["x"] = [1]
            raise error("half-way")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nxs"]


def test_an_input_is_never_written(tmp_path):
    raw = tmp_path / "frame_00001.cbf"
    raw.write_bytes(b"raw")
    link = tmp_path / "link.cbf"
    link.symlink_to(raw)
    for target in (raw, link):
        with pytest.raises(RawFileProtected, match="raw files are never written"):
            with new_nexus_file(target, inputs=[link if target == raw else raw]):
                pass
    assert raw.read_bytes() == b"raw" and sorted(p.name for p in tmp_path.iterdir()) == [raw.name, link.name]
