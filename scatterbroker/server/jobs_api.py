"""HTTP face of reduction jobs, mounted into the Tiled server (``/api/v1/jobs``).

``POST /api/v1/jobs`` with ``{"operation", "inputs": [node URIs], "parameters",
"output"?}`` needs write scope; it records the job in the catalog and runs it
on a background thread *as the caller* (the caller's API key reads the inputs
and writes the product), returning ``{"id", "uri"}`` at once. A caller who
logged in (bearer token, facility profile) gets a job key minted for the run:
a Tiled API key of their own, with their scopes, revoked when the job ends.
With ``"run": false`` the record is only filed, for the caller to run the job
(``reduction.jobs.run``), which reports through ``PATCH /api/v1/jobs/{id}``.
``GET /api/v1/jobs/{id}`` and ``GET /api/v1/jobs`` report records.

Records are the server's (:mod:`scatterbroker.server.job_records`): this module writes
them in-process, after checking what goes in them; Tiled's generic write routes
refuse ``/jobs``. Clean-up of an interrupted job's product acts within the
job owner's proposals, whoever lists the jobs.

The server reaches itself (the job's Tiled client, minting keys) at the socket
address the request arrived on, never at the ``Host:`` the caller sent, and a
job reads only from this server and the peers the operator allows
(:func:`scatterbroker.server.job_inputs.normalize`).
"""

from __future__ import annotations

import collections
import re
import threading
from collections import OrderedDict
from typing import Any, Optional

import anyio
import httpx
from fastapi import APIRouter, Body, Depends, HTTPException, Request, Security
from tiled.server.authentication import check_scopes, get_current_principal

from scatterbroker.server import job_inputs, job_records

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
    """This server's own URL: its socket address (the ``Host:`` header is the caller's to choose)."""
    return job_inputs.self_base(request)


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


def _mark_written(request: Request) -> None:
    """Tell the read caches (scatterbroker.server.write_log) that job records or products changed."""
    log = getattr(request.app.state, "write_log", None)
    if log is not None:
        log.mark(None)


async def _owner_proposals(request: Request) -> Optional[list[str]]:
    """The proposals the caller is restricted to by the access policy (None: unrestricted)."""
    policy = getattr(request.app.state, "access_policy", None)
    if policy is None or not hasattr(policy, "proposals"):
        return None
    from scatterbroker.server.fastpath import _authorize

    auth = await _authorize(request, ["read:metadata"])
    proposals = policy.proposals(auth.principal, auth.access_tags, auth.scopes)
    return None if proposals is None else sorted(proposals)


async def _visible_record(request: Request, job_id: str, scopes: list[str]) -> dict[str, Any]:
    """The record of ``job_id`` if the caller may see it (Tiled's ``get_entry`` with
    the caller's credentials and the access policy), else 404."""
    from tiled.server.dependencies import get_entry

    from scatterbroker.server.fastpath import _authorize

    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"no job {job_id!r}")
    auth = await _authorize(request, scopes)
    try:
        await get_entry(f"{jobs_tree()}/{job_id}", ["read:metadata"], auth.principal, auth.access_tags,
                        auth.scopes, request.app.state.root_tree, auth.session_state,
                        collections.defaultdict(lambda: collections.defaultdict(float)), None,
                        getattr(request.app.state, "access_policy", None))
    except HTTPException:
        raise HTTPException(404, f"no job {job_id!r}") from None
    record = await job_records.read(request.app.state.root_tree, job_id)
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return record


def jobs_tree() -> str:
    from scatterbroker.server.jobs import JOBS

    return JOBS


