"""HTTP face of reduction jobs, mounted into the Tiled server (``/api/v1/jobs``).

``POST /api/v1/jobs`` with ``{"operation", "inputs": [node URIs], "parameters",
"output"?}`` needs write scope; it records the job in the catalog and runs it
on a background thread *as the caller* (the caller's API key reads the inputs
and writes the product), returning ``{"id", "uri"}`` at once.
``GET /api/v1/jobs/{id}`` and ``GET /api/v1/jobs`` report records.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import anyio
from fastapi import APIRouter, Body, Depends, HTTPException, Request, Security
from tiled.server.authentication import check_scopes, get_current_principal

from .catalog.uris import global_uri

router = APIRouter(prefix="/jobs", tags=["scatterbroker jobs"])


def _caller_key(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("apikey "):
        return header.split(None, 1)[1].strip()
    return request.query_params.get("api_key")


def _client(request: Request, api_key: Optional[str]):
    from tiled.client import from_uri

    return from_uri(str(request.base_url).rstrip("/"), api_key=api_key)


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

    api_key = _caller_key(request)
    if api_key is None:
        raise HTTPException(401, "jobs act as their submitter: authenticate with an API key")
    try:
        client = await anyio.to_thread.run_sync(_client, request, api_key)
        job = await anyio.to_thread.run_sync(
            lambda: jobs.submit(client, body.get("operation", ""), list(body.get("inputs") or []),
                                dict(body.get("parameters") or {}), body.get("output"))
        )
    except ScatterbrokerError as err:
        raise HTTPException(err.status_code, str(err)) from None

    storage = _writable_directories(request)

    def work() -> None:
        try:
            jobs.run(client, job, api_key, storage=storage)
        except BaseException:
            pass  # recorded on the job

    threading.Thread(target=work, daemon=True, name=f"job-{job.item['id']}").start()
    return {"id": job.item["id"], "uri": global_uri(job), "state": "queued"}


@router.get("/{job_id}")
async def get_job(request: Request, job_id: str, principal=Depends(get_current_principal),
                  _=Security(check_scopes, scopes=["read:metadata"])):
    from .reduction import jobs

    client = await anyio.to_thread.run_sync(_client, request, _caller_key(request))
    node = await anyio.to_thread.run_sync(lambda: client[jobs.JOBS][job_id] if jobs.JOBS in client and job_id in client[jobs.JOBS] else None)
    if node is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return await anyio.to_thread.run_sync(jobs.status, node)


@router.get("")
async def list_all(request: Request, principal=Depends(get_current_principal),
                   _=Security(check_scopes, scopes=["read:metadata"])):
    from .reduction import jobs

    client = await anyio.to_thread.run_sync(_client, request, _caller_key(request))
    return await anyio.to_thread.run_sync(jobs.list_jobs, client)
