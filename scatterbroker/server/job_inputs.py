"""Frame-stack inputs of a job that runs inside the server, read without HTTP.

A job submitted with ``POST /api/v1/jobs`` runs in the server process, as its
submitter. Its metadata (shape, the NeXus entry the UB comes from, ...) still
goes through a Tiled client with the submitter's key, but the frames
themselves need not travel out through the server's socket and back in: at
submission the input node is looked up **with the submitter's credentials**,
through the same Tiled ``get_entry`` (access policy at every path segment)
and readable-root checks as the fast data route (``scatterbroker.server.fastpath``),
and the job reads its frames straight from that adapter, decoded in the
server's I/O threads. Nothing is looked up for an input the submitter cannot
read.

Which servers a job may read from (:func:`normalize`): this one -- an input
URI naming this server's socket address, or the host the request was sent to,
is resolved **by its node path** and rewritten to the socket address, so the
``Host:`` header never makes the server fetch anything -- and the peer servers
the operator lists in ``SCATTERBROKER_PEER_SERVERS`` (comma-separated base
URLs, read at import; empty by default), which are read over HTTP with the
submitter's key. Any other input is refused (422) before anything is fetched.

For a served Bitshuffle-LZ4 scan this removes the sending and receiving of
every compressed frame (about half of a transform job's CPU time,
``benchmarks/transform.py`` end to end).

The same holds for the sample a transform takes its UB from when the
parameters give none (:func:`scatterbroker.server.jobs.scan_ub`): the
NXentry above the input and its NXsample are found, and the UB fields read, in
the server -- each node through ``get_entry`` with the submitter's
credentials, ``read:metadata`` for the walk and ``read:data`` for the fields,
as the job's own requests would need. Over HTTP that walk is about ten
requests, each paid twice in the one server process (client and route).
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlparse

import numpy as np

from scatterbroker import _wire

log = logging.getLogger(__name__)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL, lower-cased, the default port filled in."""
    parsed = urlparse(url.strip())
    scheme = parsed.scheme.lower()
    return scheme, (parsed.hostname or "").lower(), parsed.port or _DEFAULT_PORTS.get(scheme, 0)


def _peers(value: str) -> tuple[str, ...]:
    """Base URLs from ``SCATTERBROKER_PEER_SERVERS`` (comma-separated), without a trailing ``/``."""
    peers = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if origin(item)[0] not in _DEFAULT_PORTS or not origin(item)[1]:
            raise ValueError(f"SCATTERBROKER_PEER_SERVERS: {item!r} is not an http(s) base URL")
        peers.append(item.rstrip("/"))
    return tuple(peers)


#: servers besides this one a job may read its inputs from (operator's allow-list)
PEER_SERVERS: tuple[str, ...] = _peers(os.environ.get("SCATTERBROKER_PEER_SERVERS", ""))


def self_base(request: Any) -> str:
    """This server's own base URL, from the socket the request arrived on (never from
    its ``Host:`` header, which the caller chooses)."""
    from fastapi import HTTPException

    server = request.scope.get("server")
    if not server:
        raise HTTPException(500, "jobs need the server to listen on a TCP socket (it cannot call itself)")
    host, port = server[0], server[1]
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if request.scope.get("scheme") == "https" else "http"
    return f"{scheme}://{host}:{port}{request.scope.get('root_path', '')}".rstrip("/")


def normalize(uri: Any, request: Any, base: str, what: str = "input") -> str:
    """The URI a job may read ``uri`` at: this server's socket address for a node of
    this server (by path), ``uri`` itself on an allowed peer; else ``JobError`` (422).

    This server is its socket address, or the host the request named (the node is
    then resolved here by its path: nothing is fetched from that host)."""
    from scatterbroker.server.jobs import JobError, node_path

    if not isinstance(uri, str):
        raise JobError(f"{what} {uri!r} is not a node URI (…/api/v1/metadata/<path>)")
    parts = node_path(uri)
    here = {origin(base), origin(str(request.base_url))}
    if origin(uri) in here:
        return f"{base}/api/v1/metadata/" + "/".join(quote(p, safe="") for p in parts)
    for peer in PEER_SERVERS:
        if origin(uri) == origin(peer) and urlparse(uri).path.startswith(urlparse(peer).path + "/api/v1/metadata/"):
            return uri
    raise JobError(f"{what} {uri}: not on this server, nor on a peer server the operator allows "
                   "(SCATTERBROKER_PEER_SERVERS); nothing was fetched")


@dataclass
class Found:
    """An input this server holds: its adapter, and the UB fields of its NeXus sample if found."""

    entry: Any
    sample: tuple[dict[str, Any], str] | None = None  # (field -> value, NXsample URI)


