"""Load: N concurrent HTTP clients against one scatterbroker server while a watcher ingests frames.

What is measured
----------------
One scatterbroker server in its own process on a free 127.0.0.1 port (the
server of ``benchmarks/access.py``: ``build_app(local_config(...))`` under
uvicorn, one worker, SQLite catalog, API key; ``--server-workers N`` runs N
uvicorn workers of ``scatterbroker.server.app:app_factory`` on a throwaway
PostgreSQL catalog and tables instead, summing their RSS and CPU), serving
one data tree:

* ``raw/p1/s1/scan``: a registered CBF scan, ``--scan-frames`` (20) Pilatus-style
  frames of ``--shape`` (default 1679 x 1475 int32, a Pilatus 2M: 9.9 MB a
  frame decoded, ~2.5 MB a CBF file; miniCBF header, byte-offset);
* ``scans/p1/s1/scan``: the same frames stacked into a NeXus file with
  ``scatterbroker.reduction.stack.stack_files`` (Bitshuffle-LZ4, one frame per
  chunk), served as one node per group;
* ``live/scan``: a directory watched by ``scatterbroker watch`` (the CLI's
  ``Watcher``, inotify) in a *second process*, into which a *third process*
  (``ingest_latency.Writer``) writes new CBF frames of the same shape at
  ``--ingest-rate`` frames/s (default 5) for the whole run, each opened,
  written and closed in place like a detector does. Its first frame is written
  (and waited for) before the clock starts, so the node exists.

This process runs ``--clients`` (32) asyncio tasks, each with its own
``httpx.AsyncClient`` holding one keep-alive connection (``Authorization:
Apikey ...``), as that many users would. (One client with a pool of 32 was
measured first: httpcore scans the whole pool on every request, and that cost
this process more CPU than its requests, which on 2 cores the server then
lacked: 234 -> 348 requests/s on the same server, 2026-12-02.) Each task loops until ``--duration`` (60 s) is
over, drawing an operation from ``--mix`` (relative weights) each time, with no
pause between operations (``--think`` adds one) and no retries:

``list``
    ``GET /api/v1/search/<container>?page[offset]=0&page[limit]=<--page>``:
    one page of a container's children with their metadata (the catalog root,
    the CBF scan, the NeXus file, its ``entry`` and ``detector`` groups, the
    live scan);
``frame_fast``
    one whole frame, random index, of the CBF scan or the NeXus data, through
    scatterbroker's fast route as ``scatterbroker.clients.fast_array`` asks for it:
    ``GET /api/v1/sb/frames/<array>?slice=i,0:ny,0:nx&codec=bslz4,cbf,none&shape=...``
    (each frame comes back as its file stores it, not decoded: the NeXus
    frame as its Bitshuffle-LZ4 chunk, the CBF frame as its byte-offset
    section; the client decodes them, this benchmark only counts the bytes);
``frame_tiled``
    the same through stock Tiled's route, as Tiled's Python client asks for it:
    ``GET /api/v1/array/full/<array>?slice=i`` with
    ``Accept: application/octet-stream`` and Tiled's client
    ``Accept-Encoding`` (the server may compress);
``roi_fast`` / ``roi_tiled``
    a ``--roi`` x ``--roi`` (64 x 64) region at a random place of a random
    frame, through either route;
``newest``
    what a live display does for the frame that just arrived: the live scan's
    ``frames`` metadata (``GET /api/v1/metadata/live/scan/frames``: its shape
    gives the newest index; recorded as ``newest_meta``), then the per-frame
    header table (``GET /api/v1/table/full/live/scan/headers``, JSON; recorded
    as ``newest_row``), whose last row is that frame's header. The newest
    index seen is compared with the frames the writer had closed by then
    ("frames behind").

Before the load (after one warm-up operation of each kind), ``--calibrate``
(30) operations of each kind run from one client, one at a time, measuring
the server's CPU time per request (``/proc/<pid>/stat``): where the capacity
goes, independent of the machine's load, and what the mix costs per request.

Every request of the load is timed from sending to its last byte received
(bodies are counted as they arrive, not decoded, except the JSON the
``newest`` operation parses); an *error* is any non-2xx answer, a raw body of
the wrong length, or an exception (timeouts included, ``--timeout`` 30 s).
A task starts no new operation after the deadline; those in flight finish
and count. Requests/s = requests / (first sent to last received).
*Replayed* is the share of answers the server took from its response cache
(``X-SB-Cache: hit``, :mod:`scatterbroker.server.response_cache`): this data set is
small (20-frame scans), so a frame Tiled compresses below the cache's 1 MiB
item limit is replayed more often here than in a beamline's catalog.
``--baseline no-cache`` first runs the same load against the server without
its read caches (``SCATTERBROKER_RESPONSE_CACHE=0``,
``SCATTERBROKER_ENTRY_CACHE=0``: every request walks the catalog and is
answered by Tiled), ``--baseline no-entry-cache`` without the entry cache
only (:mod:`scatterbroker.server.entry_cache`), ``--baseline tiled-layers`` with
Tiled's request middleware as Tiled builds it
(``SCATTERBROKER_PLAIN_MIDDLEWARE=0``, :mod:`scatterbroker.server.tiled_layers`),
``--baseline sqlite-threaded`` with the SQLite catalog's reads on aiosqlite's
worker thread (``SCATTERBROKER_SQLITE_READS_ON_LOOP=0``,
:mod:`scatterbroker.server.sqlite_reads`), then as configured, and prints the
ratios of requests/s and p50/p99 latency; the last line is then their JSON.

Sampled every second: the server's VmRSS, thread count and CPU time
(``/proc/<pid>``), the watcher's CPU time and its status line (frames,
backlog). Reported: total requests, requests/s, p50/p95/p99/max latency (ms,
nearest rank) overall and per kind, errors (with the first messages), a
timeline per ``--window`` seconds, server RSS start / max / end and its
slope over the second half of the run (MB/min, least squares, with its
standard error), frames written / listed during the run, the watcher's
backlog at the end and how long the catalog took to list every frame, how
many frames clients saw as not yet listed, tracebacks in the server's log,
the CPU used by server, watcher and this process (a load generator near one
core would itself be the limit), and the load average before and after.
``--malloc-trim`` also calls glibc's ``malloc_trim(0)`` inside the idle
server after the load (gdb) and reports the RSS it gives back.

Target (issue #7, item 6): 32 clients for 60 s with zero errors, p99 < 500 ms
on 2 cores, RSS flat. Flat here: the second-half slope minus two standard
errors is at most ``--rss-flat`` (10) MB/min: growth faster than that is not
established; in-flight 10 MB response buffers alone make RSS swing by ~100 MB
from one second to the next, so a bare 30-s slope is mostly noise. Each is
printed as PASS or MISS; timings are never asserted, the exit status is 0
whatever they are (non-zero only if the setup itself fails).

Run
---
    python benchmarks/load.py                                   # 32 clients, 60 s, 2M frames (~2 min)
    python benchmarks/load.py --clients 8 --duration 10 --shape 195 487   # smoke run, ~30 s
    python benchmarks/load.py --mix list=1,newest=1 --ingest-rate 20      # metadata only, faster ingest
    python benchmarks/load.py --duration 300 --malloc-trim                # does RSS level off?
    python benchmarks/load.py --baseline no-cache                         # the read caches' gain (~5 min)
    python benchmarks/load.py --baseline no-entry-cache                   # the entry cache's alone (~5 min)
    python benchmarks/load.py --baseline tiled-layers                     # Tiled's middleware flattened (~5 min)
    python benchmarks/load.py --baseline sqlite-threaded                  # catalog reads on the loop (~5 min)
    python benchmarks/load.py --quick                                     # smoke test: 4 clients x 1 s, small frames

Loopback only: the server binds 127.0.0.1 and every request goes there. The
machine may be shared: the load average is printed, and figures under load
are noisy. The last line printed is a JSON summary; ``main(argv)`` returns it
as a dict (importing this module runs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Shared pieces of the sibling benchmarks: the server process, the detector-like writer process.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from access import SCATTERBROKER, Server, _free_port  # noqa: E402
from ingest_latency import Writer, _quiet_logs, _write_frame, encode_cbf, percentile  # noqa: E402

API_KEY = "loadbench"
SHAPE_2M = (1679, 1475)  # Pilatus 2M (rows, columns)
KINDS = ("list", "frame_fast", "frame_tiled", "roi_fast", "roi_tiled", "newest")
RECORDED = ("list", "frame_fast", "frame_tiled", "roi_fast", "roi_tiled", "newest_meta", "newest_row")
DEFAULT_MIX = "list=3,frame_fast=3,frame_tiled=1,roi_fast=2,roi_tiled=1,newest=2"
TARGET_P99_MS = 500.0
LIVE = "live/scan"
# `scatterbroker watch` as its own process, through the console script's entry point.
WATCH = "import sys; from scatterbroker.cli import main; sys.argv = ['scatterbroker', 'watch', *sys.argv[1:]]; main()"
STATUS = re.compile(r"(\d+) frames\s.*backlog (\d+)\s+problems (\d+)")


# ------------------------------------------------------------------------ data


def make_frames(k: int, shape: tuple[int, int], seed: int = 2026) -> np.ndarray:
    """(k, ny, nx) int32 counts, Poisson(0.5); pixel (0, 0) of frame f is 1000 + f."""
    frames = np.random.default_rng(seed).poisson(0.5, (k, *shape)).astype(np.int32)
    frames[:, 0, 0] = 1000 + np.arange(k)
    return frames


def write_data(data: Path, blobs: list, scan_frames: int) -> None:
    """The registered CBF scan (raw/p1/s1/scan_NNNNN.cbf), its stacked NeXus file, the live directory."""
    from scatterbroker.reduction.stack import stack_files

    raw = data / "raw" / "p1" / "s1"
    raw.mkdir(parents=True)
    for i in range(scan_frames):
        _write_frame("cbf", raw, blobs[i % len(blobs)], i)
    nexus = data / "scans" / "p1" / "s1" / "scan.nxs"
    nexus.parent.mkdir(parents=True)
    stack_files(str(raw), nexus, workers=1)
    (data / "live").mkdir()


@dataclass(frozen=True)
class Array:
    """An array node the clients read: catalog path, shape (frames, ny, nx)."""

    path: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """What the clients ask for."""

    arrays: tuple[Array, ...]
    containers: tuple[str, ...]
    kinds: tuple[str, ...]
    weights: tuple[float, ...]
    roi: int
    page: int
    think: float  # s between operations of one client
    stock_encoding: str  # Accept-Encoding of Tiled's Python client


# ------------------------------------------------------------------ recording


@dataclass
class Recorder:
    """Every request's kind, start (s since the load started), latency (s), status (-1: exception), bytes."""

    t0: float
    kind: list[str] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    replayed: list[bool] = field(default_factory=list)  # answered from the server's response cache
    errors: dict[str, int] = field(default_factory=dict)  # "kind: message" -> count
    first_errors: list[str] = field(default_factory=list)
    newest: list[tuple[float, int]] = field(default_factory=list)  # (wall time sent, frames listed)

    def add(self, kind: str, start: float, latency: float, status: int, nbytes: int, error: str | None,
            replayed: bool = False) -> None:
        self.kind.append(kind)
        self.replayed.append(replayed)
        self.start.append(start - self.t0)
        self.latency.append(latency)
        self.status.append(status)
        self.nbytes.append(nbytes)
        self.failed.append(error is not None)
        if error is not None:
            self.note(kind, start, error)

    def note(self, kind: str, start: float, error: str) -> None:
        """Count an error message (``start``: perf_counter s)."""
        key = f"{kind}: {error}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"t={start - self.t0:.1f}s {key}")


