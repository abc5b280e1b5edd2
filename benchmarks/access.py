"""Remote slicing: local h5py/fabio vs stock Tiled vs h5grove vs scatterbroker.

What is measured
----------------
Same files, same machine, one run. Every server runs in its own process on a
free 127.0.0.1 port (started, and its data registered, before any clock
starts); the clients run in this process. The page cache is warmed by one
local read of every file first, so all columns read from memory.

Files (written once into ``--workdir`` and reused while the parameters match):

* ``stack.h5``: ``/data`` (N, 1024, 1024) uint32, Poisson counts, one frame per
  HDF5 chunk, uncompressed (N = 200: 839 MB);
* ``stack_bslz4.h5``: the same frames compressed with Bitshuffle-LZ4
  (hdf5plugin), the layout scatterbroker's stacking writes;
* ``list10k.h5``: a group ``/entries`` of 10,000 small datasets, each with a
  ``units`` attribute (the "10,000-node container");
* ``cbf/p1/s1/scan1_NNNNN.cbf``: 2,000 Pilatus-100K frames (195 x 487 int32,
  byte-offset CBF written by fabio).

Columns:

``local``
    h5py (file opened once; ``d[...]``) and, for CBF, ``fabio.open`` of every
    file into one array, in one process: the physical reference;
``stock``
    stock Tiled 0.2.20 serving the HDF5 files with its own ``HDF5Adapter``
    (``build_app`` over a ``MapAdapter``, single-user API key), read with the
    standard ``tiled.client.from_uri`` client and its default settings. For
    the CBF row (stock Tiled has no CBF reader) the column is a plain Tiled
    ``ArrayClient`` reading scatterbroker's node through Tiled's standard
    ``/array/full`` endpoint: what any non-scatterbroker client gets;
``h5grove``
    h5grove 4 (FastAPI router) behind uvicorn, ``/data/?format=npy`` read with
    httpx (keep-alive) and ``np.load``; ``/meta/`` for the listing;
``scatterbroker``
    ``scatterbroker serve``'s app (SQLite catalog, the files registered as
    they would be by ``scatterbroker serve DIR``), read with
    ``tiled.client.from_uri`` -- which picks ``FastArrayClient`` by the
    ``sb-array`` spec.

Rows: whole stack; one frame (median of ``--frame-reps`` random frames);
ROI ``[:, 500:532, 500:532]``; 100 random single frames read one after the
other; metadata listing of the 10,000-node container; the CBF sequence read as
one (2000, 195, 487) stack; plus the whole Bitshuffle-LZ4 stack and one frame
of it. Every remote result is compared with the local one (exit status 1 on a
mismatch). Times are the best of ``--repeat`` runs for the large reads.

Server memory: VmRSS / VmHWM of the scatterbroker server process from
``/proc``, and its VmRSS before and after 1,000 further single-frame requests.

Targets (issue "Fast remote slicing"): whole stack >= 1 GB/s through the
Python client; one frame <= 5 ms; 100 random frames <= 0.5 s; ROI within 1.2x
of local h5py; CBF sequence >= 50 % of local fabio throughput; no RSS growth
over 1,000 requests. Figures are printed, never asserted.

Run
---
    python benchmarks/access.py                       # ~3-4 min first run, ~2 min after
    python benchmarks/access.py --frames 50 --cbf-files 500 --nodes 2000 --repeat 1
    python benchmarks/access.py --skip stock,h5grove  # scatterbroker vs local only
    python benchmarks/access.py --quick               # smoke test: 6 frames, 5 CBF files, 20 nodes

A contender whose package is not installed (h5grove) is skipped, and the
summary says so (``skipped``: column -> reason). The last line printed is a
JSON summary; ``main(argv)`` returns it as a dict (importing this module runs
nothing). The exit status is 1 if a remote result differed from the local one.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

API_KEY = "benchkey"
FRAME = (1024, 1024)
CBF_FRAME = (195, 487)  # Pilatus 100K
ROI = (slice(None), slice(500, 532), slice(500, 532))
COLUMNS = ("local", "stock", "h5grove", "scatterbroker")
CBF_HEADER = """# Detector: PILATUS 100K, 1-0001
# 2026-11-25T08:00:{second:02d}.000
# Pixel_size 172e-6 m x 172e-6 m
# Exposure_time 0.1000000 s
# Exposure_period 0.1000000 s
# Wavelength 0.7293 A
# Detector_distance 0.5000 m
# Beam_xy (240.00, 100.00) pixels
# Start_angle {angle:.4f} deg.
# Angle_increment 0.1000 deg.
# Phi {angle:.4f} deg."""
TARGETS = {
    "full_stack_GBps": 1.0,
    "one_frame_ms": 5.0,
    "random_100_s": 0.5,
    "roi_vs_local": 1.2,
    "cbf_vs_local": 0.5,
}


