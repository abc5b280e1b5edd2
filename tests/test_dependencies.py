"""Every third-party package the installed package imports is declared in pyproject.toml
(base dependencies, or an extra for the modules only that extra's users import)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "distributed": "distributed"}
#: modules whose imports come with an extra, not the base install
EXTRA_ONLY = {
    "distributed": "dask",          # executors, imported only when Dask is asked for
    "nexpy": "nexpy",               # clients/nexpy_plugin.py, loaded by NeXpy itself
    "intake": "dev",                # clients/intake_reader.py, loaded by intake itself
}


def imported() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for directory in ("scatterbroker", "adapters", "catalog", "reduction"):
        for path in (ROOT / directory).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("scatterbroker", "__future__"):
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}
    for group, requirements in groups.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower().replace("_", "-")
            out.setdefault(name, set()).add(group)
    return out


def test_every_imported_package_is_declared():
    deps = declared()
    missing = []
    for module, where in sorted(imported().items()):
        name = DISTRIBUTION.get(module, module).lower().replace("_", "-")
        groups = deps.get(name, set())
        need = EXTRA_ONLY.get(module, "")
        if need not in groups:
            missing.append(f"{name} (imported by {', '.join(sorted(where))}) is not declared "
                           f"in {'the base dependencies' if not need else 'extra ' + need!r}")
    assert not missing, "\n".join(missing)
