"""Registration throughput: scatterbroker vs stock Tiled, files registered per second.

What is measured
----------------
One scan of N numbered Pilatus-100K-sized CBF frames (195 x 487 int32, Poisson
counts, default N = 2,000) with a miniCBF header in every frame. Each contender
gets its own fresh, real Tiled server on a free 127.0.0.1 port (started before
the clock starts); only the registration call itself is timed
(``time.perf_counter``). Same files, same machine, same run.

1. **scatterbroker** -- ``scatterbroker.catalog.register.register``: the scan
   becomes ONE node (``frames``: an (N, 195, 487) array) plus a ``headers``
   table with every frame's header values (start angle, exposure, ...). After
   timing we check the frame count and that ``headers`` has N rows with a
   ``start_angle`` column; the script exits non-zero if not. A second run over
   the unchanged files (re-registration, should be near-instant) is reported
   as ``scatterbroker_rerun_s``.
2. **stock Tiled, CBF** -- ``tiled.client.register.register`` with a minimal
   fabio adapter defined here (stock Tiled has no CBF support): one node per
   file, the fabio header as each node's metadata. This is slow, so by default
   only the first 300 frames are registered (``--stock-cbf-frames``); the
   figure is files per second, so it compares directly.
3. **stock Tiled, TIFF sequence** -- the same frames written as numbered TIFFs,
   registered with stock ``register`` and default settings: its walker groups
   them into ONE node (its best case), but harvests no per-frame headers.

Target: >= 1,500 files/s with per-frame headers, >= 2x the stock best case
(TIFF sequence), >= 40x stock CBF registration. Timings are printed, never
asserted; only a wrong registration result fails the run.

Run
---
    python benchmarks/registration.py                 # 2,000 frames
    python benchmarks/registration.py --frames 500 --stock-cbf-frames 100 --repeat 3
    python benchmarks/registration.py --quick         # smoke test: 20 frames, 5 stock CBF frames

The last line printed is a JSON summary; ``main(argv)`` returns it as a dict
(importing this module runs nothing). The exit status is 1 if a registration
result was wrong (its ``problems``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

FRAME_SHAPE = (195, 487)  # Pilatus 100K: (slow, fast)
TARGET_FILES_PER_S = 1500.0
TARGET_VS_STOCK_BEST = 2.0
TARGET_VS_STOCK_CBF = 40.0
API_KEY = "bench"

_NUMBER_RE = re.compile(r"(\d+)\.[A-Za-z]+$")


def _quiet_logs() -> None:
    import tiled.server.app  # noqa: F401  (sets its own logger to INFO on import)

    for name in ("tiled", "tiled.server.app", "fabio", "uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- data


def _header_text(i: int) -> str:
    angle = 10 + 0.1 * i
    return "\n".join(
        [
            "# Detector: PILATUS 2M, 24-0111",
            "# 2026-11-25T08:00:00.000",
            "# Pixel_size 172e-6 m x 172e-6 m",
            "# Exposure_time 0.1000000 s",
            "# Exposure_period 0.1000000 s",
            "# Wavelength 0.7293 A",
            "# Detector_distance 0.5000 m",
            "# Beam_xy (700.00, 800.00) pixels",
            f"# Start_angle {angle:.4f} deg.",
            "# Angle_increment 0.1000 deg.",
            f"# Phi {angle:.4f} deg.",
        ]
    )


def write_frames(tmp: Path, n: int) -> tuple[Path, Path]:
    """N CBF frames under raw/p1/s1 and the same frames as TIFFs under tiff/p1/s1."""
    import fabio.cbfimage
    import tifffile

    cbf_dir = tmp / "raw" / "p1" / "s1"
    tif_dir = tmp / "tiff" / "p1" / "s1"
    cbf_dir.mkdir(parents=True)
    tif_dir.mkdir(parents=True)
    rng = np.random.default_rng(12345)
    base = rng.poisson(0.5, size=FRAME_SHAPE).astype(np.int32)
    for i in range(n):
        data = np.roll(base, i)
        name = f"scan1_{i + 1:05d}"
        header = {
            "_array_data.header_convention": "PILATUS_1.2",
            "_array_data.header_contents": _header_text(i),
        }
        fabio.cbfimage.CbfImage(data=data, header=header).write(str(cbf_dir / f"{name}.cbf"))
        tifffile.imwrite(tif_dir / f"{name}.tif", data)
    return tmp / "raw", tmp / "tiff"


# ------------------------------------------------------- stock Tiled CBF adapter


def _make_stock_cbf_adapter():
    """A minimal fabio-based CBF adapter, the way a facility would write one for
    stock Tiled: decode with fabio, header dict as metadata, one chunk."""
    import fabio
    from tiled.adapters.core import Adapter
    from tiled.adapters.utils import init_adapter_from_catalog
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.utils import path_from_uri

    class FabioCBFAdapter(Adapter[ArrayStructure]):
        structure_family = StructureFamily.array

        def __init__(self, data_uri, structure=None, *, metadata=None, specs=None):
            self._path = path_from_uri(data_uri)
            self._header: dict[str, Any] = {}
            if structure is None:
                img = fabio.open(str(self._path))
                data = img.data
                self._header = {str(k): str(v) for k, v in img.header.items()}
                structure = ArrayStructure(
                    shape=data.shape,
                    chunks=tuple((d,) for d in data.shape),
                    data_type=BuiltinDtype.from_numpy_dtype(data.dtype),
                )
            super().__init__(structure, metadata=metadata, specs=specs)

        @classmethod
        def from_uris(cls, data_uri, **kwargs):
            return cls(data_uri)

        @classmethod
        def from_catalog(cls, data_source, node, /, **kwargs):
            return init_adapter_from_catalog(cls, data_source, node, **kwargs)

        def metadata(self):
            return {**self._header, **self._metadata}

        def read(self, slice=...):
            arr = fabio.open(str(self._path)).data
            return arr[slice] if slice is not ... else arr

        def read_block(self, block, slice=None):
            if any(block):
                raise IndexError(block)
            arr = fabio.open(str(self._path)).data
            return arr[slice] if slice else arr

    return FabioCBFAdapter


# --------------------------------------------------------------------- servers


@contextlib.contextmanager
def stock_server(directory: Path, readable: Path, adapters_by_mimetype=None):
    """A stock Tiled server (SQLite catalog) on a free loopback port.

    Same layout as ``tiled.server.SimpleTiledServer``, which cannot take extra
    adapters; without extra adapters SimpleTiledServer itself is used.
    """
    if not adapters_by_mimetype:
        from tiled.server import SimpleTiledServer

        server = SimpleTiledServer(directory=directory, api_key=API_KEY, port=0, readable_storage=[readable])
        try:
            yield server.uri.split("/api/v1")[0]
        finally:
            server.close()
        return

    import uvicorn
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app
    from tiled.server.simple import ThreadedServer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    catalog = catalog_from_uri(
        directory / "catalog.db",
        writable_storage=[directory / "data", f"duckdb:///{directory / 'storage.duckdb'}"],
        readable_storage=[readable],
        init_if_not_exists=True,
        adapters_by_mimetype=adapters_by_mimetype,
    )
    app = build_app(catalog, authentication=Authentication(single_user_api_key=API_KEY))
    server = ThreadedServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    with server.run_in_thread() as url:
        yield url


# ------------------------------------------------------------------ contenders


def run_scatterbroker(tmp: Path, raw: Path, n: int, repeat: int) -> dict[str, Any]:
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.server.app import build_app, local_config, serve_in_thread

    times: list[float] = []
    rerun = None
    problems: list[str] = []
    for k in range(repeat):
        data_dir = tmp / f"sb-data-{k}"
        cfg = local_config(data_dir, [raw], api_key=API_KEY)
        with serve_in_thread(build_app(cfg)) as url:
            client = from_uri(url, api_key=API_KEY)
            list(client)  # warm up the connection
            t0 = time.perf_counter()
            report = register(client, raw, prefix="raw")
            elapsed = time.perf_counter() - t0
            times.append(elapsed)
            if report.failed:
                problems.append(f"registration reported problems: {report.failed[:3]}")
            frames = client["raw/p1/s1/scan1/frames"]
            if frames.shape[0] != n:
                problems.append(f"frames has shape {frames.shape}, expected {n} frames")
            headers = client["raw/p1/s1/scan1/headers"].read()
            if len(headers) != n or "start_angle" not in headers.columns:
                problems.append(
                    f"headers has {len(headers)} rows and columns {list(headers.columns)}; "
                    f"expected {n} rows with 'start_angle'"
                )
            elif not np.allclose(headers["start_angle"].to_numpy(dtype=float), 10 + 0.1 * np.arange(n)):
                problems.append("headers.start_angle does not match the written headers")
            if k == repeat - 1:
                t0 = time.perf_counter()
                again = register(client, raw, prefix="raw")
                rerun = time.perf_counter() - t0
                if again.created or again.updated or again.failed or again.unchanged != 1:
                    problems.append(f"re-registration was not a no-op: {again.summary()}")
    return {"seconds": min(times), "times": times, "files": n, "rerun_s": rerun, "problems": problems}


def run_stock_cbf(tmp: Path, raw: Path, n_frames: int) -> dict[str, Any]:
    from tiled.client import from_uri
    from tiled.client.register import register

    adapter = _make_stock_cbf_adapter()
    mimetype = "image/x-cbf"

    def only_first(path: Path) -> bool:
        if path.name.startswith("."):
            return False
        m = _NUMBER_RE.search(path.name)
        return path.is_dir() or m is None or int(m.group(1)) <= n_frames

    problems: list[str] = []
    with stock_server(tmp / "stock-cbf", raw, {mimetype: adapter}) as url:
        client = from_uri(url, api_key=API_KEY)
        list(client)
        t0 = time.perf_counter()
        asyncio.run(
            register(
                client,
                raw,
                adapters_by_mimetype={mimetype: adapter},
                mimetypes_by_file_ext={".cbf": mimetype},
                filter=only_first,
            )
        )
        elapsed = time.perf_counter() - t0
        scan = client["p1/s1"]
        if len(scan) != n_frames:
            problems.append(f"stock CBF: {len(scan)} nodes registered, expected {n_frames}")
        else:
            first = scan["scan1_00001"]
            if first.shape != FRAME_SHAPE or "Start_angle" not in first.metadata.get(
                "_array_data.header_contents", ""
            ):
                problems.append("stock CBF: first node lacks its shape or header metadata")
    return {"seconds": elapsed, "files": n_frames, "problems": problems}


def run_stock_tiff(tmp: Path, tiff: Path, n: int) -> dict[str, Any]:
    from tiled.client import from_uri
    from tiled.client.register import register

    problems: list[str] = []
    with stock_server(tmp / "stock-tiff", tiff) as url:
        client = from_uri(url, api_key=API_KEY)
        list(client)
        t0 = time.perf_counter()
        asyncio.run(register(client, tiff))
        elapsed = time.perf_counter() - t0
        keys = list(client["p1/s1"])
        if len(keys) != 1 or client["p1/s1"][keys[0]].shape != (n, *FRAME_SHAPE):
            shapes = {k: client["p1/s1"][k].shape for k in keys[:3]}
            problems.append(f"stock TIFF: expected one ({n}, 195, 487) node, got {len(keys)}: {shapes}")
    return {"seconds": elapsed, "files": n, "problems": problems}


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and the JSON line; return that summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000, help="CBF frames in the scan (default 2000)")
    parser.add_argument(
        "--stock-cbf-frames",
        type=int,
        default=300,
        help="frames registered by the (slow) stock CBF contender (default 300)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="best of k scatterbroker runs (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 20 frames, 5 of them for stock CBF, one run (same code paths)")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.stock_cbf_frames, args.repeat = 20, 5, 1
    warnings.filterwarnings("ignore")
    n = args.frames
    n_stock_cbf = max(1, min(args.stock_cbf_frames, n))
    repeat = max(1, args.repeat)

    _quiet_logs()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmpdir:
        tmp = Path(tmpdir).resolve()
        t0 = time.perf_counter()
        raw, tiff = write_frames(tmp, n)
        console.print(f"wrote {n} CBF + {n} TIFF frames in {time.perf_counter() - t0:.1f} s")
        _quiet_logs()

        console.print("scatterbroker ...")
        sb = run_scatterbroker(tmp, raw, n, repeat)
        _quiet_logs()
        console.print(f"stock Tiled, CBF one node per file ({n_stock_cbf} frames) ...")
        cbf = run_stock_cbf(tmp, raw, n_stock_cbf)
        console.print("stock Tiled, TIFF sequence ...")
        tif = run_stock_tiff(tmp, tiff, n)

    rate = {name: r["files"] / r["seconds"] for name, r in (("sb", sb), ("cbf", cbf), ("tif", tif))}
    ratio_cbf = rate["sb"] / rate["cbf"]
    ratio_tif = rate["sb"] / rate["tif"]
    checks = {
        f">= {TARGET_FILES_PER_S:,.0f} files/s with per-frame headers": rate["sb"] >= TARGET_FILES_PER_S,
        f">= {TARGET_VS_STOCK_BEST:g}x stock best case (TIFF sequence)": ratio_tif >= TARGET_VS_STOCK_BEST,
        f">= {TARGET_VS_STOCK_CBF:g}x stock CBF": ratio_cbf >= TARGET_VS_STOCK_CBF,
    }
    target_met = all(checks.values())

    table = Table(title=f"Registration of a {n:,}-frame CBF scan (files/s, higher is better)")
    table.add_column("contender")
    table.add_column("files", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("files/s", justify="right")
    table.add_column("per-frame headers")
    table.add_row(
        f"scatterbroker (best of {repeat})", f"{n:,}", f"{sb['seconds']:.2f}", f"{rate['sb']:,.0f}", "yes (table)"
    )
    table.add_row("scatterbroker re-run (unchanged)", f"{n:,}", f"{sb['rerun_s']:.3f}", "", "")
    table.add_row(
        "stock Tiled, CBF node per file", f"{n_stock_cbf:,}", f"{cbf['seconds']:.2f}", f"{rate['cbf']:,.1f}",
        "yes (node metadata)",
    )
    table.add_row(
        "stock Tiled, TIFF sequence", f"{n:,}", f"{tif['seconds']:.2f}", f"{rate['tif']:,.0f}", "no"
    )
    console.print(table)
    if repeat > 1:
        console.print("scatterbroker runs (s): " + ", ".join(f"{t:.2f}" for t in sb["times"]))
    console.print(f"scatterbroker vs stock CBF:           {ratio_cbf:,.1f}x")
    console.print(f"scatterbroker vs stock TIFF sequence: {ratio_tif:,.1f}x")
    for label, ok in checks.items():
        console.print(f"target {label}: {'met' if ok else 'NOT met'}")
    console.print(f"target met: {target_met}")

    problems = sb["problems"] + cbf["problems"] + tif["problems"]
    for p in problems:
        console.print(f"[red]PROBLEM[/red] {p}")

    summary = {
        "benchmark": "registration",
        "frames": n,
        "scatterbroker_files_per_s": round(rate["sb"], 1),
        "scatterbroker_s": round(sb["seconds"], 4),
        "scatterbroker_rerun_s": round(sb["rerun_s"], 4),
        "stock_cbf_frames": n_stock_cbf,
        "stock_cbf_files_per_s": round(rate["cbf"], 1),
        "stock_tiff_sequence_files_per_s": round(rate["tif"], 1),
        "ratio_vs_stock_cbf": round(ratio_cbf, 2),
        "ratio_vs_stock_tiff_sequence": round(ratio_tif, 2),
        "target_met": target_met,
        "quick": args.quick,
        "problems": problems,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
