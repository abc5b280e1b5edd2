"""Ingest latency: from a detector closing a frame file to that frame being sliceable over HTTP.

What is measured
----------------
A *writer process* (``multiprocessing``, spawn context) drops numbered
Pilatus-2M-sized frames -- 1679 rows x 1475 columns int32 (the detector's
1475 x 1679 pixels), Poisson(0.5) background plus 40 sharp peaks -- into a
watched directory at a fixed rate R (frames/s), the way a detector does: each
file is opened, written and closed in place. A handful of distinct frames
(``--distinct``, default 4) are generated and encoded ONCE before any clock
starts and then cycled, so encoding does not load the writer; for CBF only
the angle text of each frame's header is patched (same length). Pixel (0, 0)
of distinct frame k is 1000 + k, so every answer the poller gets is checked
against the frame it asked for. Stream frame j is due at ``t0 + j/R``; the
writer records ``time.time()`` right after each file's close (after the
rename, for the stock contender) and reports the times at the end. It falls
behind schedule only if writing takes longer than 1/R (reported if > 50 ms).

Before the timed stream, the scan's FIRST frame is written alone and polled
until sliceable: it creates the scan node, a one-off per scan that would
otherwise sit in every short run's statistics. Its latency is reported as
"1st frame"; ``--cold`` puts it back at the head of the stream instead.

The benchmark process polls ``GET /api/v1/array/full/<array>?slice=i:i+8,0:1,0:1``
(one ``httpx.Client`` with keep-alive, ``Authorization: Apikey ...``,
``Accept: application/octet-stream``), where i is the LOWEST frame not yet
seen; after a poll that shows no new frame it waits ``--poll-interval``
(10 ms). The server answers with the frames from i on that it has (a range
past the end is clipped), so one answer can show several frames sliceable:
a single-frame poll (``--poll-frames 1``, ``slice=i,0:1,0:1``) costs one
request per frame -- 20-40 ms of a loaded 2-core server each -- and then
the poller, not the watcher, limits what can be measured above ~20 frames/s.
The time the answer holding frame i's pixel arrives is its *sliceable time*:

    latency_i = sliceable_time_i - close_time_i        (seconds, wall clock)

an upper bound: it includes one request round trip and up to one poll
interval. Polls that show no new frame are counted by status: scatterbroker
answers 200 with no frame (range past the end), 400 (single index past the
end) or 404 (no scan yet); stock Tiled answers 500 to a slice past its last
frame (its server may then drop the connection: "no response") and 404
while it re-registers. A 5xx from scatterbroker is a failure.

Per rate: p50 / p95 / max latency (nearest-rank percentiles), frames in
flight (closed but not yet sliceable) at the writer's last close, and whether
the rate was *sustained*, i.e. no growing backlog:

* every frame became sliceable within ``--drain`` seconds (default 15) after
  the last scheduled frame -- otherwise latency = inf, "did not keep up";
* latency did not grow: the Theil-Sen trend of latency against close time,
  times the stream's length, is <= 0.5 s. (A growing backlog is the same
  thing counted in frames: R x the latency growth. The watcher takes every
  ready frame in one batch, so latency and in-flight count are a sawtooth of
  batch period; a median-of-slopes trend is not swung by that or by one slow
  batch, where comparing two quarters of a short run, or the frame count at
  one moment, is.) The mean of the last quarter minus the first is in the
  JSON as ``quarter_growth_s``, for reference.

A trend needs a stream of some seconds, so each rate writes
max(``--frames`` (40), R x ``--min-seconds`` (6)) frames: 40, 60, 120 and
240 frames at 5, 10, 20, 40 frames/s. ``--min-seconds 0`` writes exactly
``--frames`` at every rate (40 frames at 40 frames/s is a 1-second stream:
shorter than one slow batch, so "sustained" means little there). The
highest sustained rate is the largest R in the sweep that was sustained.

Contenders (same frames, same machine, same run; a fresh directory and a
fresh server for every rate, so scans do not interact):

1. **scatterbroker** -- a real server on a free loopback port
   (``serve_in_thread(build_app(local_config(data_dir, [raw_dir], api_key=KEY)))``)
   and ``scatterbroker.catalog.watch.Watcher(client, raw_dir, "raw")`` run on
   a background thread (inotify via watchdog, default ``settle``). Frames are
   CBF files ``scan_00001.cbf ...`` (miniCBF header, byte-offset, via
   ``scatterbroker.server.demo.write_cbf``), served at ``raw/scan/frames``. Server,
   watcher and poller share one process and its GIL, as in
   ``tests/test_watch.py``; a deployment runs ``scatterbroker watch`` as its
   own process, so this setup is pessimistic. "queue max" is the watcher's
   own pending-file count (``Watcher.stats.backlog``), the highest the poller
   saw. After each rate the watcher is stopped and the scan checked: N (+1)
   frames, the last one read back in full equals what was written, and the
   ``headers`` table has one row per frame, numbered from 1.
2. **stock Tiled** -- ``tiled.client.register.watch`` (watchfiles) against
   ``tiled.server.SimpleTiledServer(readable_storage=[dir])``. Stock Tiled has
   no CBF adapter, so the same frames are written as numbered uncompressed
   TIFFs ``scan_00001.tif ...`` (9.9 MB each, encoded once by ``tifffile``;
   each written to a hidden temporary name and ``os.rename``-d into place, as
   stock Tiled has no partial-file check). Its walker groups them into one
   TIFF-sequence node keyed by the file-name prefix, ``scan_``, polled at
   ``/api/v1/array/full/scan_``. For EVERY change event the stock watcher
   deletes the tree's contents and re-walks and re-registers the whole
   directory, so each cycle costs more as the scan grows, and the node is
   briefly missing (404) during each. The cycles are counted and timed by
   wrapping ``tiled.client.register.register`` in this process (behaviour
   unchanged). Only R = 10 frames/s by default (``--stock-rates``). If it
   errors or cannot keep up, that is reported (p95 = inf, "did not keep
   up"), not raised.

Target (from the issue): p95 < 1 s at 10 frames/s of 2M frames. Also
reported: the highest sustained rate of each contender, and stock p95 /
scatterbroker p95 at 10 frames/s (the stock contender writes 9.9 MB TIFFs
where ours reads 2.5 MB CBFs; each is the format it can serve). Timings are
printed, never asserted. The exit status is non-zero only for a correctness
failure of scatterbroker: frames that never became sliceable, wrong pixels,
a server error, or a scan that reads back wrong.

Run
---
    python benchmarks/ingest_latency.py             # R = 5,10,20,40 (+ stock at 10); ~1.5 min on 2 cores
    python benchmarks/ingest_latency.py --rates 10 --frames 12 --min-seconds 0 --stock-rates 10
    python benchmarks/ingest_latency.py --poll-frames 1 --cold --min-seconds 0   # the plainest protocol
    python benchmarks/ingest_latency.py --stock-rates ''                          # scatterbroker only
    python benchmarks/ingest_latency.py --quick    # smoke test: 8 frames of 195 x 487 at 10 frames/s, both

The machine may be shared: the load average at the start is printed, and
figures are noisy under load. The last line printed is a JSON summary, with
every frame's latency (inf is ``null`` there, with ``"kept_up": false``);
``main(argv)`` returns it as a dict (importing this module runs nothing).
``--shape NY NX`` writes smaller frames (``--quick``: 195 x 487).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

FRAME_SHAPE = (1679, 1475)  # Pilatus 2M: (rows, columns) = (slow, fast)
API_KEY = "bench"  # Tiled keeps the single-user key process-global: one key for every server here
TARGET_RATE = 10.0
TARGET_P95_S = 1.0
GROWTH_S = 0.5  # latency growth over a stream (Theil-Sen trend) that means "not sustained"
ANGLE_PLACEHOLDER = "999.9999"  # written into the CBF header once, patched per frame (same width)
CBF_TIME = "2026-11-25T08:00:00.000"


def _quiet_logs() -> None:
    import tiled.server.app  # noqa: F401  (sets its own logger to INFO on import)

    for name in ("tiled", "tiled.server.app", "tiled.client.register", "fabio", "uvicorn", "uvicorn.error",
                 "uvicorn.access", "httpx", "alembic", "watchfiles", "watchfiles.main", "watchdog"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- data


def make_frames(k: int, seed: int = 2026, shape: tuple[int, int] = FRAME_SHAPE) -> np.ndarray:
    """(k, 1679, 1475) int32 (or (k, *shape)): Poisson(0.5) background plus sharp peaks; pixel (0,0) = 1000 + k."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    frames = rng.poisson(0.5, (k, ny, nx)).astype(np.int32)
    yy, xx = np.mgrid[-4:5, -4:5]
    for f in range(k):
        for _ in range(40):
            y0, x0 = int(rng.integers(10, ny - 10)), int(rng.integers(10, nx - 10))
            peak = rng.uniform(1e2, 1e5) * np.exp(-(yy ** 2 + xx ** 2) / 2.0)
            frames[f, y0 - 4:y0 + 5, x0 - 4:x0 + 5] += rng.poisson(peak).astype(np.int32)
        frames[f, 0, 0] = 1000 + f
    return frames


