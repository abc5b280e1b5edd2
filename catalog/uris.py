"""Global URIs: a node's Tiled metadata URL, which ``tiled.client.from_uri`` opens directly."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote


def global_uri(node: Any) -> str:
    """``<server>/api/v1/metadata/<path>`` for a Tiled client node.

    Stable across server restarts and catalog migrations: it names the node by
    its path, not by a database id.
    """
    api = str(node.context.api_uri).rstrip("/")
    return f"{api}/metadata/" + "/".join(quote(p, safe="") for p in node.path_parts if p)
