"""Reciprocal-space transform throughput: scatterbroker vs xrayutilities, pixels per second.

What is measured
----------------
A synthetic Pilatus-2M-sized rotation scan: ``--frames`` frames (default 360)
of 1475 x 1679 int32 counts, phi rotation 0.1 deg per frame, wavelength 0.5 Å,
distance 500 mm, 0.172 mm pixels, cubic a = 4 Å with a general U, onto HKL
grids of ``--grid`` voxels per axis (default 101 and 401) over [-3, 3]^3
r.l.u. (every pixel of this geometry falls inside, the most scatter work).

Both contenders get the **same frames and grid in the same run**, each in a
fresh child process (so each one's peak RSS is its own), with the frames
already in memory (views into a pool of 32 distinct random frames: neither pays
for I/O or decompression):

1. **scatterbroker**: ``scatterbroker.reduction.transform.transform`` with
   its default 16-frame blocks and all numba threads; the timed part includes
   the final reduction of per-thread grids and ``v/n``. Kernels are compiled
   (or loaded from numba's cache) before the clock starts. Best of
   ``--repeat`` runs.
2. **xrayutilities**, called the fast way: ``HXRD.Ang2HKL(..., dettype="area")``
   on ``--xu-batch`` frames at a time (its C conversion is OpenMP-parallel over
   the frames of a batch, so it uses both cores), each batch fed to one
   ``Gridder3D`` with a fixed data range and ``KeepData(True)``; then ``.data``.
   Conversion and gridding times are reported separately. Best of
   ``--xu-repeat`` runs (2): on a shared machine one slow reference run
   would flatter every ratio taken against it.
3. optionally **Dask**: ``partial()`` tasks over frame ranges on a
   ``LocalCluster`` of 2 single-threaded workers (numba 1 thread each), summed
   with ``merge`` and finished, vs the in-process figure of (1). Each worker
   builds the same frame pool itself before the clock starts, so no frames
   travel; the 2 x 16 bytes x voxels of each task's (v, n) do.
4. **end to end** (grids in ``--e2e-grid``, default 101): the same frames,
   written once (not timed) as a Bitshuffle-LZ4 NeXus scan file by
   ``scatterbroker.reduction.stack.write_scan``, with the geometry
   (wavelength, distance, beam centre, pixel size, rotation angle per frame)
   and the sample's ``orientation_matrix`` (U) and ``unit_cell``, served by a
   real scatterbroker server in its own process on 127.0.0.1 with an API key
   (benchmarks/access.py's server) and registered. Timed: ``POST
   /api/v1/jobs`` (operation ``transform``, input the scan's
   ``entry/instrument/detector/data`` node, geometry and grid in the
   parameters, the UB read by the job from the scan's NXsample unless
   ``--e2e-ub parameters``) until the job records ``finished``, which it does
   after the product node under ``/reduced`` is written and marked
   ``complete``; the client polls ``GET /api/v1/jobs/{id}`` every
   ``--e2e-poll`` s and checks the product's ``complete`` flag. The job reads
   the frames from the server like any client, decodes and bins them. Best
   of ``--e2e-repeat`` jobs; the first one after the server starts also pays
   the server's first import of the transform (numba, cached kernels). Peak
   RSS of the server process (and of it plus any job worker processes) is
   sampled every 100 ms during the job, VmHWM read after it; CPU is the
   server's (and its reaped children's), polls included (each ``GET
   /api/v1/jobs/{id}`` is one request).

After timing, the parent checks that the grids agree: ours vs xrayutilities
(identical ``n`` and ``v/n`` to 1e-6 on interior voxels; the outermost layer
differs by design: xrayutilities' edge voxels are half-width), and the
end-to-end product, read back with ``tiled.client.from_uri``, vs ours
in-process on the same frames (identical ``n``, ``v/n`` to 1e-6 everywhere,
NaN where empty).

Targets on 2 cores: >= 8x xrayutilities at 101^3 (about 400 Mpixel/s), >= 4x
at 401^3 (about 150 Mpixel/s), peak RSS bounded by ``16 bytes x voxels x
threads`` plus the frames; end to end >= 4x xrayutilities at 101^3 with the
server's RSS growth bounded by two blocks of frames plus the grids and the
product, whatever the number of frames. Timings are printed, never asserted.
The machine may be shared: the load average before/after and each child's CPU
use (CPU-seconds per wall-second) are printed with the figures.

Run
---
    python benchmarks/transform.py                                 # 360 frames, 101^3 and 401^3 (~4 min here)
    python benchmarks/transform.py --frames 64 --grid 101          # quick
    python benchmarks/transform.py --no-dask --repeat 3
    python benchmarks/transform.py --grid 101 --no-dask --repeat 1 # the end-to-end figure with its references
    python benchmarks/transform.py --quick                         # smoke test: 8 frames of 256 x 320, 21^3, all

A contender that cannot run here (xrayutilities or Dask not installed, or
``--no-xu`` / ``--no-dask``) is left out and the summary says why
(``skipped``). The last line printed is a JSON summary; ``main(argv)``
returns it as a dict (importing this module runs nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (1475, 1679)  # Pilatus 2M (rows, columns)
POOL = 32
SEED = 20261125
TARGET_RATIO = {101: 8.0, 401: 4.0}
TARGET_MPIX = {101: 400.0, 401: 150.0}
TARGET_E2E_RATIO = {101: 4.0}
JOB_BLOCK_FRAMES = 16  # frames per block in a transform job (transform()'s default block_frames)


# --------------------------------------------------------------------------- shared set-up


LATTICE = (4.0, 4.0, 4.0, 90.0, 90.0, 90.0)  # a, b, c (Å), alpha, beta, gamma (deg)


def orientation() -> np.ndarray:
    """U of the benchmark crystal (a general rotation)."""
    from scatterbroker.reduction.geometry import rotation_matrix

    return rotation_matrix([1.0, 0.3, 0.2], 17.0)


def setup(n_frames: int, grid_n: int, shape: tuple[int, int]):
    """Geometry, UB and grid of the benchmark (the same in every process)."""
    from scatterbroker.reduction.geometry import Geometry, Goniometer, Grid, UB

    ny, nx = shape
    geom = Geometry(
        wavelength=0.5, distance=500.0, beam_center=(nx / 2 - 0.3, ny / 2 + 0.4), pixel_size=(0.172, 0.172),
        goniometer=Goniometer(scan_axis="phi", start=0.0, step=0.1),
    )
    ub = UB.from_lattice(*LATTICE, U=orientation())
    grid = Grid.from_ranges((-3, 3), (-3, 3), (-3, 3), shape=grid_n)
    return geom, ub, grid


def make_pool(shape: tuple[int, int], size: int = POOL, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, (size, *shape), dtype=np.int32)


class PooledFrames:
    """A (n, ny, nx) stack whose frame i is pool[i % len(pool)]; slices are views when they fit."""

    def __init__(self, pool: np.ndarray, n: int) -> None:
        self.pool, self.shape, self.dtype = pool, (n, *pool.shape[1:]), pool.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            k = len(self.pool)
            if step == 1 and start % k + (stop - start) <= k:
                return self.pool[start % k : start % k + stop - start]
            return self.pool[np.arange(start, stop, step) % k]
        return self.pool[key % len(self.pool)]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- children


def child_ours(a: argparse.Namespace) -> dict[str, Any]:
    import numba

    from scatterbroker.reduction.transform import transform

    shape = tuple(a.shape)
    geom, ub, grid = setup(a.frames, a.grid_n, shape)
    frames = PooledFrames(make_pool(shape), a.frames)
    transform(frames[:1], geom, ub, setup(1, 5, shape)[2])  # compile / load numba cache
    base = rss_mb()
    runs = []
    res = None
    for _ in range(a.repeat):
        res = None
        c0, t0 = cpu_s(), time.perf_counter()
        res = transform(frames, geom, ub, grid, block_frames=a.block)
        _ = res.data
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "cpu_s": cpu_s() - c0})
    best = min(runs, key=lambda r: r["wall_s"])
    pixels = a.frames * shape[0] * shape[1]
    if a.save:
        np.save(Path(a.save) / "ours_n.npy", res.n)
        np.save(Path(a.save) / "ours_v.npy", res.v)
    return {
        "contender": "scatterbroker", "grid": a.grid_n, "threads": numba.get_num_threads(),
        "wall_s": best["wall_s"], "cpu_s": best["cpu_s"], "runs_s": [round(r["wall_s"], 3) for r in runs],
        "mpix_s": pixels / best["wall_s"] / 1e6, "mpix_per_cpu_s": pixels / best["cpu_s"] / 1e6,
        "cores_used": best["cpu_s"] / best["wall_s"], "in_grid": float(res.n.sum()) / pixels,
        "rss_base_mb": base, "peak_rss_mb": peak_rss_mb(),
        "grid_bytes_mb": grid.nbytes(numba.get_num_threads()) / 2**20,
    }


def child_xu(a: argparse.Namespace) -> dict[str, Any]:
    import xrayutilities as xu

    shape = tuple(a.shape)
    geom, ub, grid = setup(a.frames, a.grid_n, shape)
    frames = PooledFrames(make_pool(shape), a.frames)
    args = geom.xrayutilities_args(shape)
    hxrd = xu.HXRD([1, 0, 0], [0, 0, 1], wl=geom.wavelength, qconv=xu.experiment.QConversion(*args["qconv"]))
    hxrd.Ang2Q.init_area(**args["init_area"])
    base = rss_mb()
    best: dict[str, Any] | None = None
    runs = []
    for _ in range(max(1, a.xu_repeat)):  # best of N, like ours: the machine's noise hits both alike
        conv = grid_t = 0.0
        c0, t0 = cpu_s(), time.perf_counter()
        gridder = xu.Gridder3D(grid.H.num, grid.K.num, grid.L.num)
        gridder.KeepData(True)
        gridder.dataRange(grid.H.start, grid.H.stop, grid.K.start, grid.K.stop, grid.L.start, grid.L.stop,
                          fixed=True)
        for i in range(0, a.frames, a.xu_batch):
            count = min(a.xu_batch, a.frames - i)
            angles = geom.goniometer.circle_angles(i, count)
            t1 = time.perf_counter()
            h, k, l = hxrd.Ang2HKL(*angles.T, *args["detector_angles"], U=np.eye(3), B=ub.array, dettype="area")
            t2 = time.perf_counter()
            gridder(h, k, l, frames[i : i + count])
            del h, k, l
            conv += t2 - t1
            grid_t += time.perf_counter() - t2
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        runs.append(round(wall, 3))
        if best is None or wall < best["wall"]:
            best = {"wall": wall, "cpu": cpu, "conv": conv, "grid_t": grid_t, "gridder": gridder}
    wall, cpu, conv, grid_t, gridder = (best[k] for k in ("wall", "cpu", "conv", "grid_t", "gridder"))
    data = gridder.data
    pixels = a.frames * shape[0] * shape[1]
    if a.save:
        np.save(Path(a.save) / "xu_n.npy", gridder._gnorm.transpose(2, 1, 0))
        np.save(Path(a.save) / "xu_v.npy", gridder._gdata.transpose(2, 1, 0))
    del data
    return {
        "contender": "xrayutilities", "grid": a.grid_n, "batch": a.xu_batch, "threads_conversion": xu.config.NTHREADS or os.cpu_count(),
        "wall_s": wall, "cpu_s": cpu, "runs_s": runs, "mpix_s": pixels / wall / 1e6, "cores_used": cpu / wall,
        "conversion_mpix_s": pixels / conv / 1e6, "gridding_mpix_s": pixels / grid_t / 1e6,
        "rss_base_mb": base, "peak_rss_mb": peak_rss_mb(),
    }


def _dask_worker_task(first: int, count: int, params: dict, n_frames: int, shape: tuple[int, int]):
    """Runs on a Dask worker: partial (v, n) of frames first .. first+count-1 from the worker's own pool."""
    from distributed import get_worker

    from scatterbroker.reduction.transform import partial

    w = get_worker()
    frames = getattr(w, "_sb_bench_frames", None)
    if frames is None:
        frames = PooledFrames(make_pool(shape), n_frames)
        w._sb_bench_frames = frames
    return partial(frames[first : first + count], first, params)


