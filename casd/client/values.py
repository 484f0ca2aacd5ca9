"""What the client reports and accepts: progress, summaries, references to stored files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from casd.digest import Digest
from casd.protocol import EXT_RE, FILE_PATH_RE, file_path


class Phase(StrEnum):
    """Progress phases, the same names as casd.js's `onProgress` (a phase equals its string)."""

    HASHING = "hashing"
    HANDSHAKE = "handshake"
    UPLOADING = "uploading"
    MERGING = "merging"
    DOWNLOADING = "downloading"
    DONE = "done"


@dataclass(frozen=True)
class Progress:
    """A progress report; done never exceeds total.

    "hashing" counts bytes of the file hashed; "uploading" bytes and chunks acknowledged of
    those this round sends (from 0, even when there are none); "downloading" bytes of the file written. "handshake" reports 0
    of the file's size and chunk count; "merging" and "done" report all of them.
    """

    phase: Phase
    bytes_done: int
    bytes_total: int
    chunks_done: int = 0
    chunks_total: int = 0


@dataclass(frozen=True)
class UploadSummary:
    """What an upload did. sent + skipped = total; "sent" counts chunks the server acknowledged."""

    path: str
    digest: str
    algo: str
    size: int
    url: str
    chunks_total: int
    chunks_sent: int
    bytes_sent: int
    chunks_skipped: int
    bytes_skipped: int
    instant: bool
    cached: bool
    hash_seconds: float
    transfer_seconds: float
    merge_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DownloadSummary:
    """What a download did: the verified file at `path`, and how much came over the wire.

    `chunked` is true when the file came chunk by chunk from its manifest, each chunk
    verified; then fetched + reused = total, where "reused" counts chunks found in a
    `reuse` file or left by an earlier try. A single-GET download reports no chunks.
    `verified` is "file" when the whole file's digest was checked (a single GET, or
    `verify="full"`), "chunks" when each chunk was checked against the server's manifest
    only; `chunk_check` then says by what: "xxh3-128", the file's algorithm, or both.
    """

    path: str
    digest: str
    algo: str
    size: int
    url: str
    bytes_received: int
    resumed_from: int
    seconds: float
    chunked: bool = False
    chunks_total: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    chunks_reused: int = 0
    bytes_reused: int = 0
    verified: str = "file"
    chunk_check: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class FileRef:
    """A stored file named by digest, with the server it lives on when a URL said so."""

    digest: Digest
    ext: str = ""
    server: str | None = None

    @property
    def path(self) -> str:
        return file_path(self.digest.hex, self.ext)

    @classmethod
    def parse(cls, text: str) -> FileRef:
        """'<digest>', '<digest>.ext', '/v1/files/<digest>.ext' or 'http://host/v1/files/...'."""
        text = text.strip()
        server = None
        path = text
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{text!r} is not an http(s) URL")
            server, path = f"{parts.scheme}://{parts.netloc}", parts.path
        if "/" not in path:
            path = "/v1/files/" + path
        m = FILE_PATH_RE.search(path)
        if not m:
            raise ValueError(
                f"{text!r} is neither a digest (32 or 64 hexadecimal characters) "
                "nor a casd file URL (…/v1/files/DIGEST.ext)"
            )
        prefix = path[: m.start()]
        if server is not None and prefix:
            server += prefix
        return cls(Digest.parse_any(m.group(1)), (m.group(2) or "").lower(), server)


def ext_of(name: str) -> str:
    """The extension casd accepts for a file name ('.iso'), or '' when it has none it can take."""
    ext = os.path.splitext(name)[1]
    return ext.lower() if EXT_RE.match(ext) else ""
