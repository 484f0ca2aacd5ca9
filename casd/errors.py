"""Domain errors. They say what went wrong; the web layer decides the HTTP answer."""

from __future__ import annotations


class CasdError(Exception):
    """Base of every error a caller can act on; `extra` fields go into the answer."""

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(CasdError):
    pass


class Unauthorized(CasdError):
    pass


class NotFound(CasdError):
    pass


class Incomplete(CasdError):
    def __init__(self, message: str, missing: list[str]):
        super().__init__(message, missing=missing)


class NotInManifest(CasdError):
    pass


class TooLarge(CasdError):
    pass


class DigestMismatch(CasdError):
    pass


class SizeMismatch(CasdError):
    pass


class FileDigestMismatch(CasdError):
    pass


class RangeNotSatisfiable(CasdError):
    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


class StorageFull(CasdError):
    pass


class TooManyPending(CasdError):
    """A new upload would take pending manifests over their budget (it frees as uploads end)."""


class Unavailable(CasdError):
    """The thing exists but cannot be served as it is now (e.g. a file with a quarantined chunk)."""
