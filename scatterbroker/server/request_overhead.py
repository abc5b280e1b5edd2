"""Static work that FastAPI, pydantic and Tiled redo on every request of a Tiled server, done once.

Three costs showed up when the server was profiled (``py-spy``) under a loop of
small requests (a node's metadata, a metadata patch, a child lookup), each
paid per request although its result never changes while the server runs:

**Dependencies rebuilt per request.** Tiled's ``build_app`` overrides one
dependency (``get_settings``). As soon as ``app.dependency_overrides`` holds
anything, FastAPI (0.165 here, and every version before it) rebuilds the
``Dependant`` of *every* sub-dependency of *every* request with
``get_dependant`` -- ``inspect.signature`` and pydantic field analysis of each
callable, recursively -- whether or not that dependency is overridden
(upstream: fastapi/fastapi#14441 and #16342, unreleased). Tiled's routes have
deep dependency trees, so this was about a fifth of a small request's CPU.
``get_dependant`` depends on its arguments only (a callable's signature does
not change), so :func:`memoize_dependants` puts a memo in front of it.
Overrides keep working, including ones changed at run time: the override is
part of the key. Only calls made through ``fastapi.dependencies.utils`` at run
time use the memo (``solve_dependencies`` and ``get_dependant``'s recursion);
``fastapi.routing`` binds the original at import and mutates what it gets
(router-level dependencies are inserted into a route's dependant), so routes
never share a memoized object.

**Response models re-created per request.** Tiled builds each response from a
parametrized generic model (``schemas.Resource[NodeAttributes, ContainerLinks,
ContainerMeta]``, one per structure family). pydantic caches parametrized
models in a ``WeakValueDictionary`` only; a class is part of reference cycles,
so once the garbage collector runs, the next request creates the class again
(``create_generic_submodel``: about 5% of a small request's CPU, more for a
listing, which builds one resource per child). :func:`keep_generic_models`
restores what pydantic itself used before 2.x dropped it: the weak cache
chained with a bounded dict of strong references.

**SQL aliases re-created per request.** Tiled finds a node by its path with
one SELECT joining an alias of the ``nodes`` table per path segment
(``tiled.catalog.adapter.node_from_segments``), made afresh on every lookup:
SQLAlchemy then builds each new alias's column collection again before its
statement cache can answer (about 9% of a small request's CPU).
:func:`reuse_node_aliases` makes the same statement from aliases made once per
path depth; the SQL is the same, the statements differ only in their bound
values.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from scatterbroker.server import tiled_compat

#: distinct dependants remembered (routes x their dependencies: a few hundred for Tiled)
MAX_DEPENDANTS = 4096
#: parametrized models kept alive (keys: about three per parametrization)
MAX_GENERIC_MODELS = 2000

_memo: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


def install() -> None:
    """The three fixes (idempotent), each only where the library is the one it was written for
    (:mod:`scatterbroker.server.tiled_compat`: else it logs and leaves the library's own code)."""
    tiled_compat.install("dependant-memo", memoize_dependants)
    tiled_compat.install("generic-models", keep_generic_models)
    tiled_compat.install("node-aliases", reuse_node_aliases)


def _key(kwargs: dict[str, Any]) -> tuple | None:
    # the callable by identity (two equal-comparing callables are still two dependencies);
    # the memoized dependant holds it, so its id is not reused while the entry lives
    key = tuple((name, id(v) if name == "call" else tuple(v) if isinstance(v, list) else v)
                for name, v in sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _replace(owner: Any, name: str, make: Any) -> bool:
    """Put ``make(original)`` in place of ``owner.name`` once; False if ``owner`` has no such name."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    if getattr(original, "_scatterbroker_memo", False):
        return True
    replacement = make(original)
    replacement._scatterbroker_memo = True
    replacement.__wrapped__ = original
    replacement.__doc__ = original.__doc__
    setattr(owner, name, replacement)
    return True


def memoize_dependants() -> bool:
    """Memoize FastAPI's run-time ``get_dependant``; False if FastAPI has no such function."""
    try:
        from fastapi.dependencies import utils
    except ImportError:
        return False

    def make(original: Any) -> Any:
        def get_dependant(**kwargs: Any) -> Any:
            key = _key(kwargs)
            if key is None:
                return original(**kwargs)
            with _lock:
                hit = _memo.get(key)
                if hit is not None:
                    _memo.move_to_end(key)
                    return hit
            built = original(**kwargs)
            with _lock:
                _memo[key] = built
                while len(_memo) > MAX_DEPENDANTS:
                    _memo.popitem(last=False)
            return built

        return get_dependant

    return _replace(utils, "get_dependant", make)


def keep_generic_models() -> bool:
    """Keep recently used parametrized pydantic models alive; False if pydantic's cache changed shape."""
    try:
        g = tiled_compat.pydantic_generics()
    except ImportError:
        return False
    cache = tiled_compat.private(g, "_GENERIC_TYPES_CACHE", None)
    if not all(hasattr(g, name) for name in ("DeepChainMap", "LimitedDict", "GenericTypesCache")):
        return False
    if isinstance(cache, g.DeepChainMap):
        return True  # done already (or pydantic went back to it)
    weak = g.GenericTypesCache()
    if cache is not None:
        weak.update(cache)  # models created so far keep their identity
    tiled_compat.set_private(g, "_GENERIC_TYPES_CACHE", g.DeepChainMap(weak, g.LimitedDict(MAX_GENERIC_MODELS)))
    return True


def reuse_node_aliases() -> bool:
    """Tiled's path-to-node SELECT, from aliases made once per depth; False if Tiled changed."""
    try:
        from sqlalchemy import select
        from sqlalchemy.orm import aliased
        from tiled.catalog import adapter, orm
    except ImportError:
        return False
    chains: dict[int, list] = {}

    def make(original: Any) -> Any:
        def node_from_segments(segments: Any, root_id: int = 0) -> Any:
            # tiled.catalog.adapter.node_from_segments (0.2.20), statement for statement
            chain = chains.get(len(segments))
            if chain is None:
                chain = chains.setdefault(len(segments), [aliased(orm.Node) for _ in segments] + [orm.Node])
            statement = select(chain[-1]).select_from(chain[0]).where(chain[0].id == root_id)
            for i, segment in enumerate(segments):
                parent, child = chain[i], chain[i + 1]
                statement = statement.join(child, child.parent == parent.id).where(child.key == segment)
            return statement

        return node_from_segments

    return _replace(adapter, "node_from_segments", make)
