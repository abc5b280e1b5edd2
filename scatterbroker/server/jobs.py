"""Jobs: an operation on catalog nodes whose product is written back as a node.

A job is ``operation + input node URIs + parameters`` (JSON). Its record lives
in the catalog at ``/jobs/<id>`` (metadata only), so it survives a server
restart; a running job refreshes a heartbeat, and one whose heartbeat has
stopped (the process died) is reported -- and recorded -- as failed.

Records are the server's (``scatterbroker.server.job_records``): they are created,
changed and read through the jobs API (``POST``/``PATCH``/``GET
/api/v1/jobs``), which checks what it records; Tiled's generic write routes
refuse ``/jobs``. A job run by a client (:func:`submit` then :func:`run`)
goes through the same API.

By default a job runs in the process that runs it (the server, for
``POST /api/v1/jobs``): the transform streams the input's frames in blocks
through the fast route (stored Bitshuffle-LZ4 chunks decoded in the client's
threads, the next block read while the numba kernel, which uses every core and
releases the GIL, bins the current one), so no worker process has to start.
With ``SCATTERBROKER_DASK_ADDRESS`` set (e.g. a cluster started with
dask-jobqueue on SLURM/PBS), or an explicit :class:`LocalExecutor` (a local
pool of spawned processes; the executors are the stacker's too,
``scatterbroker.reduction.executors``), big inputs are split along the frame axis into tasks; each task
streams its own frames from the server, so tasks can run anywhere the server
is reachable; partial (v, n) grids are summed, so the result does not depend
on the split.

The product is a container under ``/reduced/...`` holding NXdata-shaped
arrays and provenance (inputs, parameters, software versions, times, job
id). It is marked ``complete`` only after every array is written; a failed
job leaves no product behind.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from scatterbroker.catalog.uris import global_uri
from scatterbroker.errors import ScatterbrokerError
from scatterbroker.reduction.executors import (  # noqa: F401  (LocalExecutor: callers pick it here)
    DaskExecutor,
    Executor,
    InProcessExecutor,
    LocalExecutor,
    dask_address,
)

HEARTBEAT_SECONDS = float(os.environ.get("SCATTERBROKER_JOB_HEARTBEAT") or 2.0)
#: a running job silent for this long is taken as dead
STALE_SECONDS = float(os.environ.get("SCATTERBROKER_JOB_STALE") or 20.0)
JOBS = "jobs"
REDUCED = "reduced"


class JobError(ScatterbrokerError, ValueError):
    """A job that cannot be run as submitted (unknown operation, bad input)."""

    status_code = 422


class ProductWriteError(ScatterbrokerError):
    """The product could not be written (e.g. the server's writable storage is full)."""

    status_code = 507


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _age(iso: str | None) -> float:
    if not iso:
        return float("inf")
    return (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(iso)).total_seconds()


@dataclass
class Product:
    """What an operation returns: named arrays plus NXdata-style metadata."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    specs: list[str] = field(default_factory=lambda: ["NXdata"])


# -- executors ----------------------------------------------------------
# One abstraction for jobs and stacking (scatterbroker.reduction.executors):
# a job runs in this process by default; an explicit LocalExecutor spawns its
# workers (the server's numba thread pools make fork unsafe); Dask when
# SCATTERBROKER_DASK_ADDRESS is set.


def default_executor() -> Executor:
    """Dask if ``SCATTERBROKER_DASK_ADDRESS`` is set, else this process."""
    address = dask_address()
    return DaskExecutor(address) if address else InProcessExecutor()


# -- inputs -------------------------------------------------------------


def node_path(uri: str) -> list[str]:
    """Catalog path of a global URI ``http(s)://host/api/v1/metadata/<path>``."""
    path = urlparse(uri).path
    marker = "/api/v1/metadata/"
    if marker not in path:
        raise JobError(f"{uri!r} is not a node URI (…/api/v1/metadata/<path>)")
    return [unquote(p) for p in path.split(marker, 1)[1].split("/") if p]


def _brief(err: BaseException) -> str:
    """An error in a few words, never the body of a server's answer: what another
    server answered must not come back through a job's error."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return f"{type(err).__name__}" + (f", HTTP {status}" if status else "")


def open_input(uri: str, api_key: str | None, foreign: bool = False) -> Any:
    """The Tiled client for an input URI; a scan container means its ``frames``.

    ``foreign``: the URI is on another server (an allowed peer): a failure is
    reported without its answer (:func:`_brief`)."""
    from tiled.client import from_uri

    try:
        node = from_uri(uri, api_key=api_key)
    except Exception as err:
        raise JobError(f"input {uri}: cannot be opened ({_brief(err) if foreign else err})") from None
    if getattr(node, "structure_family", None) == "container" and "frames" in node:
        node = node["frames"]
    return node


def frame_stack(node: Any, uri: str) -> Any:
    if getattr(node, "structure_family", None) != "array" or len(node.shape) != 3:
        raise JobError(f"input {uri} is not a frame stack (frame, y, x): "
                       f"{getattr(node, 'structure_family', '?')} {getattr(node, 'shape', '')}")
    return node


# -- operations ---------------------------------------------------------


class _FrameRange:
    """Frames ``start:stop`` of a frame-stack client, read only when sliced (the
    transform reads one block at a time, the next while it bins the current)."""

    def __init__(self, node: Any, start: int, stop: int) -> None:
        self.node, self.start = node, start
        self.shape, self.dtype = (stop - start, *node.shape[1:]), node.dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b, _ = key.indices(self.shape[0])
        return self.node[self.start + a : self.start + b]


def _transform_task(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    """One range of frames -> partial (v, n). Module level: runs in worker processes."""
    uri, api_key, start, stop, params, mask = task
    from tiled.client import from_uri

    from scatterbroker.reduction.transform import partial

    node = from_uri(uri, api_key=api_key)
    return tuple(partial(_FrameRange(node, start, stop), start, params, mask=mask))


def spec_names(node: Any) -> set[str]:
    """The names of a node's specs (a Tiled client node or a server-side adapter)."""
    return {getattr(s, "name", s) for s in (getattr(node, "specs", None) or ())}


#: the NXsample fields UB.from_nexus reads
_UB_FIELDS = {"ub_matrix", "orientation_matrix", "unit_cell", "unit_cell_abc", "unit_cell_alphabetagamma"}


def scan_ub(node: Any, uri: str) -> tuple[Any, str]:
    """The UB of the NeXus entry holding ``node``, and the URI of its NXsample.

    Walks up from ``node`` to the first ``NXentry`` and reads its ``NXsample``
    child with :meth:`UB.from_nexus` (``ub_matrix``, else ``orientation_matrix``,
    as U times B of ``unit_cell`` when it is a rotation and a cell is given).
    """
    from scatterbroker.reduction.geometry import UB, GeometryError

    known = getattr(node, "nexus_sample", None)
    if known is not None:  # read in the server at submission (scatterbroker.server.job_inputs.ServerFrames)
        values, sample_uri = known
        try:
            return UB.from_nexus(values), sample_uri
        except GeometryError as err:
            raise JobError(f"UB from {sample_uri}: {err}") from None
    entry = node
    while entry.path_parts and "NXentry" not in spec_names(entry):
        entry = entry.parent
    if "NXentry" in spec_names(entry):
        for child in entry.values():
            if "NXsample" in spec_names(child):
                present = set(child) & _UB_FIELDS  # one listing, then only the fields there are
                try:
                    return UB.from_nexus({k: child[k].read() for k in present}), child.uri
                except GeometryError as err:
                    raise JobError(f"UB from {child.uri}: {err}") from None
    raise JobError(f"input {uri}: the parameters give no 'ub' and the input is not inside a NeXus "
                   "entry with an NXsample (ub_matrix or orientation_matrix)")


def product_ub(uri: str, api_key: str | None, input_uri: str) -> tuple[dict, str]:
    """The refined UB (``{"matrix": ...}``, 2π convention) of a complete ``orient`` product, and its URI.

    Read with the job's own key, so a key that may not read the product cannot use its UB; only
    from the server that holds the input (the key is not sent anywhere else).
    """
    from tiled.client import from_uri

    node_path(uri)
    if urlparse(uri)[:2] != urlparse(input_uri)[:2]:
        raise JobError(f"'ub' {uri}: an orient product on another server than the input {input_uri}")
    try:
        node = from_uri(uri, api_key=api_key)
        complete = node.metadata.get("complete")
        matrix = np.asarray(node["ub"].read(), dtype=float) if complete else None
    except Exception as err:
        raise JobError(f"'ub' {uri}: not a readable orient product ({_brief(err)})") from None
    if matrix is None or matrix.shape != (3, 3):
        raise JobError(f"'ub' {uri}: not a complete orient product with a 3x3 'ub' array")
    return {"matrix": matrix.tolist()}, uri


def op_transform(inputs: list[Any], uris: list[str], params: dict, api_key: str | None, executor) -> Product:
    """Reciprocal-space transform (DESIGN.md §5) of one frame stack.

    The UB comes from ``params["ub"]`` (a UB record, or the URI of an ``orient``
    product: its refined ``ub``, :func:`product_ub`) or, if absent, from the
    NXsample of the NeXus entry the input belongs to (:func:`scan_ub`).
    """
    from scatterbroker.reduction.geometry import TransformParams
    from scatterbroker.reduction.transform import finish, merge, transform

    (node,), (uri,) = inputs, uris
    frames = frame_stack(node, uri)
    given = {k: params[k] for k in ("geometry", "ub", "grid") if k in params}
    ub_source = "parameters"
    if isinstance(given.get("ub"), str):  # the URI of an orient product
        given["ub"], ub_source = product_ub(given["ub"], api_key, uri)
    if "ub" not in given:
        given["ub"], ub_source = scan_ub(frames, uri)
    tparams = TransformParams.from_dict(given)
    mask = np.asarray(params["mask"], dtype=bool) if params.get("mask") is not None else None
    if getattr(executor, "in_process", False):
        result = transform(frames, tparams.geometry, tparams.ub, tparams.grid, mask=mask)
    else:
        n = frames.shape[0]
        step = int(params.get("frames_per_task") or max(1, -(-n // 8)))
        frames_uri = global_uri(frames)
        tasks = [(frames_uri, api_key, a, min(a + step, n), tparams.to_dict(), mask) for a in range(0, n, step)]
        result = finish(merge(executor.map(_transform_task, tasks)), tparams)
    return Product(
        arrays={"data": result.data, "weights": result.n, "H": result.H, "K": result.K, "L": result.L},
        metadata={"signal": "data", "axes": ["L", "K", "H"], "H@units": "rlu", "K@units": "rlu",
                  "L@units": "rlu", "weights": "pixels summed per voxel (v/n = data)",
                  "ub": tparams.ub.to_dict()["matrix"], "ub_source": ub_source},
    )


def op_project(inputs: list[Any], uris: list[str], params: dict, api_key: str | None, executor) -> Product:
    """Projection or statistics of one frame stack (see reduction/project.py)."""
    from scatterbroker.reduction.project import project

    (node,), (uri,) = inputs, uris
    arrays = project(frame_stack(node, uri), params)
    return Product(arrays=arrays, metadata={"kind": params.get("kind", "sum")})


def op_peaks(inputs: list[Any], uris: list[str], params: dict, api_key: str | None, executor) -> Product:
    """Bragg peaks of one frame stack (reduction/peaks.py): columns frame, y, x, intensity, npix."""
    from scatterbroker.reduction.peaks import find_peaks, peak_options

    (node,), (uri,) = inputs, uris
    peaks = find_peaks(frame_stack(node, uri), **peak_options(params))
    return Product(arrays=peaks.to_dict(), specs=["peaks"], metadata={
        "count": len(peaks), "columns": ["frame", "y", "x", "intensity", "npix"],
        "frame@units": "frame index", "y@units": "pixel (row)", "x@units": "pixel (column)",
        "intensity@units": "counts above background"})


def op_orient(inputs: list[Any], uris: list[str], params: dict, api_key: str | None, executor) -> Product:
    """Peaks, then U (and optionally the lattice) refined against them (reduction/orientation.py)."""
    from scatterbroker.reduction.orientation import orient_frames

    (node,), (uri,) = inputs, uris
    result = orient_frames(frame_stack(node, uri), params)
    return Product(arrays=result.arrays(), metadata=result.metadata(), specs=["orientation"])


#: operation name -> function(inputs, uris, params, api_key, executor) -> Product
OPERATIONS: dict[str, Callable[..., Product]] = {"transform": op_transform, "project": op_project,
                                                 "peaks": op_peaks, "orient": op_orient}


# -- records and running -------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for package in ("scatterbroker", "tiled", "numpy", "numba", "h5py"):
        try:
            out[package] = version(package)
        except Exception:
            pass
    return out


def _container(client: Any, parts: Iterable[str]) -> Any:
    """The container at ``parts`` under ``client``, created (with its parents) if missing."""
    parts = list(parts)
    if parts:
        try:
            return client["/".join(parts)]  # one request in the usual case: it exists
        except KeyError:
            pass
    node = client
    for part in parts:
        node = node[part] if part in node else node.create_container(key=part)
    return node


def _jobs_api(node: Any) -> str:
    """``<server>/api/v1/jobs`` of the server a Tiled client node is on."""
    return str(node.context.api_uri).rstrip("/") + "/jobs"


def _answer(response: Any) -> Any:
    """The JSON of a jobs-API answer; a refusal raises :class:`JobError` (4xx) with the
    server's message, anything else the client's own error."""
    if 400 <= response.status_code < 500:
        try:
            detail = response.json().get("detail")
        except Exception:
            detail = None
        error = JobError(str(detail or f"HTTP {response.status_code}"))
        error.status_code = response.status_code
        raise error
    response.raise_for_status()
    return response.json()


def submit(client: Any, operation: str, inputs: list[str], parameters: dict,
           output: str | None = None, starting: bool = False) -> Any:
    """File a job record (state ``queued``) with the server and return its node, for
    this client to :func:`run`.

    The server checks the operation, that the submitter can read each input, and
    where the product may go, and writes the record itself
    (``POST /api/v1/jobs`` with ``run: false``). ``starting``: the caller starts
    the job at once, so the record gets a heartbeat now; if the process dies
    before the job is ``running``, :func:`status` then reports it failed instead
    of queued forever. A job queued to be run later has no heartbeat yet.
    """
    body = {"operation": operation, "inputs": list(inputs), "parameters": parameters,
            "output": output, "run": False, "starting": bool(starting)}
    answer = _answer(client.context.http_client.post(_jobs_api(client), json=body))
    return client[f"{JOBS}/{answer['id']}"]


def new_record(job_id: str, operation: str, inputs: list[str], parameters: dict, output: str | None,
               starting: bool, proposal: str | None, owner_proposals: list[str] | None) -> dict[str, Any]:
    """A queued job's record, as the server files it."""
    if operation not in OPERATIONS:
        raise JobError(f"unknown operation {operation!r}; available: {', '.join(sorted(OPERATIONS))}")
    return {
        "id": job_id, "operation": operation, "inputs": list(inputs), "parameters": parameters,
        "output": output, "state": "queued", "submitted": _now(), "software": _versions(),
        "heartbeat": _now() if starting else None,
        # who may see the record under per-proposal keys (scatterbroker.server.access)
        "proposal": proposal,
        # whose rights clean-up acts with (scatterbroker.server.job_records.remove_partial)
        "owner": {"proposals": owner_proposals},
    }


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def _update(job: Any, **changes: Any) -> None:
    """Patch the given fields of the job record, and only those (``PATCH
    /api/v1/jobs/<id>``: the server checks them and writes the record).

    The job's heartbeat thread and the job itself update the same record:
    each sends only its own fields, one request at a time per job.
    """
    with _record_locks_guard:
        lock = _record_locks.setdefault(job.item["id"], threading.Lock())
    with lock:
        _answer(job.context.http_client.patch(f"{_jobs_api(job)}/{job.item['id']}", json=changes))


_record_locks: dict[str, threading.Lock] = {}
_record_locks_guard = threading.Lock()


def run(client: Any, job: Any, api_key: str | None, executor=None, storage: Sequence[str] = (),
        opener: Callable[[str, str | None], Any] | None = None) -> str:
    """Run a queued job to completion; return its product URI (raises on failure,
    after recording the error on the job).

    ``storage``: the server's writable storage directories, when the job runs
    inside the server, so a failed product write can say whether the disk is full.
    ``opener(uri, api_key)``: opens an input (default :func:`open_input`); the
    server passes one that reads frames without HTTP (``scatterbroker.server.job_inputs``).
    """
    record = job.metadata["job"]
    _update(job, state="running", started=_now(), heartbeat=_now())
    stop = threading.Event()
    partial: list[str] = []  # the product path, once recorded (see _write_product)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                _update(job, heartbeat=_now())
            except Exception:
                pass

    threading.Thread(target=beat, daemon=True, name=f"job-{record['id']}").start()
    try:
        uris = record["inputs"]
        inputs = [(opener or open_input)(uri, api_key) for uri in uris]
        product = OPERATIONS[record["operation"]](inputs, uris, record["parameters"], api_key,
                                                  executor or default_executor())
        product_node = _write_product(client, record, product, job=job, storage=storage, recorded=partial)
        uri = global_uri(product_node)
        stop.set()
        _update(job, state="done", finished=_now(), product=uri, heartbeat=None, partial_product=None)
        return uri
    except BaseException as err:
        stop.set()
        # Whatever this job left under /reduced goes (with the runner's own key); if it
        # cannot (the server is gone), the record keeps its path and the server removes
        # it later, within the owner's proposals (scatterbroker.server.job_records).
        path = partial[0] if partial else None
        left = None if _remove_partial(client, path, record["id"]) else path
        _update(job, state="failed", finished=_now(), error=f"{type(err).__name__}: {err}", heartbeat=None,
                partial_product=left)
        raise


def _product_path(client: Any, record: dict) -> list[str]:
    if record.get("output"):
        return [p for p in record["output"].split("/") if p]
    parts = node_path(record["inputs"][0])
    if parts and parts[-1] == "frames":
        parts = parts[:-1]
    if parts and parts[0] in ("raw", "scans", REDUCED):
        parts = parts[1:]
    return [REDUCED, *parts, record["operation"]]


def _write_product(client: Any, record: dict, product: Product, job: Any = None,
                   storage: Sequence[str] = (), recorded: list | None = None) -> Any:
    """Write ``product`` as a container marked ``complete`` only once every array is in.

    The container's path goes on the job record (``partial_product``) *before*
    the container exists, so if the process dies half-way whoever finds the job
    interrupted knows what to remove (:func:`status`). A failed write deletes the
    container and raises :class:`ProductWriteError` naming the array and the cause.
    """
    *parents, name = _product_path(client, record)
    parent = _container(client, parents)
    if name in parent:
        name = f"{name}-{record['id'][:8]}"
    path = "/".join([*parents, name])
    if job is not None:
        _update(job, partial_product=path)  # the server refuses a path outside reduced/<owner's>
        if recorded is not None:
            recorded.append(path)
    node = parent.create_container(
        key=name,
        metadata={**product.metadata, "complete": False, "provenance": {
            "job": record["id"], "operation": record["operation"], "inputs": record["inputs"],
            "parameters": record["parameters"], "software": _versions(),
            "started": _now(),
        }},
        specs=product.specs,
    )
    try:
        for key, array in product.arrays.items():
            array = np.ascontiguousarray(array)
            try:
                node.write_array(array, key=key)
            except Exception as err:
                raise ProductWriteError(
                    f"writing array {key!r} ({array.nbytes / 1e6:.1f} MB) of the product {path} failed: "
                    f"{_reason(err)}{_storage_report(storage, array.nbytes)}"
                ) from err
        node.update_metadata(metadata={"complete": True, "finished": _now()}, drop_revision=True)
    except BaseException:
        try:
            node.delete(recursive=True, external_only=False)
        except Exception:
            pass  # left marked incomplete, its path on the job record: removed later
        raise
    return node


def _reason(err: BaseException) -> str:
    """The server's answer to a failed request, in one line."""
    response = getattr(err, "response", None)
    if response is not None:
        try:
            detail = response.json().get("detail")
        except Exception:
            detail = None
        return f"server answered {response.status_code} {response.reason_phrase}" + (f": {detail}" if detail else "")
    return f"{type(err).__name__}: {err}"


def _storage_report(storage: Sequence[str], needed: int) -> str:
    """Why a write may have failed, as seen from the server process: a full
    writable storage (statvfs) or a file-size limit (RLIMIT_FSIZE, ``ulimit -f``)."""
    import shutil

    notes = []
    for directory in storage:
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            continue
        if free < needed:
            notes.append(f"no space left on device: the writable storage {directory} has "
                         f"{free / 1e6:.1f} MB free, the array needs {needed / 1e6:.1f} MB")
    if storage:
        try:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if limit != resource.RLIM_INFINITY and limit < needed:
                notes.append(f"file too large: the server may write files of at most {limit / 1e6:.1f} MB "
                             "(RLIMIT_FSIZE, ulimit -f)")
        except (ImportError, OSError, ValueError):
            pass
    return "".join(f"; {note}" for note in notes)


def _remove_partial(client: Any, path: str | None, job_id: str) -> bool:
    """Delete the product at ``path`` if job ``job_id`` left it incomplete (the
    runner's own key: the job owner's rights).

    True when nothing of the job's is left half-written (nothing there, a
    complete product, another job's node, or deleted now); False if it could
    not be deleted (the server is unreachable, or the caller may not write).
    Only a node under ``reduced/`` whose provenance names this job is ever deleted.
    """
    parts = [p for p in (path or "").split("/") if p]
    if not parts or parts[0] != REDUCED or len(parts) < 3 or not job_id:
        return True
    try:
        node = client["/".join(parts)]
        metadata = node.metadata
        if metadata.get("complete") or (metadata.get("provenance") or {}).get("job") != job_id:
            return True
        node.delete(recursive=True, external_only=False)
        return True
    except KeyError:
        return True
    except Exception:
        return False


def stale_changes(record: dict[str, Any]) -> dict[str, Any]:
    """What the server records about a job whose process stopped: a ``running`` job
    whose heartbeat stopped is failed, and so is a ``queued`` one the server was
    starting (it has a heartbeat) that never started; ``{}`` otherwise."""
    if record.get("state") == "running" and _age(record.get("heartbeat")) > STALE_SECONDS:
        return {"state": "failed", "finished": _now(), "heartbeat": None,
                "error": "interrupted: the process running it stopped (server restart or crash)"}
    if record.get("state") == "queued" and record.get("heartbeat") and _age(record["heartbeat"]) > STALE_SECONDS:
        return {"state": "failed", "finished": _now(), "heartbeat": None,
                "error": "interrupted before it started: the server stopped (restart or crash)"}
    return {}


def status(job: Any) -> dict[str, Any]:
    """The job's record as the server reports it (``GET /api/v1/jobs/<id>``).

    There a job found interrupted (:func:`stale_changes`) is recorded failed, and
    its half-written product, if the record names one, deleted -- or, if it was
    complete, the job recorded ``done`` (``scatterbroker.server.jobs_api``).
    """
    return _answer(job.context.http_client.get(f"{_jobs_api(job)}/{job.item['id']}"))


def list_jobs(client: Any) -> list[dict[str, Any]]:
    """Every job record the client's key may see, as :func:`status` reports them."""
    return _answer(client.context.http_client.get(_jobs_api(client)))