def encode_cbf(frame: np.ndarray, tmp: Path) -> tuple[bytes, int]:
    """The CBF file bytes of ``frame`` (scatterbroker.server.demo.write_cbf) and where its text header ends."""
    from scatterbroker.server.demo import write_cbf

    path = tmp / "encode.cbf"
    write_cbf(path, frame, float(ANGLE_PLACEHOLDER), CBF_TIME)
    blob = path.read_bytes()
    path.unlink()
    split = blob.index(b"--CIF-BINARY-FORMAT-SECTION--")
    if blob[:split].count(ANGLE_PLACEHOLDER.encode()) == 0:
        raise RuntimeError("angle placeholder not found in the CBF header")
    return blob, split


def encode_tiff(frame: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, frame)
    return buf.getvalue()


# ------------------------------------------------------------------ the writer


def _write_frame(kind: str, d: Path, blob, position: int) -> float:
    """Write frame ``position`` (file number position + 1); return ``time.time()`` after close/rename."""
    name = f"scan_{position + 1:05d}.{kind}"
    if kind == "cbf":
        data, split = blob
        head = data[:split].replace(ANGLE_PLACEHOLDER.encode(), f"{0.1 * (position + 1):08.4f}".encode())
        with open(d / name, "wb") as f:  # in place, like a detector
            f.write(head)
            f.write(memoryview(data)[split:])
    else:
        part = d / f".{name}.part"  # hidden: stock Tiled's default filter ignores it
        with open(part, "wb") as f:
            f.write(blob)
        os.rename(part, d / name)
    return time.time()


