"""The casd client library: deduplicating, resumable uploads and verified, resumable downloads.

Modules, each importable on its own:

- `casd.client.errors`: the exceptions (`CasdClientError` and its kinds, `retryable`).
- `casd.client.hashing`: the one-read hashing pipeline (`hash_file`, `file_digests`) and the
  `DigestCache`; blocking, and free of aiohttp.
- `casd.client.values`: `Progress` and its `Phase`, `UploadSummary`, `DownloadSummary`,
  `FileRef`.
- `casd.client.transfer`: `CasdClient` (aiohttp) and the one-call `upload` / `download`.

Everything public is re-exported here: `from casd.client import CasdClient, hash_file, ...`.
The client imports nothing of the server: only the leaves `casd.digest` and `casd.protocol`.
"""

from casd.chunking import Chunking
from casd.client.errors import (
    CasdClientError,
    CasdConnectionError,
    CasdHTTPError,
    CasdIntegrityError,
    FileChangedError,
)
from casd.client.hashing import (
    CACHE_MAX_ENTRIES,
    DEFAULT_CHUNK_SIZE,
    HASH_PIECE,
    RACY_COARSE_NS,
    RACY_NS,
    ChunkSpan,
    DigestCache,
    FileDigests,
    MiB,
    default_cache_dir,
    file_digests,
    hash_file,
    hash_stream,
)
from casd.client.transfer import (
    DEFAULT_BACKOFF,
    DEFAULT_CHUNKING,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_RETRIES,
    DEFAULT_SERVER,
    DEFAULT_VERIFY,
    IO_PIECE,
    MAX_ROUNDS,
    VERIFY_MODES,
    CasdClient,
    download,
    upload,
)
from casd.client.values import (
    DownloadSummary,
    FileRef,
    Phase,
    Progress,
    ProgressCallback,
    UploadSummary,
    ext_of,
)

__all__ = [
    "CACHE_MAX_ENTRIES",
    "DEFAULT_BACKOFF",
    "DEFAULT_CHUNKING",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_RETRIES",
    "DEFAULT_SERVER",
    "DEFAULT_VERIFY",
    "HASH_PIECE",
    "IO_PIECE",
    "MAX_ROUNDS",
    "RACY_COARSE_NS",
    "RACY_NS",
    "VERIFY_MODES",
    "CasdClient",
    "CasdClientError",
    "CasdConnectionError",
    "CasdHTTPError",
    "CasdIntegrityError",
    "ChunkSpan",
    "Chunking",
    "DigestCache",
    "DownloadSummary",
    "FileChangedError",
    "FileDigests",
    "FileRef",
    "MiB",
    "Phase",
    "Progress",
    "ProgressCallback",
    "UploadSummary",
    "default_cache_dir",
    "download",
    "ext_of",
    "file_digests",
    "hash_file",
    "hash_stream",
    "upload",
]
