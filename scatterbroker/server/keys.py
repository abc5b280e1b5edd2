"""Issue API keys on a facility server: admin, and per-proposal read or write keys.

The facility profile (``server_config/facility.yml``) runs Tiled in multi-user
mode: keys live, hashed, in Tiled's authentication database, each with its own
scopes and, for proposal keys, the proposals it may see (Tiled "access tags",
enforced by :class:`scatterbroker.server.access.ProposalAccessPolicy`).

Bootstrap, once per server: the administrator logs in with the password from
``$SCATTERBROKER_ADMIN_PASSWORD`` (or the facility's PAM/OIDC provider) and gets
an unrestricted admin key; with that key staff issue keys per proposal::

    ADMIN=$(scatterbroker keys admin https://catalog.example)
    scatterbroker keys issue https://catalog.example --proposal p42 --access read --api-key $ADMIN
    scatterbroker keys issue https://catalog.example --proposal p42 --access write --api-key $ADMIN

Each issued key gets its own service principal (so it is revoked on its own)
and only the secret is printed; Tiled stores a hash of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Optional

import httpx

from scatterbroker.server.access import JOBS_TREE, PROPOSAL_TREES
from scatterbroker.catalog.names import check_key

Access = Literal["read", "write", "admin"]

#: scopes of each kind of key (a key's scopes are also capped by its principal's role)
SCOPES: dict[str, list[str]] = {
    "read": ["read:metadata", "read:data"],
    # write keys register, upload, run jobs and re-register (which replaces nodes)
    "write": ["read:metadata", "read:data", "write:metadata", "write:data", "create:node",
              "register", "delete:node", "delete:revision"],
    "admin": ["inherit"],
}


class KeyIssueError(RuntimeError):
    """The server refused to issue, or could not be reached."""


@dataclass(frozen=True)
class IssuedKey:
    secret: str
    principal: str  # service principal UUID (revoke with it and ``first_eight``)
    first_eight: str
    scopes: tuple[str, ...]
    proposals: tuple[str, ...]


def _check(response: httpx.Response, doing: str) -> dict:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise KeyIssueError(f"{doing}: HTTP {response.status_code}: {detail}")
    return response.json() if response.content else {}


def admin_key(url: str, password: str, *, username: str = "admin", provider: str = "local",
              expires_in: Optional[int] = None) -> str:
    """Log in as a Tiled admin with a password; return a new unrestricted API key."""
    url = url.rstrip("/")
    with httpx.Client(timeout=30) as http:
        tokens = _check(http.post(f"{url}/api/v1/auth/provider/{provider}/token",
                                  data={"username": username, "password": password}),
                        f"log in as {username!r}")
        record = _check(http.post(f"{url}/api/v1/auth/apikey",
                                  json={"scopes": SCOPES["admin"], "expires_in": expires_in,
                                        "note": "scatterbroker admin"},
                                  headers={"Authorization": f"Bearer {tokens['access_token']}"}),
                        "create the admin key")
    return record["secret"]


def issue_key(url: str, api_key: str, access: Access, proposals: Iterable[str] = (), *,
              expires_in: Optional[int] = None, note: Optional[str] = None) -> IssuedKey:
    """Issue a key with ``access`` to ``proposals`` (admin keys: no proposals).

    Uses the admin ``api_key``. The proposals' containers (``/raw/<p>``,
    ``/scans/<p>``, ``/reduced/<p>``, ``/wrappers/<p>``) and ``/jobs`` are created
    if missing, since a proposal key may not create containers above its proposals.
    """
    proposals = tuple(dict.fromkeys(proposals))
    if access not in SCOPES:
        raise ValueError(f"access must be one of {', '.join(SCOPES)}, not {access!r}")
    if access == "admin" and proposals:
        raise ValueError("an admin key is not restricted to proposals; give none")
    if access != "admin" and not proposals:
        raise ValueError(f"a {access} key needs at least one --proposal")
    for proposal in proposals:
        check_key(proposal)
    url = url.rstrip("/")
    headers = {"Authorization": f"Apikey {api_key}"}
    with httpx.Client(timeout=30, headers=headers) as http:
        if proposals:
            _provision(http, url, proposals)
        # role admin: only that role holds `register`; the key's own scopes cap it
        principal = _check(http.post(f"{url}/api/v1/auth/principal", params={"role": "admin"}),
                           "create a service principal")
        body = {"scopes": SCOPES[access], "expires_in": expires_in,
                "access_tags": list(proposals) or None,
                "note": note or f"scatterbroker {access} key" + (f" for {', '.join(proposals)}" if proposals else "")}
        record = _check(http.post(f"{url}/api/v1/auth/principal/{principal['uuid']}/apikey", json=body),
                        f"issue the {access} key")
    return IssuedKey(record["secret"], principal["uuid"], record["first_eight"],
                     tuple(record["scopes"]), proposals)


def revoke_key(url: str, api_key: str, principal: str, first_eight: str) -> None:
    """Revoke the key ``first_eight`` of service ``principal`` (admin ``api_key``)."""
    with httpx.Client(timeout=30, headers={"Authorization": f"Apikey {api_key}"}) as http:
        response = http.delete(f"{url.rstrip('/')}/api/v1/auth/principal/{principal}/apikey",
                               params={"first_eight": first_eight[:8]})
        _check(response, f"revoke key {first_eight[:8]}")


def _provision(http: httpx.Client, url: str, proposals: tuple[str, ...]) -> None:
    def ensure(parent: str, key: str) -> None:
        path = "/".join(p for p in (parent, key) if p)
        if http.get(f"{url}/api/v1/metadata/{path}").status_code == 200:
            return
        _check(http.post(f"{url}/api/v1/metadata/{parent}",
                         json={"metadata": {}, "structure_family": "container", "specs": [],
                               "id": key, "data_sources": []}),
               f"create container {parent}/{key}")

    ensure("", JOBS_TREE)
    for tree in PROPOSAL_TREES:
        ensure("", tree)
        for proposal in proposals:
            ensure(tree, proposal)