async def resolve(request: Any, uris: list[str]) -> dict[str, Found]:
    """``{uri: Found}`` for the inputs served by this server that the caller
    may read as frame stacks (3-d arrays; a scan container means its ``frames``).

    ``request`` is the submitter's ``POST``: its credentials decide, exactly as
    for ``GET /api/v1/sb/frames/...``. Inputs that are not found, not readable
    or not frame stacks are left out: the job then opens them over HTTP and
    reports the problem itself.
    """
    from scatterbroker.server.fastpath import _authorize, _lookup
    from scatterbroker.server.jobs import node_path

    here = origin(self_base(request))
    metrics: dict = collections.defaultdict(lambda: collections.defaultdict(float))  # Tiled's timings, unused
    try:
        auth = await _authorize(request, ["read:data"])
    except Exception:
        return {}
    found: dict[str, Found] = {}
    for uri in uris:
        try:
            if origin(uri) != here:  # a peer's (inputs were normalized: see normalize)
                continue
            path = "/".join(node_path(uri))
        except Exception:
            continue
        for candidate in (path, f"{path}/frames"):
            try:
                entry = await _lookup(request, candidate, auth, ["read:data"], metrics)
            except Exception:
                continue  # not there, not readable, not an array: HTTP says why
            if len(getattr(entry.structure(), "shape", ())) == 3:
                try:
                    sample = await _sample(request, candidate, auth, metrics)
                except Exception:  # anything unexpected: the job walks over HTTP and says what is wrong
                    sample = None
                found[uri] = Found(entry, sample)
                break
    return found


async def _sample(request: Any, path: str, auth: Any, metrics: Any) -> tuple[dict[str, Any], str] | None:
    """The UB fields of the NXsample in the NXentry above ``path``, read in the server,
    and its URI -- what ``scan_ub`` reads over HTTP -- or None to leave it to HTTP
    (no NXentry, an NXentry that is a catalog node rather than a group of a served
    file, a node this caller may not read: HTTP then gives the same answer or error)."""
    import anyio
    from tiled.server.dependencies import get_entry
    from tiled.server.utils import get_base_url
    from tiled.structures.core import StructureFamily

    from scatterbroker.server.fastpath import _lookup
    from scatterbroker.server.jobs import _UB_FIELDS, spec_names

    async def node(p: str, family: StructureFamily) -> Any:
        return await get_entry(p, ["read:metadata"], auth.principal, auth.access_tags, auth.scopes,
                               request.app.state.root_tree, auth.session_state, metrics, {family},
                               getattr(request.app.state, "access_policy", None))

    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts) - 1, 0, -1):  # the input's ancestors, nearest first
        where = "/".join(parts[:depth])
        entry = await node(where, StructureFamily.container)
        if "NXentry" not in spec_names(entry):
            continue
        if hasattr(entry, "get_adapter") or not hasattr(entry, "keys"):
            return None  # a catalog node: its children are listed over HTTP
        for key in list(entry.keys()):
            try:
                child = await node(f"{where}/{key}", StructureFamily.container)
            except Exception:
                continue  # not a container, or not visible to this caller: not the sample
            if "NXsample" not in spec_names(child) or not hasattr(child, "keys"):
                continue
            values = {}
            for name in sorted(set(child.keys()) & _UB_FIELDS):
                field = await _lookup(request, f"{where}/{key}/{name}", auth, ["read:data"], metrics)
                values[name] = await anyio.to_thread.run_sync(field.read)
            return values, f"{get_base_url(request)}/metadata/{where}/{key}"
        return None
    return None


class ServerFrames:
    """A job input: the Tiled client node for everything but frame reads,
    which come from the server-side adapter (same shape and dtype, checked)."""

    def __init__(self, node: Any, entry: Any, sample: tuple[dict[str, Any], str] | None = None) -> None:
        self._node, self._entry = node, entry
        #: (UB fields, NXsample URI) read in the server, for ``scan_ub``; None: walk over HTTP
        self.nexus_sample = sample

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)

    def __getitem__(self, key: Any) -> np.ndarray:
        from scatterbroker.server.fastpath import read_payload

        if self._entry is None:
            return self._node[key]
        try:
            norm, post = _wire.normalize(key, tuple(self._entry.structure().shape))
        except (TypeError, IndexError):
            return self._node[key]  # the client gives numpy's own error (or supports the key)
        try:
            payload = read_payload(self._entry, norm, "none")
        except Exception as err:  # e.g. a file replaced under the node: HTTP reports it properly
            log.warning("job input %s: reading %s in the server failed (%s); reading over HTTP "
                        "instead", getattr(self._node, "uri", "?"), _wire.format_slice(norm), err)
            self._entry = None
            return self._node[key]
        out = np.frombuffer(payload.body, dtype=payload.dtype) if len(payload.body) else \
            np.empty(0, dtype=payload.dtype)
        out = out.reshape(payload.shape)
        return out[post] if any(p != slice(None) for p in post) else out


def opener(found: dict[str, Found], base: str | None = None):
    """An ``open_input`` for :func:`scatterbroker.server.jobs.run` that wraps the
    inputs found by :func:`resolve` (when the client node agrees on shape and dtype).

    ``base``: this server's own URL (:func:`self_base`); an input elsewhere (a
    peer's) that fails to open is reported without the peer's answer."""
    from scatterbroker.server.jobs import open_input

    def open_(uri: str, api_key: str | None) -> Any:
        node = open_input(uri, api_key, foreign=base is None or origin(uri) != origin(base))
        hit = found.get(uri)
        if hit is None:
            return node
        structure = hit.entry.structure()
        if tuple(structure.shape) != tuple(getattr(node, "shape", ())) or \
                structure.data_type.to_numpy_dtype() != getattr(node, "dtype", None):
            return node
        return ServerFrames(node, hit.entry, hit.sample)

    return open_
