"""The catalogue interface: manifests, uploads, chunks, files and the hook queue.

Two engines implement it: casd.catalog.sqlite (one file in the data folder, the default) and
casd.catalog.postgres (a PostgreSQL database that several daemons and admin commands share).
`open_catalog` picks one from the configuration; nothing else in casd names an engine.

The one invariant every engine keeps (docs/admin.md gives the argument for each):

    a live chunk row never names a blob that is not in the blob store, and gc never deletes
    a blob that a complete file or a live pending upload relies on.

It rests on the digest lock. Each engine can lock a digest (SQLite: its write lock, which
locks every digest at once; PostgreSQL: a transaction-scoped advisory lock per digest) and
the operations that place, retire, quarantine or probe a blob hand the catalogue a `Locked`
callback, the one form of "do this while the digest is locked":

    async def fn(arg) -> result

awaited exactly once, inside the operation's write transaction, while the digests `arg`
concerns are locked against every other daemon, gc and fsck; `arg` is what the catalogue
found under the lock (a Digest, chunk rows, digest hex strings, or per-digest facts: each
method says which). The callback may do I/O against the blob store. If it raises, the
operation's writes are rolled back and its error is the operation's error. It must not call
the catalogue (the lock is held; on SQLite it would wait for itself).

Errors: a full SQLite disk is StorageFull; a database that cannot be reached, or that fails
a statement for reasons of its own (connection lost, timeout, shutting down), is Unavailable:
the operation wrote nothing and may be retried. Domain refusals (BadRequest, Incomplete,
TooManyPending, ...) come from the same methods on every engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from casd.config import is_database_url
from casd.digest import Algo, Digest
from casd.errors import BadRequest, OffsetMismatch, TooLarge, Unavailable
from casd.models import (
    ChunkRef,
    ChunkState,
    FileEntry,
    Manifest,
    PendingBudget,
    PendingUpload,
    StreamBatch,
    StreamLimits,
    Tenant,
    Upload,
    UploadState,
)

# The stored chunk states (casd.models.ChunkState), by their short names in the engines' SQL.
LIVE = ChunkState.LIVE
DELETING = ChunkState.DELETING
QUARANTINED = ChunkState.QUARANTINED

# The chunks_key of a streamed upload's manifest until merge seals it (a real key is never
# empty, so no handshake ever resumes an unsealed manifest), and the key it gets then.
UNSEALED_KEY = ""


def placeholder(algo: Algo) -> Digest:
    """The digest an unsealed manifest carries: all zeros, which no upload ever claims
    for real (a file hashing to it is beyond reach)."""
    return Digest(algo, "0" * algo.hex_len)


def opened_stream(
    new_id: str, manifest_id: int, algo: Algo, ext: str, name: str, expires_at: float, owner: str
) -> Upload:
    """The upload `begin_stream` recorded: pending, unsealed (its digest the placeholder),
    nothing listed yet, `owner`'s ("" without tenants)."""
    return Upload(
        new_id,
        manifest_id,
        placeholder(algo),
        0,
        ext,
        name,
        UploadState.PENDING,
        expires_at,
        False,
        tenant=owner,
    )


def check_stream_batch(
    start: int, chunks: list[ChunkRef], count: int, size: int, limits: StreamLimits
) -> None:
    """Refuse a batch for a streamed upload that holds `count` chunks of `size` bytes:
    OffsetMismatch unless it starts at `count`, TooLarge past `limits`. Both engines call
    it inside the append's transaction."""
    if start != count:
        raise OffsetMismatch(
            f"this batch starts at chunk {start}, but the upload lists {count} chunks so far:"
            f" send the batch that starts at {count}",
            count,
        )
    if count + len(chunks) > limits.max_chunks:
        raise TooLarge(
            f"the upload would list {count + len(chunks)} chunks; this server takes at most"
            f" {limits.max_chunks}"
        )
    total = size + sum(c.size for c in chunks)
    if total > limits.max_file_size:
        raise TooLarge(
            f"the upload would have {total} bytes; this server takes files of at most"
            f" {limits.max_file_size} bytes"
        )


def check_seal(upload: Upload, digest: Digest, size: int) -> None:
    """Refuse to seal an open streamed upload with a claim that cannot be right."""
    if digest.algo is not upload.digest.algo:
        raise BadRequest(
            f"upload {upload.id} uses {upload.digest.algo.value} digests, not {digest.algo.value}"
        )
    if size != upload.size:
        raise BadRequest(
            f"the chunks listed add up to {upload.size} bytes, not to size {size}; nothing"
            " was changed"
        )


