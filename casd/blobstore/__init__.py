"""Where verified blobs live: one small interface, a local-folder engine and an S3 engine.

A chunk is received into a local temp file under --data/tmp (`TempBlob`), hashed and
verified there, fsynced, and only then handed to the store (`publish`). The store holds
blobs by digest; nothing outside this package builds a blob's path or key, and nothing
outside `open_blobstore` knows which engine runs.

The contract every engine keeps (tests/test_blobstore_contract.py runs them all through it):

- `publish(temp, digest)` returns once the store has acknowledged the bytes: durably on
  disk (local), or accepted by the object store after checking them against the digest sent
  along (S3: `Content-MD5` or `x-amz-checksum-sha256`). Publishing a digest that is already
  stored is not an error and leaves equal bytes (only verified bytes are ever published).
- `ensure_stored(temp, digest)` and `delete(digest)` are the two operations run while the
  catalogue holds the digest locked (publish_chunk's check before the row; gc's retire):
  that lock is what makes "no row names a blob that is not stored" hold across processes
  and machines. `ensure_stored` puts the blob back from the temp file when gc removed it
  after `publish`.
- Removing or quarantining a blob that is not there is not an error (False / None).
- `open(digest)` returns a `BlobReader` the caller closes (it is an async context manager);
  a missing blob raises `BlobMissing`. Reads past what the blob holds end early: the caller
  compares lengths (a short read is a damaged or collected blob).
- A store that cannot be reached, or answers with a server error or too slowly, raises
  `StoreUnavailable` (the web layer answers 503); nothing is half-published.
- The caller owns every `TempBlob` it made and discards it; the store never does.
"""

from __future__ import annotations

import asyncio
import builtins  # the interface has a method named `list`
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, Self

import xxhash

from casd.blobstore.base import READ_PIECE, BlobHash, BlobInfo, BlobMissing
from casd.blobstore.local import (
    LocalBlobStore,
    Reserve,
    StoredBlob,
    TempBlob,
    TempFile,
    free_bytes,
    fsync_dir,
    is_disk_full,
    temp_busy,
)
from casd.digest import Algo, Digest
from casd.errors import StoreUnavailable

__all__ = [
    "READ_PIECE",
    "BlobHash",
    "BlobInfo",
    "BlobMissing",
    "BlobReader",
    "BlobStore",
    "LocalBlobStore",
    "Reserve",
    "StoreUnavailable",
    "StoredBlob",
    "TempBlob",
    "TempFile",
    "blob_matches",
    "feed",
    "free_bytes",
    "fsync_dir",
    "hash_blob",
    "is_disk_full",
    "open_blobstore",
    "parse_s3_url",
    "temp_busy",
]


class BlobReader(Protocol):
    """An open blob. `file` is a local file positioned anywhere (for zero-copy sendfile), or
    None when the bytes come over the network; `stream` works for every engine."""

    file: BinaryIO | None
    size: int

    def stream(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) in pieces of at most READ_PIECE; may end early."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc) -> None: ...


class BlobStore(Protocol):
    """See the module docstring for the contract."""

    tmp_dir: Path
    # Shown in logs and errors: the folder or s3://bucket/prefix.
    location: str
    # Where `quarantine` puts blobs, for people.
    quarantine_location: str
    # Whether a quick `casd fsck` rehashes every blob (xxh3-128): yes on a local disk; no
    # where that would read every byte over the network (it checks sizes; --deep rehashes).
    quick_rehash: bool

    async def start(self) -> None:
        """Make folders / check that the bucket answers; StoreUnavailable if not."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises (StoreUnavailable) when the store does not answer now; for /healthz."""

    # -- temp files: always local, under tmp_dir --

    def new_temp(self) -> TempBlob:
        """Blocking: a new locked temp file; the caller discards it."""
        ...

    def temp_files(self) -> Iterator[TempFile]:
        """Blocking: the temp files there are now (gc removes old ones, fsck reports them)."""
        ...

    def check_writable(self) -> None:
        """Blocking: create, fsync and remove a temp file; OSError when that fails."""
        ...

    # -- blobs --

    async def publish(self, temp: TempBlob, digest: Digest) -> None:
        """Outside any lock: store a finished (fsynced, verified) temp file's bytes."""

    async def ensure_stored(self, temp: TempBlob, digest: Digest) -> None:
        """With the digest locked, before its row is written: the blob is in the store."""

    async def replace(self, temp: TempBlob, digest: Digest) -> None:
        """With the digest locked: the temp file's bytes replace a stored blob found wrong."""

    async def stat(self, digest: Digest) -> BlobInfo | None: ...

    async def open(self, digest: Digest) -> BlobReader:
        """An open reader; BlobMissing when there is no such blob."""
        ...

    async def feed_run(
        self,
        algo: Algo,
        run: builtins.list[tuple[str, int, int]],
        sink: Callable[[bytes], object],
        executor=None,
    ) -> builtins.list[int]:
        """Hand slices (hex, offset, length) of several blobs, in order, to blocking `sink` on
        `executor`'s threads; per slice, the bytes handed (fewer when the blob is short).
        BlobMissing when one is gone. Merge hashing reads runs of small chunks this way."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove a blob; False when there was none (not an error)."""
        ...

    async def delete_if_older(self, digest: Digest, before: float) -> bool:
        """gc's orphan step, with the digest locked: remove the blob unless it was stored
        at or after `before` or is still a daemon's temp file; True when removed."""
        ...

    def list(self) -> AsyncIterator[BlobInfo]:
        """Every stored object, foreign names included (digest None)."""
        ...

    async def quarantine(self, digest: Digest) -> str | None:
        """Move a blob aside (kept for the operator, never served); where it went, or None
        when there was no blob."""
        ...

    async def hash_blobs(
        self, items: builtins.list[tuple[Digest, Algo | None]], workers: int
    ) -> builtins.list[BlobHash | OSError]:
        """xxh3-128 of each blob (and its real digest where an algo is given), `workers` at
        a time, in order; a blob that is gone or unreadable gives its OSError (BlobMissing)."""
        ...

    async def assemble(
        self, parts: builtins.list[tuple[Digest, int]], dest: Path, total: int
    ) -> None:
        """Concatenate blobs (digest, expected size) into a local file at `dest`: written
        beside it, fsynced, checked to be `total` bytes, renamed in place. BlobMissing or
        ValueError (a size that does not match) leave `dest` untouched."""


