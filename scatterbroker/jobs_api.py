"""HTTP face of reduction jobs, mounted into the Tiled server (``/api/v1/jobs``).

``POST /api/v1/jobs`` with ``{"operation", "inputs": [node URIs], "parameters",
"output"?}`` needs write scope; it records the job in the catalog and runs it
on a background thread *as the caller* (the caller's API key reads the inputs
and writes the product), returning ``{"id", "uri"}`` at once. A caller who
logged in (bearer token, facility profile) gets a job key minted for the run:
a Tiled API key of their own, with their scopes, revoked when the job ends.
``GET /api/v1/jobs/{id}`` and ``GET /api/v1/jobs`` report records.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any, Optional

import anyio
import httpx
from fastapi import APIRouter, Body, Depends, HTTPException, Request, Security
from tiled.server.authentication import check_scopes, get_current_principal

from . import job_inputs
from .catalog.uris import global_uri

router = APIRouter(prefix="/jobs", tags=["scatterbroker jobs"])
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _caller_key(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("apikey "):
        return header.split(None, 1)[1].strip()
    return request.query_params.get("api_key")


def _bearer(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    return header.split(None, 1)[1].strip() if header.lower().startswith("bearer ") else None


class _BearerAuth(httpx.Auth):
    """Send a caller's login token (Tiled's client would otherwise try to log in
    itself, which a server cannot do)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request):
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


#: seconds a job key minted for a logged-in caller lives at most (revoked at the job's end)
JOB_KEY_LIFETIME = 7 * 24 * 3600
_clients: OrderedDict[tuple, Any] = OrderedDict()
_clients_lock = threading.Lock()


def _base(request: Request) -> str:
    """This server's own URL, as the caller reached it."""
    return str(request.base_url).rstrip("/")


def _client(request: Request, api_key: Optional[str], bearer: Optional[str] = None):
    """A Tiled client acting as the caller, reused per credential: building one
    costs the server ~0.15 CPU-s, and status polling would pay it every time.
    (Reuse is safe: the server checks the credential on every request.)"""
    from tiled.client import from_uri

    base = _base(request)
    key = (base, api_key, bearer)
    with _clients_lock:
        if key in _clients:
            _clients.move_to_end(key)
            return _clients[key]
    client = from_uri(base, api_key=api_key, auth=_BearerAuth(bearer) if bearer and not api_key else None)
    with _clients_lock:
        _clients[key] = client
        while len(_clients) > 64:
            _clients.popitem(last=False)
    return client


def _mint_job_key(request: Request, bearer: str, job_note: str) -> str:
    """An API key of the logged-in caller (Tiled's own ``POST /auth/apikey``)."""
    r = httpx.post(f"{_base(request)}/api/v1/auth/apikey",
                   json={"scopes": ["inherit"], "expires_in": JOB_KEY_LIFETIME, "note": job_note},
                   headers={"Authorization": f"Bearer {bearer}"}, timeout=30)
    if r.status_code != 200:
        raise HTTPException(r.status_code, f"cannot act as you for a job: {r.json().get('detail', r.text)}")
    return r.json()["secret"]


def _revoke(request: Request, api_key: str) -> None:
    """Revoke a minted job key, and drop the client that used it."""
    with _clients_lock:
        _clients.pop((_base(request), api_key, None), None)
    httpx.delete(f"{_base(request)}/api/v1/auth/apikey",
                 params={"first_eight": api_key[:8]},
                 headers={"Authorization": f"Apikey {api_key}"}, timeout=30)


def _writable_directories(request: Request) -> list[str]:
    """The server's writable file storage (where products go), for a job's
    disk-full diagnosis; empty if the tree does not say."""
    tree = getattr(request.app.state, "root_tree", None)
    storage = getattr(getattr(tree, "context", None), "writable_storage", None) or {}
    return [str(s.path) for s in storage.values() if hasattr(s, "path")]


@router.post("")
async def submit_job(
    request: Request,
    body: dict[str, Any] = Body(...),
    principal=Depends(get_current_principal),
    _=Security(check_scopes, scopes=["write:data", "write:metadata"]),
):
    from .reduction import jobs
    from .errors import ScatterbrokerError

    api_key, minted = _caller_key(request), False
    if api_key is None and _bearer(request):
        api_key = await anyio.to_thread.run_sync(_mint_job_key, request, _bearer(request), "scatterbroker job")
        minted = True
    if api_key is None:
        raise HTTPException(401, "jobs act as their submitter: authenticate with an API key or a login")
    inputs = list(body.get("inputs") or [])
    # the inputs this server holds, looked up with the submitter's credentials, so the
    # job reads their frames without HTTP (scatterbroker.job_inputs); before the record
    # exists, whose first heartbeat must be followed promptly by the job's own
    local = await job_inputs.resolve(request, inputs)
    try:
        client = await anyio.to_thread.run_sync(_client, request, api_key)
        job = await anyio.to_thread.run_sync(
            lambda: jobs.submit(client, body.get("operation", ""), inputs,
                                dict(body.get("parameters") or {}), body.get("output"), starting=True)
        )
    except ScatterbrokerError as err:
        if minted:
            await anyio.to_thread.run_sync(_revoke, request, api_key)
        raise HTTPException(err.status_code, str(err)) from None

    storage = _writable_directories(request)

    def work() -> None:
        try:
            jobs.run(client, job, api_key, storage=storage, opener=job_inputs.opener(local))
        except BaseException:
            pass  # recorded on the job
        finally:
            if minted:
                try:
                    _revoke(request, api_key)
                except Exception:
                    pass  # it expires anyway (JOB_KEY_LIFETIME)

    threading.Thread(target=work, daemon=True, name=f"job-{job.item['id']}").start()
    return {"id": job.item["id"], "uri": global_uri(job), "state": "queued"}


@router.get("/{job_id}")
async def get_job(request: Request, job_id: str, principal=Depends(get_current_principal),
                  _=Security(check_scopes, scopes=["read:metadata"])):
    from .reduction import jobs

    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"no job {job_id!r}")
    client = await anyio.to_thread.run_sync(_client, request, _caller_key(request), _bearer(request))

    def find():  # one request (status polls are frequent)
        try:
            return client[f"{jobs.JOBS}/{job_id}"]
        except KeyError:
            return None

    node = await anyio.to_thread.run_sync(find)
    if node is None or "job" not in node.metadata:
        raise HTTPException(404, f"no job {job_id!r}")
    return await anyio.to_thread.run_sync(jobs.status, node)


@router.get("")
async def list_all(request: Request, principal=Depends(get_current_principal),
                   _=Security(check_scopes, scopes=["read:metadata"])):
    from .reduction import jobs

    client = await anyio.to_thread.run_sync(_client, request, _caller_key(request), _bearer(request))
    return await anyio.to_thread.run_sync(jobs.list_jobs, client)