def _writer_main(conn, kind: str, directory: str, blobs: list, first: int, n: int, rate: float) -> None:
    """Writer process. Protocol on ``conn``: send "ready"; on "first", write frame 0 and send its
    close time; on a float t0, write frames first .. first+n-1, frame j due at t0 + j/rate, then
    send [(due, closed)] for them.

    ``kind`` "cbf": open/write/close in place (the header's angle text patched per frame);
    ``kind`` "tif": write a hidden temporary file, then rename it into place.
    """
    d = Path(directory)
    k = len(blobs)
    conn.send("ready")
    msg = conn.recv()
    if msg == "first":
        conn.send(_write_frame(kind, d, blobs[0], 0))
        msg = conn.recv()
    t0 = float(msg)
    times: list[tuple[float, float]] = []
    try:
        for j in range(n):
            due = t0 + j / rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            times.append((due, _write_frame(kind, d, blobs[(first + j) % k], first + j)))
    finally:
        conn.send(times)
        conn.close()


class Writer:
    """The writer process (spawn context), driven from the benchmark process."""

    def __init__(self, kind: str, directory: Path, blobs: list, first: int, n: int, rate: float) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_writer_main, args=(child, kind, str(directory), blobs, first, n, rate),
                                daemon=True)

    def __enter__(self) -> Writer:
        self.proc.start()
        self._recv(120, "start")
        return self

    def _recv(self, timeout: float, what: str):
        if not self.conn.poll(timeout):
            raise RuntimeError(f"writer process did not {what} within {timeout:g} s")
        return self.conn.recv()

    def write_first(self) -> float:
        """Write the scan's first frame now; return its close time."""
        self.conn.send("first")
        return self._recv(60, "write the first frame")

    def start(self) -> float:
        """Start the timed stream half a second from now; return t0."""
        t0 = time.time() + 0.5
        self.conn.send(t0)
        return t0

    def times(self) -> list[tuple[float, float]]:
        return self._recv(120, "report its close times")

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the benchmark side failed: the writer may be waiting for t0
            self.proc.terminate()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# ------------------------------------------------------------------ the poller


@dataclass
class Poll:
    seen: list[float | None]
    statuses: dict[int, int] = field(default_factory=dict)  # non-answers; -1 = no response
    errors: dict[str, int] = field(default_factory=dict)  # exceptions behind the -1s
    wrong: list[str] = field(default_factory=list)
    requests: int = 0