async def feed(
    reader: BlobReader,
    offset: int,
    length: int,
    sink: Callable[[bytes], object],
    executor=None,
) -> int:
    """Hand bytes [offset, offset+length) of a blob to blocking `sink`, on `executor`'s
    threads; the number of bytes handed (less than `length` when the blob is short)."""
    loop = asyncio.get_running_loop()
    done = 0
    async for piece in reader.stream(offset, length):
        await loop.run_in_executor(executor, sink, piece)
        done += len(piece)
    return done


async def feed_each(
    store: BlobStore,
    algo: Algo,
    run: builtins.list[tuple[str, int, int]],
    sink: Callable[[bytes], object],
    executor=None,
) -> builtins.list[int]:
    """`BlobStore.feed_run` by opening and streaming each blob in turn (remote stores)."""
    out = []
    for hex_, offset, length in run:
        async with await store.open(Digest(algo, hex_)) as reader:
            out.append(await feed(reader, offset, length, sink, executor))
    return out


async def hash_blob(store: BlobStore, digest: Digest, algo: Algo | None, executor=None) -> BlobHash:
    """Hash one blob by reading it through the store; BlobMissing when it is gone."""
    x = xxhash.xxh3_128()
    h = algo.new() if algo is not None else None

    def absorb(piece: bytes) -> None:
        x.update(piece)
        if h is not None:
            h.update(piece)

    async with await store.open(digest) as reader:
        n = await feed(reader, 0, reader.size, absorb, executor)
        version = getattr(reader, "version", ())
    return BlobHash(x.hexdigest(), h.hexdigest() if h else None, version, n)


async def blob_matches(
    store: BlobStore, digest: Digest, size: int, xxh3: str, executor=None
) -> bool:
    """True when the stored blob has exactly this size and xxh3-128."""
    try:
        reader = await store.open(digest)
    except BlobMissing:
        return False
    async with reader:
        if reader.size != size:
            return False
        h = xxhash.xxh3_128()
        if await feed(reader, 0, size, h.update, executor) != size:
            return False
    return h.hexdigest() == xxh3


def open_blobstore(
    blobs: str | None, data_dir: Path, s3_endpoint: str | None = None, io=None
) -> BlobStore:
    """The engine the settings name: `blobs` None keeps blobs under `data_dir`, an
    s3://BUCKET[/PREFIX] URL puts them in that bucket. Temp files and quarantined local
    blobs stay under `data_dir`. `io`: the executor local file work runs on."""
    tmp_dir = data_dir / "tmp"
    if not blobs:
        return LocalBlobStore(data_dir / "blobs", tmp_dir, data_dir / "quarantine", io)
    bucket, prefix = parse_s3_url(blobs)
    from casd.blobstore.s3 import S3BlobStore  # aiobotocore is needed only for S3

    return S3BlobStore(bucket, prefix, tmp_dir, endpoint=s3_endpoint)


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes at either end); ValueError."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3://BUCKET[/PREFIX] URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    return bucket, prefix.strip("/")
