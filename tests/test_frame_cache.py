"""Decoded frames are kept (scatterbroker.adapters.frame_cache) and never outlive their file's content.

A real server in this process (so the cache's counters are visible) serving a
CBF scan and a Bitshuffle-LZ4 NeXus stack written by fabio and h5py; regions
of frames are read twice through Tiled's route and the fast route, then the
files are replaced on disk.
"""

from __future__ import annotations

import h5py
import hdf5plugin
import httpx
import numpy as np
import pytest

from conftest import API_KEY, make_frames, write_cbf

from scatterbroker.adapters import frame_cache
from scatterbroker.adapters.frame_cache import FrameCache
from scatterbroker.server.app import build_app, local_config, serve_in_thread

AUTH = {"Authorization": f"Apikey {API_KEY}"}
OCTET = {**AUTH, "Accept": "application/octet-stream"}


def test_bounded_by_bytes_least_recently_used_first_out():
    cache = FrameCache(max_bytes=3 * 800)
    for i in range(3):
        cache.put(i, np.full(100, i, "<f8"))  # 800 bytes each
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(3, np.zeros(100, "<f8"))
    assert cache.get(1) is None and all(cache.get(k) is not None for k in (0, 2, 3))
    kept = cache.get(3)
    with pytest.raises(ValueError):
        kept[0] = 1  # read-only: the next reader gets the same array
    cache.put(4, np.zeros(1000))  # larger than the whole cache: not kept
    assert cache.get(4) is None and cache.get(0) is not None


def test_regions_read_again_come_from_memory_until_the_file_changes(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    d = tmp_path / "d"
    d.mkdir()
    frames = make_frames(3, seed=12)
    for i, frame in enumerate(frames, start=1):
        write_cbf(d / f"scan1_{i:05d}.cbf", frame, i)
    with h5py.File(d / "stack.h5", "w") as f:
        f.create_dataset("data", data=frames, chunks=(1, *frames.shape[1:]), **hdf5plugin.Bitshuffle(cname="lz4"))
    app = build_app(local_config(tmp_path / "db", [d], api_key=API_KEY), response_cache=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url + "/api/v1/") as http:
        register(from_uri(url, api_key=API_KEY), d, prefix="d")
        routes = [("array/full/d/scan1/frames", OCTET), ("sb/frames/d/scan1/frames", AUTH),
                  ("sb/frames/d/stack/data", AUTH)]

        def region(route: str, headers: dict) -> np.ndarray:
            r = http.get(route, params={"slice": "1,2:9,3:7"}, headers=headers)
            assert r.status_code == 200, r.text
            return np.frombuffer(r.content, "<i4").reshape(7, 4)

        for route, headers in routes:
            assert np.array_equal(region(route, headers), frames[1, 2:9, 3:7]), route
            hits = frame_cache.frames.stats["hit"]
            assert np.array_equal(region(route, headers), frames[1, 2:9, 3:7]), route
            assert frame_cache.frames.stats["hit"] > hits, f"{route}: not read from memory"
        # the files replaced on disk (new inodes), as a re-stacking or a restore would
        changed = frames[::-1] + 7  # every pixel differs
        for i, frame in enumerate(changed, start=1):
            write_cbf(d / f"new_{i}.cbf", frame, i)
            (d / f"new_{i}.cbf").replace(d / f"scan1_{i:05d}.cbf")
        with h5py.File(d / "new.h5", "w") as f:
            f.create_dataset("data", data=changed, chunks=(1, *frames.shape[1:]),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        (d / "new.h5").replace(d / "stack.h5")
        for route, headers in routes:
            assert np.array_equal(region(route, headers), changed[1, 2:9, 3:7]), f"{route} after the change"
