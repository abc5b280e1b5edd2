"""Per-proposal API keys on the facility profile (server_config/facility.yml, as shipped).

The server runs in its own process (``scatterbroker serve --config``): Tiled's
multi-user settings are process-global, so it cannot share the test process
with the single-user servers of the other tests. Keys are issued the way staff
do it, with ``scatterbroker keys admin`` and ``scatterbroker keys issue``.
Runs on SQLite and on PostgreSQL (catalog, tables and the key database).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fabio
import httpx
import numpy as np
import pytest
from conftest import make_frames, write_cbf

CONFIG = Path(__file__).resolve().parent.parent / "server_config" / "facility.yml"
ADMIN_PASSWORD = "correct-horse-battery-staple"
CLI = [sys.executable, "-m", "scatterbroker"]


@dataclass
class Facility:
    url: str
    raw: Path
    env: dict
    databases: dict  # PostgreSQL database names ("catalog", "tables", "authn"), if any

    def cli(self, *args: str, api_key: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = {**self.env, **({"SCATTERBROKER_API_KEY": api_key} if api_key else {})}
        if not api_key:
            env.pop("SCATTERBROKER_API_KEY", None)
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def issue(self, admin: str, access: str, *proposals: str) -> str:
        args = [a for p in proposals for a in ("--proposal", p)]
        return self.cli("keys", "issue", self.url, "--access", access, *args, api_key=admin).stdout.strip()

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1", headers={"Authorization": f"Apikey {key}"}, timeout=30)


def _environment(tmp_path: Path, backend) -> tuple[dict, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCATTERBROKER_")}
    # secrets as files (Docker/systemd style), read by the server and by the CLI
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "admin").write_text(ADMIN_PASSWORD + "\n")
    (secrets / "session").write_text("s" * 64)
    env.update(SCATTERBROKER_RAW_ROOT=str(tmp_path / "raw"), SCATTERBROKER_PRODUCTS_ROOT=str(tmp_path / "products"),
               SCATTERBROKER_ADMIN_PASSWORD_FILE=str(secrets / "admin"),
               SCATTERBROKER_SECRET_KEY_FILE=str(secrets / "session"))
    databases = {}
    if backend.name == "sqlite":
        env.update(SCATTERBROKER_CATALOG_URI=f"sqlite:///{tmp_path}/catalog.db",
                   SCATTERBROKER_TABLES_URI=f"duckdb:///{tmp_path}/tables.duckdb",
                   SCATTERBROKER_AUTH_DB_URI=f"sqlite:///{tmp_path}/authn.db")
    else:
        pg = backend.postgres
        databases = {name: pg.create_database(name) for name in ("catalog", "tables", "authn")}
        env.update(SCATTERBROKER_CATALOG_URI=pg.uri(databases["catalog"]),
                   SCATTERBROKER_TABLES_URI=pg.uri(databases["tables"], driver="postgresql"),
                   SCATTERBROKER_AUTH_DB_URI=pg.uri(databases["authn"]))
    return env, databases


def _serve(env: dict, log: Path, config: Path = CONFIG) -> tuple[subprocess.Popen, str]:
    """``scatterbroker serve --config facility.yml`` on a free loopback port; (process, URL)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, "serve", "--config", str(config), "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"serving (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"facility server did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def facility(tmp_path_factory, backend):
    """The shipped facility profile serving raw/p1 and raw/p2 (each one CBF scan).

    One server per module and backend: tests work in different corners of it."""
    tmp_path = tmp_path_factory.mktemp("facility")
    for proposal, seed in (("p1", 1), ("p2", 2)):
        scan = tmp_path / "raw" / proposal / "s1"
        scan.mkdir(parents=True)
        for i, frame in enumerate(make_frames(4, seed=seed), start=1):
            write_cbf(scan / f"scan1_{i:05d}.cbf", frame, i)
    (tmp_path / "products").mkdir()
    env, databases = _environment(tmp_path, backend)
    proc, url = _serve(env, tmp_path / "server.log")
    try:
        yield Facility(url, tmp_path / "raw", env, databases)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def keys(facility):
    """admin key, and read/write keys for p1 and p2, issued through the CLI; both proposals registered."""
    admin = facility.cli("keys", "admin", facility.url).stdout.strip()
    issued = {"admin": admin}
    for proposal in ("p1", "p2"):
        for access in ("read", "write"):
            issued[f"{proposal}-{access}"] = facility.issue(admin, access, proposal)
    for proposal in ("p1", "p2"):
        facility.cli("register", facility.url, str(facility.raw / proposal), "--prefix", f"raw/{proposal}",
                     api_key=issued[f"{proposal}-write"])
    return issued


def _frame(path: Path) -> np.ndarray:
    return fabio.open(str(path)).data


def test_nothing_without_a_key_and_bad_keys_are_refused(facility):
    assert httpx.get(f"{facility.url}/api/v1/metadata/").status_code == 401
    bad = httpx.get(f"{facility.url}/api/v1/metadata/", headers={"Authorization": "Apikey " + "ab" * 36})
    assert bad.status_code == 401
    wrong = Facility(facility.url, facility.raw, {**facility.env, "SCATTERBROKER_ADMIN_PASSWORD": "wrong"}, {})
    refused = wrong.cli("keys", "admin", facility.url, check=False)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr


def test_a_proposal_key_sees_only_its_proposal(facility, keys):
    from tiled.client import from_uri

    p1 = from_uri(facility.url, api_key=keys["p1-read"])
    assert list(p1["raw"]) == ["p1"]
    expected = _frame(facility.raw / "p1" / "s1" / "scan1_00002.cbf")
    assert np.array_equal(p1["raw/p1/s1/scan1/frames"][1], expected)
    with facility.http(keys["p1-read"]) as http:
        for path in ("metadata/raw/p2", "metadata/raw/p2/s1/scan1/frames",
                     "array/full/raw/p2/s1/scan1/frames?slice=0", "sb/frames/raw/p2/s1/scan1/frames?slice=0",
                     "search/raw/p2", "table/full/raw/p2/s1/scan1/headers"):
            r = http.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
        deep = http.get("search-deep/").json()["data"]
        paths = {d["links"]["self"].split("/metadata/", 1)[1] for d in deep}
        assert paths and all("p2" not in p.split("/") for p in paths), paths
        assert any(p.startswith("raw/p1/s1/scan1") for p in paths)
    # the other proposal's key sees the other half, the admin everything
    assert list(from_uri(facility.url, api_key=keys["p2-read"])["raw"]) == ["p2"]
    assert sorted(from_uri(facility.url, api_key=keys["admin"])["raw"]) == ["p1", "p2"]


def test_scopes_read_write_admin(facility, keys):
    with facility.http(keys["p1-read"]) as http:
        refused = http.post("metadata/raw/p1", json={"metadata": {}, "structure_family": "container",
                                                     "specs": [], "id": "mine", "data_sources": []})
        assert refused.status_code in (401, 403), refused.text
        assert "scope" in refused.json()["detail"].lower() or "permission" in refused.json()["detail"].lower()
    # a read key cannot register new data ...
    new = facility.raw / "p1" / "s2"
    new.mkdir()
    for i, frame in enumerate(make_frames(2, seed=3), start=1):
        write_cbf(new / f"scan2_{i:05d}.cbf", frame, i)
    refused = facility.cli("register", facility.url, str(facility.raw / "p1"), "--prefix", "raw/p1",
                           api_key=keys["p1-read"], check=False)
    assert refused.returncode != 0
    assert "s2" not in from_uri_keys(facility, keys["admin"], "raw/p1")
    # ... a write key can, but only inside its proposal, and cannot add proposals
    with facility.http(keys["p1-write"]) as http:
        body = {"metadata": {"note": 1}, "structure_family": "container", "specs": [], "data_sources": []}
        assert http.post("metadata/raw/p1", json={**body, "id": "notes"}).status_code == 200
        assert http.post("metadata/raw/p2", json={**body, "id": "intruder"}).status_code == 404
        assert http.post("metadata/raw", json={**body, "id": "p3"}).status_code in (401, 403)
        assert http.delete("metadata/raw/p2/s1").status_code == 404
    assert "intruder" not in from_uri_keys(facility, keys["admin"], "raw/p2")
    # only an admin key issues keys
    refused = facility.cli("keys", "issue", facility.url, "--access", "read", "--proposal", "p2",
                           api_key=keys["p1-write"], check=False)
    assert refused.returncode != 0 and ("401" in refused.stderr or "403" in refused.stderr)


def from_uri_keys(facility: Facility, key: str, path: str) -> list[str]:
    from tiled.client import from_uri

    return list(from_uri(facility.url, api_key=key)[path])


def test_jobs_run_as_their_proposal_and_stay_in_it(facility, keys):
    with facility.http(keys["p1-write"]) as http:
        uri = f"{facility.url}/api/v1/metadata/raw/p1/s1/scan1"
        r = http.post("jobs", json={"operation": "project", "inputs": [uri],
                                    "parameters": {"kind": "sum", "axis": 0}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while (record := http.get(f"jobs/{job_id}").json())["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record["state"] == "done", record
        assert "/reduced/p1/" in record["product"]
        # a p1 key cannot run a job on p2's data, nor file a record against it
        r = http.post("jobs", json={"operation": "project", "inputs": [uri.replace("/p1/", "/p2/")],
                                    "parameters": {"kind": "sum", "axis": 0}})
        assert r.status_code == 422 and "p2" in r.json()["detail"], r.text
    product = record["product"].split("/metadata/", 1)[1]
    expected = sum(_frame(p).astype(np.float64) for p in sorted((facility.raw / "p1" / "s1").glob("*.cbf")))
    with facility.http(keys["p1-read"]) as http:
        assert np.array_equal(np.frombuffer(http.get(f"array/full/{product}/data",
                                                     headers={"Accept": "application/octet-stream"}).content,
                                            "<f8").reshape(expected.shape), expected)
        assert http.get(f"jobs/{job_id}").status_code == 200
    with facility.http(keys["p2-read"]) as http:
        assert http.get(f"metadata/{product}").status_code == 404
        assert http.get(f"jobs/{job_id}").status_code == 404
        assert job_id not in [j["id"] for j in http.get("jobs").json()]
        r = http.post("jobs", json={"operation": "project", "inputs": [uri], "parameters": {}})
        assert r.status_code in (401, 403)  # a read key submits nothing


def test_revoked_key_is_refused(facility, keys):
    issued = facility.cli("keys", "issue", facility.url, "--access", "read", "--proposal", "p1",
                          api_key=keys["admin"])
    secret = issued.stdout.strip()
    with facility.http(secret) as http:
        assert http.get("metadata/raw/p1").status_code == 200
    principal, first_eight = re.search(r"keys revoke \S+ (\S+) (\S+)", issued.stderr).groups()
    facility.cli("keys", "revoke", facility.url, principal, first_eight, api_key=keys["admin"])
    with facility.http(secret) as http:
        assert http.get("metadata/raw/p1").status_code == 401


def test_the_catalog_and_keys_live_in_the_configured_databases(facility, keys, backend):
    """On PostgreSQL: nodes, header tables and hashed keys are really there."""
    if backend.name != "postgresql":
        pytest.skip("PostgreSQL only")
    pg = backend.postgres
    nodes = pg.psql(facility.databases["catalog"], "SELECT key FROM nodes").split()
    assert {"raw", "p1", "p2", "scan1", "frames", "headers"} <= set(nodes)
    assert int(pg.psql(facility.databases["tables"], "SELECT count(*) FROM information_schema.tables "
                                                     "WHERE table_schema = 'public'")) >= 1
    hashed = pg.psql(facility.databases["authn"], "SELECT encode(hashed_secret, 'hex') FROM api_keys").split()
    assert len(hashed) >= 5 and keys["p1-read"] not in hashed  # stored hashed, never in clear


def test_facility_yml_refuses_to_start_without_its_secrets(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCATTERBROKER_")}
    done = subprocess.run([*CLI, "serve", "--config", str(CONFIG), "--port", "0"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "SCATTERBROKER_ADMIN_PASSWORD" in done.stderr and "SCATTERBROKER_SECRET_KEY" in done.stderr


def test_people_who_log_in_see_only_their_member_proposals(tmp_path, facility, keys):
    """Not only keys: a login (PAM/OIDC in production; passwords here) is restricted too.

    Same catalog as ``facility`` (a second server process on its databases),
    with two more users: alice, a member of p1 by the policy's ``members``
    mapping, and bob, a member of nothing. Neither is an admin.
    """
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    config["authentication"]["providers"][0]["args"]["users_to_passwords"].update(alice="pw-a", bob="pw-b")
    config["access_control"]["args"] = {"members": {"alice": ["p1"]}}
    path = tmp_path / "members.yml"
    path.write_text(yaml.safe_dump(config))
    proc, url = _serve(dict(facility.env), tmp_path / "server.log", config=path)
    try:
        def token(user: str, password: str) -> dict:
            r = httpx.post(f"{url}/api/v1/auth/provider/local/token", data={"username": user, "password": password})
            assert r.status_code == 200, r.text
            return {"Authorization": f"Bearer {r.json()['access_token']}"}

        with httpx.Client(base_url=f"{url}/api/v1", headers=token("alice", "pw-a")) as alice:
            assert [d["id"] for d in alice.get("search/raw").json()["data"]] == ["p1"]
            assert alice.get("metadata/raw/p2").status_code == 404
            assert alice.get("array/full/raw/p1/s1/scan1/frames?slice=0").status_code == 200
            # a job submitted with a login (no API key) runs as alice, with a key minted for it
            r = alice.post("jobs", json={"operation": "project", "inputs": [f"{url}/api/v1/metadata/raw/p1/s1/scan1"],
                                         "parameters": {"kind": "mean", "axis": 0}, "output": "reduced/p1/alice"})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 120
            while (record := alice.get(f"jobs/{r.json()['id']}").json()).get("state") not in ("done", "failed"):
                assert time.monotonic() < deadline, record
                time.sleep(0.2)
            assert record["state"] == "done", record
            assert alice.get("metadata/reduced/p1/alice").json()["data"]["attributes"]["metadata"]["complete"]
            wait = time.monotonic() + 30  # the job's key is revoked when it ends
            while alice.get("auth/whoami").json()["api_keys"] and time.monotonic() < wait:
                time.sleep(0.2)
            assert alice.get("auth/whoami").json()["api_keys"] == []
        with httpx.Client(base_url=f"{url}/api/v1", headers=token("bob", "pw-b")) as bob:
            assert bob.get("metadata/raw/p1").status_code == 404
            listing = bob.get("search/raw")
            assert listing.status_code == 404 or listing.json()["data"] == [], listing.text
            assert bob.get("array/full/raw/p2/s1/scan1/frames?slice=0").status_code == 404
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_secret_files_fill_their_variables_and_bad_ones_are_named(tmp_path):
    from scatterbroker.environment import load_secret_files

    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "empty").write_text("")
    env = {"SCATTERBROKER_ADMIN_PASSWORD_FILE": str(tmp_path / "pw"), "SCATTERBROKER_API_KEY": "given",
           "SCATTERBROKER_API_KEY_FILE": str(tmp_path / "pw"), "OTHER_FILE": str(tmp_path / "pw")}
    assert load_secret_files(env) == ["SCATTERBROKER_ADMIN_PASSWORD"]
    assert env["SCATTERBROKER_ADMIN_PASSWORD"] == "hunter2" and env["SCATTERBROKER_API_KEY"] == "given"
    assert "OTHER" not in env
    for name, why in (("empty", "is empty"), ("missing", "cannot read")):
        with pytest.raises(ValueError, match=f"SCATTERBROKER_SECRET_KEY_FILE.*{why}"):
            load_secret_files({"SCATTERBROKER_SECRET_KEY_FILE": str(tmp_path / name)})
