"""Per-proposal access: which nodes an API key may see and what it may do there.

A facility catalog is laid out by proposal (DESIGN.md §3)::

    /raw/<proposal>/...   /scans/<proposal>/...   /reduced/<proposal>/...
    /wrappers/<proposal>/...                      /jobs/<id>  (metadata job.proposal)

API keys are Tiled's (multi-user mode: hashed in the authentication database,
each with its own scopes). A key issued with access tags — the proposals it
belongs to, see :mod:`scatterbroker.server.keys` — is *restricted*: it sees

- the nodes of its proposals and everything below them,
- the containers above them (``/``, ``/raw`` …), read-only, for navigation,
- ``/jobs`` and the job records of its proposals;

every other node does not exist for it (404), in listings, in deep search and
on every data route. Only an admin (a key or login holding ``admin:apikeys``)
and the single-user key are unrestricted. Anyone else without access tags -- a
user logged in through PAM/OIDC, a key issued without proposals -- sees the
proposals the policy's ``members`` mapping gives their identity, or none. What a key may *do* on a node it sees
is its scopes: ``read:metadata``/``read:data`` (read key), plus
``write:*``/``create:node``/``register`` (write key), ``admin:apikeys`` (admin).

Enforcement is one SQL condition on the catalog's node rows (a node is visible
if it is, lies under or lies above one of the key's proposal nodes), applied by
Tiled at every container the request walks through, so a hidden proposal can
neither be listed nor reached by guessing its path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import aliased
from tiled.access_control.access_policies import ALL_ACCESS
from tiled.access_control.protocols import AccessPolicy, normalize_access_tags
from tiled.access_control.scopes import ALL_SCOPES, PUBLIC_SCOPES
from tiled.catalog import orm
from tiled.catalog.adapter import CatalogNodeAdapter
from tiled.queries import In

from scatterbroker.server import tiled_compat

#: top-level containers whose children are proposals
PROPOSAL_TREES = ("raw", "scans", "reduced", "wrappers")
#: top-level container of job records (each with metadata ``job.proposal``)
JOBS_TREE = "jobs"
#: metadata key of a job record naming its proposal (set by the jobs API, scatterbroker.server.jobs_api)
JOB_PROPOSAL_KEY = "job.proposal"
#: what a restricted key may do on the containers above its proposals
READ_SCOPES = frozenset(PUBLIC_SCOPES)
#: ... and on /jobs: job records are written by the server's jobs API only
#: (scatterbroker.server.job_records), never by a key through the generic write routes
JOBS_SCOPES = READ_SCOPES
ROOT_ID = 0  # Tiled's catalog root row


def proposal_of(path: Iterable[str]) -> Optional[str]:
    """The proposal a catalog path belongs to (``raw/p1/s1`` -> ``p1``), or None."""
    parts = [p for p in path if p]
    if len(parts) >= 2 and parts[0] in PROPOSAL_TREES:
        return parts[1]
    return None


@dataclass(frozen=True)
class ProposalScope:
    """Catalog query: only nodes visible to the given proposals (see module doc)."""

    proposals: tuple[str, ...]
    trees: tuple[str, ...] = PROPOSAL_TREES
    jobs: str = JOBS_TREE


def _scope_condition(query: ProposalScope, tree: CatalogNodeAdapter) -> Any:
    closure = orm.NodesClosure
    top, proposal = aliased(orm.Node), aliased(orm.Node)
    proposal_ids = (
        select(proposal.id)
        .join(top, proposal.parent == top.id)
        .where(top.parent == ROOT_ID, top.key.in_(query.trees), proposal.key.in_(query.proposals))
    )
    above = select(closure.ancestor).where(closure.descendant.in_(proposal_ids))
    below = select(closure.descendant).where(closure.ancestor.in_(proposal_ids))
    jobs = aliased(orm.Node)
    jobs_id = select(jobs.id).where(jobs.parent == ROOT_ID, jobs.key == query.jobs).scalar_subquery()
    # Tiled's own (dialect-aware) JSON condition for metadata job.proposal in [...]
    job_of_proposal = tree.query_registry(In(JOB_PROPOSAL_KEY, list(query.proposals)),
                                          tree.new_variation(conditions=[])).conditions[-1]
    return or_(
        orm.Node.id.in_(above),
        orm.Node.id.in_(below),
        orm.Node.id == jobs_id,
        and_(orm.Node.parent == jobs_id, job_of_proposal),
    )


def _scope(query: ProposalScope, tree: CatalogNodeAdapter) -> CatalogNodeAdapter:
    return tree.new_variation(conditions=[*tree.conditions, _scope_condition(query, tree)])


CatalogNodeAdapter.register_query(ProposalScope, _scope)


def _catalog_node(node: Any) -> Any:
    """The catalog row behind ``node``, or None inside a file (decided above it)."""
    return getattr(node, "node", None) if isinstance(node, CatalogNodeAdapter) else None


class ProposalAccessPolicy(AccessPolicy):
    """Tiled access policy: API keys restricted to proposals (see module doc).

    Configured in the server config::

        access_control:
          access_policy: scatterbroker.server.access:ProposalAccessPolicy
          args: {}
    """

    def __init__(self, trees: Iterable[str] = PROPOSAL_TREES, jobs: str = JOBS_TREE,
                 members: Optional[dict[str, list[str]]] = None) -> None:
        """``members``: identity id (e.g. a PAM user name) -> proposals, for people who
        log in rather than use an issued key."""
        # security-relevant: _scope_condition takes Tiled's JSON "In" condition as the last one
        # its query handler appends; another handler refuses to start (scatterbroker.server.tiled_compat)
        tiled_compat.install("proposal-access", lambda: None)
        self.trees = tuple(trees)
        self.jobs = jobs
        self.members = {who: tuple(proposals) for who, proposals in (members or {}).items()}

    def proposals(self, principal: Any, authn_access_tags: Any, authn_scopes: Any) -> Optional[tuple[str, ...]]:
        """The proposals a caller may see, or None for no restriction."""
        if authn_access_tags is not None:
            return tuple(sorted(authn_access_tags))
        if principal is None or "admin:apikeys" in authn_scopes:  # single-user key, admin
            return None
        ids = [identity.id for identity in getattr(principal, "identities", None) or ()]
        return tuple(sorted({p for who in ids for p in self.members.get(who, ())}))

    async def init_node(self, principal, authn_access_tags, authn_scopes, access_tags=None):
        # Nodes carry no tags: where a node lies decides who sees it.
        return False, normalize_access_tags(access_tags or ())

    async def allowed_scopes(self, node, principal, authn_access_tags, authn_scopes):
        if self.proposals(principal, authn_access_tags, authn_scopes) is None:
            return set(authn_scopes) & ALL_SCOPES
        row = _catalog_node(node)
        if row is not None and row.parent is None:  # the root
            return set(authn_scopes) & READ_SCOPES
        if row is not None and row.parent == ROOT_ID:  # /raw, /jobs ...
            return set(authn_scopes) & (JOBS_SCOPES if row.key == self.jobs else READ_SCOPES)
        # Anything deeper was reached through ProposalScope at every level above it.
        return set(authn_scopes)

    async def filters(self, node, principal, authn_access_tags, authn_scopes, scopes):
        proposals = self.proposals(principal, authn_access_tags, authn_scopes)
        if proposals is None:
            return ALL_ACCESS
        row = _catalog_node(node)
        if row is None or row.data_sources:
            # inside a registered file: the file's own node was already checked
            return ALL_ACCESS
        return [ProposalScope(proposals, self.trees, self.jobs)]