def poll_frames(url: str, path: str, start: int, n: int, expected: Callable[[int], int], deadline: float,
                interval: float, per_request: int = 8, sample: Callable[[], None] | None = None) -> Poll:
    """Poll frames start .. start+n-1 until each is sliceable, or until ``deadline``.

    Each request asks for the LOWEST frame not yet seen, i, as ``slice=i,0:1,0:1``
    (``per_request`` 1) or ``slice=i:i+m,0:1,0:1`` (m = ``per_request``, clipped to
    the frames asked for): the server answers with the frames from i on that it
    has, so one answer can show several frames sliceable. Frame i is seen when
    an answer (status 200) holds its pixel (0, 0); ``seen[j]`` is the time that
    answer arrived for frame start+j. Every pixel is checked against ``expected``.
    """
    import httpx

    result = Poll(seen=[None] * n)
    headers = {"Authorization": f"Apikey {API_KEY}", "Accept": "application/octet-stream"}
    j = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as http:
        while j < n and time.time() < deadline:
            i = start + j
            m = min(max(1, per_request), n - j)
            first = f"{i}" if per_request == 1 else f"{i}:{i + m}"
            r = None
            try:
                r = http.get(f"/api/v1/array/full/{path}", params={"slice": f"{first},0:1,0:1"})
                status = r.status_code
            except httpx.HTTPError as err:
                status = -1
                result.errors[type(err).__name__] = result.errors.get(type(err).__name__, 0) + 1
            result.requests += 1
            if sample:
                sample()
            got = 0
            if status == 200 and r is not None and len(r.content) % 4 == 0:
                now = time.time()
                values = np.frombuffer(r.content, dtype="<i4")[:m]
                for v in values.tolist():
                    if v != expected(i + got):
                        result.wrong.append(f"frame {i + got}: pixel (0,0) = {v}, expected {expected(i + got)}")
                    result.seen[j + got] = now
                    got += 1
                j += got
            if got == 0:
                key = status if status != 200 else 0  # 0: 200 with no frame in it
                result.statuses[key] = result.statuses.get(key, 0) + 1
                time.sleep(interval)
    return result


def stream(kind: str, url: str, path: str, directory: Path, blobs: list, n: int, rate: float, cold: bool,
           drain: float, interval: float, per_request: int, sample: Callable[[], None] | None = None):
    """Write (and poll) the scan's first frame alone unless ``cold``, then the timed stream of n frames.

    Returns (first-frame latency or None, stream close times [(due, closed)], stream Poll,
    first-frame Poll or None).
    """
    k = len(blobs)
    expected = lambda i: 1000 + i % k  # noqa: E731  (pixel (0,0) of distinct frame i % k)
    first = 0 if cold else 1
    with Writer(kind, directory, blobs, first, n, rate) as writer:
        first_latency, first_poll = None, None
        if not cold:
            closed = writer.write_first()
            first_poll = poll_frames(url, path, 0, 1, expected, closed + 60, interval, per_request, sample)
            seen = first_poll.seen[0]
            first_latency = (seen - closed) if seen is not None else math.inf
        t0 = writer.start()
        poll = poll_frames(url, path, first, n, expected, t0 + (n - 1) / rate + drain, interval,
                           per_request, sample)
        times = writer.times()
    return first_latency, times, poll, first_poll


