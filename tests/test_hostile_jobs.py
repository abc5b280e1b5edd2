"""Hostile job records and job inputs (issue 18, items 3 and 4), against real servers.

* A write key of proposal p1 forges job records (through Tiled's generic write
  routes and through the jobs API) that name p2's data as a half-written
  product; p2's writer and the admin then list jobs. p2's raw scan and its
  product (catalog nodes and files on disk) must survive.
* Job inputs and ``Host:`` headers that name another host: a second HTTP
  listener on 127.0.0.1 stands for it, and must receive no request unless the
  operator lists it as a peer; even then its answer never reaches a job's error.
"""

from __future__ import annotations

import http.server
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
from conftest import API_KEY, make_frames, start_server, write_cbf
from test_keys import facility, keys  # noqa: F401  (module fixtures: the facility profile, its keys)

SECRET = "FOREIGN-ANSWER-7f3a"


def _wait_job(http: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (record := http.get(f"jobs/{job_id}").json())["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    return record


def test_a_forged_job_record_never_deletes_another_proposals_data(facility, keys):  # noqa: F811
    with facility.http(keys["p2-write"]) as p2:  # p2 has a product, with files on disk
        r = p2.post("jobs", json={"operation": "project", "inputs": [f"{facility.url}/api/v1/metadata/raw/p2/s1/scan1"],
                                  "parameters": {"kind": "sum", "axis": 0}, "output": "reduced/p2/kept"})
        assert r.status_code == 200, r.text
        assert _wait_job(p2, r.json()["id"])["state"] == "done"
    products = facility.raw.parent / "products"
    on_disk = sorted(p for p in products.rglob("*") if "p2" in p.parts and p.is_file())
    assert on_disk, "the p2 product left no files to protect"

    forged = {"state": "failed", "partial_product": "raw/p2", "proposal": "p2", "operation": "project",
              "inputs": [], "parameters": {}, "heartbeat": None}
    answers = {}
    with facility.http(keys["p1-write"]) as p1:
        for job_id, target in (("forged1", "raw/p2"), ("forged2", "reduced/p2")):
            body = {"metadata": {"job": {**forged, "id": None, "partial_product": target}},
                    "structure_family": "container", "specs": [{"name": "job", "version": None}], "id": job_id, "data_sources": []}
            answers[job_id] = p1.post("metadata/jobs", json=body).status_code
        # a record of p1's own, then its fields rewritten: generically, and through the jobs API
        r = p1.post("jobs", json={"operation": "project", "inputs": [f"{facility.url}/api/v1/metadata/raw/p1/s1/scan1"],
                                  "parameters": {"kind": "sum", "axis": 0}, "output": "reduced/p1/mine"})
        assert r.status_code == 200, r.text
        own = r.json()["id"]
        _wait_job(p1, own)
        answers["generic put"] = p1.put(f"metadata/jobs/{own}", json={"metadata": {"job": {
            **forged, "id": own, "proposal": "p1", "partial_product": "raw/p2"}}}).status_code
        for target in ("raw/p2", "reduced/p2/kept", "raw/p1/s1", "reduced/p1/../p2/kept"):
            answers[f"api {target}"] = p1.patch(f"jobs/{own}", json={"state": "failed",
                                                                     "partial_product": target}).status_code
        answers["delete record"] = p1.delete(f"metadata/jobs/{own}").status_code
    with facility.http(keys["admin"]) as admin:  # not even the admin writes records generically
        answers["admin"] = admin.post("metadata/jobs", json={
            "metadata": {"job": {**forged, "id": None}}, "structure_family": "container", "specs": [{"name": "job", "version": None}],
            "id": "forged3", "data_sources": []}).status_code

    for viewer in ("p2-write", "admin", "p1-write"):  # whoever lists jobs
        with facility.http(keys[viewer]) as http:
            assert http.get("jobs").status_code == 200

    with facility.http(keys["admin"]) as admin:
        assert admin.get("metadata/raw/p2/s1/scan1").status_code == 200, "p2's raw scan was deleted"
        frames = admin.get("array/full/raw/p2/s1/scan1/frames", headers={"Accept": "application/octet-stream"})
        assert frames.status_code == 200 and len(frames.content) > 0
        kept = admin.get("metadata/reduced/p2/kept")
        assert kept.status_code == 200, "p2's product was deleted"
        assert admin.get("array/full/reduced/p2/kept/data").status_code == 200
        assert admin.get("metadata/raw/p1/s1/scan1").status_code == 200
        assert {j["id"] for j in admin.get("jobs").json()}.isdisjoint({"forged1", "forged2", "forged3"})
    assert all(p.exists() for p in on_disk), "product files of p2 were removed from disk"
    # every forging attempt was refused, with a message in the user's terms
    assert answers["forged1"] in (401, 403) and answers["forged2"] in (401, 403), answers
    assert answers["generic put"] in (401, 403) and answers["delete record"] in (401, 403), answers
    assert answers["admin"] == 403, answers
    assert all(answers[f"api {t}"] == 422 for t in ("raw/p2", "reduced/p2/kept", "raw/p1/s1",
                                                      "reduced/p1/../p2/kept")), answers


class _Listener(http.server.BaseHTTPRequestHandler):
    """A host the operator did not allow: counts every request, answers a marker."""

    seen: list = []

    def _answer(self) -> None:
        type(self).seen.append((self.command, self.path))
        body = f'{{"detail": "{SECRET}"}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _other_host():
    _Listener.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Listener)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", _Listener.seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_fetches_nothing_from_a_host_the_operator_did_not_allow(tmp_path, monkeypatch):
    from tiled.client import from_uri

    from scatterbroker.server import job_inputs
    from scatterbroker.catalog.register import register

    raw = tmp_path / "raw" / "s1"
    raw.mkdir(parents=True)
    frames = make_frames(4)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"scan1_{i:05d}.cbf", frame, i)
    key = {"Authorization": f"Apikey {API_KEY}"}
    body = {"operation": "project", "parameters": {"kind": "sum", "axis": 0}}
    # public: anonymous reads, as the demo profile
    with _other_host() as (other, seen), start_server(tmp_path / "db", [tmp_path / "raw"], public=True) as url:
        register(from_uri(url, api_key=API_KEY), tmp_path / "raw", prefix="raw")
        foreign = f"http://{other}/api/v1/metadata/raw/s1/scan1"  # a path that exists here
        with httpx.Client(base_url=f"{url}/api/v1", timeout=60) as http:
            r = http.post("jobs", json={**body, "inputs": [foreign]}, headers=key)
            assert r.status_code == 422 and "SCATTERBROKER_PEER_SERVERS" in r.json()["detail"], r.text
            # the same input with the request's Host: naming that host: resolved here, by path
            r = http.post("jobs", json={**body, "inputs": [foreign], "output": "reduced/s1/by-path",
                                        "parameters": {**body["parameters"], "ub": foreign}},
                          headers={**key, "Host": other})
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while (record := http.get(f"jobs/{job_id}", headers={"Host": other}).json())["state"] not in (
                    "done", "failed"):
                assert time.monotonic() < deadline, record
                time.sleep(0.2)
            assert record["state"] == "done", record
            assert record["inputs"] == [f"{url}/api/v1/metadata/raw/s1/scan1"]
            product = http.get("array/full/reduced/s1/by-path/data", headers={"Accept": "application/octet-stream"})
            np.testing.assert_array_equal(np.frombuffer(product.content, "<f8").reshape(frames.shape[1:]),
                                          frames.astype(np.float64).sum(axis=0))
            # listings and status with a forged Host:, with a key and anonymously
            for headers in ({"Host": other}, {**key, "Host": other}):
                assert http.get("jobs", headers=headers).status_code == 200
                assert http.get(f"jobs/{job_id}", headers=headers).status_code == 200
        assert seen == [], f"the server sent requests to {other}, which the operator did not allow: {seen}"

        # an allowed peer is read -- and what it answers never comes back in the job's error
        monkeypatch.setattr(job_inputs, "PEER_SERVERS", (f"http://{other}",))
        with httpx.Client(base_url=f"{url}/api/v1", timeout=60, headers=key) as http:
            r = http.post("jobs", json={**body, "inputs": [foreign], "output": "reduced/s1/peer"})
            assert r.status_code == 200, r.text
            record = _wait_job(http, r.json()["id"])
        assert record["state"] == "failed" and "cannot be opened" in record["error"], record
        assert SECRET not in str(record), record
        assert seen, "the allowed peer was not asked"