async def get(http: Any, rec: Recorder, kind: str, url: str, params: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None, keep: bool = False,
              expect: int | None = None) -> bytes | None:
    """One timed GET, recorded; returns the body if ``keep`` and the answer is 2xx, else None.

    ``expect``: the body length (bytes) a raw answer must have (checked when the fast
    route says ``codec: none``; frames sent as stored must have the sizes the answer
    lists); another length is an error.
    """
    body = bytearray()
    n, error, status, replayed = 0, None, -1, False
    t = time.perf_counter()
    try:
        async with http.stream("GET", url, params=params, headers=headers) as r:
            status = r.status_code
            replayed = r.headers.get("x-sb-cache") == "hit"
            ok = 200 <= status < 300
            if keep and ok:  # a body to parse: decoded (the server may gzip JSON)
                async for chunk in r.aiter_bytes():
                    body += chunk
                n = r.num_bytes_downloaded
            else:  # counted as it came over the wire, not decoded
                async for chunk in r.aiter_raw():
                    n += len(chunk)
                    if not ok:
                        body += chunk
        if not ok:
            error = f"{status} {bytes(body[:160]).decode(errors='replace')}"
        elif expect is not None and r.headers.get("x-sb-codec", "none") == "none" and n != expect:
            error = f"{status} but {n} bytes, {expect} expected"
        elif expect is not None and r.headers.get("x-sb-codec") in ("bslz4", "cbf") and n != sum(
                int(size) for size in r.headers.get("x-sb-chunks", "").split(",") if size):
            error = f"{status} but {n} bytes, the stored frames' sizes say {r.headers.get('x-sb-chunks')}"
    except Exception as err:  # an error of this request, counted
        error = f"{type(err).__name__}: {str(err)[:160]}"
    rec.add(kind, t, time.perf_counter() - t, status, n, error, replayed)
    return bytes(body) if keep and error is None else None


