"""Catalog keys: what a node may be called."""

from __future__ import annotations

from ..errors import InvalidName

MAX_KEY_LENGTH = 255


def check_key(key: str) -> str:
    """Return ``key`` if it can name a catalog node, else raise InvalidName.

    Refused: empty, ``.``/``..``, containing ``/``, ``\\``, NUL or other control
    characters, longer than 255 characters.
    """
    if not key or key in {".", ".."}:
        raise InvalidName(f"{key!r} cannot name a catalog node")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidName(f"node name of {len(key)} characters is longer than {MAX_KEY_LENGTH}")
    bad = [c for c in key if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise InvalidName(f"node name {key!r} contains forbidden character {bad[0]!r}")
    return key