# -------------------------------------------------------------------- analysis


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (inf-safe)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def theil_sen_slope(x: list[float], y: list[float]) -> float:
    """Median of the pairwise slopes: a latency trend that one slow batch does not swing."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(len(xa), k=1)
    dx = xa[j] - xa[i]
    ok = dx > 1e-6
    if not ok.any():
        return 0.0
    return float(np.median((ya[j] - ya[i])[ok] / dx[ok]))


@dataclass
class RateResult:
    contender: str
    rate: float
    n: int
    latencies: list[float]
    readable: int
    p50: float
    p95: float
    max: float
    in_flight_end: int
    trend_growth_s: float
    quarter_growth_s: float
    sustained: bool
    why: str
    writer_lag_max: float
    statuses: dict[int, int]
    request_errors: dict[str, int]
    wrong: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def analyse(contender: str, rate: float, times: list[tuple[float, float]], poll: Poll,
            extra: dict[str, Any] | None = None) -> RateResult:
    n = len(poll.seen)
    closes = [c for _, c in times] + [math.inf] * (n - len(times))
    seen = [s if s is not None else math.inf for s in poll.seen]
    lat = [s - c if math.isfinite(s) and math.isfinite(c) else math.inf for s, c in zip(seen, closes)]
    readable = sum(1 for x in lat if math.isfinite(x))
    last_close = max((c for c in closes if math.isfinite(c)), default=math.inf)
    in_flight_end = sum(1 for c, s in zip(closes, seen) if c <= last_close < s)
    q = max(1, n // 4)
    if readable == n:
        span = closes[-1] - closes[0]
        trend = theil_sen_slope(closes, lat) * span
        quarters = float(np.mean(lat[-q:]) - np.mean(lat[:q]))
    else:
        trend = quarters = math.inf
    if readable < n:
        why = f"{n - readable} frames not sliceable within the drain time (did not keep up)"
    elif trend > GROWTH_S:
        why = f"latency grew {trend:.2f} s over the run"
    else:
        why = ""
    return RateResult(
        contender=contender, rate=rate, n=n, latencies=lat, readable=readable,
        p50=percentile(lat, 50), p95=percentile(lat, 95), max=max(lat),
        in_flight_end=in_flight_end, trend_growth_s=trend, quarter_growth_s=quarters,
        sustained=not why, why=why, writer_lag_max=max((c - d for d, c in times), default=math.inf),
        statuses=dict(poll.statuses), request_errors=dict(poll.errors), wrong=list(poll.wrong),
        extra=dict(extra or {}),
    )


# ------------------------------------------------------------------ contenders


@dataclass
class Settings:
    cold: bool
    drain: float
    interval: float
    per_request: int


def run_scatterbroker(work: Path, rate: float, n: int, frames: np.ndarray, blobs: list,
                      opts: Settings) -> tuple[RateResult, list[str]]:
    """One rate against a fresh scatterbroker server + Watcher; return result and correctness problems."""
    from tiled.client import from_uri

    from scatterbroker.catalog.watch import Watcher
    from scatterbroker.server.app import build_app, local_config, serve_in_thread

    raw = work / "raw"
    raw.mkdir(parents=True)
    problems: list[str] = []
    k = len(frames)
    with serve_in_thread(build_app(local_config(work / "data", [raw], api_key=API_KEY))) as url:
        _quiet_logs()
        client = from_uri(url, api_key=API_KEY)
        watcher = Watcher(client, raw, "raw")
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), kwargs={"status": lambda s: None},
                                  daemon=True)
        thread.start()
        watcher.ready.wait(30)  # inotify started and the (empty) directory reconciled
        queue = {"max": 0}

        def sample() -> None:
            queue["max"] = max(queue["max"], watcher.stats.backlog)

        try:
            first_latency, times, poll, first_poll = stream(
                "cbf", url, "raw/scan/frames", raw, blobs, n, rate, opts.cold, opts.drain, opts.interval,
                opts.per_request, sample)
        finally:
            stop.set()
            thread.join(60)
        if thread.is_alive():
            problems.append("watcher thread did not stop within 60 s")
        # Correctness, with the watcher stopped (header rows land after the frame is sliceable).
        total = n + (0 if opts.cold else 1)
        try:
            arr = client["raw/scan/frames"]
            if arr.shape != (total, *frames.shape[1:]):
                problems.append(f"raw/scan/frames has shape {arr.shape}, expected {(total, *frames.shape[1:])}")
            elif not np.array_equal(arr[total - 1], frames[(total - 1) % k]):
                problems.append(f"frame {total - 1} read back differs from the frame written")
            rows = client["raw/scan/headers"].read()
            if list(rows["frame"]) != list(range(1, total + 1)):
                problems.append(f"headers table has frames {list(rows['frame'])[:5]}..., expected 1..{total}")
        except Exception as err:  # a correctness failure, reported below
            problems.append(f"reading the scan back failed: {type(err).__name__}: {err}")
    result = analyse("scatterbroker", rate, times, poll, {
        "first_frame_s": first_latency, "queue_max": queue["max"], "requests": poll.requests,
        "watcher_problems": watcher.stats.problems, "last_problem": watcher.stats.last_problem})
    if result.readable < n:
        problems.append(f"{n - result.readable} of {n} frames never became sliceable at {rate:g} frames/s")
    if first_latency is not None and not math.isfinite(first_latency):
        problems.append(f"the scan's first frame never became sliceable (at {rate:g} frames/s)")
    bad_status = {s: c for s, c in {**result.statuses, **(first_poll.statuses if first_poll else {})}.items()
                  if s >= 500}
    if bad_status:
        problems.append(f"server errors while polling at {rate:g} frames/s: {bad_status}")
    problems += result.wrong + (first_poll.wrong if first_poll else [])
    return result, problems


class StockWatch:
    """``tiled.client.register.watch`` on its own thread and event loop; cancellable; errors kept."""

    def __init__(self, client, directory: Path) -> None:
        self.client, self.directory = client, directory
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import anyio

        try:
            anyio.run(self._main)
        except BaseException as err:  # reported, not raised
            self.error = self.error or err
            self.ready.set()

    async def _main(self) -> None:
        import anyio
        from tiled.client.register import watch

        initial = anyio.Event()

        async with anyio.create_task_group() as tg:

            async def run_watch() -> None:
                try:
                    await watch(self.client, self.directory, initial_walk_complete_event=initial)
                except Exception as err:  # reported, not raised
                    self.error = err
                    self.ready.set()
                    tg.cancel_scope.cancel()

            async def signal_ready() -> None:
                await initial.wait()
                self.ready.set()

            async def stopper() -> None:
                while not self.stop.is_set():
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()

            tg.start_soon(run_watch)
            tg.start_soon(signal_ready)
            tg.start_soon(stopper)

    def __enter__(self) -> StockWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


@contextlib.contextmanager
def counting_stock_register(calls: list[tuple[float, float, str]]):
    """Count and time stock Tiled's full re-registrations (``register``), behaviour unchanged."""
    import tiled.client.register as reg

    original = reg.register

    async def register(*args, **kwargs):
        t = time.perf_counter()
        status = "ok"
        try:
            return await original(*args, **kwargs)
        except BaseException as err:
            status = type(err).__name__
            raise
        finally:
            calls.append((time.time(), time.perf_counter() - t, status))

    reg.register = register
    try:
        yield
    finally:
        reg.register = original