async def operation(http: Any, rec: Recorder, plan: Plan, kind: str, rng: random.Random) -> None:
    """One operation of ``kind`` (one request, two for ``newest``)."""
    if kind == "list":
        container = rng.choice(plan.containers)
        await get(http, rec, kind, f"/api/v1/search/{container}",
                  {"page[offset]": 0, "page[limit]": plan.page})
        return
    if kind == "newest":
        sent = time.time()
        body = await get(http, rec, "newest_meta", f"/api/v1/metadata/{LIVE}/frames", keep=True)
        if body is not None:
            try:
                rec.newest.append((sent, int(json.loads(body)["data"]["attributes"]["structure"]["shape"][0])))
            except (ValueError, KeyError, IndexError, TypeError) as err:  # an answer we cannot use: an error
                rec.failed[-1] = True
                rec.note("newest_meta", time.perf_counter(), f"unusable body: {err!r}"[:160])
        await get(http, rec, "newest_row", f"/api/v1/table/full/{LIVE}/headers",
                  headers={"Accept": "application/json"})
        return
    a = rng.choice(plan.arrays)
    n, ny, nx = a.shape
    i = rng.randrange(n)
    if kind.startswith("roi"):
        r = plan.roi
        y0, x0 = rng.randrange(ny - r + 1), rng.randrange(nx - r + 1)
        sel, size = f"{i},{y0}:{y0 + r},{x0}:{x0 + r}", r * r * 4
    else:
        sel, size = f"{i},0:{ny},0:{nx}", ny * nx * 4
    if kind.endswith("fast"):
        await get(http, rec, kind, f"/api/v1/sb/frames/{a.path}",
                  {"slice": sel, "codec": "bslz4,cbf,none", "shape": ",".join(map(str, a.shape))},
                  {"Accept-Encoding": "identity"}, expect=size)
    else:
        await get(http, rec, kind, f"/api/v1/array/full/{a.path}", {"slice": sel},
                  {"Accept": "application/octet-stream", "Accept-Encoding": plan.stock_encoding})


async def client_loop(http: Any, rec: Recorder, plan: Plan, deadline: float, seed: int) -> None:
    """One client: operations drawn from the mix until ``deadline`` (perf_counter s)."""
    rng = random.Random(seed)
    while time.perf_counter() < deadline:
        kind = rng.choices(plan.kinds, plan.weights)[0]
        try:
            await operation(http, rec, plan, kind, rng)
        except Exception as err:  # a bug of this benchmark: an error (latency 0), shown; the client goes on
            rec.add(kind, time.perf_counter(), 0.0, -1, 0, f"load generator failed: {err!r}"[:200])
        if plan.think > 0:
            await asyncio.sleep(plan.think)


def _http(url: str, clients: int, timeout: float) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Apikey {API_KEY}"}, limits=limits,
                             timeout=timeout)


async def warm_up(url: str, plan: Plan, timeout: float) -> list[str]:
    """One operation of each kind, not counted (server imports, caches); returns their errors."""
    async with _http(url, 1, timeout) as http:
        warm = Recorder(time.perf_counter())
        for kind in plan.kinds:
            await operation(http, warm, plan, kind, random.Random(0))
    return warm.first_errors


async def calibrate(url: str, plan: Plan, server: Server, n: int, timeout: float) -> dict[str, dict[str, float]]:
    """``n`` operations of each kind from one client, one at a time: server CPU and wall time per request (ms)."""
    out: dict[str, dict[str, float]] = {}
    async with _http(url, 1, timeout) as http:
        for kind in plan.kinds:
            rec = Recorder(time.perf_counter())
            rng = random.Random(7)
            cpu0, t0 = server.cpu(), time.perf_counter()
            for _ in range(n):
                await operation(http, rec, plan, kind, rng)
            wall, cpu = time.perf_counter() - t0, server.cpu() - cpu0
            k = max(1, len(rec.kind))
            out[kind] = {"requests": len(rec.kind), "server_cpu_ms": cpu / k * 1e3, "wall_ms": wall / k * 1e3,
                         "errors": sum(rec.failed)}
    return out


