"""The package's layers point one way (docs/architecture.md):

    cli  ->  server, clients  ->  catalog  ->  adapters, reduction  ->  core

``core`` is the package's own top-level modules (errors, settings, wire
format, limits, the Bitshuffle binding). Reduction sits beside adapters: it may
use them, never the reverse. Server and clients are siblings: neither imports
the other. This test reads every module's imports (including those inside
functions) and fails on one that runs against the direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source directory -> dotted package it is installed as (pyproject's package-dir)
PACKAGES = {"scatterbroker": "scatterbroker", "adapters": "scatterbroker.adapters",
            "catalog": "scatterbroker.catalog", "reduction": "scatterbroker.reduction"}
RANK = {"core": 0, "adapters": 1, "reduction": 1, "catalog": 2, "server": 3, "clients": 3, "cli": 4}
#: same-rank imports that are allowed (importer layer, imported layer)
BESIDE = {("reduction", "adapters")}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "scatterbroker":
        raise ValueError(module)
    if len(parts) == 1:
        return "core"
    if parts[1] in ("adapters", "reduction", "catalog", "server", "clients"):
        return parts[1]
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return "core"


def modules() -> dict[str, Path]:
    out = {}
    for directory, dotted in PACKAGES.items():
        for path in (ROOT / directory).rglob("*.py"):
            rel = path.relative_to(ROOT / directory).with_suffix("").parts
            name = ".".join((dotted, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # "from scatterbroker import server" names a layer through the imported name
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names
                      if target == "scatterbroker"]
    return [(line, t) for line, t in found if t == "scatterbroker" or t.startswith("scatterbroker.")]


def against(importer: str, imported: str) -> bool:
    a, b = layer(importer), layer(imported)
    if a == b or (a, b) in BESIDE:
        return False
    return RANK[b] >= RANK[a]


def test_every_import_follows_the_layers():
    found = modules()
    assert "scatterbroker.server.app" in found and "scatterbroker.adapters.nexus" in found
    wrong = [f"{path.relative_to(ROOT)}:{line}: {name} ({layer(name)}) imports {target} ({layer(target)})"
             for name, path in sorted(found.items())
             for line, target in imports(name, path)
             if target != "scatterbroker" and against(name, target)]
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)


def test_the_rule_can_fail():
    assert against("scatterbroker.adapters.nexus", "scatterbroker.catalog.register")
    assert against("scatterbroker.clients.nexus", "scatterbroker.server.app")
    assert against("scatterbroker.errors", "scatterbroker.adapters.roots")
    assert not against("scatterbroker.reduction.stack", "scatterbroker.adapters.sequence")
    assert not against("scatterbroker.server.app", "scatterbroker.catalog.register")


def test_reduction_talks_to_no_server():
    """Reduction computes on the arrays and files it is given; reading a catalog
    (a Tiled client, HTTP) is the catalog's or the job runner's."""
    found = modules()
    wrong = [f"{path.relative_to(ROOT)}: {target}"
             for name, path in sorted(found.items()) if layer(name) == "reduction"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             for target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
             if target.split(".")[0] in ("tiled", "httpx", "requests", "urllib3")]
    assert not wrong, "reduction imports a client:\n" + "\n".join(wrong)