def run_stock(work: Path, rate: float, n: int, blobs: list, opts: Settings) -> RateResult:
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    raw = work / "raw"
    raw.mkdir(parents=True)
    calls: list[tuple[float, float, str]] = []
    error = ""
    server = SimpleTiledServer(directory=work / "stock-db", api_key=API_KEY, port=0, readable_storage=[raw])
    try:
        _quiet_logs()
        url = server.uri.split("/api/v1")[0]
        client = from_uri(url, api_key=API_KEY)
        with counting_stock_register(calls), StockWatch(client, raw) as sw:
            if not sw.ready.wait(60):
                error = "stock watcher did not finish its initial walk within 60 s"
            first_latency, times, poll, first_poll = stream(
                "tif", url, "scan_", raw, blobs, n, rate, opts.cold, opts.drain, opts.interval,
                opts.per_request)
        if sw.error is not None:
            error = f"stock watcher raised {type(sw.error).__name__}: {sw.error}"
        elif sw.thread.is_alive():
            error = error or "stock watcher thread did not stop within 60 s"
    finally:
        server.close()
    t_start = times[0][1] if times else 0.0
    # Re-walks that ended during the stream; one cut short by our stop at the end does not count.
    during = [c for c in calls if c[0] >= t_start and c[2] != "CancelledError"]
    durations = [d for _, d, _ in during]
    extra = {
        "first_frame_s": first_latency,
        "full_rewalks": len(during),
        "rewalk_s_mean": float(np.mean(durations)) if durations else None,
        "rewalk_s_max": max(durations) if durations else None,
        "rewalk_s_first": durations[0] if durations else None,
        "rewalk_s_last": durations[-1] if durations else None,
        "rewalk_errors": sorted({s for *_, s in during if s != "ok"}),
        "error": error,
        "requests": poll.requests,
    }
    result = analyse("stock Tiled", rate, times, poll, extra)
    result.wrong += first_poll.wrong if first_poll else []
    return result


# ------------------------------------------------------------------------ main


def _summary(r: RateResult) -> str:
    first = r.extra.get("first_frame_s")
    return ((f"  first frame {_fmt(first)} s;" if first is not None else " ")
            + f" stream p50 {_fmt(r.p50)} s  p95 {_fmt(r.p95)} s  max {_fmt(r.max)} s, "
            + f"trend {_fmt(r.trend_growth_s)} s  "
            + ("sustained" if r.sustained else "NOT sustained: " + r.why))


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if not math.isfinite(x) else f"{x:.3f}"


def _num(x: float | None, nd: int = 4):
    return None if x is None or not math.isfinite(x) else round(x, nd)


def _rates(text: str) -> list[float]:
    return [float(r) for r in text.replace(",", " ").split() if r]