async def run_load(url: str, plan: Plan, clients: int, duration: float, timeout: float,
                   start_wall: float) -> tuple[Recorder, float]:
    """Start the clients at ``start_wall`` (time.time()); return the record and the wall span (s)."""
    async with contextlib.AsyncExitStack() as stack:
        # One httpx client (one connection) per simulated client, as 32 users would have:
        # a shared pool of 32 scans every connection on each request (httpcore), which cost
        # this process more CPU than the requests themselves.
        https = [await stack.enter_async_context(_http(url, 1, timeout)) for _ in range(clients)]
        await asyncio.sleep(max(0.0, start_wall - time.time()))
        rec = Recorder(time.perf_counter())
        deadline = rec.t0 + duration
        await asyncio.gather(*(client_loop(http, rec, plan, deadline, 1000 + c) for c, http in enumerate(https)))
        span = time.perf_counter() - rec.t0
    return rec, span


# ------------------------------------------------------------------- sampling


@dataclass
class Sampler:
    """Once a second: server VmRSS (MB) and CPU (s), watcher CPU (s) and its last status line."""

    server: Server
    watcher: Server
    log: Path
    t: list[float] = field(default_factory=list)  # s since start()
    rss: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    watcher_cpu: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)  # the server's
    status: list[tuple[int, int, int]] = field(default_factory=list)  # (frames, backlog, problems)
    stop: threading.Event = field(default_factory=threading.Event)
    t0: float = 0.0  # perf_counter s of the load's start
    thread: threading.Thread | None = None

    def watcher_status(self) -> tuple[int, int, int]:
        """The watcher's last printed status: frames registered, backlog, problems (-1s if none yet)."""
        found = STATUS.findall(self.log.read_text(errors="replace")) if self.log.exists() else []
        return tuple(map(int, found[-1])) if found else (-1, -1, -1)  # type: ignore[return-value]

    def sample(self) -> None:
        self.t.append(time.perf_counter() - self.t0)
        self.rss.append(self.server.memory()["VmRSS"])
        self.threads.append(server_threads(self.server))
        self.cpu.append(self.server.cpu())
        self.watcher_cpu.append(self.watcher.cpu())
        self.status.append(self.watcher_status())

    def _run(self) -> None:
        while not self.stop.wait(1.0 - (time.perf_counter() - self.t0) % 1.0):
            try:
                self.sample()
            except OSError:  # a process has gone (the run is failing): stop sampling
                return

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.sample()


def server_threads(server: Server) -> int:
    """How many threads the server process(es) have (``/proc/<pid>/status``)."""
    total = 0
    for pid in server.pids():
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return total


class WorkersServer(Server):
    """``uvicorn --factory scatterbroker.server.app:app_factory --workers N`` on a PostgreSQL catalog;
    its pids are the supervisor and its worker processes (memory and CPU are summed over them)."""

    def __init__(self, config: Path, workers: int, port: int, work: Path) -> None:
        self.name, self.port = "server", port
        self.url = f"http://127.0.0.1:{port}"
        log = open(work / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "scatterbroker.server.app:app_factory", "--workers",
             str(workers), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, env={**os.environ, "SCATTERBROKER_CONFIG": str(config)})

    def pids(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid, *map(int, f.read().split())]
        except OSError:
            return [self.proc.pid]


