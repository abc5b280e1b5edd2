"""Secrets and paths from the environment: ``${VARIABLES}`` in configs, ``*_FILE`` secret files.

Configs name their secrets as ``${VARIABLES}`` (never values). A secret may
also come from a file, the convention of Docker/Kubernetes/systemd secrets:
``SCATTERBROKER_ADMIN_PASSWORD_FILE=/run/secrets/admin`` sets
``SCATTERBROKER_ADMIN_PASSWORD`` to the file's content (trailing newline
stripped) unless the variable itself is set.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

PREFIX = "SCATTERBROKER_"
_VARIABLE = re.compile(r"\$\{(\w+)\}")
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool, environ: MutableMapping[str, str] = os.environ) -> bool:
    """An on/off environment variable: unset or blank is ``default``; ``1/true/yes/on`` and
    ``0/false/no/off`` (any case) are on and off; anything else is a ValueError naming it."""
    text = environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise ValueError(f"{name}={environ[name]!r}: expected one of {', '.join(_ON + _OFF)}")


def env_number(name: str, default: float, environ: MutableMapping[str, str] = os.environ) -> float:
    """The number in environment variable ``name``, or ``default`` if it is unset or blank."""
    text = environ.get(name, "").strip()
    return float(text) if text else default


def load_secret_files(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Fill ``SCATTERBROKER_X`` from the file named by ``SCATTERBROKER_X_FILE``; return the names set.

    Raises ValueError naming the variable if the file cannot be read or is empty.
    """
    loaded = []
    for name in [n for n in environ if n.startswith(PREFIX) and n.endswith("_FILE")]:
        target = name[: -len("_FILE")]
        if environ.get(target):
            continue
        try:
            value = Path(environ[name]).read_text().rstrip("\r\n")
        except OSError as err:
            raise ValueError(f"{name}: cannot read {environ[name]} ({err.strerror})") from None
        if not value:
            raise ValueError(f"{name}: {environ[name]} is empty")
        environ[target] = value
        loaded.append(target)
    return loaded


def check_environment(config: str | os.PathLike) -> None:
    """Refuse a YAML config (file or directory) naming ``${VARIABLES}`` that are unset.

    Tiled expands them with ``os.path.expandvars``, which leaves an unset one as
    literal text: a missing ``${SCATTERBROKER_ADMIN_PASSWORD}`` would otherwise
    become the admin's password. Secret files (``*_FILE``) are loaded first.
    """
    load_secret_files()
    path = Path(config)
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    missing = sorted({name for f in files for name in _VARIABLE.findall(f.read_text())
                      if name not in os.environ})
    if missing:
        raise ValueError(f"{config} needs environment variables that are not set: {', '.join(missing)}")
