"""Job records are the server's: written in-process by the jobs API, never through Tiled's
generic write routes, and cleaned up only within what the server recorded.

A job record (``/jobs/<id>``, metadata ``job``) tells the server what to delete
when the job is found interrupted (``partial_product``). If anyone with a write
key could write such a record through ``POST/PATCH /api/v1/metadata/jobs/...``,
a record claiming ``partial_product: raw/p2`` would have the server delete
another proposal's data the next time somebody listed jobs. So:

* every write at or under ``/jobs`` through the catalog (create a child, replace
  metadata, delete, add a data source) is refused with 403 unless it comes from
  this module (:data:`SERVER_WRITE`, set only around the server's own writes;
  checked by :func:`refuse_generic_write`, which :func:`install` puts in front
  of Tiled's catalog writes for the catalogs ``scatterbroker.server.app`` builds);
  creating the empty ``/jobs`` container itself stays allowed (``keys issue``);
* the jobs API (``scatterbroker.server.jobs_api``) validates what it records: the
  proposal and owner come from the submitter's inputs and key, and a
  ``partial_product``/``product`` must lie under ``reduced/`` and, for an owner
  restricted to proposals, under one of theirs (:func:`check_product_path`);
* clean-up (:func:`remove_partial`) deletes only a node under ``reduced/``,
  inside the owner's proposals, whose provenance names this job and which is
  not complete -- the owner's rights, whoever asked for the listing. Raw,
  scan and wrapper nodes are never deleted from a job path.
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

from scatterbroker.errors import ScatterbrokerError
from scatterbroker.server import tiled_compat

#: True only while the server writes a job record itself (see module doc)
SERVER_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("scatterbroker_job_record_write",
                                                                     default=False)
JOBS = "jobs"
REDUCED = "reduced"


class JobRecordWrite(ScatterbrokerError):
    """A write to a job record through the generic catalog API."""

    status_code = 403


class BadJobPath(ScatterbrokerError, ValueError):
    """A product path a job may not write or delete."""

    status_code = 422


async def refuse_generic_write(node: Any, what: str, key: Optional[str] = None) -> None:
    """Raise :class:`JobRecordWrite` if ``what`` (a catalog write on ``node``, or on
    its new child ``key``) reaches ``/jobs`` and the server is not writing it."""
    if SERVER_WRITE.get():
        return
    row = getattr(node, "node", None)
    if row is None:
        return
    if getattr(row, "parent", None) is None:  # the root: only creating /jobs itself is allowed there
        return
    segments = list(await node.path_segments())
    if segments and segments[0] == JOBS:
        where = "/".join([*segments, *([key] if key else [])])
        raise JobRecordWrite(f"{where}: job records are written only by the server "
                             f"(POST /api/v1/jobs, PATCH /api/v1/jobs/<id>); refused: {what}")


def check_product_path(path: str, owner_proposals: Optional[list[str]]) -> list[str]:
    """The segments of ``path`` if a job of an owner restricted to ``owner_proposals``
    (None: unrestricted) may write and clean up there, else :class:`BadJobPath`.

    Always under ``reduced/`` and at least two levels below it (never ``reduced``
    or a proposal's container), never with ``.``/``..``/empty segments.
    """
    if not isinstance(path, str):
        raise BadJobPath(f"a product path must be a string, not {type(path).__name__}")
    parts = path.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] != REDUCED or len(parts) < 3:
        raise BadJobPath(f"{path!r}: job products go under {REDUCED}/<proposal>/<name> "
                         f"(never raw, scans or wrappers)")
    if owner_proposals is not None and parts[1] not in owner_proposals:
        raise BadJobPath(f"{path!r}: outside the job owner's proposals "
                         f"({', '.join(owner_proposals) or 'none'})")
    return parts


async def _adapter(tree: Any, parts: list[str]) -> Any:
    """The catalog node at ``parts`` (unfiltered: the caller decided access), or None."""
    try:
        node = await tree.lookup_adapter(parts)
    except Exception:
        return None
    return node if hasattr(node, "replace_metadata") else None


async def create(tree: Any, job_id: str, record: dict[str, Any]) -> None:
    """Create ``/jobs/<job_id>`` holding ``record`` (``/jobs`` too, if missing)."""
    from tiled.structures.core import Spec, StructureFamily

    token = SERVER_WRITE.set(True)
    try:
        jobs = await _adapter(tree, [JOBS])
        if jobs is None:
            try:
                await tree.create_node(StructureFamily.container, {}, key=JOBS, specs=[])
            except Exception:
                pass  # created meanwhile by another request
            jobs = await _adapter(tree, [JOBS])
        await jobs.create_node(StructureFamily.container, {"job": record}, key=job_id, specs=[Spec("job")])
    finally:
        SERVER_WRITE.reset(token)


async def read(tree: Any, job_id: str) -> Optional[dict[str, Any]]:
    """The stored record of ``job_id`` (no access check: callers check it), or None."""
    node = await _adapter(tree, [JOBS, job_id])
    if node is None:
        return None
    record = (node.metadata() or {}).get("job")
    return dict(record) if isinstance(record, dict) else None


async def update(tree: Any, job_id: str, changes: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Apply ``changes`` to the record's fields (read-modify-write in one process;
    the fields each writer sends are its own); the new record, or None if gone."""
    node = await _adapter(tree, [JOBS, job_id])
    if node is None:
        return None
    metadata = dict(node.metadata() or {})
    record = {**(metadata.get("job") or {}), **changes}
    token = SERVER_WRITE.set(True)
    try:
        await node.replace_metadata({**metadata, "job": record}, drop_revision=True)
    finally:
        SERVER_WRITE.reset(token)
    return record


def owner_proposals(record: dict[str, Any]) -> Optional[list[str]]:
    """The proposals the job's owner was restricted to (None: unrestricted).

    Records written before the server kept ``owner`` count as restricted to
    their ``proposal`` if they name one."""
    owner = record.get("owner")
    if isinstance(owner, dict):
        proposals = owner.get("proposals")
        return None if proposals is None else [str(p) for p in proposals]
    return [record["proposal"]] if isinstance(record.get("proposal"), str) else None


async def partial_state(tree: Any, record: dict[str, Any]) -> tuple[str, Any]:
    """What ``record['partial_product']`` is: ``("none", None)`` (nothing of this job
    there, or a path a job may not touch), ``("complete", node)`` (this job's finished
    product) or ``("incomplete", node)`` (this job's half-written product)."""
    path, job_id = record.get("partial_product"), record.get("id")
    if not path or not isinstance(job_id, str) or not job_id:
        return "none", None
    try:
        parts = check_product_path(path, owner_proposals(record))
    except BadJobPath:
        return "none", None
    node = await _adapter(tree, parts)
    if node is None:
        return "none", None
    metadata = node.metadata() or {}
    if (metadata.get("provenance") or {}).get("job") != job_id:
        return "none", None  # another job's node, or not a product at all
    return ("complete" if metadata.get("complete") else "incomplete"), node


async def remove_partial(tree: Any, record: dict[str, Any]) -> bool:
    """Delete this job's half-written product (see module doc for what qualifies);
    True when nothing of the job's is left half-written."""
    state, node = await partial_state(tree, record)
    if state != "incomplete":
        return True
    try:
        await node.delete(recursive=True, external_only=False)
    except Exception:
        return False
    return True


_ATTRIBUTE = "_scatterbroker_job_records"


def install(catalog: Any) -> Any:
    """Make ``catalog`` (from ``tiled.catalog.from_uri``) refuse generic writes to
    ``/jobs`` (:func:`refuse_generic_write`); other catalogs in the process are untouched."""
    _wrap()
    setattr(catalog.context, _ATTRIBUTE, True)
    return catalog


def _wrap() -> None:
    from tiled.catalog.adapter import CatalogNodeAdapter

    if getattr(CatalogNodeAdapter, _ATTRIBUTE, False):
        return
    # security-relevant: refuses to start on a Tiled whose catalog writes are not the ones wrapped
    tiled_compat.install("job-records", lambda: _wrap_writes(CatalogNodeAdapter))


def _wrap_writes(CatalogNodeAdapter: Any) -> None:
    import functools

    def checked(method: Any, what: str, keyed: bool = False) -> Any:
        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(self.context, _ATTRIBUTE, False):
                key = (kwargs.get("key") if "key" in kwargs else (args[2] if len(args) > 2 else None)) \
                    if keyed else None
                await refuse_generic_write(self, what, key)
            return await method(self, *args, **kwargs)

        return wrapper

    CatalogNodeAdapter.create_node = checked(CatalogNodeAdapter.create_node, "creating a node", keyed=True)
    CatalogNodeAdapter.replace_metadata = checked(CatalogNodeAdapter.replace_metadata, "writing metadata")
    CatalogNodeAdapter.delete = checked(CatalogNodeAdapter.delete, "deleting")
    CatalogNodeAdapter.put_data_source = checked(CatalogNodeAdapter.put_data_source, "adding a data source")
    setattr(CatalogNodeAdapter, _ATTRIBUTE, True)