def start_postgres_server(work: Path, data: Path, workers: int, port: int) -> tuple[WorkersServer, Any]:
    """A throwaway PostgreSQL (tests/postgres.py), an initialised catalog in it, and the workers on it."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from postgres import PostgresServer, find_bindir

    from scatterbroker.server.app import local_config

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("--server-workers > 1 needs PostgreSQL's initdb and pg_ctl (apt-get install postgresql)")
    pg = PostgresServer(bindir).start()
    try:
        config = local_config(work / "sbdata", [data], api_key=API_KEY,
                              catalog_uri=pg.uri(pg.create_database("catalog")))
        storage = config["trees"][0]["args"]["writable_storage"]
        storage[:] = [x for x in storage if not x.startswith("duckdb:")]
        storage.append(pg.uri(pg.create_database("tables"), driver="postgresql"))
        (work / "config.yml").write_text(yaml.safe_dump(config))
        tiled = Path(sys.executable).with_name("tiled")  # workers must not race to create the catalog
        subprocess.run([str(tiled), "catalog", "init", config["trees"][0]["args"]["uri"]], check=True,
                       capture_output=True, timeout=120)
        return WorkersServer(work / "config.yml", workers, port, work), pg
    except BaseException:
        pg.stop()
        raise


def malloc_trim(server: Server) -> dict[str, float] | None:
    """Server VmRSS (MB) before and after glibc's ``malloc_trim(0)``, called inside the idle server by gdb.

    What it gives back is memory the allocator kept after it was freed (per-thread arenas);
    what stays is in use. None without gdb. Opt-in (``--malloc-trim``): it stops the server's
    threads for a moment, so only after the load.
    """
    if shutil.which("gdb") is None:
        return None
    before = server.memory()["VmRSS"]
    done = subprocess.run(["gdb", "-p", str(server.proc.pid), "-batch", "-nx", "-ex", "call (int) malloc_trim(0)"],
                          capture_output=True, text=True, timeout=120)
    return {"before": before, "after": server.memory()["VmRSS"], "gdb_exit": done.returncode}


def slope_mb_per_min(t: list[float], rss: list[float], since: float) -> tuple[float, float] | None:
    """Least-squares slope of RSS (MB) against time over the samples at t >= ``since`` s, and its
    standard error, both in MB/min (None with fewer than 4 samples)."""
    pts = [(a, b) for a, b in zip(t, rss) if a >= since]
    if len(pts) < 4:
        return None
    x, y = np.array(pts).T
    fit, cov = np.polyfit(x / 60.0, y, 1, cov=True)
    return float(fit[0]), float(np.sqrt(cov[0, 0]))


# ------------------------------------------------------------------------ main


@dataclass
class Run:
    """Everything one run measured, for the report."""

    calib: dict[str, dict[str, float]]  # kind -> requests, server_cpu_ms, wall_ms, errors (one client)
    rec: Recorder
    span: float  # s, first request sent to last byte received
    sampler: Sampler
    client_cpu: float  # s of CPU this process used during the load
    closes: list[float]  # time.time() each live frame was closed
    n_ingest: int  # frames written during the load
    listed_end: int  # frames the live scan listed at the end of the load (the first one included)
    listed: int  # ... after waiting up to --drain s
    drained: float  # s waited
    trim: dict[str, float] | None  # --malloc-trim: server VmRSS (MB) before and after
    server_log: str
    watcher_log: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    kept: Path | None = None


def wait_for_frames(http: Any, want: int, timeout: float) -> tuple[int, float]:
    """Poll the live scan until it lists ``want`` frames; return (frames listed, seconds waited)."""
    t = time.perf_counter()
    n = 0
    while True:
        r = http.get(f"/api/v1/metadata/{LIVE}/frames")
        if r.status_code == 200:
            n = int(r.json()["data"]["attributes"]["structure"]["shape"][0])
        if n >= want or time.perf_counter() - t > timeout:
            return n, time.perf_counter() - t
        time.sleep(0.1)


def stats_ms(lat: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 (nearest rank) and max of latencies in s, as ms."""
    if not lat:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    return {"p50": percentile(lat, 50) * 1e3, "p95": percentile(lat, 95) * 1e3,
            "p99": percentile(lat, 99) * 1e3, "max": max(lat) * 1e3}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def parse_mix(text: str) -> dict[str, float]:
    """``"list=3,frame_fast=2"`` -> {kind: weight}, kinds with weight 0 dropped."""
    mix = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        name, _, weight = part.partition("=")
        if name not in KINDS:
            raise SystemExit(f"--mix: unknown kind {name!r}; choose from {', '.join(KINDS)}")
        mix[name] = float(weight or 1)
    mix = {k: w for k, w in mix.items() if w > 0}
    if not mix:
        raise SystemExit("--mix: no kind with a positive weight")
    return mix


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the load (twice with ``--baseline``), print the report and the JSON line; return that summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (asyncio tasks; default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--shape", type=int, nargs=2, default=list(SHAPE_2M), metavar=("NY", "NX"),
                   help="frame shape, rows columns (default 1679 1475, a Pilatus 2M)")
    p.add_argument("--scan-frames", type=int, default=20, help="frames of the registered CBF scan (default 20)")
    p.add_argument("--ingest-rate", type=float, default=5.0,
                   help="new frames/s into the watched directory (default 5)")
    p.add_argument("--mix", default=DEFAULT_MIX, help=f"operation weights (default {DEFAULT_MIX})")
    p.add_argument("--roi", type=int, default=64, help="ROI edge, pixels (default 64)")
    p.add_argument("--page", type=int, default=50, help="items per listing page (default 50)")
    p.add_argument("--think", type=float, default=0.0,
                   help="seconds each client waits between operations (default 0)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, s (an error; default 30)")
    p.add_argument("--window", type=float, default=10.0, help="timeline window, s (default 10)")
    p.add_argument("--rss-flat", type=float, default=10.0,
                   help="RSS slope over the second half, MB/min, still counted as flat (default 10)")
    p.add_argument("--drain", type=float, default=30.0,
                   help="s to wait after the load for the watcher to catch up (default 30)")
    p.add_argument("--calibrate", type=int, default=30,
                   help="before the load, this many operations of each kind from one client, one at a time, "
                        "for the server CPU per request (0: skip; default 30)")
    p.add_argument("--malloc-trim", action="store_true",
                   help="after the load, call malloc_trim(0) in the server with gdb and report its RSS before "
                        "and after (memory the allocator kept vs memory in use)")
    p.add_argument("--server-workers", type=int, default=1,
                   help="server processes (uvicorn --workers with scatterbroker.server.app:app_factory); above 1 "
                        "the catalog and tables go to a throwaway PostgreSQL server (tests/postgres.py; "
                        "Debian's postgresql), as several processes need (default 1: SQLite + DuckDB)")
    p.add_argument("--distinct", type=int, default=4, help="distinct frames encoded and cycled (default 4)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep data and logs in a new directory here (default: a temporary one, removed)")
    p.add_argument("--baseline", choices=("none", *BASELINES), default="none",
                   help="first run the same load against the server without its read caches (no-cache: "
                        "SCATTERBROKER_RESPONSE_CACHE=0 and SCATTERBROKER_ENTRY_CACHE=0), without its entry "
                        "cache only (no-entry-cache), with Tiled's request middleware as Tiled builds it "
                        "(tiled-layers: SCATTERBROKER_PLAIN_MIDDLEWARE=0) or with the SQLite catalog's reads "
                        "on aiosqlite's thread (sqlite-threaded: SCATTERBROKER_SQLITE_READS_ON_LOOP=0), then "
                        "as configured, and print the ratios (default none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4 clients x 1 s on 195 x 487 frames, 4-frame scan, 5 calibration operations "
                        "of each kind (same code paths)")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.duration, args.shape, args.scan_frames = 4, 1.0, [195, 487], 4
        args.calibrate, args.drain, args.window, args.distinct = 5, 10.0, 0.5, 2
    warnings.filterwarnings("ignore")
    mix = parse_mix(args.mix)
    shape = (args.shape[0], args.shape[1])
    if min(shape) < args.roi:
        raise SystemExit(f"--roi {args.roi} does not fit frames of shape {shape}")
    if args.baseline == "none":
        return one_run(args, mix, shape)
    what, env = BASELINES[args.baseline]
    print(f"baseline: {what} ({', '.join(f'{k}={v}' for k, v in env.items())})")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the server process at start
    try:
        base = one_run(args, mix, shape)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    print()
    print("the same load against the server as configured")
    this = one_run(args, mix, shape)
    ratios = {"req_per_s": _r(this["req_per_s"] / base["req_per_s"], 2),
              **{f"{k}_latency": _r(this["latency_ms"][k] / base["latency_ms"][k], 2) for k in ("p50", "p99")}}
    print()
    print(f"against {what}, same run: requests/s x{ratios['req_per_s']:.2f}, "
          f"p50 latency x{ratios['p50_latency']:.2f}, p99 latency x{ratios['p99_latency']:.2f}")
    summary = {"benchmark": "load", "baseline": args.baseline, "ratios": ratios,
               "baseline_run": {k: base[k] for k in ("req_per_s", "latency_ms", "errors")},
               "this_run": {k: this[k] for k in ("req_per_s", "latency_ms", "errors")}}
    print(json.dumps(summary))
    return summary


