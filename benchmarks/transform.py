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
   Conversion and gridding times are reported separately.
3. optionally **Dask**: ``partial()`` tasks over frame ranges on a
   ``LocalCluster`` of 2 single-threaded workers (numba 1 thread each), summed
   with ``merge`` and finished, vs the in-process figure of (1). Each worker
   builds the same frame pool itself before the clock starts, so no frames
   travel; the 2 x 16 bytes x voxels of each task's (v, n) do.

After timing, the parent checks that the two grids agree (identical ``n`` and
``v/n`` to 1e-6 on interior voxels; the outermost layer differs by design:
xrayutilities' edge voxels are half-width) and reports mismatches.

Targets on 2 cores: >= 8x xrayutilities at 101^3 (about 400 Mpixel/s), >= 4x
at 401^3 (about 150 Mpixel/s), peak RSS bounded by ``16 bytes x voxels x
threads`` plus the frames. Timings are printed, never asserted. The machine
may be shared: the load average before/after and each child's CPU use
(CPU-seconds per wall-second) are printed with the figures.

Run
---
    python benchmarks/transform.py                                 # 360 frames, 101^3 and 401^3 (~3 min here)
    python benchmarks/transform.py --frames 64 --grid 101          # quick
    python benchmarks/transform.py --no-dask --repeat 3

The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
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

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

SHAPE = (1475, 1679)  # Pilatus 2M (rows, columns)
POOL = 32
SEED = 20261125
TARGET_RATIO = {101: 8.0, 401: 4.0}
TARGET_MPIX = {101: 400.0, 401: 150.0}


# --------------------------------------------------------------------------- shared set-up


def setup(n_frames: int, grid_n: int, shape: tuple[int, int]):
    """Geometry, UB and grid of the benchmark (the same in every process)."""
    from scatterbroker.reduction.geometry import Geometry, Goniometer, Grid, UB, rotation_matrix

    ny, nx = shape
    geom = Geometry(
        wavelength=0.5, distance=500.0, beam_center=(nx / 2 - 0.3, ny / 2 + 0.4), pixel_size=(0.172, 0.172),
        goniometer=Goniometer(scan_axis="phi", start=0.0, step=0.1),
    )
    ub = UB.from_lattice(4.0, 4.0, 4.0, 90, 90, 90, U=rotation_matrix([1.0, 0.3, 0.2], 17.0))
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
    conv = grid_t = 0.0
    c0, t0 = cpu_s(), time.perf_counter()
    gridder = xu.Gridder3D(grid.H.num, grid.K.num, grid.L.num)
    gridder.KeepData(True)
    gridder.dataRange(grid.H.start, grid.H.stop, grid.K.start, grid.K.stop, grid.L.start, grid.L.stop, fixed=True)
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
    data = gridder.data
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0
    pixels = a.frames * shape[0] * shape[1]
    if a.save:
        np.save(Path(a.save) / "xu_n.npy", gridder._gnorm.transpose(2, 1, 0))
        np.save(Path(a.save) / "xu_v.npy", gridder._gdata.transpose(2, 1, 0))
    del data
    return {
        "contender": "xrayutilities", "grid": a.grid_n, "batch": a.xu_batch, "threads_conversion": xu.config.NTHREADS or os.cpu_count(),
        "wall_s": wall, "cpu_s": cpu, "mpix_s": pixels / wall / 1e6, "cores_used": cpu / wall,
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


# --------------------------------------------------------------------------- parent


def run_child(kind: str, a: argparse.Namespace, grid_n: int, save: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--grid-n", str(grid_n), "--frames", str(a.frames),
           "--shape", *map(str, a.shape), "--block", str(a.block), "--xu-batch", str(a.xu_batch),
           "--repeat", str(a.repeat), "--dask-tasks", str(a.dask_tasks)]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=360)
    p.add_argument("--grid", type=int, nargs="+", default=[101, 401], help="voxels per axis, one run per value")
    p.add_argument("--shape", type=int, nargs=2, default=list(SHAPE), metavar=("NY", "NX"))
    p.add_argument("--block", type=int, default=16, help="frames per transform block")
    p.add_argument("--xu-batch", type=int, default=4, help="frames per xrayutilities conversion call")
    p.add_argument("--repeat", type=int, default=2, help="runs of ours per grid (best is reported)")
    p.add_argument("--no-xu", action="store_true")
    p.add_argument("--no-dask", action="store_true")
    p.add_argument("--dask-grid", type=int, nargs="*", default=[101], help="grids to run through Dask")
    p.add_argument("--dask-tasks", type=int, default=8)
    p.add_argument("--no-compare", action="store_true", help="skip the ours-vs-xrayutilities grid check")
    p.add_argument("--child", choices=["ours", "xu", "dask"], help=argparse.SUPPRESS)
    p.add_argument("--grid-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child:
        fn = {"ours": child_ours, "xu": child_xu, "dask": child_dask}[a.child]
        print(json.dumps(fn(a)))
        return 0

    have_xu = not a.no_xu
    if have_xu:
        try:
            import xrayutilities  # noqa: F401
        except ImportError:
            print("xrayutilities is not installed: measuring scatterbroker only")
            have_xu = False
    have_dask = not a.no_dask
    if have_dask:
        try:
            import distributed  # noqa: F401
        except ImportError:
            have_dask = False

    import numba

    pixels = a.frames * a.shape[0] * a.shape[1]
    print(f"{a.frames} frames of {a.shape[0]} x {a.shape[1]} = {pixels / 1e6:.0f} Mpixel; "
          f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()} ({numba.config.THREADING_LAYER}); "
          f"load average before {os.getloadavg()[0]:.2f}")
    summary: dict[str, Any] = {"frames": a.frames, "shape": a.shape, "pixels": pixels, "cpus": os.cpu_count(),
                               "load_before": os.getloadavg()[0], "grids": {}}
    for n in a.grid:
        entry: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp:
            save = None if (a.no_compare or not have_xu) else tmp
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
                print(f"  xrayutilities   {x['mpix_s']:8.0f} Mpixel/s  ({x['wall_s']:.2f} s; conversion "
                      f"{x['conversion_mpix_s']:.0f}, Gridder3D {x['gridding_mpix_s']:.0f} Mpixel/s; "
                      f"{x['cores_used']:.2f} cores busy)  peak RSS {x['peak_rss_mb']:.0f} MB")
                ratio = ours["mpix_s"] / x["mpix_s"]
                entry["ratio"] = ratio
                target = TARGET_RATIO.get(n)
                verdict = "" if target is None else (" (target >= %.0fx: %s)" % (target, "met" if ratio >= target else "MISSED"))
                print(f"  ratio           {ratio:8.1f}x{verdict}")
                if save:
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
        summary["grids"][str(n)] = entry
    summary["load_after"] = os.getloadavg()[0]
    print(f"\nload average after {summary['load_after']:.2f} (other processes share the cores)")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
