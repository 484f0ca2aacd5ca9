"""Frozen value types passed between the layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import overload

from casd.digest import Algo, Digest


class UploadState(StrEnum):
    """Where an upload is; the values are what the catalogue stores."""

    PENDING = "pending"  # taking chunks until merged, aborted or expired
    MERGED = "merged"  # its file is complete; kept so a repeated merge answers the same


class ChunkState(IntEnum):
    """What a chunk row says about its blob; the values are what the catalogue stores."""

    LIVE = 0  # the blob is in place and may be used
    DELETING = 1  # a gc is retiring it: absent to the daemon, a re-upload revives it
    QUARANTINED = 2  # set aside by fsck --repair: absent until sent again


class FsckKind(StrEnum):
    """The kinds of problem fsck reports (the `kind` of its JSON output)."""

    MISSING_BLOB = "missing_blob"
    WRONG_SIZE = "wrong_size"
    CORRUPT = "corrupt"
    ORPHAN_FILE = "orphan_file"
    ORPHAN_ROW = "orphan_row"
    TEMP_FILE = "temp_file"


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One entry of a manifest: a chunk's validated lowercase hex digest (of the manifest's
    algorithm; a plain string because manifests run to a million entries) and its size."""

    hex: str
    size: int


class ChunkList(Sequence[ChunkRef]):
    """A manifest's chunk list as two parallel lists, the lowercase hex digests and the
    sizes: a 1,000,000-entry handshake never builds a million ChunkRef objects (indexing or
    iterating one still gives ChunkRefs, made on the way)."""

    __slots__ = ("hexes", "sizes")

    def __init__(self, hexes: list[str], sizes: list[int]):
        if len(hexes) != len(sizes):
            raise ValueError("a chunk list needs one size per digest")
        self.hexes = hexes
        self.sizes = sizes

    @classmethod
    def of(cls, chunks: Iterable[ChunkRef]) -> ChunkList:
        if isinstance(chunks, ChunkList):
            return chunks
        refs = list(chunks)
        return cls([c.hex for c in refs], [c.size for c in refs])

    def __len__(self) -> int:
        return len(self.hexes)

    @overload
    def __getitem__(self, i: int) -> ChunkRef: ...
    @overload
    def __getitem__(self, i: slice) -> ChunkList: ...
    def __getitem__(self, i: int | slice) -> ChunkRef | ChunkList:
        if isinstance(i, slice):
            return ChunkList(self.hexes[i], self.sizes[i])
        return ChunkRef(self.hexes[i], self.sizes[i])

    def __iter__(self) -> Iterator[ChunkRef]:
        return map(ChunkRef, self.hexes, self.sizes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkList):
            return self.hexes == other.hexes and self.sizes == other.sizes
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ChunkList({len(self)} chunks)"


@dataclass(frozen=True)
class Manifest:
    """What a handshake says a file is made of."""

    digest: Digest
    size: int
    chunks: Sequence[ChunkRef]  # a ChunkList when parsed from a handshake
    ext: str = ""
    name: str = ""

    @property
    def algo(self) -> Algo:
        return self.digest.algo


@dataclass(frozen=True)
class Upload:
    """A pending upload as the catalogue holds it."""

    id: str
    manifest_id: int
    digest: Digest
    size: int
    ext: str
    name: str
    state: UploadState
    expires_at: float
    # False for a streamed upload (protocol v1.1) still taking chunk digests: its `digest`
    # is a placeholder and its `size` the sum of the chunks listed so far, until merge
    # seals it with the digest and size the client claims.
    sealed: bool = True
    tenant: str = ""  # who may see it in tenant mode; "" without tenants


@dataclass(frozen=True)
class StreamLimits:
    """What a streamed upload may grow to (--max-chunks, --max-file-size)."""

    max_chunks: int
    max_file_size: int


@dataclass(frozen=True)
class StreamBatch:
    """A batch of chunk digests added to a streamed upload: its chunk count and size after
    the batch, and the batch's digests the server lacks (each once, in batch order)."""

    count: int
    size: int
    missing: list[str]


@dataclass(frozen=True)
class Tenant:
    """Whose view a request has in tenant mode (docs/tenants.md): the files it owns, the
    chunks it proved it holds, its uploads; and the byte quota its handshakes are held to
    (None: no quota). Single-tenant mode passes no Tenant at all."""

    name: str
    quota: int | None = None


@dataclass(frozen=True)
class PendingBudget:
    """How many chunk entries live pending uploads may hold, in total and per client."""

    total: int
    per_client: int


@dataclass(frozen=True)
class PendingUpload:
    """A pending upload as `casd uploads ls` shows it."""

    id: str
    digest: Digest
    size: int
    entries: int  # chunk entries of its manifest (what it holds in the catalogue)
    name: str
    created: float
    expires_at: float
    client: str


@dataclass(frozen=True)
class FileEntry:
    """A complete file: its digest, size, and the manifest its chunks are read by."""

    digest: Digest
    size: int
    ext: str
    name: str
    created: float
    manifest_id: int


@dataclass(frozen=True)
class HandshakeComplete:
    """The file is stored already: nothing to send."""

    digest: Digest
    size: int
    ext: str


@dataclass(frozen=True)
class HandshakePending:
    """An upload is open: send the `missing` chunks to `upload_id` before `expires_at`."""

    digest: Digest
    size: int
    ext: str
    upload_id: str
    missing: list[str]
    expires_at: float


HandshakeResult = HandshakeComplete | HandshakePending


@dataclass(frozen=True)
class PutResult:
    stored: bool
    missing: list[str] | None  # None when the client asked for a minimal answer


@dataclass(frozen=True)
class Stats:
    files: int
    logical_bytes: int
    chunks: int
    physical_bytes: int
    pending_uploads: int
    pending_bytes: int
    deleting_chunks: int = 0  # rows a gc is retiring right now (or was, when killed)
    expired_uploads: int = 0  # uploads past their expiry, left for gc to drop
    pending_entries: int = 0  # chunk entries of the manifests of live pending uploads
    pending_catalog_bytes: int = 0  # an estimate of the catalogue space those entries take
    catalog_bytes: int = 0  # catalogue file plus its WAL, or the PostgreSQL database's size
    quarantined_chunks: int = 0  # set aside by fsck --repair, absent until re-sent

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.physical_bytes if self.physical_bytes else 1.0


@dataclass(frozen=True)
class FsckIssue:
    kind: FsckKind
    digest: str | None
    detail: str
    files: tuple[str, ...] = ()