#: --baseline: what the same-run comparison serves without, and the environment that says so
BASELINES = {
    "no-cache": ("the server without its read caches",
                 {"SCATTERBROKER_RESPONSE_CACHE": "0", "SCATTERBROKER_ENTRY_CACHE": "0"}),
    "no-entry-cache": ("the server without its entry cache", {"SCATTERBROKER_ENTRY_CACHE": "0"}),
    "tiled-layers": ("the server with Tiled's six BaseHTTPMiddleware layers (scatterbroker.server.tiled_layers off)",
                     {"SCATTERBROKER_PLAIN_MIDDLEWARE": "0"}),
    "sqlite-threaded": ("the server with its SQLite catalog's reads on aiosqlite's thread (scatterbroker.server.sqlite_reads "
                        "off)", {"SCATTERBROKER_SQLITE_READS_ON_LOOP": "0"}),
}


def one_run(args: argparse.Namespace, mix: dict[str, float], shape: tuple[int, int]) -> dict[str, Any]:
    """Write the data, serve and load it once (:func:`measure`), print the report; its summary."""
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          "before (a shared machine makes these figures noisy)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sb-load-", dir=args.workdir)).resolve()
    try:
        run = measure(args, mix, shape, work, load_before)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    run.kept = work if args.workdir is not None else None
    run.load_after = os.getloadavg()
    return report(args, mix, run)


def measure(args: argparse.Namespace, mix: dict[str, float], shape: tuple[int, int], work: Path,
            load_before: tuple[float, float, float]) -> Run:
    """Write the data, start server and watcher, calibrate, run the load with the writer going."""
    import httpx
    from tiled.client import from_uri
    from tiled.client.decoders import SUPPORTED_DECODERS

    from scatterbroker.catalog.register import register

    data = work / "data"
    n_ingest = max(1, math.ceil(args.ingest_rate * args.duration))
    t = time.perf_counter()
    blobs = [encode_cbf(f, work) for f in make_frames(max(1, args.distinct), shape)]
    write_data(data, blobs, args.scan_frames)
    print(f"data: {args.scan_frames} CBF frames {shape[0]} x {shape[1]} int32 "
          f"({np.mean([len(b) for b, _ in blobs]) / 1e6:.2f} MB each) + their Bitshuffle-LZ4 NeXus stack, "
          f"written in {time.perf_counter() - t:.1f} s")
    port = _free_port()
    pg = None
    if args.server_workers > 1:
        server, pg = start_postgres_server(work, data, args.server_workers, port)
    else:
        server = Server("server", SCATTERBROKER, [work / "sbdata", data, port, API_KEY], port, work)
    watcher = None
    try:
        server.wait("/api/v1/")
        url = server.url
        assert url.startswith("http://127.0.0.1:"), url  # loopback only
        _quiet_logs()
        admin = from_uri(url, api_key=API_KEY)
        for sub in ("raw", "scans"):
            registered = register(admin, data / sub, prefix=sub)
            if registered.failed:
                raise RuntimeError(f"registering {sub} failed: {registered.failed[:3]}")
        watcher = Server("watcher", WATCH, [data / "live", "--uri", url, "--prefix", "live",
                                            "--api-key", API_KEY], 0, work)
        nexus = "scans/p1/s1/scan/entry"
        plan = Plan(
            arrays=(Array("raw/p1/s1/scan/frames", (args.scan_frames, *shape)),
                    Array(f"{nexus}/data/data", (args.scan_frames, *shape))),
            containers=("", "raw/p1/s1/scan", "scans/p1/s1/scan", nexus, f"{nexus}/instrument/detector", LIVE),
            kinds=tuple(mix), weights=tuple(mix.values()), roi=args.roi, page=args.page, think=args.think,
            stock_encoding=", ".join(k for k in SUPPORTED_DECODERS if k != "identity"),
        )
        sync = httpx.Client(base_url=url, headers={"Authorization": f"Apikey {API_KEY}"}, timeout=30)
        with Writer("cbf", data / "live", blobs, 1, n_ingest, args.ingest_rate) as writer:
            writer.write_first()
            listed, waited = wait_for_frames(sync, 1, 60)
            if listed < 1:
                raise RuntimeError(f"the watcher did not register the live scan's first frame in {waited:.0f} s; "
                                   f"see {work / 'watcher.log'}")
            warm = asyncio.run(warm_up(url, plan, args.timeout))
            if warm:
                print(f"warm-up errors: {warm}")
            calib = asyncio.run(calibrate(url, plan, server, args.calibrate, args.timeout)) if args.calibrate else {}
            sampler = Sampler(server, watcher, work / "watcher.log")
            t_wall = writer.start()  # frames due at t_wall + j / rate; the clients start then too
            print(f"load: {args.clients} clients x {args.duration:g} s, mix {args.mix}; "
                  f"{n_ingest} frames written at {args.ingest_rate:g} frames/s meanwhile ...", flush=True)
            cpu0 = time.process_time()
            sampler.start(time.perf_counter() + max(0.0, t_wall - time.time()))
            rec, span = asyncio.run(run_load(url, plan, args.clients, args.duration, args.timeout, t_wall))
            client_cpu = time.process_time() - cpu0
            sampler.finish()
            closes = [c for _, c in writer.times()]
        listed_end, _ = wait_for_frames(sync, 0, 0)
        listed, drained = wait_for_frames(sync, 1 + n_ingest, args.drain)
        sync.close()
        trim = malloc_trim(server) if args.malloc_trim and args.server_workers == 1 else None
    finally:
        if watcher is not None:
            watcher.stop()
        server.stop()
        if pg is not None:
            pg.stop()
    return Run(calib=calib, rec=rec, span=span, sampler=sampler, client_cpu=client_cpu, closes=closes,
               n_ingest=n_ingest, listed_end=listed_end, listed=listed, drained=drained, trim=trim,
               server_log=(work / "server.log").read_text(errors="replace"),
               watcher_log=(work / "watcher.log").read_text(errors="replace"), load_before=load_before)