def _statuses(r: RateResult) -> str:
    names = {0: "200 without the frame", -1: "no response"}
    parts = [f"{names.get(s, s)} x{c}" for s, c in sorted(r.statuses.items())]
    return ", ".join(parts) + (f" ({r.request_errors})" if r.request_errors else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables and the JSON line; return that summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="5,10,20,40", help="scatterbroker rates, frames/s (default 5,10,20,40)")
    parser.add_argument("--frames", type=int, default=40, help="frames per rate, at least (default 40)")
    parser.add_argument("--min-seconds", type=float, default=6.0,
                        help="stream at least this long: frames per rate = max(--frames, rate x this); "
                             "0 = exactly --frames (default 6)")
    parser.add_argument("--stock-rates", default="10", help="stock Tiled rates, frames/s ('' = none; default 10)")
    parser.add_argument("--distinct", type=int, default=4, help="distinct frames generated and cycled (default 4)")
    parser.add_argument("--drain", type=float, default=15.0,
                        help="seconds after the last scheduled frame to wait for stragglers (default 15)")
    parser.add_argument("--poll-interval", type=float, default=0.01,
                        help="seconds to wait after a poll that found no new frame (default 0.01)")
    parser.add_argument("--poll-frames", type=int, default=8,
                        help="frames asked for per poll, from the lowest unseen one (1 = slice=i,0:1,0:1; "
                             "default 8)")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up: the timed stream starts with the scan's first frame (which creates "
                             "the scan node), instead of writing that frame alone first")
    parser.add_argument("--workdir", default=None, help="where temporary directories go (default: system temp)")
    parser.add_argument("--shape", type=int, nargs=2, default=list(FRAME_SHAPE), metavar=("NY", "NX"),
                        help="frame shape, rows columns (default 1679 1475, a Pilatus 2M)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 frames of 195 x 487 at 10 frames/s, both contenders (same code paths)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.stock_rates, args.frames, args.min_seconds = "10", "10", 8, 0.0
        args.distinct, args.drain, args.shape = 2, 5.0, [195, 487]
    shape = (args.shape[0], args.shape[1])
    warnings.filterwarnings("ignore")
    rates, stock_rates = _rates(args.rates), _rates(args.stock_rates)
    k = max(1, args.distinct)
    opts = Settings(cold=args.cold, drain=args.drain, interval=args.poll_interval,
                    per_request=max(1, args.poll_frames))

    def frames_for(rate: float) -> int:
        return max(4, args.frames, math.ceil(rate * args.min_seconds))

    _quiet_logs()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    load = os.getloadavg()
    console.print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                  "(a shared machine makes these figures noisy)")
    t_all = time.perf_counter()
    sb: list[RateResult] = []
    stock: list[RateResult] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sb-ingest-", dir=args.workdir) as tmpdir:
        tmp = Path(tmpdir).resolve()
        t = time.perf_counter()
        frames = make_frames(k, shape=shape)
        cbf = [encode_cbf(f, tmp) for f in frames]
        tif = [encode_tiff(f) for f in frames] if stock_rates else []
        console.print(f"{k} distinct {shape[1]} x {shape[0]} int32 frames encoded in "
                      f"{time.perf_counter() - t:.1f} s: CBF {np.mean([len(b) for b, _ in cbf]) / 1e6:.2f} MB"
                      + (f", TIFF {np.mean([len(b) for b in tif]) / 1e6:.2f} MB" if tif else "") + " each")
        for rate in rates:
            n = frames_for(rate)
            console.print(f"scatterbroker, {rate:g} frames/s x {n} frames ...")
            work = tmp / f"sb-{rate:g}"
            result, bad = run_scatterbroker(work, rate, n, frames, cbf, opts)
            shutil.rmtree(work, ignore_errors=True)
            sb.append(result)
            problems += bad
            console.print(_summary(result))
        for rate in stock_rates:
            n = frames_for(rate)
            console.print(f"stock Tiled (TIFF sequence), {rate:g} frames/s x {n} frames ...")
            work = tmp / f"stock-{rate:g}"
            try:
                result = run_stock(work, rate, n, tif, opts)
            except Exception as err:  # the baseline's failure is a result, not a crash
                msg = f"{type(err).__name__}: {err}"
                result = RateResult("stock Tiled", rate, n, [math.inf] * n, 0, math.inf, math.inf, math.inf, n,
                                    math.inf, math.inf, False, f"run failed: {msg}", math.inf, {}, {}, [],
                                    {"error": msg})
            shutil.rmtree(work, ignore_errors=True)
            stock.append(result)
            console.print(_summary(result))

    table = Table(title="Ingest latency, file close -> sliceable over HTTP "
                        f"({shape[1]} x {shape[0]} int32 frames; seconds, lower is better)")
    for col in ("contender", "frames/s", "frames", "1st frame", "sliceable", "p50", "p95", "max", "trend",
                "in flight at end", "queue max", "sustained?"):
        table.add_column(col, justify="left" if col in ("contender", "sustained?") else "right")
    for r in [*sb, *stock]:
        table.add_row(
            r.contender + (" (CBF)" if r.contender == "scatterbroker" else " (TIFF seq.)"),
            f"{r.rate:g}", str(r.n), _fmt(r.extra.get("first_frame_s")), f"{r.readable}/{r.n}",
            _fmt(r.p50), _fmt(r.p95), _fmt(r.max), _fmt(r.trend_growth_s), str(r.in_flight_end),
            str(r.extra.get("queue_max", "-")), "yes" if r.sustained else f"no: {r.why}",
        )
    console.print(table)
    console.print("1st frame: the scan's first frame, written alone before the stream (it creates the scan "
                  "node; --cold puts it in the stream). trend: latency growth over the stream (Theil-Sen); "
                  f"> {GROWTH_S:g} s = not sustained. in flight: frames closed but not yet sliceable at the "
                  "writer's last close. queue max: the watcher's own pending-file count, highest seen.")

    for r in sb:
        notes = [f"polls that found no new frame: {_statuses(r)}"]
        if r.extra.get("watcher_problems"):
            notes.append(f"watcher problems {r.extra['watcher_problems']} (last: {r.extra['last_problem']})")
        if r.writer_lag_max > 0.05:
            notes.append(f"writer fell behind schedule by up to {r.writer_lag_max:.3f} s")
        console.print(f"scatterbroker at {r.rate:g} frames/s: " + "; ".join(notes))
    for r in stock:
        e = r.extra
        notes = []
        if "full_rewalks" in e:
            notes.append(f"{e['full_rewalks']} full delete + re-walk + re-register cycles during the stream"
                         + (f" ({e['rewalk_s_mean']:.3f} s mean, {e['rewalk_s_max']:.3f} s max, first "
                            f"{e['rewalk_s_first']:.3f} s, last {e['rewalk_s_last']:.3f} s)"
                            if e.get("rewalk_s_mean") is not None else ""))
        if e.get("rewalk_errors"):
            notes.append(f"errors in re-walks: {e['rewalk_errors']}")
        notes.append(f"polls that found no new frame: {_statuses(r)} (stock answers 500 to a slice past its "
                     "last frame, 404 while it re-registers)")
        if r.writer_lag_max > 0.05:
            notes.append(f"writer fell behind schedule by up to {r.writer_lag_max:.3f} s")
        console.print(f"stock at {r.rate:g} frames/s: " + "; ".join(notes))
        if e.get("error"):
            console.print(f"[yellow]stock at {r.rate:g} frames/s: {e['error']}[/yellow]")
        if not r.sustained:
            console.print(f"stock at {r.rate:g} frames/s did not keep up: {r.why}")

    def best(results: list[RateResult]) -> float | None:
        ok = [r.rate for r in results if r.sustained]
        return max(ok) if ok else None

    at_target = next((r for r in sb if r.rate == TARGET_RATE), None)
    stock_at_target = next((r for r in stock if r.rate == TARGET_RATE), None)
    target_met = None if at_target is None else at_target.p95 < TARGET_P95_S
    console.print(f"target p95 < {TARGET_P95_S:g} s at {TARGET_RATE:g} frames/s of 2M frames: "
                  + ("not measured (10 frames/s not in --rates)" if at_target is None else
                     f"{'met' if target_met else 'NOT met'} (p95 {_fmt(at_target.p95)} s)"))
    ratio: float | str | None = None
    if at_target is not None and stock_at_target is not None:
        if math.isfinite(stock_at_target.p95) and math.isfinite(at_target.p95):
            ratio = stock_at_target.p95 / at_target.p95
            console.print(f"stock p95 / scatterbroker p95 at {TARGET_RATE:g} frames/s: {ratio:.2f}x "
                          f"({_fmt(stock_at_target.p95)} s / {_fmt(at_target.p95)} s)")
        else:
            ratio = "inf" if math.isfinite(at_target.p95) else None
            console.print(f"stock p95 / scatterbroker p95 at {TARGET_RATE:g} frames/s: "
                          f"{_fmt(stock_at_target.p95)} s / {_fmt(at_target.p95)} s"
                          + (" (stock did not keep up)" if ratio == "inf" else ""))
    else:
        console.print(f"stock p95 / scatterbroker p95 at {TARGET_RATE:g} frames/s: not measured")
    hs, hk = best(sb), best(stock)
    parts = []
    if sb:
        parts.append(f"scatterbroker {hs if hs is not None else 'none'} frames/s (of {args.rates})")
    if stock:
        parts.append(f"stock Tiled {hk if hk is not None else 'none'} frames/s (of {args.stock_rates})")
    console.print("highest sustained rate: " + (", ".join(parts) or "nothing run"))
    for p in problems:
        console.print(f"[red]PROBLEM[/red] {p}")
    console.print(f"total {time.perf_counter() - t_all:.0f} s")

    def row(r: RateResult) -> dict[str, Any]:
        return {
            "rate": r.rate, "frames": r.n, "sliceable": r.readable, "kept_up": r.readable == r.n,
            "p50_s": _num(r.p50), "p95_s": _num(r.p95), "max_s": _num(r.max),
            "trend_growth_s": _num(r.trend_growth_s), "quarter_growth_s": _num(r.quarter_growth_s),
            "in_flight_end": r.in_flight_end, "sustained": r.sustained, "why": r.why,
            "writer_lag_max_s": _num(r.writer_lag_max),
            "poll_statuses": {str(s): c for s, c in r.statuses.items()}, "request_errors": r.request_errors,
            **{k2: (_num(v) if isinstance(v, float) else v) for k2, v in r.extra.items()},
            "latencies_s": [_num(x, 3) for x in r.latencies],
        }

    summary = {
        "benchmark": "ingest_latency",
        "quick": args.quick,
        "frame_shape": list(shape),
        "cold": args.cold,
        "poll_frames": opts.per_request,
        "load_average_start": [round(x, 2) for x in load],
        "scatterbroker": [row(r) for r in sb],
        "stock_tiff_sequence": [row(r) for r in stock],
        "highest_sustained_rate": {"scatterbroker": hs, "stock": hk},
        "target_p95_under_1s_at_10fps": target_met,
        "stock_over_ours_p95_at_10fps": round(ratio, 2) if isinstance(ratio, float) else ratio,
        "correct": not problems,
        "problems": problems,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["correct"] else 1)
