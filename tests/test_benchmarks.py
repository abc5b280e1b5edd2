"""Smoke tests of the benchmarks (benchmarks/hostile.py has its own: test_benchmarks_hostile.py).

Each runs ``main(["--quick"])`` -- tiny sizes, the same code paths -- and checks the summary it
returns and prints as its last line: the expected keys, every figure finite and positive, every
named baseline run (or reported as skipped, with a reason, when its package is not installed).
No time and no speed ratio is asserted: these only keep the benchmarks from rotting.

Benchmarks that start Tiled servers inside their own process (registration, ingest_latency: Tiled
keeps the single-user API key process-global) or fork worker pools (stacking) run in a subprocess;
the others start their servers as subprocesses and run here.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NAMES = ("access", "ingest_latency", "load", "registration", "stacking", "transform")


@pytest.fixture()
def benchmarks_path():
    """benchmarks/ on sys.path while a test runs (the scripts import each other by name); the
    log levels a benchmark quietens (tiled, uvicorn, httpx, ...) are put back afterwards."""
    loggers = [logging.getLogger(name) for name in ("", "tiled", "tiled.server.app", "tiled.client.register",
                                                    "fabio", "uvicorn", "uvicorn.error", "uvicorn.access",
                                                    "httpx", "alembic", "watchfiles", "watchfiles.main",
                                                    "watchdog")]
    levels = [logger.level for logger in loggers]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield
    finally:
        sys.path.remove(str(BENCHMARKS))
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def bench(name: str) -> Any:
    return importlib.import_module(name)


def run_in_subprocess(name: str, tmp_path: Path, *extra: str) -> tuple[dict, dict, str]:
    """``main(["--quick", *extra])`` of ``name`` in a fresh interpreter: (last printed JSON line,
    returned dict, stdout)."""
    code = (f"import json, sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import {name}; "
            f"r = {name}.main(['--quick', *sys.argv[1:]]); print('RETURNED ' + json.dumps(r, default=float))")
    out = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=240)
    assert out.returncode == 0, f"{name} --quick failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("RETURNED "), lines[-3:]
    return json.loads(lines[-2]), json.loads(lines[-1][len("RETURNED "):]), out.stdout


def last_json(capsys) -> tuple[dict, str]:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def same(printed: dict, returned: dict) -> None:
    """The JSON line printed last is the dict ``main`` returned (NaN-tolerant: compared as JSON)."""
    assert json.dumps(printed, sort_keys=True) == json.dumps(returned, sort_keys=True, default=float)


def positive(x: Any, what: str) -> None:
    assert isinstance(x, (int, float)) and not isinstance(x, bool), f"{what}: {x!r} is not a number"
    assert math.isfinite(x) and x > 0, f"{what}: {x!r} is not finite and positive"


def finite(x: Any, what: str) -> None:
    assert isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x), f"{what}: {x!r}"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# ------------------------------------------------------------------------------------------ import


def test_importing_the_benchmarks_runs_nothing():
    """Importing a benchmark prints nothing, starts nothing and leaves the warning filters alone
    (numpy, imported first, adds its own)."""
    code = ("import sys, threading, warnings; import numpy; sys.path.insert(0, sys.argv[1]); "
            "before = list(warnings.filters); "
            f"import {', '.join(NAMES)}; "
            f"assert all(callable(m.main) for m in ({', '.join(NAMES)},)); "
            "assert warnings.filters == before, 'warning filters changed at import'; "
            "assert threading.active_count() == 1, threading.enumerate(); "
            "import multiprocessing; assert not multiprocessing.active_children()")
    out = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "", out.stdout


# ------------------------------------------------------------------------------------------ access


def test_access_quick(benchmarks_path, capsys, tmp_path):
    access = bench("access")
    result = access.main(["--quick", "--workdir", str(tmp_path / "work")])
    printed, out = last_json(capsys)
    same(printed, result)
    assert result["benchmark"] == "access" and result["quick"] is True
    assert result["failures"] == [], result["failures"]
    rows = result["results"]
    columns = ["local", "scatterbroker", "stock"]
    if installed("h5grove"):
        columns.append("h5grove")
        assert "h5grove" not in result["skipped"]
    else:  # the baseline is reported as skipped, with why; the rest ran
        assert result["skipped"]["h5grove"].strip()
        assert "h5grove: skipped" in out
        assert all("h5grove" not in row for key, row in rows.items() if key != "_cpu")
    hdf5_rows = ("full_stack", "one_frame", "roi", "random_100", "bslz4_full_stack", "bslz4_one_frame")
    for row in (*hdf5_rows, "list_10k", "cbf_sequence"):
        for col in columns:
            if col == "h5grove" and row == "cbf_sequence":
                continue  # h5grove has no CBF reader
            cell = rows[row].get(col)
            assert cell is not None and "error" not in cell, f"{row}/{col}: {cell}"
            positive(cell["s"], f"{row}/{col} seconds")
            if "MBps" in cell:
                positive(cell["MBps"], f"{row}/{col} MB/s")
    for row in ("bslz4_full_stack_server_decode", "bslz4_one_frame_server_decode"):
        positive(rows[row]["scatterbroker"]["s"], row)
    for col in ("scatterbroker", "stock"):
        acc = rows["_cpu"][col]
        assert "error" not in acc, acc
        for key, value in acc.items():
            finite(value, f"CPU {col} {key}")
            assert value >= 0, (col, key, value)
    assert set(result["targets"]) == {*access.TARGETS, "rss_growth_MB"}
    for name, verdict in result["targets"].items():
        finite(verdict["value"], name)
    for when in ("before", "after"):
        positive(result["server_memory_MB"][when]["VmRSS"], f"server RSS {when}")
    assert "sb/local" in out and "stock/sb" in out  # the ratios against the named baselines


# ---------------------------------------------------------------------------------- ingest latency


def test_ingest_latency_quick(tmp_path):
    printed, result, out = run_in_subprocess("ingest_latency", tmp_path)
    same(printed, result)
    assert result["benchmark"] == "ingest_latency" and result["quick"] is True
    assert result["correct"] is True and result["problems"] == [], result["problems"]
    (sb,) = result["scatterbroker"]
    assert sb["kept_up"] is True and sb["sliceable"] == sb["frames"] > 0
    for key in ("p50_s", "p95_s", "max_s", "first_frame_s"):
        positive(sb[key], f"scatterbroker {key}")
    assert len(sb["latencies_s"]) == sb["frames"]
    (stock,) = result["stock_tiff_sequence"]  # the named baseline: stock Tiled's watcher, same frames
    assert stock["frames"] == sb["frames"] and "error" in stock and "full_rewalks" in stock
    if stock["kept_up"]:
        positive(stock["p95_s"], "stock p95")
        positive(result["stock_over_ours_p95_at_10fps"], "stock p95 / ours")
    else:  # not keeping up is a result of the baseline, reported as such
        assert result["stock_over_ours_p95_at_10fps"] in ("inf", None)
    assert result["highest_sustained_rate"]["scatterbroker"] == 10.0
    assert "stock p95 / scatterbroker p95" in out


# -------------------------------------------------------------------------------------------- load


def test_load_quick(benchmarks_path, capsys):
    load = bench("load")
    result = load.main(["--quick"])
    printed, out = last_json(capsys)
    same(printed, result)
    assert result["benchmark"] == "load" and result["quick"] is True
    assert result["errors"] == 0, result["first_errors"]
    positive(result["requests"], "requests")
    positive(result["req_per_s"], "requests/s")
    positive(result["span_s"], "span")
    for key in ("p50", "p95", "p99", "max"):
        positive(result["latency_ms"][key], f"latency {key}")
    assert set(result["per_kind"]) == {*load.RECORDED, "all"}
    for kind, row in result["per_kind"].items():
        positive(row["requests"], f"{kind} requests")
        positive(row["p50"], f"{kind} p50")
    calib = result["one_client"]["per_kind"]
    assert set(calib) == set(load.KINDS)
    assert all(c["errors"] == 0 and c["requests"] > 0 for c in calib.values()), calib
    positive(result["one_client"]["mix_server_cpu_ms_per_request"], "server CPU per request")
    for key in ("start", "max", "end"):
        positive(result["server_rss_MB"][key], f"server RSS {key}")
    ingest = result["ingest"]
    positive(ingest["frames_written"], "frames written")
    assert ingest["all_listed"] is True and ingest["watcher_problems"] == 0, ingest
    assert set(result["targets"]) == {"zero_errors", "p99_under_500ms", "rss_flat"}
    assert "requests/s" in out


# ------------------------------------------------------------------------------------ registration


def test_registration_quick(tmp_path):
    printed, result, out = run_in_subprocess("registration", tmp_path)
    same(printed, result)
    assert result["benchmark"] == "registration" and result["quick"] is True
    assert result["problems"] == [], result["problems"]
    for key in ("scatterbroker_files_per_s", "scatterbroker_s", "scatterbroker_rerun_s", "stock_cbf_files_per_s",
                "stock_tiff_sequence_files_per_s", "ratio_vs_stock_cbf", "ratio_vs_stock_tiff_sequence"):
        positive(result[key], key)
    assert result["stock_cbf_frames"] <= result["frames"]
    assert "scatterbroker vs stock CBF" in out and "scatterbroker vs stock TIFF sequence" in out


# ---------------------------------------------------------------------------------------- stacking


def test_stacking_quick(tmp_path):
    printed, result, out = run_in_subprocess("stacking", tmp_path)
    same(printed, result)
    assert result["benchmark"] == "stacking" and result["quick"] is True
    assert result["lossless"] is True and result["problems"] == [], result["problems"]
    assert set(result["results"]) == {"scatterbroker", "scatterbroker_1_worker", "naive_bitshuffle_lz4",
                                      "naive_gzip4"}
    for name, row in result["results"].items():
        positive(row["frames"], f"{name} frames")
        positive(row["frames_per_s_best"], f"{name} frames/s")
        positive(row["size_percent_of_raw"], f"{name} size")
    for key in ("speedup_vs_naive_bitshuffle_lz4", "speedup_vs_naive_gzip4", "size_reduction"):
        finite(result[key], key)  # rounded: a tiny run may round a ratio to 0
    positive(result["frames_per_s_if_cores_were_idle"], "frames/s if the cores were idle")
    assert "scatterbroker vs naive Bitshuffle-LZ4" in out


# --------------------------------------------------------------------------------------- transform


def test_transform_quick(benchmarks_path, capsys):
    transform = bench("transform")
    result = transform.main(["--quick"])
    printed, out = last_json(capsys)
    same(printed, result)
    assert result["benchmark"] == "transform" and result["quick"] is True
    (grid,) = result["grids"].values()
    ours = grid["scatterbroker"]
    for key in ("wall_s", "mpix_s", "peak_rss_mb"):
        positive(ours[key], f"scatterbroker {key}")
    assert ours["in_grid"] > 0
    if installed("xrayutilities"):
        positive(grid["xrayutilities"]["mpix_s"], "xrayutilities Mpixel/s")
        positive(grid["ratio"], "ratio to xrayutilities")
        assert grid["agreement"]["agree_1e-6"] is True, grid["agreement"]
        assert "xrayutilities" not in result["skipped"]
    else:  # the baseline is reported as skipped, with why; the rest ran
        assert result["skipped"]["xrayutilities"].strip() and "xrayutilities" not in grid
    if installed("distributed"):
        positive(grid["dask"]["mpix_s"], "Dask Mpixel/s")
    else:
        assert result["skipped"]["dask"].strip() and "dask" not in grid
    e2e = grid["end_to_end"]
    for key in ("wall_s", "mpix_s", "server_peak_rss_mb"):
        positive(e2e[key], f"end to end {key}")
    assert e2e["agreement"]["agree_1e-6"] is True, e2e["agreement"]
    assert "ratio" in out or "xrayutilities" in result["skipped"]
