"""Smoke test of benchmarks/hostile.py: ``main(["--quick"])`` runs every attack and ends
with one JSON line holding every figure (no time is asserted)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_hostile_benchmark_quick(capsys, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        hostile = importlib.import_module("hostile")
        assert hostile.main(["--quick", "--workdir", str(tmp_path / "work")]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "hostile" and result["quick"] is True
    assert result["baseline"]["n"] > 0 and result["baseline"]["p99_ms"] is not None
    assert set(result["attacks"]) == set(hostile.ATTACKS)
    for name, row in result["attacks"].items():
        assert {"p50_ms", "p99_ms", "p99_ratio", "peak_rss_mb", "rss_rise_mb", "statuses", "server"} <= set(row), name
        assert row["statuses"], f"{name}: the attack made no request"
        assert any(line.startswith(name) for line in lines[:-1]), f"no line printed for {name}"
