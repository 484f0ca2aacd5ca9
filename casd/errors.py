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


class OffsetMismatch(CasdError):
    """A streamed upload's batch of digests does not start where its list ends."""

    def __init__(self, message: str, count: int):
        super().__init__(message, count=count)


class FileDigestMismatch(CasdError):
    pass


class RangeNotSatisfiable(CasdError):
    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


class StorageFull(CasdError):
    pass


class Forbidden(CasdError):
    """A policy refused the request: a foreign web origin, the pre-handshake hook, or a
    tenant token whose role may not do this."""


class UnsupportedMediaType(CasdError):
    """A body whose declared type the endpoint does not take."""


class MisdirectedRequest(CasdError):
    """The request names a host this server does not answer for."""


class Unavailable(CasdError):
    """What the request needs cannot be had now: the pre-handshake hook did not answer, or a
    file has a quarantined chunk (until it is sent again)."""


class BodyTimeout(CasdError):
    """The client stopped sending a request body; the connection is dropped after the answer."""


class MalformedBody(CasdError):
    """The body's framing (chunked encoding, length) is broken; the connection is dropped."""


class QuotaExceeded(CasdError):
    """A tenant's handshake would take its owned and pending bytes over its quota."""


class TooManyPending(CasdError):
    """A new upload would take pending manifests over their budget (it frees as uploads end)."""


class StoreUnavailable(CasdError):
    """The blob store cannot be reached or answers with errors (down, slow, refusing); the
    request can be retried, and nothing was recorded for it."""


class AdminError(CasdError):
    """A maintenance request that cannot be done as asked (the message says why)."""
