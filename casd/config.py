"""Settings of one daemon: where the data lives, where it listens, its limits."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

MiB = 1024 * 1024
GiB = 1024 * MiB

DEFAULT_DATA = "./casd-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080

ALGOS = ("md5", "sha256")
SYNC_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")
# Settings that count something and must be at least 1.
_COUNTS = (
    "max_chunk_size",
    "max_chunks",
    "max_handshake_bytes",
    "max_file_size",
    "max_pending_chunks",
    "max_pending_chunks_per_client",
    "io_workers",
    "hash_workers",
    "hook_queue_max",
    "max_connections",
    "read_connections",
    "bulk_read_connections",
)
# Timeouts where 0 turns the timeout off.
_TIMEOUTS = ("header_timeout", "body_timeout", "keepalive_timeout", "shutdown_timeout")


@dataclass(frozen=True)
class Settings:
    """Everything a daemon runs with. Checked when built: a value out of its range, or two
    that contradict each other, raise ValueError naming the field (the CLI names its flag)."""

    data_dir: Path = Path(DEFAULT_DATA)
    # Where blobs live: None keeps them under data_dir/blobs; "s3://BUCKET[/PREFIX]" puts them
    # in that bucket (casd/blobstore). Temp files stay under data_dir either way.
    blobs: str | None = None
    # An S3-compatible service other than AWS (MinIO, Ceph RGW, R2, ...).
    s3_endpoint: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_chunk_size: int = 64 * MiB
    max_chunks: int = 1_000_000
    # A valid 200,000-chunk handshake is 12 MiB (md5) or 18.7 MiB (sha256, 64 MiB chunks);
    # parsing one costs a few times its size, so this bounds what one request can cost.
    max_handshake_bytes: int = 24 * MiB
    # Merge hashes a whole file; a manifest that lists one stored chunk many times makes a
    # huge file from a small handshake, so the size a manifest may claim is bounded.
    max_file_size: int = 64 * GiB
    upload_ttl: float = 24 * 3600.0
    # Chunk entries live pending uploads may hold in the catalogue (each ~100 bytes of
    # database): in total (~400 MB at the default), and per client (its address, or its
    # token when tokens are required). One client's share takes a --max-chunks manifest.
    max_pending_chunks: int = 4_000_000
    max_pending_chunks_per_client: int = 1_000_000
    # A file of this size kept in the data folder and deleted when the disk fills, so that
    # deletes, aborts, `casd rm` and `casd gc` still find room for their catalogue writes.
    reserve_bytes: int = 32 * MiB
    # Bearer tokens; when token is set every /v1 request needs it (or the admin token),
    # and DELETE /v1/files needs the admin token once that is set.
    token: str | None = None
    admin_token: str | None = None
    # Tenant mode (docs/tenants.md): the token file naming each token's tenant, role and
    # quota. Replaces token and admin_token, which cannot be set beside it.
    tokens: Path | None = None
    # Blocking file work (hash+write, fsync, rename) runs in threads; this bounds how many
    # requests do disk work at once so the daemon stays responsive under load.
    io_workers: int = 8
    # Whole-file hashing (hash-ahead and merge) runs on its own threads, in slices, so a huge
    # merge never holds up chunk ingest or /healthz on the I/O pool.
    hash_workers: int = 2
    # "FULL" makes every acknowledged catalogue write survive a power cut, not just a crash.
    sqlite_synchronous: str = "FULL"
    shutdown_timeout: float = 10.0
    # Host names the daemon answers (against DNS rebinding), on top of the defaults derived
    # from `host` (docs/security.md); "*" accepts any.
    allowed_hosts: tuple[str, ...] = ()
    # Web origins ("https://app.example", or "*") whose pages may call the API (CORS).
    cors_origins: tuple[str, ...] = ()
    # Digest algorithms handshakes may use; ("sha256",) refuses MD5 where collisions matter.
    algos: tuple[str, ...] = ("md5", "sha256")
    # Protocol v1.1 streamed uploads (docs/PROTOCOL.md): chunk digests sent as the client
    # hashes, the file's digest at merge. Off, the server answers as a v1 server and every
    # client uses v1. A v1 client works either way.
    stream_uploads: bool = True
    # Operations (docs/operating.md): /metrics protection and webhooks.
    metrics_token: str | None = None
    hook_urls: tuple[str, ...] = ()
    hook_secret: str | None = None
    hook_pre_handshake: str | None = None
    hook_timeout: float = 5.0
    hook_queue_max: int = 10_000
    # Connection timeouts, in seconds (0 turns one off). A request's headers must arrive
    # within header_timeout of connecting or of its first byte; a body may pause at most
    # body_timeout between bytes; an idle connection is closed after keepalive_timeout.
    # The defaults are nginx's: a phone on a bad network stalls for seconds, not a minute.
    header_timeout: float = 60.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    # Open connections beyond this are answered 503 and closed at once. `casd serve` lowers
    # it to what the open-file limit can carry.
    max_connections: int = 1000
    # Catalogue readers: `read_connections` for quick lookups, `bulk_read_connections` more
    # for reading long lists (huge manifests), so those never queue the quick ones.
    read_connections: int = 2
    bulk_read_connections: int = 2
    # Where the catalogue lives: a postgresql:// URL (shared by several daemons), or None
    # for catalog.sqlite in the data folder.
    catalog: str | None = None

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            return value

        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port!r} is out of range (0 to 65535)")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must name an address to listen on")
        for name in _COUNTS:
            if number(name) < 1 or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be a whole number, at least 1")
        if self.tokens is not None and (self.token is not None or self.admin_token is not None):
            raise ValueError(
                "tokens (tenant mode) cannot be used with token or admin_token: in tenant"
                " mode every key is a line of that file, with its tenant and role"
            )
        if self.max_pending_chunks_per_client > self.max_pending_chunks:
            raise ValueError("max_pending_chunks_per_client cannot exceed max_pending_chunks")
        if number("reserve_bytes") < 0:
            raise ValueError("reserve_bytes cannot be negative")
        for name in ("upload_ttl", "hook_timeout"):
            if not 0 < number(name) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds")
        for name in _TIMEOUTS:
            if not 0 <= number(name) < math.inf:
                raise ValueError(f"{name} must be a number of seconds, 0 or more")
        if self.sqlite_synchronous not in SYNC_LEVELS:
            raise ValueError(
                f"sqlite_synchronous {self.sqlite_synchronous!r} is not one of {', '.join(SYNC_LEVELS)}"
            )
        if not self.algos or not set(self.algos) <= set(ALGOS):
            raise ValueError(f"algos must be some of {', '.join(ALGOS)}, got {list(self.algos)}")

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def reserve_path(self) -> Path:
        return self.data_dir / "reserve"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite"

    @property
    def catalog_where(self) -> str | Path:
        """What casd.catalog.open_catalog opens: the database URL, else the SQLite file."""
        return self.catalog or self.catalog_path


def data_dir_from_env(value: str | None = None) -> Path:
    """The data folder: an explicit value, else $CASD_DATA, else ./casd-data."""
    return Path(value or os.environ.get("CASD_DATA") or DEFAULT_DATA)


def is_database_url(value: str | None) -> bool:
    """True when `value` names a PostgreSQL database rather than a file."""
    return bool(value) and str(value).split(":", 1)[0] in ("postgresql", "postgres")


def masked(url: str) -> str:
    """`url` with its password replaced by ***, for logs, --check-config and errors."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(an unparsable URL)"
    if password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