@router.post("")
async def submit_job(
    request: Request,
    body: dict[str, Any] = Body(...),
    principal=Depends(get_current_principal),
    _=Security(check_scopes, scopes=["write:data", "write:metadata"]),
):
    """File a job (the server writes its record) and, unless ``"run": false``, run it here."""
    from scatterbroker.server import jobs
    from scatterbroker.server.access import proposal_of
    from scatterbroker.errors import ScatterbrokerError

    api_key, minted = _caller_key(request), False
    if api_key is None and _bearer(request):
        api_key = await anyio.to_thread.run_sync(_mint_job_key, request, _bearer(request), "scatterbroker job")
        minted = True
    if api_key is None:
        raise HTTPException(401, "jobs act as their submitter: authenticate with an API key or a login")
    base = _base(request)
    try:
        operation = body.get("operation", "")
        if operation not in jobs.OPERATIONS:
            raise jobs.JobError(f"unknown operation {operation!r}; available: {', '.join(sorted(jobs.OPERATIONS))}")
        given = body.get("inputs") or []
        if not isinstance(given, list) or not given:
            raise jobs.JobError("a job needs at least one input node URI")
        # this server's inputs by path (at its socket address), an allowed peer's as
        # they are; anything else is refused before anything is fetched
        inputs = [job_inputs.normalize(uri, request, base) for uri in given]
        parameters = dict(body.get("parameters") or {})
        if isinstance(parameters.get("ub"), str):
            try:  # an orient product here, by path; elsewhere: refused when the job runs
                parameters["ub"] = job_inputs.normalize(parameters["ub"], request, base, "'ub'")
            except jobs.JobError:
                pass  # product_ub reads only from the input's server, and inputs are checked
        owner = await _owner_proposals(request)
        output = body.get("output")
        record = jobs.new_record(jobs.new_job_id(), operation, inputs, parameters, output,
                                 bool(body.get("starting", True)), proposal_of(jobs.node_path(inputs[0])), owner)
        job_records.check_product_path("/".join(jobs._product_path(None, record)), owner)
        client = await anyio.to_thread.run_sync(_client, request, api_key)

        def check_inputs() -> None:
            # the submitter must see each input of this server: no records filed against others' data
            for uri in inputs:
                if job_inputs.origin(uri) != job_inputs.origin(base):
                    continue  # a peer's: read there with the submitter's key when the job runs
                try:
                    client["/".join(jobs.node_path(uri))]
                except KeyError:
                    raise jobs.JobError(f"input {'/'.join(jobs.node_path(uri))} does not exist "
                                        "(or this key may not read it)") from None

        await anyio.to_thread.run_sync(check_inputs)
    except ScatterbrokerError as err:
        if minted:
            await anyio.to_thread.run_sync(_revoke, request, api_key)
        raise HTTPException(err.status_code, str(err)) from None
    # the inputs this server holds, looked up with the submitter's credentials, so the
    # job reads their frames without HTTP (scatterbroker.server.job_inputs); before the record
    # exists, whose first heartbeat must be followed promptly by the job's own
    local = await job_inputs.resolve(request, inputs) if body.get("run", True) else {}
    job_id = record["id"]
    await job_records.create(request.app.state.root_tree, job_id, record)
    _mark_written(request)
    uri = f"{base}/api/v1/metadata/{jobs.JOBS}/{job_id}"
    if not body.get("run", True):
        if minted:
            await anyio.to_thread.run_sync(_revoke, request, api_key)
        return {"id": job_id, "uri": uri, "state": "queued"}
    job = await anyio.to_thread.run_sync(lambda: client[f"{jobs.JOBS}/{job_id}"])
    storage = _writable_directories(request)

    def work() -> None:
        try:
            jobs.run(client, job, api_key, storage=storage, opener=job_inputs.opener(local, base))
        except BaseException:
            pass  # recorded on the job
        finally:
            if minted:
                try:
                    _revoke(request, api_key)
                except Exception:
                    pass  # it expires anyway (JOB_KEY_LIFETIME)

    threading.Thread(target=work, daemon=True, name=f"job-{job_id}").start()
    return {"id": job_id, "uri": uri, "state": "queued"}


#: fields a job's runner may change on its record, and how
_TIMES = ("submitted", "started", "finished", "heartbeat")
_STATES = ("queued", "running", "done", "failed")
MAX_ERROR_CHARS = 8000