def child_dask(a: argparse.Namespace) -> dict[str, Any]:
    os.environ["NUMBA_NUM_THREADS"] = "1"  # inherited by the worker processes: 1 core each
    from distributed import Client, LocalCluster

    from scatterbroker.reduction.geometry import TransformParams
    from scatterbroker.reduction.transform import finish, merge

    shape = tuple(a.shape)
    geom, ub, grid = setup(a.frames, a.grid_n, shape)
    params = TransformParams(geom, ub, grid).to_dict()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit=0) as cluster, Client(cluster) as client:
        warm = [client.submit(_dask_worker_task, 0, 1, TransformParams(geom, ub, setup(1, 5, shape)[2]).to_dict(),
                              a.frames, shape, workers=[w], pure=False)
                for w in client.scheduler_info()["workers"]]
        client.gather(warm)  # pools built, kernels compiled, before the clock
        per_task = max(1, -(-a.frames // a.dask_tasks))
        c0, t0 = cpu_s(), time.perf_counter()
        futures = [client.submit(_dask_worker_task, i, min(per_task, a.frames - i), params, a.frames, shape, pure=False)
                   for i in range(0, a.frames, per_task)]
        total = merge(client.gather(futures))
        res = finish(total, params)
        _ = res.data
        wall = time.perf_counter() - t0
    pixels = a.frames * shape[0] * shape[1]
    if a.save:
        np.save(Path(a.save) / "dask_n.npy", res.n)
    return {"contender": "dask", "grid": a.grid_n, "workers": 2, "tasks": len(futures), "wall_s": wall,
            "mpix_s": pixels / wall / 1e6, "client_cpu_s": cpu_s() - c0, "peak_rss_mb_client": peak_rss_mb()}


# --------------------------------------------------------------------------- end to end


def scan_metadata(geom) -> dict[str, Any]:
    """NeXus metadata of the benchmark scan (``stack.write_scan`` layout): geometry, sample U and cell."""
    (x0, y0), (px, py) = geom.beam_center, geom.pixel_size
    return {
        "sample": {"name": "bench", "orientation_matrix": orientation(), "unit_cell": np.array(LATTICE)},
        "instrument": {
            "monochromator": {"wavelength": geom.wavelength, "wavelength@units": "angstrom"},
            "detector": {
                "distance": geom.distance, "distance@units": "mm",
                "beam_center_x": x0, "beam_center_x@units": "pixel", "beam_center_y": y0, "beam_center_y@units": "pixel",
                "x_pixel_size": px, "x_pixel_size@units": "mm", "y_pixel_size": py, "y_pixel_size@units": "mm",
            },
        },
    }


def write_bench_scan(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's frames as a Bitshuffle-LZ4 NeXus scan file (``stack.write_scan``), with its geometry."""
    from scatterbroker.reduction.stack import write_scan

    shape = tuple(a.shape)
    geom = setup(a.frames, 5, shape)[0]
    t0 = time.perf_counter()
    write_scan(path, PooledFrames(make_pool(shape), a.frames), angles=geom.goniometer.scan_angles(0, a.frames),
               metadata=scan_metadata(geom), codec="bitshuffle-lz4")
    return {"write_s": time.perf_counter() - t0, "file_mb": path.stat().st_size / 1e6,
            "raw_mb": a.frames * shape[0] * shape[1] * 4 / 1e6}


class ServedScan:
    """The scan file served by a real scatterbroker server in its own process (benchmarks/access.py's), registered."""

    NODE = "scans/bench/entry/instrument/detector/data"

    def __init__(self, a: argparse.Namespace, work: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from access import API_KEY, SCATTERBROKER, Server, _free_port
        from tiled.client import from_uri

        from scatterbroker.catalog.register import register

        root = work / "scans"
        root.mkdir()
        self.file = write_bench_scan(root / "bench.nxs", a)
        port = _free_port()
        self.api_key = API_KEY
        self.server = Server("scatterbroker", SCATTERBROKER, [work / "sbdata", root, port, API_KEY], port, work)
        try:
            self.server.wait("/api/v1/")
            report = register(from_uri(self.server.url, api_key=API_KEY), root, prefix="scans")
            if report.failed:
                raise RuntimeError(f"registration failed: {report.failed}")
            self.uri = from_uri(self.server.url, api_key=API_KEY)[self.NODE].uri
        except BaseException:
            self.server.stop()
            raise

    def close(self) -> None:
        self.server.stop()


class TreeMemory:
    """Peak RSS of a process and of it plus its children, sampled on a thread every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import threading

        import psutil

        self.proc, self.interval = psutil.Process(pid), interval
        self.base_mb = self.proc.memory_info().rss / 2**20
        self.peak_mb = self.peak_tree_mb = self.base_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            try:
                own = self.proc.memory_info().rss
                tree = own
                for child in self.proc.children(recursive=True):
                    try:
                        tree += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak_mb = max(self.peak_mb, own / 2**20)
            self.peak_tree_mb = max(self.peak_tree_mb, tree / 2**20)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_s(self) -> float:
        """CPU seconds of the process and its reaped children (job worker processes) so far."""
        t = self.proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system


def run_job(served: ServedScan, a: argparse.Namespace, grid_n: int, output: str, poll: float) -> dict[str, Any]:
    """POST a transform job for the served scan, poll it until done, check its product is complete; timed."""
    import httpx
    from tiled.client import from_uri

    geom, ub, grid = setup(a.frames, grid_n, tuple(a.shape))
    params: dict[str, Any] = {"geometry": geom.to_dict(), "grid": grid.to_dict()}
    if a.e2e_ub == "parameters":
        params["ub"] = ub.to_dict()  # else the job reads it from the scan's NXsample (orientation_matrix + unit_cell)
    body = {"operation": "transform", "inputs": [served.uri], "parameters": params, "output": output}
    headers = {"Authorization": f"Apikey {served.api_key}"}
    url = served.server.url
    memory = TreeMemory(served.server.proc.pid)
    c0, t0, posted = memory.cpu_s(), time.perf_counter(), time.time()
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        r = http.post("/api/v1/jobs", json=body)
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            record = http.get(f"/api/v1/jobs/{job_id}").json()
            if record.get("state") in ("done", "failed"):
                break
            time.sleep(poll)
    if record["state"] != "done":
        memory.stop()
        raise RuntimeError(f"the transform job failed: {record.get('error')}")
    product = from_uri(record["product"], api_key=served.api_key)
    complete = product.metadata.get("complete") is True
    seen = time.perf_counter() - t0
    memory.stop()
    if not complete:
        raise RuntimeError(f"the job is done but its product is not marked complete: {record['product']}")
    # the job records 'finished' after its product is marked complete; same machine, same clock
    wall = datetime.datetime.fromisoformat(record["finished"]).timestamp() - posted
    hwm = served.server.memory().get("VmHWM", float("nan"))
    # where the wall time went, from the job record's and the product's own timestamps
    ts = datetime.datetime.fromisoformat
    prov = product.metadata.get("provenance") or {}
    stamps = [("queued", posted), ("started", record.get("started")),
              ("computed", prov.get("started")), ("written", product.metadata.get("finished")),
              ("recorded", record["finished"])]
    stamps = [(k, v if isinstance(v, float) else ts(v).timestamp()) for k, v in stamps if v]
    phases = {f"{a_}->{b_}": round(tb - ta, 3) for (a_, ta), (b_, tb) in zip(stamps, stamps[1:])}
    pixels = a.frames * a.shape[0] * a.shape[1]
    return {
        "contender": "end-to-end", "grid": grid_n, "wall_s": wall, "mpix_s": pixels / wall / 1e6,
        "seen_s": seen, "server_cpu_s": memory.cpu_s() - c0, "product": record["product"],
        "ub_from": a.e2e_ub, "phases_s": phases, "server_rss_before_mb": memory.base_mb, "server_peak_rss_mb": memory.peak_mb,
        "server_tree_peak_rss_mb": memory.peak_tree_mb, "server_vmhwm_mb": hwm,
    }


def check_product(product_uri: str, api_key: str, tmp: str) -> dict[str, Any]:
    """The product's grid against the in-process kernel's on the same frames: ``n`` exactly, ``v/n`` to 1e-6."""
    from tiled.client import from_uri

    product = from_uri(product_uri, api_key=api_key)
    n, data = product["weights"].read(), product["data"].read()
    on, ov = np.load(f"{tmp}/ours_n.npy"), np.load(f"{tmp}/ours_v.npy")
    filled = on > 0
    expected = ov[filled] / on[filled]
    rel = float(np.max(np.abs(data[filled] - expected) / np.maximum(np.abs(expected), 1e-300))) if filled.any() else 0.0
    same_n = bool(n.shape == on.shape and np.array_equal(n, on))
    empty_nan = bool(np.isnan(data[~filled]).all())
    return {"n_identical": same_n, "max_rel_diff_data": rel, "empty_voxels_nan": empty_nan,
            "agree_1e-6": same_n and empty_nan and rel <= 1e-6}


# --------------------------------------------------------------------------- parent


def run_child(kind: str, a: argparse.Namespace, grid_n: int, save: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--grid-n", str(grid_n), "--frames", str(a.frames),
           "--shape", *map(str, a.shape), "--block", str(a.block), "--xu-batch", str(a.xu_batch),
           "--xu-repeat", str(a.xu_repeat), "--repeat", str(a.repeat), "--dask-tasks", str(a.dask_tasks)]
    if save:
        cmd += ["--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(tmp: str) -> dict[str, Any]:
    on, xn = np.load(f"{tmp}/ours_n.npy"), np.load(f"{tmp}/xu_n.npy")
    inner = (slice(1, -1),) * 3
    on_i, xn_i = on[inner], xn[inner]
    n_mismatch = int(np.count_nonzero(on_i != xn_i))
    del on, xn
    ov, xv = np.load(f"{tmp}/ours_v.npy")[inner], np.load(f"{tmp}/xu_v.npy")[inner]
    both = (on_i > 0) & (on_i == xn_i)
    od, xd = ov[both] / on_i[both], xv[both] / xn_i[both]
    rel = float(np.max(np.abs(od - xd) / np.maximum(np.abs(xd), 1e-300))) if both.any() else float("nan")
    return {"interior_voxels_filled": int(both.sum()), "n_mismatched_voxels": n_mismatch,
            "max_rel_diff_data": rel, "agree_1e-6": bool(n_mismatch == 0 and rel <= 1e-6)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or, with ``--child``, one contender), print the figures and the JSON line;
    return that summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=360)
    p.add_argument("--grid", type=int, nargs="+", default=[101, 401], help="voxels per axis, one run per value")
    p.add_argument("--shape", type=int, nargs=2, default=list(SHAPE), metavar=("NY", "NX"))
    p.add_argument("--block", type=int, default=16, help="frames per transform block")
    p.add_argument("--xu-batch", type=int, default=4, help="frames per xrayutilities conversion call")
    p.add_argument("--repeat", type=int, default=2, help="runs of ours per grid (best is reported)")
    p.add_argument("--xu-repeat", type=int, default=2, help="runs of xrayutilities per grid (best is reported)")
    p.add_argument("--no-xu", action="store_true")
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--dask-grid", type=int, nargs="*", default=[101], help="grids to run through Dask")
    p.add_argument("--dask-tasks", type=int, default=8)
    p.add_argument("--no-compare", action="store_true", help="skip the ours-vs-xrayutilities grid check")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run (served scan file, job system)")
    p.add_argument("--e2e-grid", type=int, nargs="*", default=[101], help="grids to run end to end")
    p.add_argument("--e2e-repeat", type=int, default=3, help="jobs per grid (best is reported; the first "
                   "one after the server starts also pays the server's imports)")
    p.add_argument("--e2e-ub", choices=["nexus", "parameters"], default="nexus",
                   help="job's UB: from the scan's NXsample (orientation_matrix + unit_cell) or in the parameters")
    p.add_argument("--e2e-poll", type=float, default=1.0, help="seconds between GET /api/v1/jobs/{id} (each "
                   "is one request to the server; the time reported is the job's own 'finished' time)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 frames of 256 x 320 onto 21^3, one run of each contender, Dask and end to "
                        "end included (same code paths)")
    p.add_argument("--child", choices=["ours", "xu", "dask"], help=argparse.SUPPRESS)
    p.add_argument("--grid-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    if a.child:
        fn = {"ours": child_ours, "xu": child_xu, "dask": child_dask}[a.child]
        result = fn(a)
        print(json.dumps(result))
        return result
    if a.quick:
        a.frames, a.shape, a.grid, a.dask_grid, a.e2e_grid = 8, [256, 320], [21], [21], [21]
        a.repeat, a.xu_repeat, a.e2e_repeat, a.e2e_poll, a.dask_tasks = 1, 1, 1, 0.2, 2

    skipped: dict[str, str] = {}  # a contender left out -> why
    have_xu = not a.no_xu
    if have_xu:
        try:
            import xrayutilities  # noqa: F401
        except ImportError:
            print("xrayutilities is not installed: measuring scatterbroker only")
            have_xu = False
            skipped["xrayutilities"] = "xrayutilities is not installed"
    else:
        skipped["xrayutilities"] = "--no-xu"
    have_dask = not a.no_dask
    if have_dask:
        try:
            import distributed  # noqa: F401
        except ImportError:
            have_dask = False
            skipped["dask"] = "distributed is not installed"
    else:
        skipped["dask"] = "--no-dask"
    if a.no_e2e:
        skipped["end_to_end"] = "--no-e2e"

    import numba

    pixels = a.frames * a.shape[0] * a.shape[1]
    print(f"{a.frames} frames of {a.shape[0]} x {a.shape[1]} = {pixels / 1e6:.0f} Mpixel; "
          f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()} ({numba.config.THREADING_LAYER}); "
          f"load average before {os.getloadavg()[0]:.2f}")
    summary: dict[str, Any] = {"benchmark": "transform", "quick": a.quick,
                               "frames": a.frames, "shape": a.shape, "pixels": pixels, "cpus": os.cpu_count(),
                               "load_before": os.getloadavg()[0], "grids": {}, "skipped": skipped}
    e2e_grids = [] if a.no_e2e else [n for n in a.grid if n in a.e2e_grid]
    with tempfile.TemporaryDirectory(prefix="sb-bench-e2e-") as work:
        served = None
        if e2e_grids:
            served = ServedScan(a, Path(work))
            f = served.file
            summary["e2e_file"] = f
            print(f"scan file: Bitshuffle-LZ4 NeXus, {f['file_mb']:.0f} MB ({f['raw_mb'] / f['file_mb']:.1f}x smaller "
                  f"than the frames; written in {f['write_s']:.1f} s, not timed), served by a scatterbroker server "
                  f"in its own process (pid {served.server.proc.pid}) at {served.server.url}")
        try:
            run_grids(a, summary, have_xu, have_dask, served, e2e_grids)
        finally:
            if served is not None:
                served.close()
    summary["load_after"] = os.getloadavg()[0]
    print(f"\nload average after {summary['load_after']:.2f} (other processes share the cores)")
    print(json.dumps(summary, default=float))
    return summary


def verdict(ratio: float, target: float | None) -> str:
    return "" if target is None else f" (target >= {target:.0f}x: {'met' if ratio >= target else 'MISSED'})"


def run_grids(a: argparse.Namespace, summary: dict[str, Any], have_xu: bool, have_dask: bool,
              served: ServedScan | None, e2e_grids: list[int]) -> None:
    for n in a.grid:
        entry: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
            compare_xu = have_xu and not a.no_compare
            save = tmp if (compare_xu or n in e2e_grids) else None
            ours = run_child("ours", a, n, save)
            entry["scatterbroker"] = ours
            print(f"\n{n}^3 grid ({ours['grid_bytes_mb']:.0f} MiB of per-thread v/n):")
            print(f"  scatterbroker   {ours['mpix_s']:8.0f} Mpixel/s  ({ours['wall_s']:.2f} s; runs {ours['runs_s']}; "
                  f"{ours['mpix_per_cpu_s']:.0f} Mpixel per CPU-s; {ours['cores_used']:.2f} cores busy; "
                  f"{100 * ours['in_grid']:.1f}% of pixels in grid)  peak RSS {ours['peak_rss_mb']:.0f} MB "
                  f"(frames+imports {ours['rss_base_mb']:.0f} MB)")
            if have_xu:
                x = run_child("xu", a, n, save)
                entry["xrayutilities"] = x
                print(f"  xrayutilities   {x['mpix_s']:8.0f} Mpixel/s  ({x['wall_s']:.2f} s; runs {x['runs_s']}; conversion "
                      f"{x['conversion_mpix_s']:.0f}, Gridder3D {x['gridding_mpix_s']:.0f} Mpixel/s; "
                      f"{x['cores_used']:.2f} cores busy)  peak RSS {x['peak_rss_mb']:.0f} MB")
                ratio = ours["mpix_s"] / x["mpix_s"]
                entry["ratio"] = ratio
                print(f"  ratio           {ratio:8.1f}x{verdict(ratio, TARGET_RATIO.get(n))}")
                if compare_xu:
                    entry["agreement"] = compare(tmp)
                    print(f"  agreement       {entry['agreement']}")
            if n in TARGET_MPIX:
                ok = ours["mpix_s"] >= TARGET_MPIX[n]
                print(f"  absolute target >= {TARGET_MPIX[n]:.0f} Mpixel/s: {'met' if ok else 'MISSED'}")
            if have_dask and n in a.dask_grid:
                d = run_child("dask", a, n, None)
                entry["dask"] = d
                print(f"  dask 2 workers  {d['mpix_s']:8.0f} Mpixel/s  ({d['wall_s']:.2f} s, {d['tasks']} tasks) "
                      f"= {d['mpix_s'] / ours['mpix_s']:.2f}x in-process")
            if n in e2e_grids:
                entry["end_to_end"] = end_to_end(a, served, n, tmp, entry.get("xrayutilities"))
        summary["grids"][str(n)] = entry


def end_to_end(a: argparse.Namespace, served: ServedScan, n: int, tmp: str, xu: dict | None) -> dict[str, Any]:
    runs = []
    for i in range(max(1, a.e2e_repeat)):
        load = os.getloadavg()[0]
        runs.append({**run_job(served, a, n, f"reduced/bench/transform-{n}-{i}", a.e2e_poll), "load_before": load})
    best = min(runs, key=lambda r: r["wall_s"])
    grid = setup(a.frames, n, tuple(a.shape))[2]
    # what the job holds at once: the block being binned and the next one being read, per-thread v/n
    # grids, data = v/n and one copy of it on its way to the server
    frame_bytes = a.shape[0] * a.shape[1] * 4
    bound = (2 * JOB_BLOCK_FRAMES * frame_bytes + grid.nbytes(os.cpu_count()) + 16 * grid.size) / 2**20
    growth = [r["server_peak_rss_mb"] - r["server_rss_before_mb"] for r in runs]
    out = {**best, "runs_s": [round(r["wall_s"], 3) for r in runs],
           "runs_peak_rss_mb": [round(r["server_peak_rss_mb"]) for r in runs],
           "runs_rss_growth_mb": [round(g) for g in growth], "rss_growth_bound_mb": bound,
           "rss_bounded": growth[-1] <= bound}
    print(f"  end to end      {best['mpix_s']:8.0f} Mpixel/s  ({best['wall_s']:.2f} s POST -> product complete -> job "
          f"finished; seen by polling after {best['seen_s']:.2f} s; runs {out['runs_s']}; server CPU "
          f"{best['server_cpu_s']:.1f} s = {best['server_cpu_s'] / best['wall_s']:.2f} cores; UB from {best['ub_from']})")
    print(f"  phases, s       {best['phases_s']} (best run; from the job record's and the product's timestamps)")
    print(f"  server RSS      before {best['server_rss_before_mb']:.0f} MB, peak {best['server_peak_rss_mb']:.0f} MB "
          f"(with job worker processes {best['server_tree_peak_rss_mb']:.0f} MB; VmHWM since start "
          f"{best['server_vmhwm_mb']:.0f} MB); per run peaks {out['runs_peak_rss_mb']} MB, growth during each job "
          f"{out['runs_rss_growth_mb']} MB (the first also imports the transform); bound {bound:.0f} MB "
          f"(2 blocks of {JOB_BLOCK_FRAMES} frames + grids + data): {'met' if out['rss_bounded'] else 'EXCEEDED'} by the last job")
    if xu is not None:
        out["ratio"] = best["mpix_s"] / xu["mpix_s"]
        print(f"  ratio e2e/xu    {out['ratio']:8.1f}x{verdict(out['ratio'], TARGET_E2E_RATIO.get(n))}")
    out["agreement"] = check_product(best["product"], served.api_key, tmp)
    print(f"  product vs kernel {out['agreement']}")
    return out


if __name__ == "__main__":
    main()
