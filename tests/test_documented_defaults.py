"""The operator guide's defaults are the code's: read out of docs/operator-guide.md
and compared with what a fresh process computes with the variable unset.

The guide once said the response limit defaulted to 4 GiB while the code used
300 MB; a default changed in one place only now fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_default(variable: str, guide: Path = DOCS / "operator-guide.md") -> str:
    """The last cell ("default") of the environment-variable table row for ``variable``."""
    for line in guide.read_text().splitlines():
        if line.startswith(f"| `{variable}` |"):
            return [cell.strip() for cell in line.strip().strip("|").split("|")][-1]
    raise AssertionError(f"{variable} has no row in {guide.name}'s environment variable table")


def code_value(expression: str, module: str, unset: str) -> str:
    """``repr`` of ``expression`` in a new interpreter that imports ``module`` with ``unset``
    removed from the environment (module constants are read at import)."""
    env = {k: v for k, v in os.environ.items() if k != unset}
    done = subprocess.run([sys.executable, "-c", f"import {module} as m; print(repr({expression}))"],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    return done.stdout.strip()


def test_response_limit_default_is_the_codes():
    cell = documented_default("SCATTERBROKER_MAX_RESPONSE_BYTES")
    found = re.match(r"`(\d+)`", cell)
    assert found, f"the default should start with the number of bytes in backticks: {cell!r}"
    code = int(code_value("m.MAX_READ_BYTES", "scatterbroker.adapters.sequence",
                          "SCATTERBROKER_MAX_RESPONSE_BYTES"))
    assert int(found.group(1)) == code, (cell, code)
    # the user guide's table of status codes states the same default
    users = (DOCS / "user-guide.md").read_text()
    (row,) = [line for line in users.splitlines() if "RequestTooLarge" in line]
    assert f"{code / 1e6:g} MB by default" in row, row


def test_refuse_hard_links_default_is_off():
    assert documented_default("SCATTERBROKER_REFUSE_HARD_LINKS").startswith("off")
    assert code_value("m.refuse_hard_links()", "scatterbroker.adapters.roots",
                      "SCATTERBROKER_REFUSE_HARD_LINKS") == "False"


def test_limits_defaults_are_the_codes():
    """The row of scatterbroker/limits.py's bounds: each default, in the row's order."""
    names = ["MAX_CHUNK_BYTES", "MAX_CHUNKS_PER_READ", "HDF5_READ_PIECE_BYTES", "MAX_VLEN_STRINGS",
             "MAX_ATTRIBUTES", "MAX_INLINED_MEMBERS"]
    guide = (DOCS / "operator-guide.md").read_text()
    (row,) = [line for line in guide.splitlines() if line.startswith("| `SCATTERBROKER_MAX_CHUNK_BYTES`")]
    cell = [c.strip() for c in row.strip().strip("|").split("|")][-1]
    documented = [int(re.match(r"\d+", part.strip()).group()) for part in cell.split(",")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCATTERBROKER_")}
    done = subprocess.run([sys.executable, "-c", "import scatterbroker.limits as m; print(["
                           + ", ".join(f"m.{n}" for n in names) + "])"],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    assert documented == eval(done.stdout), (cell, done.stdout)