A_contra = TypeVar("A_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


class Locked(Protocol[A_contra, R_co]):
    """`async def fn(arg) -> result`, awaited once while the digest lock is held (above)."""

    def __call__(self, arg: A_contra, /) -> Awaitable[R_co]: ...


@dataclasses.dataclass(frozen=True)
class ChunkRow:
    """A chunks row as gc and fsck see it."""

    digest: Digest
    size: int
    xxh3: str
    state: int
    created: float


@dataclasses.dataclass(frozen=True)
class ChunkUsers:
    """What the catalogue says about one chunk digest at one moment."""

    row: ChunkRow | None
    files: tuple[tuple[FileEntry, int], ...]  # each file using it, and the size it expects
    uploads: tuple[str, ...]  # live pending uploads whose manifest has it


@dataclasses.dataclass(eq=False)
class HookEvents:
    """Webhook events that commit with the catalogue change they report, so a crash right
    after the change cannot lose them (at-least-once delivery).

    `rows(entry)` gives the (url, kind, body) rows for the file registered or deleted; it
    must be pure: an engine may call it on its writer thread, and again when it retries the
    transaction. Queued at `now`; past `max_rows` the oldest queued events are dropped in
    the same transaction. After the call returned, `queued` and `dropped` say what the
    committed transaction did (queued 0: the operation changed nothing, so no event).
    """

    rows: Callable[[FileEntry], list[tuple[str, str, str]]]
    now: float
    max_rows: int
    queued: int = 0
    dropped: int = 0


@dataclasses.dataclass(frozen=True)
class TenantUsage:
    """What one tenant holds: files it owns and their bytes (logical: a file two tenants own
    counts for both), and its live pending uploads and their bytes."""

    files: int = 0
    logical_bytes: int = 0
    pending_uploads: int = 0
    pending_bytes: int = 0


def usage_table(owned: Iterable, pending: Iterable) -> dict[str, TenantUsage]:
    """TenantUsage per tenant from (tenant, files, bytes) and (tenant, uploads, bytes) rows."""
    out: dict[str, TenantUsage] = {}
    for tenant, n, size in owned:
        out[tenant] = TenantUsage(int(n), int(size))
    for tenant, n, size in pending:
        out[tenant] = dataclasses.replace(
            out.get(tenant, TenantUsage()), pending_uploads=int(n), pending_bytes=int(size)
        )
    return dict(sorted(out.items()))


class WriteStats(Protocol):
    """The write path as metrics see it."""

    @property
    def depth(self) -> int:
        """Write operations waiting for a transaction."""

    on_commit: Callable[[float], None] | None  # told each transaction's seconds


class Catalog(Protocol):
    """What the daemon and the admin commands ask of a catalogue engine.

    Every method is one transaction (reads: one snapshot) unless it says otherwise; the
    caller opens the engine with `open_catalog` and closes it with `close`.
    """

    @property
    def writer(self) -> WriteStats: ...

    async def close(self) -> None:
        """Finish queued writes and close every connection."""

    async def ping(self) -> None:
        """Return when the catalogue answers; Unavailable when it does not."""

    # ---- daemon reads ----

    async def get_file(self, digest: Digest, tenant: str | None = None) -> FileEntry | None:
        """The complete file, or None. With `tenant`: only a file that tenant owns, under the
        name, ext and time it gave it (None, exactly as for no file, when it owns none)."""

    async def files_page(self, tenant: str | None, after: str, limit: int) -> list[FileEntry]:
        """At most `limit` complete files whose digest (hex) sorts after `after` ("": from
        the first), in digest order: every file, or (`tenant`) those it owns, under its names."""

    async def file_with_chunks(
        self, digest: Digest, tenant: str | None = None
    ) -> tuple[FileEntry, list[tuple[str, int]]] | None:
        """A file and its (digest hex, size) chunks in order, as one snapshot gives them.

        None when there is no such file (or `tenant` does not own it, as get_file). Safe
        beside a delete and new handshakes committing meanwhile: a download never gets one
        manifest's chunks under another file's ETag.
        """

    async def get_upload(self, upload_id: str) -> Upload | None: ...

    async def manifest_size_of(self, manifest_id: int, digest: Digest) -> int | None:
        """The size the manifest gives `digest`, or None when it is not in the manifest."""

    async def has_chunk(self, digest: Digest) -> bool:
        """True when the chunk is stored (live)."""

    async def present_chunks(self, digests: set[str]) -> set[str]:
        """Those of `digests` that are stored (live)."""

    async def damaged(self, manifest_id: int) -> bool:
        """True when the manifest uses a quarantined chunk (its file cannot be served whole)."""

    async def missing(self, manifest_id: int, tenant: str | None = None) -> list[str]:
        """Chunk digests the manifest needs and the store lacks, once each, in manifest order.
        With `tenant`, also those stored that the tenant never proved it holds (prove_chunk,
        or a merge of a file made of them)."""

    async def manifest_chunks(self, manifest_id: int) -> list[tuple[str, int]]:
        """(digest hex, size) of every chunk of a manifest, in order."""

    async def manifest_chunk_count(self, manifest_id: int) -> int | None:
        """How many chunks a manifest lists, or None when it is gone."""

    async def manifest_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int]]:
        """(digest hex, size) of up to `limit` chunks of a manifest from position `start` on."""

    async def file_chunks_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int, str | None]]:
        """(digest hex, size, xxh3) of up to `limit` chunks of a manifest from `start` on.

        The page GET /v1/files/{digest}/chunks sends: `xxh3` is the xxh3-128 (32 hex) of the
        chunk's bytes as the daemon verified them on upload, or None when the catalogue has
        none for it (a chunk row set aside without its bytes ever being verified).
        """

    async def count_expired_pending(self, now: float) -> int:
        """Pending uploads expired at `now` that gc has not removed yet (a metric)."""

    # ---- daemon writes ----

    async def begin_upload(
        self,
        manifest: Manifest,
        chunks_key: str,
        now: float,
        expires_at: float,
        new_id: str,
        client: str = "",
        budget: PendingBudget | None = None,
        tenant: Tenant | None = None,
    ) -> tuple[Upload, list[str]]:
        """Find the live pending upload of this exact manifest or create one (id `new_id`),
        and its missing chunks.

        A new upload is refused (TooManyPending or TooLarge, nothing written) when its chunk
        entries would take `client`'s or everyone's pending entries over `budget`; resuming
        never is. BadRequest when a chunk's size differs from the stored chunk's.

        With `tenant`: only that tenant's uploads are resumed, the new one is its own,
        `missing` is as missing(manifest_id, tenant), only chunks it proved are checked for
        a size clash, and a new upload is refused with QuotaExceeded (nothing written) when
        the bytes the tenant owns, plus its live pending uploads, plus this file's size are
        over `tenant.quota`: checked in the transaction that records the upload, so two
        racing handshakes cannot both take the last of it.
        """

    async def touch_upload(self, upload_id: str, now: float, expires_at: float) -> bool:
        """Push a live pending upload's expiry forward; False when there is none."""

    async def begin_stream(
        self,
        algo: Algo,
        ext: str,
        name: str,
        now: float,
        expires_at: float,
        new_id: str,
        client: str = "",
        tenant: Tenant | None = None,
        size: int | None = None,
        budget: PendingBudget | None = None,
    ) -> Upload:
        """Create an open streamed upload (protocol v1.1), id `new_id`, with no chunks yet.

        It is a pending upload whose manifest is unsealed (see `UNSEALED_KEY`): its digest is
        `placeholder(algo)` and its size the sum of the chunks listed so far. A pending upload
        holds at least one entry of the `budget` (TooManyPending as for begin_upload), so
        opens that list nothing cannot pile up without bound.

        With `tenant`: the upload is that tenant's, and it is refused with QuotaExceeded
        (nothing written) when the bytes the tenant owns, plus its live pending uploads, plus
        `size` (the file size its client declares; required with a tenant) are over
        `tenant.quota`: checked in the transaction that records the upload, as begin_upload's.
        """

    async def append_stream(
        self,
        upload_id: str,
        start: int,
        chunks: list[ChunkRef],
        now: float,
        expires_at: float,
        limits: StreamLimits,
        client: str = "",
        budget: PendingBudget | None = None,
        tenant: Tenant | None = None,
    ) -> StreamBatch | None:
        """Append `chunks` to an open streamed upload's list at position `start`, push its
        expiry forward, and say which of them the server lacks; one transaction.

        None when there is no open (unsealed, live) upload of that id. Refused with nothing
        written: OffsetMismatch when `start` is not the list's length; TooLarge past
        `limits`; TooManyPending/TooLarge past `budget`, as for a new upload of that many
        entries; BadRequest when a digest comes with another size than this upload or the
        stored chunk gives it.

        With `tenant`: `missing` lists the batch's chunks that are not both stored and proved
        by that tenant, and only chunks it proved are checked for a size clash with the
        stored chunk (as begin_upload's: a clash with a chunk it never proved would tell it
        someone stored that digest; such a chunk is listed missing and its PUT fails
        verification).
        """

    async def seal_stream(
        self, upload_id: str, digest: Digest, size: int, chunks_key: str
    ) -> Upload | None:
        """Give an open streamed upload the digest and size its client claims: from then on
        it is a pending upload like any other, to be merged (and verified). None when there
        is no such pending upload; an upload sealed already is answered as it is, whatever
        `digest` says. BadRequest (nothing written) when `size` is not its chunks' sum."""

    async def publish_chunk(
        self,
        digest: Digest,
        size: int,
        xxh3: str,
        now: float,
        place: Locked[Digest, None],
        touch: tuple[str, float] | None = None,
        replace: bool = False,
    ) -> bool:
        """Record a verified blob; False (and `place` not called) when it is already live.

        `place(digest)` makes sure the blob is in the store; it runs under the digest lock,
        the lock gc holds while it retires the blob, so no row ever names a blob gc removed.
        `touch` is an (upload id, new expiry) pushed forward in the same transaction, never
        reviving an expired upload. `replace`: the stored blob's bytes were found wrong;
        `place` puts the verified ones over it and the row is rewritten although it is live.
        """

    async def register_file(
        self, upload_id: str, now: float, events: HookEvents | None = None
    ) -> FileEntry | None:
        """Turn a fully present pending upload into a complete file; None if no such upload.

        An upload of a tenant also makes that tenant own the file (a file another tenant
        stored first just gains an owner) and records its proofs of every chunk of the
        file; the answer is the tenant's view (get_file with its name), None once it has
        deleted the file.

        Idempotent: a merged upload answers the file it became. Incomplete (with the missing
        digests) when chunks are still missing; FileDigestMismatch when a file of another
        size holds the digest. `events`' rows are queued in the same transaction when this
        call merges the upload, and only then (not when it answers an earlier merge).
        """

    async def drop_pending_upload(self, upload_id: str) -> bool:
        """Forget a still-pending upload (and its manifest unless a file uses it).

        False when there is no such upload or it was merged meanwhile: an abort racing a
        merge is decided once, either way.
        """

    async def delete_file(
        self, digest: Digest, events: HookEvents | None = None, tenant: str | None = None
    ) -> bool:
        """Remove a file, every tenant's ownership of it and the merged uploads that built
        it; its chunks are left for gc. False if unknown. `events`' rows are queued in the
        same transaction when a file was removed.

        With `tenant`: remove that tenant's ownership (False when it owns none) and its
        merged uploads of it; the file itself only when no tenant owns it any more."""

    async def prove_chunk(self, tenant: str, digest: Digest) -> bool:
        """Record that `tenant` sent bytes verified to hash to `digest`; True when it had
        not proved it before."""

    # ---- webhook queue ----

    async def hook_events(self, url: str, limit: int) -> list[tuple[int, str, str]]:
        """The oldest queued (id, kind, body) for one receiver URL, in order."""

    async def count_hook_events(self) -> int:
        """Events waiting for delivery, all receivers together (a metric)."""

    async def hook_event_done(self, event_id: int) -> None:
        """Forget a delivered event (no error when it is gone already)."""

    # ---- gc: plan (reads) ----

    async def expired_uploads(self, now: float) -> list[tuple[str, int]]:
        """(id, file size) of every upload, pending or merged, expired at `now`."""

    async def unused_manifests(self, now: float) -> list[int]:
        """Manifests that no file and no upload unexpired at `now` uses."""

    async def garbage_chunks(self, now: float, cutoff: float) -> list[ChunkRow]:
        """Live chunks that nothing relies on at `now` and that were stored before `cutoff`."""

    async def deleting_chunks(self) -> list[ChunkRow]:
        """Rows marked DELETING by a gc that has not finished (killed, or still running)."""

    # ---- gc: execute (each call one short write transaction) ----

    async def drop_expired_uploads(self, ids: list[str], now: float) -> tuple[int, int]:
        """Delete these uploads where still expired at `now`, and their manifests if unused.
        Returns (uploads deleted, manifests deleted)."""

    async def drop_unused_manifests(self, ids: list[int]) -> int:
        """Delete these manifests (their chunk lists cascade) where still unused; how many."""

    async def mark_garbage(self, digests: list[str], now: float, cutoff: float) -> list[ChunkRow]:
        """gc step 1: mark DELETING those of `digests` still live, unreferenced at `now` (the
        check is made against every reference committed or committing) and older than
        `cutoff`. A DELETING chunk counts as absent everywhere."""

    async def retire_chunks(
        self, digests: list[str], unlink: Locked[list[ChunkRow], object]
    ) -> list[ChunkRow]:
        """gc step 2: under their digest lock, `unlink(rows)` the blobs of those of `digests`
        still DELETING, then drop their rows and the tenants' proofs of them. A publish that
        revived a row first wins: its row is LIVE and is neither unlinked nor dropped."""

    async def unused_quarantined(self, now: float) -> int:
        """Quarantined chunks that nothing relies on any more (nothing left to heal)."""

    async def drop_unused_quarantined(self, now: float) -> int:
        """Forget quarantined chunks nothing relies on; how many."""

    async def orphans(self, digests: list[str]) -> set[str]:
        """Those of `digests` with no chunk row that no complete file uses."""

    async def retire_orphans(self, digests: list[str], unlink: Locked[set[str], object]) -> object:
        """Under the digest lock of `digests`, `unlink` those still orphans; its answer.

        No `publish_chunk` of them commits meanwhile, so a blob a client is being granted is
        either rowed already (skipped) or put back from its temp file by `place`."""

    # ---- fsck ----

    async def quarantine(
        self,
        digests: Iterable[str],
        now: float,
        decide: Locked[dict[str, ChunkUsers], list[tuple[Digest, int]]],
    ) -> list[tuple[Digest, int]]:
        """fsck --repair: under the digest lock, `decide(facts)` which chunks to set aside
        (moving their blobs away); their rows become QUARANTINED in the same transaction."""

    async def all_chunks(self) -> list[ChunkRow]: ...

    async def file_chunk_sizes(self) -> list[tuple[str, int]]:
        """(digest hex, size its manifest gives) of every chunk some complete file uses."""

    async def chunk_users(
        self,
        digests: Iterable[str],
        now: float,
        probe: Locked[dict[str, ChunkUsers], object] | None = None,
    ) -> tuple[dict[str, ChunkUsers], object]:
        """The facts about `digests` read under their digest lock, and `probe(facts)`'s
        answer: no blob of them is published or retired meanwhile."""

    # ---- stats, ls, uploads ----

    async def stats_counts(self, now: float) -> dict[str, int]: ...

    async def size_bytes(self) -> int:
        """The space the catalogue takes where it is stored (file and WAL, or database)."""

    async def pending_uploads(self) -> list[PendingUpload]:
        """Every upload not merged yet (expired ones too, until gc drops them), oldest first."""

    async def abort_uploads(self, ids: list[str]) -> list[str]:
        """Drop these pending uploads (and their manifests) in one transaction; the ids found."""

    async def list_files(self, tenant: str | None = None) -> list[FileEntry]:
        """Every complete file, or (`tenant`) those it owns under its names."""

    async def tenant_usage(self, now: float) -> dict[str, TenantUsage]:
        """Per tenant (sorted by name): what it owns and what its uploads live at `now` hold."""

    async def store_file(
        self,
        manifest: Manifest,
        chunks_key: str,
        xxh3: str,
        now: float,
        place: Locked[Digest, None],
        replace: bool = False,
        tenant: Tenant | None = None,
        events: HookEvents | None = None,
        expires_at: float = 0.0,
        new_id: str = "",
    ) -> tuple[FileEntry | None, bool]:
        """Record a file of at most one chunk whose bytes were verified and stored (protocol
        v1.1 one-request upload): the chunk (as publish_chunk, `place` under the digest
        lock), a one-entry manifest and the file, and in tenant mode the tenant's ownership
        and proof of the chunk, held to its quota (QuotaExceeded, nothing written) unless it
        owns the file already. One transaction where the engine can (SQLite); an engine may
        compose begin_upload, publish_chunk and register_file instead (`expires_at`,
        `new_id`: that upload's). The file as register_file answers it (None: deleted under
        it), and whether the chunk was written now (or, for a tenant, newly proved).
        `events` are queued in the same transaction."""


async def open_catalog(
    where: str | Path,
    *,
    synchronous: str = "FULL",
    readers: int = 2,
    bulk_readers: int = 2,
) -> Catalog:
    """Open (creating and migrating as needed) the catalogue `where` names: a
    postgresql:// URL, or the path of a SQLite file. The caller closes it."""
    if isinstance(where, str) and is_database_url(where):
        try:
            from casd.catalog.postgres import PostgresCatalog
        except ImportError as exc:
            raise Unavailable(
                f"a PostgreSQL catalogue needs {exc.name}: pip install 'casd[postgres]'"
            ) from None

        return await PostgresCatalog.open(where, readers=readers + bulk_readers)
    from casd.catalog.sqlite import SqliteCatalog

    return await SqliteCatalog.open(Path(where), synchronous, readers, bulk_readers)
