"""Settings of one daemon: where the data lives, where it listens, its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024

DEFAULT_DATA = "./casd-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(DEFAULT_DATA)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_chunk_size: int = 64 * MiB
    max_chunks: int = 1_000_000
    max_handshake_bytes: int = 128 * MiB
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
    # Blocking file work (hash+write, fsync, rename) runs in threads; this bounds how many
    # requests do disk work at once so the daemon stays responsive under load.
    io_workers: int = 8
    # "FULL" makes every acknowledged catalogue write survive a power cut, not just a crash.
    sqlite_synchronous: str = "FULL"
    shutdown_timeout: float = 10.0

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


def data_dir_from_env(value: str | None = None) -> Path:
    """The data folder: an explicit value, else $CASD_DATA, else ./casd-data."""
    return Path(value or os.environ.get("CASD_DATA") or DEFAULT_DATA)
