"""The client's exceptions: what it could not do, and whether trying again may help."""

from __future__ import annotations

from casd.protocol import is_retryable_status


class CasdClientError(Exception):
    """Anything the client could not do; `status`/`code` are set when the server refused.

    `retryable` says whether the same request may succeed later unchanged (the client has
    already retried it `retries` times when it surfaces).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        body: dict | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body or {}
        # Seconds the server asked us to wait (Retry-After), when it said.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is not None and is_retryable_status(self.status)


class CasdHTTPError(CasdClientError):
    """The server answered with an error (`status`, `code` and `message` from its JSON body)."""


class CasdConnectionError(CasdClientError):
    """The server could not be reached, or the connection kept failing after every retry."""

    @property
    def retryable(self) -> bool:
        return True


class CasdIntegrityError(CasdClientError):
    """Bytes are not what their digest says: a downloaded file, or a file that changed."""

    @property
    def retryable(self) -> bool:
        return False


class FileChangedError(CasdIntegrityError):
    """The local file changed between hashing and sending; running again rehashes it."""
