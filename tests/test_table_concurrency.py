"""A scan's ``headers`` table (DuckDB storage) under concurrent requests.

Tiled 0.2.20 gives DuckDB storage a ``StaticPool``: every request thread gets
the same ADBC connection at the same time. Concurrent reads of a table then
fail with "Attempting to execute an unsuccessful or closed pending query
result" (HTTP 500), and soon crash the server process with SIGSEGV inside
DuckDB. ``scatterbroker.server.app.catalog`` gives DuckDB storage a
one-connection pool instead, so its users take turns. Found by
``benchmarks/load.py`` (a live display reading the headers of the frame the
watcher just appended).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow as pa

from conftest import API_KEY, make_frames, start_server, write_cbf

READERS = 16  # threads, one connection each
READS = 10  # requests per reader
APPENDS = 20  # rows appended meanwhile, one request each


def test_headers_table_concurrent_reads_and_appends(tmp_path):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw"
    raw.mkdir()
    for i, frame in enumerate(make_frames(3), start=1):
        write_cbf(raw / f"scan1_{i:05d}.cbf", frame, i)
    with start_server(tmp_path / "catalog", [raw]) as url:
        client = from_uri(url, api_key=API_KEY)
        assert not register(client, raw, prefix="raw").failed
        headers = client["raw/scan1/headers"]
        row = pa.Table.from_pandas(headers.read().iloc[:1], preserve_index=False)
        appended = []

        def append() -> None:  # what the watcher does for each new frame
            for _ in range(APPENDS):
                headers.append_partition(0, row)
                appended.append(1)

        def read(_: int) -> list[int]:
            with httpx.Client(base_url=url, timeout=60, headers={
                    "Authorization": f"Apikey {API_KEY}", "Accept": "application/json"}) as http:
                return [http.get("/api/v1/table/full/raw/scan1/headers").status_code for _ in range(READS)]

        writer = threading.Thread(target=append)
        writer.start()
        try:
            with ThreadPoolExecutor(READERS) as pool:
                statuses = [s for batch in pool.map(read, range(READERS)) for s in batch]
        finally:
            writer.join(120)
        assert statuses == [200] * len(statuses), {s: statuses.count(s) for s in set(statuses)}
        assert len(appended) == APPENDS
        assert len(headers.read()) == 3 + APPENDS