# ------------------------------------------------------------------------ data


def _frames(n: int, seed: int = 7) -> Callable[[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.poisson(3.0, (8, *FRAME)).astype(np.uint32)

    def frame(i: int) -> np.ndarray:
        f = np.roll(base[i % 8], i, axis=1)
        f[0, 0] = i  # every frame distinct
        return f

    return frame


def write_data(work: Path, n: int, cbf_files: int, nodes: int) -> dict[str, Path]:
    import fabio.cbfimage
    import h5py
    import hdf5plugin

    params = {"frames": n, "cbf_files": cbf_files, "nodes": nodes, "version": 3}
    data = work / "data"
    manifest = work / "manifest.json"
    paths = {
        "stack": data / "stack.h5",
        "bslz4": data / "stack_bslz4.h5",
        "list": data / "list10k.h5",
        "cbf": data / "cbf" / "p1" / "s1",
    }
    if manifest.exists() and json.loads(manifest.read_text()) == params:
        return paths
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    frame = _frames(n)
    for key, codec in (("stack", {}), ("bslz4", dict(hdf5plugin.Bitshuffle(cname="lz4")))):
        with h5py.File(paths[key], "w") as f:
            d = f.create_dataset("data", shape=(n, *FRAME), dtype="<u4", chunks=(1, *FRAME), **codec)
            for i in range(n):
                d[i] = frame(i)
    with h5py.File(paths["list"], "w") as f:
        g = f.create_group("entries")
        for i in range(nodes):
            d = g.create_dataset(f"e{i:05d}", data=np.array([i, i + 0.5, i + 0.25]))
            d.attrs["units"] = "mm"
    paths["cbf"].mkdir(parents=True)
    rng = np.random.default_rng(3)
    base = rng.poisson(0.5, CBF_FRAME).astype(np.int32)
    for i in range(cbf_files):
        img = np.roll(base, i)
        img[0, 0] = i
        header = {"_array_data.header_convention": "PILATUS_1.2",
                  "_array_data.header_contents": CBF_HEADER.format(second=i % 60, angle=0.1 * i)}
        fabio.cbfimage.CbfImage(data=img, header=header).write(str(paths["cbf"] / f"scan1_{i + 1:05d}.cbf"))
    manifest.write_text(json.dumps(params))
    print(f"wrote test data in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return paths


# --------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STOCK = """
import sys, logging, uvicorn
from tiled.adapters.hdf5 import HDF5Adapter
from tiled.adapters.mapping import MapAdapter
from tiled.config import Authentication
from tiled.server.app import build_app
from tiled.utils import ensure_uri
stack, bslz4, lst, port, key = sys.argv[1:6]
tree = MapAdapter({name: HDF5Adapter.from_uris(ensure_uri(p)) for name, p in
                   (("stack", stack), ("bslz4", bslz4), ("list10k", lst))})
app = build_app(tree, authentication=Authentication(single_user_api_key=key))
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""

H5GROVE = """
import sys, uvicorn
from fastapi import FastAPI
from h5grove.fastapi_utils import router, settings
settings.base_dir = sys.argv[1]
app = FastAPI()
app.include_router(router)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""

SCATTERBROKER = """
import sys, uvicorn
from pathlib import Path
from scatterbroker.server.app import build_app, local_config
data_dir, root, port, key = sys.argv[1:5]
app = build_app(local_config(Path(data_dir), [Path(root)], api_key=key), freeze_gc=True)  # as serve does
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


class Server:
    def __init__(self, name: str, script: str, args: list[str], port: int, work: Path) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=work)

    def wait(self, path: str, timeout: float = 180) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self.proc.returncode}); see its log")
            try:
                if httpx.get(self.url + path, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} server did not start in {timeout} s")

    def pids(self) -> list[int]:
        """The processes counted as the server: this one process (load.WorkersServer adds workers)."""
        return [self.proc.pid]

    def _proc(self, name: str) -> Iterator[str]:
        """``/proc/<pid>/<name>`` of each of :meth:`pids` (one that has gone is skipped, unless the first)."""
        for n, pid in enumerate(self.pids()):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    text = f.read()
            except OSError:
                if n == 0:
                    raise
                continue
            yield text

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM, MB, summed over :meth:`pids`."""
        out: dict[str, float] = {}
        for text in self._proc("status"):
            for line in text.splitlines():
                if line.startswith(("VmRSS", "VmHWM")):
                    key, value = line.split(":")
                    out[key] = out.get(key, 0.0) + int(value.split()[0]) / 1024  # MB
        return out

    def cpu(self) -> float:
        """CPU seconds (user + system) the server's processes (:meth:`pids`) have used so far."""
        total = 0.0
        for text in self._proc("stat"):
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------- timing


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def median_each(fn: Callable[[int], Any], indices: list[int]) -> float:
    times = []
    for i in indices:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def each(arr: Any, indices: list[int]) -> None:
    """Read frames one after the other, as a loop over a scan would (results not kept)."""
    for i in indices:
        arr[i]