def _checked_changes(changes: Any, record: dict[str, Any]) -> dict[str, Any]:
    """The runner's changes to ``record`` if acceptable (422 naming the field otherwise):
    product paths only where the job's owner may write (job_records.check_product_path)."""
    from scatterbroker.server.jobs import JobError, node_path

    if not isinstance(changes, dict) or not changes:
        raise JobError("send a JSON object of the record's fields to change")
    allowed = {*_TIMES, "state", "error", "product", "partial_product"}
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise JobError(f"a job's runner may change only {', '.join(sorted(allowed))}, not {', '.join(unknown)}")
    owner = job_records.owner_proposals(record)
    for name, value in changes.items():
        if value is None and name not in ("state",):
            continue
        if not isinstance(value, str):
            raise JobError(f"{name}: a string or null, not {type(value).__name__}")
        if name in _TIMES and len(value) > 64:
            raise JobError(f"{name}: not a time")
        if name == "state" and value not in _STATES:
            raise JobError(f"state: one of {', '.join(_STATES)}, not {value!r}")
        if name == "error" and len(value) > MAX_ERROR_CHARS:
            changes = {**changes, "error": value[:MAX_ERROR_CHARS] + "…"}
        if name == "partial_product":
            job_records.check_product_path(value, owner)
        if name == "product":
            job_records.check_product_path("/".join(node_path(value)), owner)
    return dict(changes)


@router.patch("/{job_id}")
async def update_job(request: Request, job_id: str, body: dict[str, Any] = Body(...),
                     principal=Depends(get_current_principal),
                     _=Security(check_scopes, scopes=["write:metadata"])):
    """A job's runner reports (state, heartbeat, product); the server checks and records it."""
    from scatterbroker.errors import ScatterbrokerError

    record = await _visible_record(request, job_id, ["write:metadata"])
    try:
        changes = _checked_changes(body, record)
    except ScatterbrokerError as err:
        raise HTTPException(err.status_code, f"job {job_id}: {err}") from None
    updated = await job_records.update(request.app.state.root_tree, job_id, changes)
    _mark_written(request)
    if updated is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return updated


async def _status(request: Request, record: dict[str, Any]) -> dict[str, Any]:
    """The record as reported, after recording what the server finds: a job whose
    process stopped is failed (or done, if its product was complete), and the
    half-written product it names is deleted -- only a node of this job, under
    ``reduced/`` within the owner's proposals (job_records.remove_partial), with
    the server's own access, whoever asks."""
    from scatterbroker.server import jobs

    tree = request.app.state.root_tree
    changes = jobs.stale_changes(record)
    partial = record.get("partial_product")
    if partial and (changes or record.get("state") == "failed"):
        state, product = await job_records.partial_state(tree, record)
        if state == "complete" and changes:
            changes = {"state": "done", "finished": (product.metadata() or {}).get("finished") or jobs._now(),
                       "heartbeat": None, "product": f"{_base(request)}/api/v1/metadata/{partial}",
                       "partial_product": None}
        elif await job_records.remove_partial(tree, record):
            changes["partial_product"] = None
            if changes.get("error"):
                changes["error"] += f"; its incomplete product {partial} was removed"
    if changes and isinstance(record.get("id"), str):
        record = {**record, **changes}
        try:
            await job_records.update(tree, record["id"], changes)
        finally:
            _mark_written(request)
    return record


@router.get("/{job_id}")
async def get_job(request: Request, job_id: str, principal=Depends(get_current_principal),
                  _=Security(check_scopes, scopes=["read:metadata"])):
    return await _status(request, await _visible_record(request, job_id, ["read:metadata"]))


@router.get("")
async def list_all(request: Request, principal=Depends(get_current_principal),
                   _=Security(check_scopes, scopes=["read:metadata"])):
    from scatterbroker.server import jobs

    client = await anyio.to_thread.run_sync(_client, request, _caller_key(request), _bearer(request))

    def visible() -> list[str]:  # the records this caller may see, by the access policy
        if jobs.JOBS not in client:
            return []
        return [key for key, node in client[jobs.JOBS].items() if "job" in node.metadata]

    out = []
    for job_id in await anyio.to_thread.run_sync(visible):
        record = await job_records.read(request.app.state.root_tree, job_id)
        if record is not None:
            out.append(await _status(request, record))
    return out
