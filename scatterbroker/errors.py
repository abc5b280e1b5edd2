"""Named failures, each with the HTTP status the server answers with.

Adapters and the catalog raise these. They derive from Starlette's
``HTTPException``, so any Tiled server (ours, or ``tiled serve config`` with our
adapters) answers a bad file with ``status_code`` and a JSON
``{"detail": message}`` naming the problem, while the rest of the catalog
keeps serving. Outside a server they are ordinary exceptions.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException


class ScatterbrokerError(HTTPException):
    """Base class; ``str(err)`` is the one-line message shown to users."""

    status_code: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(status_code=type(self).status_code, detail=message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.detail,))


class UnreadableFile(ScatterbrokerError):
    """A file is truncated, corrupt, or not what its extension claims."""

    status_code = 422


class IncompleteFile(UnreadableFile):
    """A file is shorter than its own header says: still being written, or truncated."""


class FrameMismatch(UnreadableFile):
    """A frame of a sequence has a different shape or dtype from the rest of its scan."""


class UnknownFormat(ScatterbrokerError):
    """No installed adapter reads this file."""

    status_code = 415


class OutsideRoots(ScatterbrokerError):
    """A path, link, or HDF5 external source resolves outside the readable roots."""

    status_code = 403


class RefusedAsset(ScatterbrokerError):
    """An asset a client asked to register that the server will not accept: not a
    plain local ``file:`` URI (``http:``, ``x-file:``, a bare path, another host),
    a URI whose path a reader could decode into another file (``%2F``, ``%2E``,
    ``;``/``?``/``#`` parts), or a file inside the server's writable storage (where
    any write key can put bytes of its choosing)."""

    status_code = 403


class BrokenLink(ScatterbrokerError):
    """An HDF5 external or soft link whose target does not exist (or loops)."""

    status_code = 404


class RequestTooLarge(ScatterbrokerError):
    """A read would return more than the server's configured response limit."""

    status_code = 413


class InvalidName(ScatterbrokerError):
    """A node name that cannot be a catalog key (``/``, ``..``, NUL, too long)."""

    status_code = 422


class InvalidMetadata(ScatterbrokerError):
    """Metadata the catalog cannot store (a NUL character: PostgreSQL's JSONB refuses it)."""

    status_code = 422
