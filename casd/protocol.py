"""Constants and small formatters of the v1 wire protocol (docs/PROTOCOL.md), shared by sides.

A leaf module: it imports nothing of casd but `casd.digest`, so the client can use it
without the server's code and the server without the client's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from casd.digest import Digest

# `ext` in a handshake and in a file URL: empty, or a dot and 1 to 16 of [A-Za-z0-9_-].
EXT_PATTERN = r"\.[A-Za-z0-9_-]{1,16}"
EXT_RE = re.compile(EXT_PATTERN + r"\Z")
# A file path as the server hands it out: /v1/files/DIGEST[.ext] (group 1 digest, 2 ext).
# The name part of a file URL: a digest's hex, then any number of extensions (ignored).
# Any number of extensions after a file URL's digest (a download ignores them).
EXTS_RE = re.compile("(" + EXT_PATTERN + r")*\Z")
FILE_NAME_PATTERN = r"([0-9a-fA-F]{32}|[0-9a-fA-F]{64})(" + EXT_PATTERN + r")*"
FILE_PATH_RE = re.compile(r"/v1/files/([0-9a-fA-F]+)(" + EXT_PATTERN + r")?\Z")

# The `error` codes of error answers (PROTOCOL.md, "Error codes").
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
REQUEST_TIMEOUT = "request_timeout"
INCOMPLETE = "incomplete"
NOT_IN_MANIFEST = "not_in_manifest"
TOO_LARGE = "too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
MISDIRECTED_REQUEST = "misdirected_request"
DIGEST_MISMATCH = "digest_mismatch"
SIZE_MISMATCH = "size_mismatch"
FILE_DIGEST_MISMATCH = "file_digest_mismatch"
OFFSET_MISMATCH = "offset_mismatch"
TOO_MANY_PENDING = "too_many_pending"
QUOTA_EXCEEDED = "quota_exceeded"
HEADERS_TOO_LARGE = "headers_too_large"
INTERNAL_ERROR = "internal_error"
UNAVAILABLE = "unavailable"
INSUFFICIENT_STORAGE = "insufficient_storage"

# Statuses a client may retry: the request may succeed unchanged later (timeouts, rate
# limits, server trouble, a full disk that may be freed). Every other 4xx is a refusal.
RETRYABLE_STATUSES = frozenset({408, 429})

# Chunk PUT header asking for `{"stored": ...}` without the `missing` list (RFC 7240).
PREFER_MINIMAL = "return=minimal"


def is_retryable_status(status: int) -> bool:
    """True for the answers a client retries: 408, 429 and every 5xx (507 included)."""
    return status in RETRYABLE_STATUSES or status >= 500


def file_path(digest_hex: str, ext: str = "") -> str:
    """The path of a stored file: /v1/files/DIGEST.ext (`ext` already valid, or empty)."""
    return f"/v1/files/{digest_hex}{ext}"


def file_url(digest: Digest, ext: str = "") -> str:
    """The path the server answers for a stored file, as `url` in handshake and merge."""
    return file_path(digest.hex, ext)


def format_bytes(n: float) -> str:
    """A byte count for people: '512 B', '1.5 KiB', '2.0 GiB' (binary units, up to TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_timestamp(ts: float) -> str:
    """A Unix time as RFC 3339 UTC to the second, as in `expires_at`: 2024-05-01T12:00:00Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