class Mismatch(AssertionError):
    pass


def same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("=") or not np.array_equal(a, b):
        raise Mismatch(f"{what}: got {a.dtype} {a.shape}, expected {b.dtype} {b.shape} (or values differ)")


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and the JSON line; return that summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=200, help="frames in the HDF5 stack (1024 x 1024 uint32)")
    p.add_argument("--cbf-files", type=int, default=2000, help="files in the CBF sequence (195 x 487)")
    p.add_argument("--nodes", type=int, default=10000, help="members of the listed container")
    p.add_argument("--repeat", type=int, default=3, help="runs of each large read; the best counts")
    p.add_argument("--frame-reps", type=int, default=30, help="single-frame reads for the median")
    p.add_argument("--rss-requests", type=int, default=1000, help="requests of the memory-growth check")
    p.add_argument("--random-reads", type=int, default=100, help="frames of the random_100 row (default 100)")
    p.add_argument("--cpu-frames", type=int, default=50, help="frame requests of the CPU accounting (default 50)")
    p.add_argument("--skip", default="", help="comma-separated columns to leave out: stock,h5grove")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the files are written and reused (default $TMPDIR/sb-access-bench, "
                        "with --quick sb-access-bench-quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 6 frames, 5 CBF files, 20 nodes, one run of each read, 3 single frames, "
                        "10 random frames, 5 CPU-accounting and 10 memory-check requests (same code paths, "
                        "every column)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.cbf_files, args.nodes, args.repeat = 6, 5, 20, 1  # frames 3 and 5 are read
        args.frame_reps, args.rss_requests, args.random_reads, args.cpu_frames = 3, 10, 10, 5
    if args.workdir is None:
        args.workdir = Path(os.environ.get("TMPDIR", "/tmp")) / ("sb-access-bench-quick" if args.quick
                                                                 else "sb-access-bench")
    warnings.filterwarnings("ignore")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    skipped: dict[str, str] = {}  # a contender that cannot run here -> why
    if "h5grove" not in skip and importlib.util.find_spec("h5grove") is None:
        skipped["h5grove"] = "h5grove is not installed (pip install h5grove)"
        skip.add("h5grove")
    for col, why in skipped.items():
        print(f"{col}: skipped, {why}", file=sys.stderr)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = write_data(work, args.frames, args.cbf_files, args.nodes)
    n = args.frames
    rng = random.Random(11)
    picks = [rng.randrange(n) for _ in range(args.random_reads)]
    singles = [rng.randrange(n) for _ in range(args.frame_reps)]

    servers: dict[str, Server] = {}
    try:
        sbdata = work / "sbdata"
        shutil.rmtree(sbdata, ignore_errors=True)
        port = _free_port()
        servers["scatterbroker"] = Server("scatterbroker", SCATTERBROKER,
                                          [sbdata, work / "data", port, API_KEY], port, work)
        if "stock" not in skip:
            port = _free_port()
            servers["stock"] = Server("stock", STOCK, [paths["stack"], paths["bslz4"], paths["list"], port, API_KEY], port, work)
        if "h5grove" not in skip:
            port = _free_port()
            servers["h5grove"] = Server("h5grove", H5GROVE, [work / "data", port], port, work)
        results, rss, failures = run(args, paths, servers, picks, singles, skip)
    finally:
        for s in servers.values():
            s.stop()
    return report(args, results, rss, skip, failures, skipped)


def run(args, paths, servers, picks, singles, skip):
    import fabio
    import h5py
    import hdf5plugin  # noqa: F401
    import httpx
    from tiled.client import from_uri
    from tiled.client.array import ArrayClient

    from scatterbroker.catalog.register import register

    n = args.frames
    results: dict[str, dict[str, dict[str, Any]]] = {}
    failures: list[str] = []
    cpu: dict[str, dict[str, float]] = {}
    results["_cpu"] = cpu  # type: ignore[assignment]

    def cell(row: str, col: str, fn: Callable[[], tuple[float, Any]], nbytes: int | None = None,
             check: Callable[[Any], None] | None = None) -> None:
        """Time ``fn`` (-> (seconds, result)), check the result, record it; never raise."""
        try:
            seconds, result = fn()
            if check is not None:
                check(result)
        except Mismatch as err:
            failures.append(f"{row}/{col}: {err}")
            results.setdefault(row, {})[col] = {"error": f"wrong result: {err}"}
            print(f"  {row:<22} {col:<14} WRONG RESULT {err}", file=sys.stderr, flush=True)
            return
        except Exception as err:  # a contender failing is a result, not a crash
            text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
            results.setdefault(row, {})[col] = {"error": text}
            print(f"  {row:<22} {col:<14} FAILED {text}", file=sys.stderr, flush=True)
            return
        entry = {"s": seconds}
        if nbytes:
            entry["MBps"] = nbytes / seconds / 1e6
        results.setdefault(row, {})[col] = entry
        shown = f"{seconds * 1e3:9.1f} ms" + (f"  {nbytes / seconds / 1e6:8.0f} MB/s" if nbytes else "")
        print(f"  {row:<22} {col:<14} {shown}", file=sys.stderr, flush=True)

    def hdf5_rows(col: str, arr: Any, arrb: Any) -> None:
        cell("full_stack", col, lambda: best(arr.read, args.repeat), ref_full.nbytes,
             lambda got: same(got, ref_full, f"{col} full stack"))
        cell("one_frame", col, lambda: (median_each(lambda i: arr[i], singles), arr[3]),
             check=lambda got: same(got, ref_full[3], f"{col} frame"))
        cell("roi", col, lambda: best(lambda: arr[ROI], args.repeat * 2),
             check=lambda got: same(got, ref_roi, f"{col} roi"))
        cell("random_100", col, lambda: best(lambda: each(arr, picks), args.repeat))
        cell("bslz4_full_stack", col, lambda: best(arrb.read, args.repeat), ref_full.nbytes,
             lambda got: same(got, ref_full, f"{col} bslz4 full stack"))
        cell("bslz4_one_frame", col, lambda: (median_each(lambda i: arrb[i], singles), arrb[5]),
             check=lambda got: same(got, ref_full[5], f"{col} bslz4 frame"))

    def listing(col: str, fn: Callable[[], list]) -> None:
        def check(items: list) -> None:
            if len(items) != args.nodes:
                raise Mismatch(f"{len(items)} entries listed, {args.nodes} expected")

        cell("list_10k", col, lambda: best(fn, 1), check=check)

    # -- local, which also warms the page cache
    cbf_files = sorted(paths["cbf"].glob("*.cbf"))

    def read_cbf_local() -> np.ndarray:
        out = np.empty((len(cbf_files), *CBF_FRAME), dtype=np.int32)
        for k, f in enumerate(cbf_files):
            out[k] = fabio.open(str(f)).data
        return out

    print("local (h5py / fabio)", file=sys.stderr)
    with h5py.File(paths["stack"], "r") as f, h5py.File(paths["bslz4"], "r") as fb:
        d, db = f["data"], fb["data"]
        ref_full = d[()]
        ref_roi = d[ROI]
        db[()]
        hdf5_rows("local", d_reader(d), d_reader(db))
    with h5py.File(paths["list"], "r") as f:
        g = f["entries"]
        listing("local", lambda: [(k, v.shape, dict(v.attrs)) for k, v in g.items()])
    ref_cbf = read_cbf_local()
    cell("cbf_sequence", "local", lambda: best(read_cbf_local, args.repeat), ref_cbf.nbytes)

    # -- servers up and registered (not timed)
    sb = servers["scatterbroker"]
    sb.wait("/api/v1/")
    admin = from_uri(sb.url, api_key=API_KEY)
    report = register(admin, paths["stack"].parent, prefix="data")
    if report.failed:
        print(f"registration problems: {report.failed[:3]}", file=sys.stderr)
    for s in servers.values():
        s.wait("/api/v1/" if s.name != "h5grove" else "/")

    # -- scatterbroker
    print("scatterbroker", file=sys.stderr)
    client = from_uri(sb.url, api_key=API_KEY)
    arr = client["data/stack/data"]
    scan = client["data/cbf/p1/s1"]
    frames_node = next(iter(scan.values()))["frames"]
    print(f"  client classes: {type(arr).__name__}, {type(frames_node).__name__}", file=sys.stderr)
    arrb = client["data/stack_bslz4/data"]
    hdf5_rows("scatterbroker", arr, arrb)
    # the same Bitshuffle-LZ4 reads with the chunks decoded on the server instead
    arrb.direct_chunks = False
    cell("bslz4_full_stack_server_decode", "scatterbroker", lambda: best(arrb.read, args.repeat), ref_full.nbytes,
         lambda got: same(got, ref_full, "server-decoded bslz4 full stack"))
    cell("bslz4_one_frame_server_decode", "scatterbroker",
         lambda: (median_each(lambda i: arrb[i], singles), arrb[5]),
         check=lambda got: same(got, ref_full[5], "server-decoded bslz4 frame"))
    arrb.direct_chunks = True
    node = client["data/list10k/entries"]
    listing("scatterbroker", lambda: [(k, v.metadata) for k, v in node.items()])
    frames_node[:2]
    cell("cbf_sequence", "scatterbroker", lambda: best(frames_node.read, args.repeat), ref_cbf.nbytes,
         lambda got: same(got, ref_cbf, "scatterbroker cbf"))

    cpu["scatterbroker"] = cpu_account(sb, arr, n, args.cpu_frames)

    # -- memory of the scatterbroker server: then growth over N more requests
    rss = {"before": sb.memory()}
    for k in range(args.rss_requests):
        arr[k % n]
    rss["after"] = sb.memory()
    rss["requests"] = args.rss_requests
    print(f"  server memory (MB): {rss}", file=sys.stderr)

    # -- stock Tiled
    if "stock" in servers:
        print("stock Tiled", file=sys.stderr)
        stock = from_uri(servers["stock"].url, api_key=API_KEY)
        hdf5_rows("stock", stock["stack/data"], stock["bslz4/data"])
        cpu["stock"] = cpu_account(servers["stock"], stock["stack/data"], n, args.cpu_frames)
        snode = stock["list10k/entries"]
        listing("stock", lambda: [(k, v.metadata) for k, v in snode.items()])
        cell("cbf_sequence", "stock", lambda: best(lambda: ArrayClient.read(frames_node), max(1, args.repeat - 1)),
             ref_cbf.nbytes, lambda got: same(got, ref_cbf, "stock cbf"))

    # -- h5grove
    if "h5grove" in servers:
        print("h5grove", file=sys.stderr)
        http = httpx.Client(base_url=servers["h5grove"].url, timeout=600)

        class Grove:
            def __init__(self, file: str) -> None:
                self.file = file

            def get(self, selection: str | None = None) -> np.ndarray:
                params = {"file": self.file, "path": "/data", "format": "npy"}
                if selection:
                    params["selection"] = selection
                r = http.get("/data", params=params)
                r.raise_for_status()
                return np.load(io.BytesIO(r.content))

            def __getitem__(self, key: Any) -> np.ndarray:
                if isinstance(key, int):
                    return self.get(str(key))
                if key == ROI:
                    return self.get(":,500:532,500:532")
                raise KeyError(key)

            def read(self) -> np.ndarray:
                return self.get()

        hdf5_rows("h5grove", Grove("stack.h5"), Grove("stack_bslz4.h5"))

        def meta() -> list:
            r = http.get("/meta", params={"file": "list10k.h5", "path": "/entries"})
            r.raise_for_status()
            return r.json()["children"]

        listing("h5grove", meta)
    return results, rss, failures


def cpu_account(server: Server, arr: Any, n: int, k: int = 50) -> dict[str, float]:
    """CPU time, not wall time, per MB and per frame request, client and server.

    On a shared machine wall times depend on what else runs; CPU seconds
    spent per MB show where the time goes and what two idle cores would give.
    """
    out: dict[str, float] = {}
    try:
        c0, s0 = time.process_time(), server.cpu()
        whole = arr.read()
        c1, s1 = time.process_time(), server.cpu()
        mb = whole.nbytes / 1e6
        del whole
        out["whole_client_ms_per_MB"] = (c1 - c0) / mb * 1e3
        out["whole_server_ms_per_MB"] = (s1 - s0) / mb * 1e3
        c0, s0 = time.process_time(), server.cpu()
        for i in range(k):
            arr[i % n]
        c1, s1 = time.process_time(), server.cpu()
        out["frame_client_ms"] = (c1 - c0) / k * 1e3
        out["frame_server_ms"] = (s1 - s0) / k * 1e3
    except Exception as err:
        out["error"] = str(err)[:120]  # type: ignore[assignment]
    print(f"  CPU: {out}", file=sys.stderr, flush=True)
    return out


class d_reader:
    """An h5py dataset with the ``read()`` the remote contenders have."""

    def __init__(self, dset: Any) -> None:
        self.dset = dset

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.dset[key]

    def read(self) -> np.ndarray:
        return self.dset[()]


ROWS = [
    ("full_stack", "whole stack"),
    ("one_frame", "one frame"),
    ("roi", "ROI [:,500:532,500:532]"),
    ("random_100", "100 random frames"),
    ("list_10k", "listing, 10k nodes"),
    ("cbf_sequence", "CBF sequence"),
    ("bslz4_full_stack", "whole stack, bslz4 file"),
    ("bslz4_one_frame", "one frame, bslz4 file"),
    ("bslz4_full_stack_server_decode", "  whole, server decodes"),
    ("bslz4_one_frame_server_decode", "  frame, server decodes"),
]


def report(args, results, rss, skip, failures, skipped=None) -> dict[str, Any]:
    """Print the table, the verdicts against the targets and the JSON line; return that summary."""
    cols = [c for c in COLUMNS if c not in skip]
    ok = lambda c: c is not None and "s" in c  # noqa: E731
    print()
    print(f"{'':26}" + "".join(f"{c:>24}" for c in cols) + f"{'sb/local':>10}{'stock/sb':>10}")
    for key, label in ROWS:
        if key == "random_100" and args.random_reads != 100:
            label = f"{args.random_reads} random frames"
        row = results.get(key, {})
        cells = []
        for c in cols:
            cell = row.get(c)
            if cell is None:
                text = "n/a"
            elif "error" in cell:
                text = "FAILED" if not cell["error"].startswith("wrong") else "WRONG"
            else:
                text = f"{cell['s'] * 1e3:.1f} ms" if cell["s"] < 10 else f"{cell['s']:.1f} s"
                if "MBps" in cell:
                    text += f" {cell['MBps']:.0f} MB/s"
            cells.append(f"{text:>24}")
        sbc, loc, stk = row.get("scatterbroker"), row.get("local"), row.get("stock")
        ratio = f"{sbc['s'] / loc['s']:.2f}x" if ok(sbc) and ok(loc) else "-"
        speed = f"{stk['s'] / sbc['s']:.1f}x" if ok(sbc) and ok(stk) else "-"
        print(f"{label:26}" + "".join(cells) + f"{ratio:>10}{speed:>10}")
    cpu = results.get("_cpu", {})
    errors = [(k, c, v["error"]) for k, row in results.items() if k != "_cpu"
              for c, v in row.items() if "error" in v]
    for k, c, e in errors:
        print(f"  {k} / {c}: {e}")

    def get(row: str, col: str, field: str) -> float | None:
        c = results.get(row, {}).get(col)
        return c.get(field) if c else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    checks = {
        "full_stack_GBps": (div(get("full_stack", "scatterbroker", "MBps"), 1e3), ">=", TARGETS["full_stack_GBps"]),
        "one_frame_ms": (div(get("one_frame", "scatterbroker", "s"), 1e-3), "<=", TARGETS["one_frame_ms"]),
        "random_100_s": (get("random_100", "scatterbroker", "s"), "<=", TARGETS["random_100_s"]),
        "roi_vs_local": (div(get("roi", "scatterbroker", "s"), get("roi", "local", "s")), "<=",
                         TARGETS["roi_vs_local"]),
        "cbf_vs_local": (div(get("cbf_sequence", "scatterbroker", "MBps"), get("cbf_sequence", "local", "MBps")),
                         ">=", TARGETS["cbf_vs_local"]),
        "rss_growth_MB": (rss["after"]["VmRSS"] - rss["before"]["VmRSS"], "<=", 50.0),
    }
    print()
    verdicts = {}
    for name, (value, op, target) in checks.items():
        met = value is not None and (value >= target if op == ">=" else value <= target)
        verdicts[name] = {"value": None if value is None else round(value, 4), "target": f"{op} {target}", "met": met}
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"  {name:<18} {shown:>10}   target {op} {target:<6}  {'met' if met else 'NOT MET'}")
    for col, acc in cpu.items():
        if "error" in acc:
            print(f"  CPU accounting {col}: {acc['error']}")
            continue
        print(f"  CPU {col:<13} whole stack: client {acc['whole_client_ms_per_MB']:.2f} + server "
              f"{acc['whole_server_ms_per_MB']:.2f} ms per MB;  one frame: client "
              f"{acc['frame_client_ms']:.2f} + server {acc['frame_server_ms']:.2f} ms")
    print(f"  scatterbroker server RSS: {rss['before']['VmRSS']:.0f} MB before, {rss['after']['VmRSS']:.0f} MB "
          f"after {rss['requests']} more frame requests; peak (VmHWM) {rss['after']['VmHWM']:.0f} MB")
    try:
        load = os.getloadavg()
        print(f"  load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    except OSError:
        load = None
    for col, why in (skipped or {}).items():
        print(f"  {col}: skipped, {why}")
    summary = {
        "benchmark": "access",
        "quick": getattr(args, "quick", False),
        "params": {"frames": args.frames, "cbf_files": args.cbf_files, "nodes": args.nodes,
                   "repeat": args.repeat, "random_reads": args.random_reads, "cpu_frames": args.cpu_frames,
                   "cpus": os.cpu_count(), "loadavg": load},
        "results": results, "targets": verdicts, "server_memory_MB": rss, "failures": failures,
        "skipped": dict(skipped or {}),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
