"""The server process gives freed frame-sized buffers back to the system.

glibc raises its mmap threshold to the size of the first large block freed, so
without :func:`scatterbroker.server.app.release_large_buffers` later 10 MB frames
are carved from the heap and kept after they are freed (the server's RSS grew
~100 MB/min under 32 clients in benchmarks/load.py, and was flat with it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RETAINED = """
import sys
import numpy as np
if sys.argv[1] == "server":
    from pathlib import Path
    from scatterbroker.server.app import build_app, local_config
    build_app(local_config(Path(sys.argv[2]), [], api_key="k"))

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base = rss()
for _ in range(5):
    frame = np.ones(10_000_000 // 8)  # one 10 MB frame, every page touched
    del frame
print((rss() - base) / 1e6)
"""


def run_python(script: str, *args: str, timeout: float, cwd=None) -> list[str]:
    """Run ``script`` in a fresh Python process; the words it printed."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def retained_mb(kind: str, tmp_path) -> float:
    return float(run_python(RETAINED, kind, str(tmp_path / "data"), timeout=120)[-1])


def test_freed_frames_go_back_to_the_system(tmp_path):
    plain = retained_mb("plain", tmp_path)
    if plain < 5:
        pytest.skip(f"this C library gives freed 10 MB blocks back by itself (kept {plain:.1f} MB)")
    assert retained_mb("server", tmp_path) < 2, "a process serving scatterbroker keeps freed frames"


FROZEN = """
import gc, sys, tempfile
from pathlib import Path
import httpx
from scatterbroker.server.app import build_app, local_config, serve_in_thread

app = build_app(local_config(Path(tempfile.mkdtemp()) / "data", [], api_key="k"),
                freeze_gc=sys.argv[1] == "freeze")
before = gc.get_freeze_count()
with serve_in_thread(app) as url:  # a real server on loopback: start-up has run
    r = httpx.get(url + "/api/v1/metadata/", headers={"Authorization": "Apikey k"})
    assert r.status_code == 200, r.text
    print(before, gc.get_freeze_count())
"""


@pytest.mark.parametrize("mode", ["freeze", "plain"])
def test_serving_processes_freeze_what_start_up_made(mode, tmp_path):
    before, after = map(int, run_python(FROZEN, mode, timeout=180, cwd=tmp_path)[-2:])
    assert before == 0
    # a started server holds a few hundred thousand objects: frozen only when asked
    assert (after > 100_000) if mode == "freeze" else (after == 0), (before, after)


ARROW_POOL = """
import sys
from pathlib import Path
from scatterbroker.server.app import build_app, local_config
build_app(local_config(Path(sys.argv[1]), [], api_key="k"))
import pyarrow
print(pyarrow.default_memory_pool().backend_name)
"""


def test_arrow_buffers_come_from_malloc_unless_the_operator_chose(tmp_path, monkeypatch):
    """pyarrow's own pool (mimalloc) kept what it freed: the server's RSS grew with table reads."""
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    assert run_python(ARROW_POOL, str(tmp_path / "a"), timeout=120) == ["system"]
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    assert run_python(ARROW_POOL, str(tmp_path / "b"), timeout=120) == ["mimalloc"]