def report(args: argparse.Namespace, mix: dict[str, float], run: Run) -> dict[str, Any]:
    """Print the tables, the verdicts against the target and the JSON line; return that summary."""
    rec, span, sampler, calib = run.rec, run.span, run.sampler, run.calib
    mean_req = None
    if calib:
        print()
        print("one client, one request at a time (before the load):")
        print(f"{'operation':<12}{'requests':>9}{'server CPU ms':>15}{'wall ms':>9}{'errors':>8}")
        for kind, c in calib.items():
            print(f"{kind:<12}{c['requests']:>9}{c['server_cpu_ms']:>15.1f}{c['wall_ms']:>9.1f}{c['errors']:>8}")
        # mix-weighted server CPU per request: sum(w * cpu per operation) / sum(w * requests per operation)
        per_op = {k: c["server_cpu_ms"] * c["requests"] / args.calibrate for k, c in calib.items()}
        mean_req = (sum(mix[k] * per_op[k] for k in mix)
                    / sum(mix[k] * calib[k]["requests"] / args.calibrate for k in mix))
        print(f"the mix costs {mean_req:.1f} ms of server CPU per request: at most ~{1e3 / mean_req:.0f} "
              "requests/s per core the server process gets")

    # -- latency per kind
    kinds = np.array(rec.kind)
    lat = np.array(rec.latency)
    ok = ~np.array(rec.failed, dtype=bool)
    nbytes = np.array(rec.nbytes, dtype=float)
    replayed = np.array(rec.replayed, dtype=bool)
    n = len(rec.kind)
    errors = int((~ok).sum())
    overall = stats_ms(rec.latency)
    print()
    print(f"{'kind':<12}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'errors':>8}{'MB/s':>8}{'replayed':>10}")
    per_kind: dict[str, Any] = {}
    for kind in [*RECORDED, "all"]:
        sel = np.ones(n, bool) if kind == "all" else kinds == kind
        if not sel.any():
            continue
        s = stats_ms(list(lat[sel]))
        row = per_kind[kind] = {"requests": int(sel.sum()), "req_per_s": _r(sel.sum() / span, 1),
                                **{k: _r(v, 1) for k, v in s.items()}, "errors": int((~ok[sel]).sum()),
                                "MB_per_s": _r(nbytes[sel].sum() / 1e6 / span, 1),
                                "replayed": _r(replayed[sel].mean(), 3)}
        print(f"{kind:<12}{row['requests']:>9}{sel.sum() / span:>8.1f}{_ms(s['p50']):>9}{_ms(s['p95']):>9}"
              f"{_ms(s['p99']):>9}{_ms(s['max']):>9}{row['errors']:>8}{nbytes[sel].sum() / 1e6 / span:>8.1f}"
              f"{100 * replayed[sel].mean():>9.0f}%")
    print(f"{n} requests in {span:.1f} s: {n / span:.1f} requests/s; latency = request sent to last byte received")

    # -- timeline
    t = np.array(rec.start)
    st, rss, cpu, status = np.array(sampler.t), sampler.rss, sampler.cpu, sampler.status
    print()
    print(f"{'window s':<12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MB':>9}{'srv cores':>10}"
          f"{'backlog':>9}")
    timeline = []
    for a in np.arange(0, span, args.window):
        b = min(a + args.window, span)
        sel = (t >= a) & (t < b)
        s = stats_ms(list(lat[sel]))
        idx = [i for i, x in enumerate(st) if a <= x <= b + 0.5]
        rss_w = rss[idx[-1]] if idx else None
        cores = (cpu[idx[-1]] - cpu[idx[0]]) / (st[idx[-1]] - st[idx[0]]) if len(idx) > 1 else None
        backlog = status[idx[-1]][1] if idx else None
        timeline.append({"from_s": _r(a, 1), "to_s": _r(b, 1), "req_per_s": _r(sel.sum() / (b - a), 1),
                         "p50_ms": _r(s["p50"], 1), "p99_ms": _r(s["p99"], 1), "errors": int((~ok[sel]).sum()),
                         "rss_MB": _r(rss_w, 0), "server_cores": _r(cores), "watcher_backlog": backlog})
        print(f"{f'{a:g}-{b:.3g}':<12}{sel.sum() / (b - a):>8.1f}{_ms(s['p50']):>9}{_ms(s['p99']):>9}"
              f"{int((~ok[sel]).sum()):>8}{_ms(rss_w):>9}{'-' if cores is None else f'{cores:.2f}':>10}"
              f"{'-' if backlog is None else backlog:>9}")

    # -- memory and CPU
    fit = slope_mb_per_min(sampler.t, rss, args.duration / 2)
    slope, slope_se = fit if fit is not None else (None, None)
    print()
    print(f"server RSS: start {rss[0]:.0f} MB, max {max(rss):.0f} MB, end {rss[-1]:.0f} MB; slope over the second "
          "half " + ("-" if fit is None else f"{slope:+.1f} +- {2 * slope_se:.1f} (2 SE) MB/min")
          + f" ({len(rss)} samples, 1 s apart); server threads {sampler.threads[0]} at the start, "
          f"{max(sampler.threads)} at most")
    if run.trim is not None:
        print(f"after the load, malloc_trim(0) in the server: VmRSS {run.trim['before']:.0f} -> "
              f"{run.trim['after']:.0f} MB (gdb exit {run.trim['gdb_exit']}): the difference was freed memory "
              "the allocator kept")
    dt = max(st[-1] - st[0], 1e-9)
    cores_server, cores_watcher = (cpu[-1] - cpu[0]) / dt, (sampler.watcher_cpu[-1] - sampler.watcher_cpu[0]) / dt
    cores_client = run.client_cpu / span
    print(f"CPU: server {cores_server:.2f} cores, watcher {cores_watcher:.2f}, load generator (this process) "
          f"{cores_client:.2f}" + ("  <- the load generator was near one core: figures are a lower bound"
                                   if cores_client > 0.85 else ""))

    # -- ingest
    end_status = status[-1]
    behind = [1 + sum(1 for c in run.closes if c <= sent) - seen for sent, seen in rec.newest]  # +1: first frame
    problem_lines = [line.strip() for line in run.watcher_log.splitlines() if line.startswith("problem ")]
    caught_up = run.listed >= 1 + run.n_ingest
    print(f"ingest: {len(run.closes)} frames written during the run ({args.ingest_rate:g}/s); at the end the "
          f"catalog listed {run.listed_end - 1} of them, the watcher's backlog was {end_status[1]} files; all "
          + (f"listed {run.drained:.1f} s after the load" if caught_up
             else f"NOT listed within {args.drain:g} s ({run.listed - 1})"))
    if behind:
        print(f"newest frame as clients saw it: frames closed but not yet listed p50 {percentile(behind, 50)}, "
              f"max {max(behind)} (at {args.ingest_rate:g} frames/s)")
    if problem_lines:
        print(f"watcher reported {len(problem_lines)} problem(s), the first: " + "; ".join(problem_lines[:3])[:400])

    # -- errors and the server's log
    if rec.errors:
        print(f"errors by kind and message ({errors}):")
        for k, c in sorted(rec.errors.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  {c:>5} x {k}")
        print("first errors: " + " | ".join(rec.first_errors))
    tracebacks = run.server_log.count("Traceback")
    if tracebacks:
        first = run.server_log[run.server_log.index("Traceback"):]
        print(f"server log: {tracebacks} traceback(s); the end of the first:\n"
              + "\n".join(first.split("\n\n")[0].splitlines()[-6:]))

    # -- target
    p99 = overall["p99"]
    verdicts = {"zero_errors": errors == 0, "p99_under_500ms": p99 is not None and p99 < TARGET_P99_MS,
                # growth above --rss-flat not established (slope minus 2 standard errors); in-flight
                # response buffers alone make RSS swing by ~100 MB from one second to the next
                "rss_flat": fit is not None and slope - 2 * slope_se <= args.rss_flat}
    word = {True: "PASS", False: "MISS"}
    print()
    print(f"target (issue: 32 clients x 60 s on 2 cores); this run: {args.clients} clients x {args.duration:g} s "
          f"on {os.cpu_count()} CPUs, {args.server_workers} server process(es)"
          f"{' on PostgreSQL' if args.server_workers > 1 else ''}")
    print(f"  errors == 0             {errors:>10}          {word[verdicts['zero_errors']]}")
    print(f"  p99 < {TARGET_P99_MS:g} ms            {_ms(p99):>10} ms       {word[verdicts['p99_under_500ms']]}")
    print(f"  RSS flat (<= {args.rss_flat:g} MB/min) {'-' if fit is None else f'{slope:+.1f}':>8} MB/min   "
          f"{word[verdicts['rss_flat']]}" + ("" if fit is None else f"  (+- {2 * slope_se:.1f}: flat = slope - 2 SE "
                                             f"<= {args.rss_flat:g})"))
    lb, la = run.load_before, run.load_after
    print(f"load average {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f} before, {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} after")
    if run.kept is not None:
        print(f"data and logs kept in {run.kept}")
    summary = {
        "benchmark": "load",
        "quick": args.quick,
        "params": {"clients": args.clients, "duration_s": args.duration, "shape": list(args.shape),
                   "scan_frames": args.scan_frames, "ingest_rate": args.ingest_rate, "mix": mix,
                   "roi": args.roi, "page": args.page, "think_s": args.think, "timeout_s": args.timeout,
                   "cpus": os.cpu_count(), "server_workers": args.server_workers,
                   "catalog": "postgresql" if args.server_workers > 1 else "sqlite"},
        "requests": n, "span_s": _r(span), "req_per_s": _r(n / span, 1),
        "latency_ms": {k: _r(v, 1) for k, v in overall.items()},
        "per_kind": per_kind,
        "errors": errors, "error_messages": rec.errors, "first_errors": rec.first_errors,
        "server_log_tracebacks": tracebacks,
        "one_client": {"per_kind": {k: {kk: _r(vv) for kk, vv in v.items()} for k, v in calib.items()},
                       "mix_server_cpu_ms_per_request": _r(mean_req)},
        "server_rss_MB": {"start": _r(rss[0], 1), "max": _r(max(rss), 1), "end": _r(rss[-1], 1),
                          "slope_second_half_MB_per_min": _r(slope), "slope_standard_error_MB_per_min": _r(slope_se),
                          "malloc_trim": run.trim,
                          "samples": [[_r(a, 1), _r(b, 1)] for a, b in zip(sampler.t, rss)],
                          "server_threads": sampler.threads},
        "cpu_cores": {"server": _r(cores_server), "watcher": _r(cores_watcher), "load_generator": _r(cores_client)},
        "ingest": {"frames_written": len(run.closes), "listed_at_end": run.listed_end - 1,
                   "watcher_backlog_at_end": end_status[1], "all_listed": caught_up,
                   "drain_s": _r(run.drained), "frames_behind_p50": percentile(behind, 50) if behind else None,
                   "frames_behind_max": max(behind) if behind else None, "watcher_problems": len(problem_lines)},
        "timeline": timeline,
        "targets": verdicts,
        "load_average": {"before": [round(x, 2) for x in lb], "after": [round(x, 2) for x in la]},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()  # the exit status is 0 whatever the figures; a failed setup raises
