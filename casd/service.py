"""Use cases: handshake, put_chunk, merge, abort, open_file, delete_file.

The ordering rules live here: a blob is verified and acknowledged by the blob store before
any catalogue row says it exists; bytes are verified while they stream in, never trusted.
Which engines store blobs and the catalogue is decided in `Service.open` alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import xxhash

from casd.blobstore import (
    BlobMissing,
    BlobReader,
    BlobStore,
    Reserve,
    TempBlob,
    blob_matches,
    is_disk_full,
    open_blobstore,
)
from casd.blobstore.local import LocalBlobStore
from casd.catalog import Catalog, HookEvents, open_catalog, placeholder
from casd.config import Settings
from casd.digest import Algo, ChunkHasher, Digest
from casd.errors import (
    BadRequest,
    DigestMismatch,
    FileDigestMismatch,
    Incomplete,
    NotFound,
    NotInManifest,
    QuotaExceeded,
    SizeMismatch,
    StorageFull,
    TooLarge,
    Unavailable,
)
from casd.fsck import Fsck
from casd.models import (
    ChunkList,
    ChunkRef,
    FileEntry,
    HandshakeComplete,
    HandshakePending,
    HandshakeResult,
    Manifest,
    PendingBudget,
    PutResult,
    StreamBatch,
    StreamLimits,
    Tenant,
    Upload,
    UploadState,
)

log = logging.getLogger("casd.service")

# Bytes handed to a worker thread at a time: large enough that hashlib releases the GIL and
# thread hand-offs are rare, small enough that a request holds only a couple of them.
INGEST_BLOCK = 1 << 20
# Body pieces held for one block before they are joined (see Service._ingest).
MAX_PIECES = 64


@contextmanager
def full_disk_refused():
    """A full disk (ENOSPC, EDQUOT) in file work becomes StorageFull: a 507, nothing kept."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageFull("the data folder's disk is full; nothing was kept") from exc
        raise


def chunks_key(manifest: Manifest) -> str:
    """A fingerprint of the ordered chunk list, to find "the same manifest" again: the
    xxh3-128 of "hex:size\n" of every chunk, fed thousands of entries at a time."""
    c = ChunkList.of(manifest.chunks)
    h = xxhash.xxh3_128()
    for i in range(0, len(c), 8192):  # a few hundred KiB at a time, not the whole list's text
        h.update(
            "".join(map("{}:{}\n".format, c.hexes[i : i + 8192], c.sizes[i : i + 8192])).encode()
        )
    return h.hexdigest()


class FileHash:
    """The whole-file hash over the longest run of a pending upload's chunks seen so far.

    Chunks usually arrive nearly in order, so hashing the present prefix in the background
    while the rest uploads leaves merge with only the tail to hash. It holds a position in
    the manifest, never the manifest itself: the chunk list is paged from the catalogue.
    """

    def __init__(self, digest: Digest, manifest_id: int, open_ended: bool = False):
        self.algo = digest.algo
        self.hash = digest.algo.new()
        self.manifest_id = manifest_id
        self.next = 0  # position of the first chunk not yet wholly hashed
        self.offset = 0  # bytes of that chunk already hashed
        self.total = 0
        self.done = False
        # Set when a hash was cut short (error, cancellation): a chunk may be half fed in.
        self.broken = False
        self.lock = asyncio.Lock()
        self.ahead: asyncio.Task | None = None  # the one background hash-ahead of this upload
        self.again = False  # a chunk arrived while `ahead` ran: it looks once more
        self.merging = False  # a merge waits for the lock: hash-ahead stops at its next turn
        # A streamed upload still taking digests: the end of its list is not the file's end.
        # Only ever goes from True to False (when merge seals the upload).
        self.open_ended = open_ended

    def result(self) -> tuple[Digest, int]:
        return Digest(self.algo, self.hash.hexdigest()), self.total


@dataclass
class _Declared:
    """A streamed upload opened with the file's size: the size, what it has listed so far
    (never more than the size), whose it is ("" without tenants), when it expires."""

    tenant: str
    size: int
    listed: int
    expires_at: float


class _InOrder:
    """A chunk received in order: a copy of the upload's whole-file hash fed its bytes, put
    in place of the hash (`advance`) once the chunk is verified and stored. Whoever holds
    one holds `state.lock`."""

    __slots__ = ("hash", "state")

    def __init__(self, state: FileHash):
        self.state = state
        self.hash = state.hash.copy()

    def advance(self, size: int) -> None:
        state = self.state
        state.hash = self.hash
        state.total += size
        state.next += 1


# Pending uploads whose prefix hash is kept in memory; an evicted one is rehashed at merge.
MAX_FILE_HASHES = 256
# Manifest entries read from the catalogue at a time while hashing; also how many chunks
# after the hashed prefix one presence query looks at.
MANIFEST_PAGE = 512
# Chunk entries a download reads from its manifest at a time (Service.read_plan).
DOWNLOAD_PAGE = 2048
# Manifests a download moves on to when the one it reads is dropped meanwhile.
READ_PLAN_TRIES = 3
# Bytes one turn on the hash pool reads. The pool's queue is first come, first served and
# every upload has at most one turn queued, so uploads take turns: one huge merge slows the
# others in proportion, never holds them up until it is done.
HASH_SLICE = 4 << 20
# Chunk digests one batch of a streamed upload may list: its rows are written in one
# transaction that holds the catalogue's write lock, so a batch stays small (a 4,096-entry
# batch of SHA-256 digests is about 400 KB of JSON).
MAX_STREAM_BATCH = 4096


@dataclass(frozen=True)
class ReadSegment:
    """Bytes [offset, offset+length) of one blob."""

    digest: Digest
    offset: int
    length: int


def _name(tenant: Tenant | None) -> str | None:
    return tenant.name if tenant is not None else None


def _sees(tenant: Tenant | None, upload: Upload) -> bool:
    """Whether a request of `tenant` may see `upload` (without tenants, every upload)."""
    return tenant is None or upload.tenant == tenant.name


class Service:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
        io: ThreadPoolExecutor | None = None,
    ):
        self.settings = settings
        self.catalog = catalog
        self.blobs = blobs
        self.clock = clock
        self.io = io or ThreadPoolExecutor(settings.io_workers, thread_name_prefix="casd-io")
        # Whole-file hashing has its own threads: chunk ingest and /healthz use `io`, and a
        # merge of a manifest that repeats one chunk a million times must not queue them.
        self.hashing = ThreadPoolExecutor(settings.hash_workers, thread_name_prefix="casd-hash")
        # Background hash-ahead takes at most this many turns at once, whatever the number
        # of uploads: a merge someone waits for never queues behind hundreds of them.
        self._ahead_turns = asyncio.Semaphore(settings.hash_workers)
        self._file_hashes: OrderedDict[str, FileHash] = OrderedDict()
        self._background: set[asyncio.Task] = set()
        self.reserve = Reserve(settings.reserve_path, settings.reserve_bytes)
        self._reserve_lock = asyncio.Lock()
        self.budget = PendingBudget(
            settings.max_pending_chunks, settings.max_pending_chunks_per_client
        )
        # Streamed uploads opened with a declared file size (tenant mode requires one):
        # what they may still list, and what the tenant's quota holds for them meanwhile.
        self._declared: dict[str, _Declared] = {}
        # Streamed uploads whose merge found the file stored (upload id: digest, size,
        # tenant, ext), so a retried merge answers the same; the last MAX_FILE_HASHES of them.
        self._known: dict[str, tuple[Digest, int, str, str]] = {}
        # A failed whole-file check reads the file's blobs once more (Fsck.heal): one such
        # pass at a time, so clients claiming wrong digests cannot multiply the disk reads.
        self._healing = asyncio.Semaphore(1)
        # One quota-checked write (handshake, streamed open) of a tenant at a time.
        self._quota_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(cls, settings: Settings, clock: Callable[[], float] = time.time) -> Service:
        io = ThreadPoolExecutor(settings.io_workers, thread_name_prefix="casd-io")
        blobs = open_blobstore(settings.blobs, settings.data_dir, settings.s3_endpoint, io)
        await blobs.start()

        def open_it():
            return open_catalog(
                settings.catalog_where,
                synchronous=settings.sqlite_synchronous,
                readers=settings.read_connections,
                bulk_readers=settings.bulk_read_connections,
            )

        try:
            catalog = await open_it()
        except sqlite3.OperationalError as exc:
            # A restart on a full disk cannot make the WAL ("disk I/O error"): use the reserve.
            if not await asyncio.to_thread(Reserve(settings.reserve_path, 0).release):
                raise
            log.warning("%s: released the disk reserve to open the catalogue", exc)
            catalog = await open_it()
        service = cls(settings, catalog, blobs, clock, io)
        try:
            made = await asyncio.to_thread(service.reserve.ensure)
        except OSError as exc:
            log.warning(
                "cannot make the disk reserve %s (%s): running without one",
                settings.reserve_path,
                exc,
            )
            service.reserve = Reserve(settings.reserve_path, 0)
            made = True
        if not made:
            log.warning(
                "the disk is too full for the %d-byte reserve; uploads are refused until"
                " there is room for it",
                settings.reserve_bytes,
            )
        return service

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.catalog.close()
        await self.blobs.close()
        self.io.shutdown(wait=True)
        self.hashing.shutdown(wait=True)

    async def _run(self, fn, *args):
        """Blocking file work on the bounded I/O pool; a full disk becomes StorageFull."""
        with full_disk_refused():
            return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def _expiry(self, now: float) -> float:
        return now + self.settings.upload_ttl

    async def _admit_upload(self) -> None:
        """Uploads go on only while the disk reserve is in place (re-made when there is room).

        Once the reserve was given up for a delete on a full disk, new bytes would eat the
        headroom it left; they wait (507) until deletes and gc made room for it again.
        """
        if self.reserve.size <= 0 or self.reserve.present():
            return
        async with self._reserve_lock:  # one request re-makes it; the others wait for that
            made = await self._run(self.reserve.ensure)
        if not made:
            raise StorageFull(
                "the data folder's disk is nearly full; uploads resume once space is freed"
                " (delete files, then casd gc)"
            )

    async def _freeing(self, fn, *args):
        """A change that frees space (delete, abort): on a full disk, give up the reserve
        and try once more, so that it can still commit."""
        try:
            return await fn(*args)
        except StorageFull:
            if not await asyncio.to_thread(self.reserve.release):
                raise
            log.warning("the disk is full: released the %d-byte reserve", self.reserve.size)
            return await fn(*args)

    # ---- handshake --------------------------------------------------------------------

    def check_manifest(self, m: Manifest) -> None:
        """Limits and arithmetic of a parsed manifest; raises BadRequest or TooLarge."""
        s = self.settings
        if m.size > s.max_file_size:
            raise TooLarge(
                f"the file has {m.size} bytes; this server takes files of at most"
                f" {s.max_file_size} bytes"
            )
        if len(m.chunks) > s.max_chunks:
            raise TooLarge(
                f"the manifest has {len(m.chunks)} chunks; this server takes at most {s.max_chunks}"
            )
        chunks = ChunkList.of(m.chunks)
        self._check_chunks(chunks)
        total = sum(chunks.sizes)
        if total != m.size:
            raise BadRequest(f"the chunk sizes add up to {total}, not to size {m.size}")

    def _check_chunks(self, chunks: ChunkList, first: int = 0) -> None:
        """Each chunk 1 byte to --max-chunk-size, each digest with one size: a handshake's list,
        or a v1.1 batch whose first chunk is chunk `first` of the file. BadRequest/TooLarge."""
        max_size = self.settings.max_chunk_size
        # Over the whole list at once; walked entry by entry only to name what is wrong.
        if chunks.sizes and (min(chunks.sizes) < 1 or max(chunks.sizes) > max_size):
            for i, size in enumerate(chunks.sizes, first):
                if size < 1:
                    raise BadRequest(f"chunk {i} has size {size}; chunks are 1 byte or more")
                if size > max_size:
                    raise TooLarge(
                        f"chunk {i} has size {size}; this server takes chunks of at most"
                        f" {max_size} bytes"
                    )
        if len(set(chunks.hexes)) != len(chunks):  # a digest used twice: one size each time
            sizes: dict[str, int] = {}
            for hex_, size in zip(chunks.hexes, chunks.sizes, strict=True):
                seen = sizes.setdefault(hex_, size)
                if seen != size:
                    raise BadRequest(f"chunk {hex_} appears with sizes {seen} and {size}")

    def check_algo(self, digest: Digest) -> None:
        """Refuse digests the deployment's --algos policy does not accept (MD5 collisions)."""
        allowed = self.settings.algos
        algo = digest.algo
        if algo.value not in allowed:
            raise BadRequest(
                f"this server does not accept {algo.value} uploads (its --algos policy"
                f" allows {', '.join(allowed)}): hash with one of those",
                allowed_algos=list(allowed),
            )

    async def handshake(
        self, m: Manifest, client: str = "", tenant: Tenant | None = None
    ) -> HandshakeResult:
        """`client` names who asks (see web.client_of), for the pending-upload budget;
        `tenant` (tenant mode) whose view it has: complete only for a file it owns, missing
        every chunk it has not proved it holds, held to its quota (QuotaExceeded)."""
        self.check_algo(m.digest)
        self.check_manifest(m)
        existing = await self.catalog.get_file(m.digest, _name(tenant))
        if existing is not None and existing.size == m.size:
            # A file that uses a quarantined chunk is damaged: upload it again to heal it.
            if not await self.catalog.damaged(existing.manifest_id):
                return HandshakeComplete(m.digest, m.size, m.ext)
            if tenant is not None:
                # Healing a file it owns adds nothing to what the tenant holds.
                tenant = dataclasses.replace(tenant, quota=None)
        await self._admit_upload()
        async with self._quota_turn(tenant, m.size) as held:
            now = self.clock()
            upload, missing = await self.catalog.begin_upload(
                m,
                chunks_key(m),
                now,
                self._expiry(now),
                secrets.token_hex(16),
                client,
                self.budget,
                held,
            )
        return HandshakePending(m.digest, m.size, m.ext, upload.id, missing, upload.expires_at)

    # ---- uploads ----------------------------------------------------------------------

    async def _pending(self, upload_id: str, tenant: Tenant | None = None) -> Upload:
        upload = await self.catalog.get_upload(upload_id)
        if (
            upload is None
            or upload.state != UploadState.PENDING
            or upload.expires_at <= self.clock()
            or not _sees(tenant, upload)
        ):
            raise NotFound(
                f"no pending upload {upload_id!r} (never created, merged, aborted or expired)"
            )
        return upload

    async def status(
        self, upload_id: str, tenant: Tenant | None = None
    ) -> tuple[Upload, list[str]]:
        """A pending upload and what it still lacks (for the tenant it belongs to); counts as
        activity on it. In tenant mode another tenant's upload is NotFound, as one that does
        not exist (`tenant` None: every upload is seen)."""
        upload = await self._pending(upload_id, tenant)
        now = self.clock()
        if not await self.catalog.touch_upload(upload_id, now, self._expiry(now)):
            raise NotFound(f"no pending upload {upload_id!r}")
        upload = dataclasses.replace(upload, expires_at=self._expiry(now))
        self._declared_touch(upload_id)
        return upload, await self.catalog.missing(upload.manifest_id, upload.tenant or None)

    # ---- streamed uploads (protocol v1.1) -----------------------------------------------

    async def open_stream(
        self,
        algo: Algo,
        ext: str,
        name: str,
        client: str = "",
        tenant: Tenant | None = None,
        size: int | None = None,
    ) -> Upload:
        """Open a streamed upload: chunk digests come in batches (`add_chunks`), chunks by
        `put_chunk`, the file's digest and size at `merge`, which verifies them.

        `size`: the file's size as the client declares it (required in tenant mode, where
        the tenant's quota is checked against it here, as a handshake's is); the upload may
        then list no more, and merge only for exactly that size."""
        self.check_algo(placeholder(algo))
        if size is not None and size > self.settings.max_file_size:
            raise TooLarge(
                f"the file has {size} bytes; this server takes files of at most"
                f" {self.settings.max_file_size} bytes"
            )
        if tenant is not None and size is None:
            # Not offered without one: 404 is what sends a client (one from before the size
            # was asked for, too) to the v1 handshake, which gives the size.
            raise NotFound(
                'in tenant mode a streamed upload needs the file\'s size ("size") when it'
                " opens; without one, use the v1 handshake"
            )
        await self._admit_upload()
        self._reserved("")  # drops what expired
        async with self._quota_turn(tenant, size) as held:
            now = self.clock()
            expires_at, new_id = self._expiry(now), secrets.token_hex(16)
            upload = await self.catalog.begin_stream(
                algo, ext, name, now, expires_at, new_id, client, held, size, self.budget
            )
            if size is not None:
                self._declared[upload.id] = _Declared(upload.tenant, size, 0, upload.expires_at)
        return upload

    @asynccontextmanager
    async def _quota_turn(self, tenant: Tenant | None, size: int | None):
        """Quota-checked writes of one tenant one at a time, each held to the tenant's quota
        less what its open streamed uploads declared and have not listed yet (the catalogue
        counts what they listed). Yields the tenant to give the catalogue. `size`: the bytes
        of the file the write is for, as its refusal names them."""
        if tenant is None or tenant.quota is None:
            yield tenant
            return
        lock = self._quota_locks.setdefault(tenant.name, asyncio.Lock())
        async with lock:
            reserved = self._reserved(tenant.name)
            try:
                yield dataclasses.replace(tenant, quota=tenant.quota - reserved)
            except QuotaExceeded as exc:
                if not reserved:
                    raise
                usage = int(exc.extra.get("usage", 0)) + reserved
                raise QuotaExceeded(
                    f"tenant {tenant.name!r} has a quota of {tenant.quota} bytes and uses"
                    f" {usage} (in files, pending uploads and the declared sizes of streamed"
                    f" uploads still open); this {size}-byte file would take it over: delete"
                    " files or abort uploads first",
                    quota=tenant.quota,
                    usage=usage,
                ) from None

    def _reserved(self, tenant: str) -> int:
        """Bytes `tenant`'s live streamed uploads declared and have not listed yet."""
        now = self.clock()
        total = 0
        for upload_id, d in list(self._declared.items()):
            if d.expires_at <= now:
                del self._declared[upload_id]
            elif d.tenant == tenant:
                total += max(0, d.size - d.listed)
        return total

    def _declared_touch(self, upload_id: str) -> None:
        d = self._declared.get(upload_id)
        if d is not None:
            d.expires_at = self._expiry(self.clock())

    async def add_chunks(
        self,
        upload_id: str,
        algo: Algo,
        start: int,
        chunks: list[ChunkRef],
        client: str = "",
        tenant: Tenant | None = None,
    ) -> StreamBatch:
        """List the next chunks of an open streamed upload, from position `start`; which of
        them the server lacks (in tenant mode: lacks, or `tenant` never proved it holds).
        The same limits and budgets as a handshake of the whole list."""
        s = self.settings
        if len(chunks) > MAX_STREAM_BATCH:
            raise TooLarge(
                f"the batch lists {len(chunks)} chunks; send at most {MAX_STREAM_BATCH} at a time"
            )
        self._check_chunks(ChunkList.of(chunks), start)
        upload = await self._pending(upload_id, tenant)
        if upload.sealed:
            raise NotFound(f"upload {upload_id} is not streamed, or is being merged")
        declared = self._declared.get(upload_id)
        if declared is None and tenant is not None:
            # Its declared size (which the quota holds it to) was lost with a restart.
            raise NotFound(f"streamed upload {upload_id} was lost: open a new one")
        if declared is not None and declared.listed + sum(c.size for c in chunks) > declared.size:
            raise TooLarge(
                f"the batch takes upload {upload_id} over the {declared.size} bytes declared"
                " when it was opened; nothing was changed"
            )
        if algo is not upload.digest.algo:
            raise BadRequest(
                f"upload {upload_id} uses {upload.digest.algo.value} digests, not {algo.value}"
            )
        now = self.clock()
        limits = StreamLimits(s.max_chunks, s.max_file_size)
        # In tenant mode: missing unless stored and proved by this tenant; a size clash told
        # only about chunks it proved.
        batch = await self.catalog.append_stream(
            upload_id, start, chunks, now, self._expiry(now), limits, client, self.budget, tenant
        )
        if batch is None:
            raise NotFound(f"no open streamed upload {upload_id!r} (merged, aborted or expired)")
        if declared is not None:
            declared.listed = batch.size
            declared.expires_at = self._expiry(now)
        return batch

    async def put_chunk(
        self,
        upload_id: str,
        digest: Digest,
        body: AsyncIterator[bytes],
        content_length: int | None,
        with_missing: bool = True,
        tenant: Tenant | None = None,
    ) -> PutResult:
        """Receive one chunk's bytes: verify while streaming, store once, say what is left
        (unless `with_missing` is off: for huge manifests that list is the dominant cost).

        In tenant mode the verified bytes also prove that `tenant` holds the chunk, and
        `stored` says whether the chunk is new *to this tenant*: whether another tenant
        stored it first is not this tenant's to learn."""
        self.check_algo(digest)
        upload = await self._pending(upload_id, tenant)
        if digest.algo is not upload.digest.algo:
            raise BadRequest(
                f"upload {upload_id} uses {upload.digest.algo.value} digests, not {digest.algo.value}"
            )
        size = await self.catalog.manifest_size_of(upload.manifest_id, digest)
        if size is None:
            raise NotInManifest(f"chunk {digest.hex} is not part of upload {upload_id}")
        limit = self.settings.max_chunk_size
        if content_length is not None:
            if content_length > limit:
                raise TooLarge(f"the body has {content_length} bytes; chunks are at most {limit}")
            if content_length != size:
                raise SizeMismatch(
                    f"the body has {content_length} bytes; the manifest gives chunk"
                    f" {digest.hex} {size} bytes"
                )
        if await self.catalog.has_chunk(digest):
            stored = await self._receive(upload_id, digest, size, body, check_stored=True)
        else:
            await self._admit_upload()
            follow = await self._follow_in_order(upload, digest)
            try:
                stored = await self._receive(upload_id, digest, size, body, follow=follow)
            finally:
                if follow is not None:
                    follow.state.lock.release()
        if tenant is not None:
            proved = await self.catalog.prove_chunk(tenant.name, digest)
            stored = stored or proved
        self._start_hash_ahead(upload)
        self._declared_touch(upload_id)
        if not with_missing:
            return PutResult(stored, None)
        return PutResult(stored, await self.catalog.missing(upload.manifest_id, _name(tenant)))

    async def _receive(
        self,
        upload_id: str,
        digest: Digest,
        size: int,
        body: AsyncIterator[bytes],
        check_stored: bool = False,
        follow: _InOrder | None = None,
    ) -> bool:
        """Verify and store a chunk; True when its bytes were written into the store.

        `follow`: the chunk is the next one the upload's whole-file hash needs; its bytes are
        fed to a copy of that hash as they stream in, and the copy replaces the hash once
        the chunk is verified and stored, so hash-ahead and merge need not read it back.

        `check_stored`: the catalogue says the chunk is stored already. The bytes are still
        verified; when the stored blob's size or xxh3-128 differs from theirs (it rotted or
        was damaged), they replace it, otherwise they are dropped.
        """
        temp = await self._run(self.blobs.new_temp)
        published = False
        try:
            # A new chunk is fsynced by the worker that writes its last block, once its digest
            # checks; a stored one's bytes may only be compared, and need no fsync.
            hasher, finished = await self._ingest(
                temp, body, size, digest, not check_stored, follow.hash if follow else None
            )
            xxh3 = hasher.xxh3()
            if check_stored:
                if await self._stored_is_sound(digest, size, xxh3):
                    now = self.clock()
                    await self.catalog.touch_upload(upload_id, now, self._expiry(now))
                    return False
                locked = self.blobs.replace
            else:
                locked = self.blobs.ensure_stored
            if not finished:
                await self._run(temp.finish)
            if not check_stored:
                # Store the bytes here, in parallel with other uploads (link and fsync, or a
                # PUT the store acknowledges); under the digest lock the catalogue then only
                # checks that the blob is still there.
                with full_disk_refused():
                    await self.blobs.publish(temp, digest)
            now = self.clock()

            async def place(d: Digest) -> None:
                await locked(temp, d)

            with full_disk_refused():
                published = await self.catalog.publish_chunk(
                    digest,
                    size,
                    xxh3,
                    now,
                    place,
                    (upload_id, self._expiry(now)),
                    replace=check_stored,
                )
            if follow is not None:
                follow.advance(size)
            return published
        finally:
            # The blob path is its own link: dropping the temp name (and the flock that told
            # gc and fsck this inode is in flight) leaves the blob.
            await asyncio.shield(self._run(temp.discard))

    async def _stored_is_sound(self, digest: Digest, size: int, xxh3: str) -> bool:
        """Whether the stored blob of a chunk just received again holds the bytes verified
        now (size and xxh3-128); when not, the caller replaces it with them."""
        if await blob_matches(self.blobs, digest, size, xxh3, self.io):
            return True
        log.warning(
            "chunk %s: the stored blob's bytes are wrong; replacing them with"
            " the verified ones just received",
            digest.hex,
        )
        return False

    async def _ingest(
        self,
        temp: TempBlob,
        body: AsyncIterator[bytes],
        size: int,
        digest: Digest,
        durable: bool = False,
        also=None,
    ) -> tuple[ChunkHasher, bool]:
        """Stream the body into `temp`, hashing in a worker thread while the next block arrives.

        With `durable`, the worker that writes the last block also fsyncs `temp` once the
        bytes hash to `digest` (a chunk of one block costs one thread hop, not two); the bool
        says whether it did. `also`: a hash object fed the same bytes in the same worker.
        `body` must yield buffers it does not reuse: they are held until their block is
        written."""
        hasher = ChunkHasher(digest.algo)
        limit = self.settings.max_chunk_size
        received = 0
        # The body's pieces as aiohttp handed them over, kept as they are: the worker hashes
        # each and writes them all with one writev, so no byte is copied on the event loop.
        pieces: list[bytes] = []
        held = 0
        pending: asyncio.Future | None = None
        loop = asyncio.get_running_loop()

        finished = False

        def absorb(block: list[bytes], last: bool) -> None:
            nonlocal finished
            for piece in block:
                hasher.update(piece)
            if also is not None:
                for piece in block:
                    also.update(piece)
            temp.write(block)
            if last and durable and hasher.size == size and hasher.digest() == digest:
                temp.finish()
                finished = True

        try:
            with full_disk_refused():
                async for piece in body:
                    received += len(piece)
                    if received > limit:
                        raise TooLarge(f"the body is over the chunk limit of {limit} bytes")
                    if received > size:
                        raise SizeMismatch(
                            f"the body is longer than the {size} bytes the manifest gives"
                            f" chunk {digest.hex}"
                        )
                    pieces.append(piece)
                    held += len(piece)
                    if len(pieces) >= MAX_PIECES:
                        # A client sending tiny pieces: join them, so a block stays a few
                        # buffers (writev takes at most IOV_MAX, and each object costs memory).
                        pieces = [b"".join(pieces)]
                    if held >= INGEST_BLOCK:
                        if pending is not None:
                            await pending
                        pending = loop.run_in_executor(self.io, absorb, pieces, received == size)
                        pieces, held = [], 0
                if pending is not None:
                    await pending
                    pending = None
                if pieces:
                    await self._run(absorb, pieces, True)
        finally:
            if pending is not None:
                # The worker still writes into temp; let it finish before temp is discarded.
                await asyncio.wait([pending])
        if received != size:
            raise SizeMismatch(
                f"the body has {received} bytes; the manifest gives chunk {digest.hex} {size} bytes"
            )
        actual = hasher.digest()
        if actual != digest:
            raise DigestMismatch(
                f"the body hashes to {actual.hex}, not to {digest.hex}; nothing was stored"
            )
        return hasher, finished

    async def merge(
        self,
        upload_id: str,
        events: HookEvents | None = None,
        claim: tuple[Digest, int] | None = None,
        tenant: Tenant | None = None,
    ) -> tuple[FileEntry, bool]:
        """Verify the whole file's digest over its chunks and register it; idempotent. Also
        says whether the file was stored before (instant: a streamed upload's merge only).
        `events` commit with the registration (see Catalog.register_file). In tenant mode
        the file becomes `tenant`'s (another tenant's upload is NotFound).

        `claim` is the file's (digest, size) as a streamed upload's client gives it at
        merge: it seals the upload first (BadRequest when a streamed upload has none). On
        an upload that has its digest already, a claim must be that digest and size."""
        # One read decides: another client merging the same upload may flip it to merged.
        upload = await self.catalog.get_upload(upload_id)
        if upload is not None and not _sees(tenant, upload):
            upload = None
        known = self._known.get(upload_id) if upload is None else None
        if (
            known is not None
            and known[2] == (_name(tenant) or "")
            and (claim is None or claim == known[:2])
        ):
            # Answered at once before (the file was stored): a retry gets the same answer.
            entry = await self.catalog.get_file(known[0], known[2] or None)
            if entry is not None:
                return dataclasses.replace(entry, ext=known[3]), True
        if upload is None or (
            upload.state != UploadState.MERGED and upload.expires_at <= self.clock()
        ):
            raise NotFound(f"no pending upload {upload_id!r} (never created, aborted or expired)")
        if not upload.sealed:
            declared = self._declared.get(upload_id)
            if declared is None and upload.tenant:
                raise NotFound(f"streamed upload {upload_id} was lost: open a new one")
            if declared is not None and claim is not None and claim[1] != declared.size:
                raise BadRequest(
                    f"upload {upload_id} was opened for a file of {declared.size} bytes, not"
                    f" {claim[1]}; nothing was changed"
                )
            upload = await self._seal(upload, claim)
            if upload.state != UploadState.MERGED:
                stored = await self._known_file(upload)
                if stored is not None:
                    return stored, True
        elif claim is not None and claim != (upload.digest, upload.size):
            raise BadRequest(
                f"upload {upload_id} is for {upload.digest.hex} ({upload.size} bytes), not for"
                f" {claim[0].hex} ({claim[1]} bytes)"
            )
        if upload.state == UploadState.MERGED:
            return await self._merged_file(upload), False
        missing = await self.catalog.missing(upload.manifest_id, upload.tenant or None)
        if missing:
            raise Incomplete(f"{len(missing)} chunk(s) are still missing", missing)
        try:
            hashed: tuple[Digest, int] | None = (
                await self._hash_file(upload, all_present=True)
            ).result()
        except BlobMissing:
            hashed = None  # a blob is gone: the check below finds which
        finally:
            self._forget_hash(upload_id)
        if hashed != (upload.digest, upload.size):
            async with self._healing:
                fsck = Fsck(self.settings, self.catalog, self.blobs, self.clock)
                healed = await fsck.heal(upload.manifest_id)
            if healed:
                # Bytes the store held went bad (or missing) since they were verified: they
                # are set aside, and the client sends them again (as after fsck --repair).
                log.warning(
                    "upload %s: merge found stored chunk(s) damaged and set them aside: %s",
                    upload_id,
                    ", ".join(healed),
                )
                missing = await self.catalog.missing(upload.manifest_id, upload.tenant or None)
                raise Incomplete(
                    f"{len(healed)} chunk(s) the server held were damaged and were set aside;"
                    " send them again",
                    missing,
                )
            if hashed is None:
                # A blob went away between the check and the read (an operator's hand): the
                # next merge finds out which.
                raise Unavailable("a chunk's stored bytes could not be read; merge again")
            actual, total = hashed
            self._declared.pop(upload_id, None)
            if not await self.catalog.drop_pending_upload(upload_id):
                # Aborted or merged while this merge hashed: its manifest may have gone with
                # it, so this hash proves nothing. Answer what the upload became.
                return await self._settled(upload_id), False
            # The real digest stays in the log: it says something about chunks this client
            # may never have sent (it skipped those the server already held).
            log.debug(
                "upload %s: chunks assemble to %d bytes hashing to %s, claimed %s",
                upload_id,
                total,
                actual.hex,
                upload.digest.hex,
            )
            raise FileDigestMismatch(
                f"the chunks, in manifest order, do not hash to the claimed"
                f" {upload.digest.hex} ({upload.size} bytes); the upload was discarded"
            )
        entry = await self.catalog.register_file(upload_id, self.clock(), events)
        self._declared.pop(upload_id, None)
        if entry is None:
            raise NotFound(f"no pending upload {upload_id!r} (aborted or expired)")
        return entry, False

    async def _known_file(self, upload: Upload) -> FileEntry | None:
        """A streamed upload whose claimed file is stored (and, in tenant mode, its tenant's)
        is done: the answer a v1 handshake gives on the same claim, so nothing is hashed
        again. The upload is forgotten; a merge repeated after that answers the same."""
        existing = await self.catalog.get_file(upload.digest, upload.tenant or None)
        if existing is None or existing.size != upload.size:
            return None
        if await self.catalog.damaged(existing.manifest_id):
            return None  # verified and registered anew: the upload's chunks heal it
        self._forget_hash(upload.id)
        self._declared.pop(upload.id, None)
        await self.catalog.drop_pending_upload(upload.id)
        self._known[upload.id] = (upload.digest, upload.size, upload.tenant, upload.ext)
        while len(self._known) > MAX_FILE_HASHES:
            self._known.pop(next(iter(self._known)))
        return dataclasses.replace(existing, ext=upload.ext)

    async def _seal(self, upload: Upload, claim: tuple[Digest, int] | None) -> Upload:
        """A streamed upload given the digest and size its client claims (to be verified)."""
        if claim is None:
            raise BadRequest(
                f"upload {upload.id} is streamed: merge it with the file's"
                f" {upload.digest.algo.value} and size in a JSON body"
            )
        digest, size = claim
        sealed = await self.catalog.seal_stream(upload.id, digest, size, "stream:" + upload.id)
        if sealed is None:
            # Merged, aborted or expired since it was read: answer what it became.
            return await self._settled_upload(upload.id)
        if (sealed.digest, sealed.size) != claim:
            raise BadRequest(
                f"upload {upload.id} was merged for {sealed.digest.hex} ({sealed.size} bytes),"
                f" not for {digest.hex} ({size} bytes)"
            )
        return sealed

    async def _settled_upload(self, upload_id: str) -> Upload:
        upload = await self.catalog.get_upload(upload_id)
        if upload is not None and upload.state == UploadState.MERGED:
            return upload
        raise NotFound(f"no pending upload {upload_id!r} (never created, aborted or expired)")

    async def _settled(self, upload_id: str) -> FileEntry:
        """The answer for an upload that stopped being pending under a merge's feet."""
        upload = await self.catalog.get_upload(upload_id)
        if upload is not None and upload.state == UploadState.MERGED:
            return await self._merged_file(upload)
        raise NotFound(f"no pending upload {upload_id!r} (never created, aborted or expired)")

    async def _merged_file(self, upload: Upload) -> FileEntry:
        entry = await self.catalog.get_file(upload.digest, upload.tenant or None)
        if entry is None:
            raise NotFound(f"upload {upload.id} was merged, but its file has been deleted")
        return entry

    def _file_hash(self, upload: Upload) -> FileHash:
        """The upload's hash state, a fresh one if it has none or its last was cut short."""
        state = self._file_hashes.get(upload.id)
        if state is None or state.broken:
            state = self._file_hashes[upload.id] = FileHash(
                upload.digest, upload.manifest_id, not upload.sealed
            )
            while len(self._file_hashes) > MAX_FILE_HASHES:
                _, evicted = self._file_hashes.popitem(last=False)
                if evicted.ahead is not None:
                    evicted.ahead.cancel()
        elif upload.sealed:
            state.open_ended = False
        self._file_hashes.move_to_end(upload.id)
        return state

    def _forget_hash(self, upload_id: str) -> None:
        state = self._file_hashes.pop(upload_id, None)
        if state is not None and state.ahead is not None:
            state.ahead.cancel()

    async def _follow_in_order(self, upload: Upload, digest: Digest) -> _InOrder | None:
        """When `digest` is the chunk the upload's whole-file hash needs next and nothing
        hashes it now, that hash's lock (held: the caller releases it) and a copy to feed;
        else None, and hash-ahead reads the chunk back once it is stored."""
        state = self._file_hash(upload)
        if state.broken or state.done or state.merging or state.offset or state.lock.locked():
            return None
        at = state.next
        page = await self.catalog.manifest_page(upload.manifest_id, at, 1)
        if not page or page[0][0] != digest.hex:
            return None
        if (
            self._file_hashes.get(upload.id) is not state
            or state.lock.locked()
            or state.broken
            or state.merging
            or state.next != at
            or state.offset
        ):
            return None  # it moved while the manifest was read
        await state.lock.acquire()  # free (checked above, no await since): at once
        return _InOrder(state)

    def _start_hash_ahead(self, upload: Upload) -> None:
        """Have the upload's one background hash-ahead look at its chunks (again)."""
        state = self._file_hash(upload)
        if state.ahead is not None and not state.ahead.done():
            state.again = True
            return
        task = asyncio.create_task(self._hash_ahead(upload, state))
        state.ahead = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hash_ahead(self, upload: Upload, state: FileHash) -> None:
        """The background task: hash what is stored after the prefix, again while PUTs come."""
        try:
            while not state.broken:
                state.again = False
                if await self._next_is_stored(state):
                    await self._hash_file(upload, all_present=False, state=state)
                # No await between this test and the task's end: a PUT that comes later
                # finds the task done and starts a new one.
                if not state.again or state.done or state.merging:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Merge hashes again from the start; nothing a client sees depends on this.
            log.warning("hash-ahead of upload %s stopped: %s", upload.id, exc)

    async def _next_is_stored(self, state: FileHash) -> bool:
        """Whether the chunk the hash needs next is stored, looked up without the lock.

        Hash-ahead takes the lock only when it has something to hash: a PUT of that very
        chunk arriving meanwhile then finds the lock free and feeds the hash as it streams
        in, instead of leaving the chunk to be read back. A stale answer costs one look.
        """
        if state.done or state.merging:
            return False
        page = await self.catalog.manifest_page(state.manifest_id, state.next, 1)
        if not page:
            return not state.open_ended  # the end of a sealed list: mark the hash done
        return bool(await self.catalog.present_chunks({page[0][0]}))

    async def _hash_file(
        self, upload: Upload, all_present: bool, state: FileHash | None = None
    ) -> FileHash:
        """Extend the upload's whole-file hash: over every chunk (merge, which has checked
        they are all present), or over those stored right after the prefix (hash-ahead).

        A stored chunk stays stored while the upload is live (gc never collects what a live
        upload references), so what is hashed once need not be looked at again.
        """
        while True:
            if state is None or state.broken:
                state = self._file_hash(upload)
            if all_present:
                state.merging = True
            async with state.lock:
                if state.broken:
                    continue  # cut short while this waited: start over on a fresh state
                try:
                    await self._extend(state, all_present)
                except BaseException:
                    state.broken = True
                    if self._file_hashes.get(upload.id) is state:
                        del self._file_hashes[upload.id]
                    raise
                return state

    async def _extend(self, state: FileHash, all_present: bool) -> None:
        """Called with state.lock held."""
        while not state.done:
            # Read before the page: a merge may seal the list while this hashes it, and the
            # entries listed after the page was read are not in it.
            open_ended = state.open_ended
            page = await self.catalog.manifest_page(state.manifest_id, state.next, MANIFEST_PAGE)
            ready = page
            if not all_present and page:
                present = await self.catalog.present_chunks({h for h, _ in page})
                for n, (hex_, _size) in enumerate(page):
                    if hex_ not in present:
                        ready = page[:n]
                        break
            i = 0
            while i < len(ready):
                if not all_present and state.merging:
                    return
                i = await self._hash_turn(state, ready, i, background=not all_present)
            if len(ready) < len(page):
                return  # stopped at a chunk not stored yet
            if len(page) < MANIFEST_PAGE:
                if open_ended and not all_present:
                    return  # more digests may come (or came): the next PUT or merge looks
                state.done = True

    async def _hash_turn(
        self, state: FileHash, page: list[tuple[str, int]], i: int, background: bool
    ) -> int:
        if not background:
            return await self._hash_slice(state, page, i)
        async with self._ahead_turns:
            return await self._hash_slice(state, page, i)

    async def _hash_slice(self, state: FileHash, page: list[tuple[str, int]], i: int) -> int:
        """Hash at most HASH_SLICE bytes from page[i] (at state.offset); the next index.

        The bytes come from the blob store (a local file, or ranged reads of objects a
        daemon that received none of the chunks never saw) and are hashed on the hash pool,
        a piece at a time.
        """

        def absorb(piece: bytes) -> None:
            state.hash.update(piece)
            state.total += len(piece)

        run: list[tuple[str, int, int]] = []
        budget, j, offset = HASH_SLICE, i, state.offset
        while j < len(page) and budget > 0:
            hex_, size = page[j]
            n = min(budget, size - offset)
            run.append((hex_, offset, n))
            budget -= n
            offset = 0
            j += 1
        got = await self.blobs.feed_run(state.algo, run, absorb, self.hashing)
        for (_hex, _start, n), fed in zip(run, got, strict=True):
            size = page[i][1]
            if fed < n:
                # A damaged blob: what it holds is hashed, and the file's digest or size
                # then fails to match, as it should.
                state.offset = size
            else:
                state.offset += n
            if state.offset == size:
                state.next += 1
                state.offset = 0
                i += 1
        return i

    async def abort(self, upload_id: str, tenant: Tenant | None = None) -> None:
        """Forget a pending upload; NotFound once it is merged (a merge that won stays won),
        and in tenant mode for another tenant's upload."""
        if tenant is not None:
            # An upload's tenant never changes, so checking it first leaves no race.
            upload = await self.catalog.get_upload(upload_id)
            if upload is None or not _sees(tenant, upload):
                raise NotFound(f"no pending upload {upload_id!r}")
        if not await self._freeing(self.catalog.drop_pending_upload, upload_id):
            raise NotFound(f"no pending upload {upload_id!r}")
        self._forget_hash(upload_id)
        self._declared.pop(upload_id, None)

    # ---- files ------------------------------------------------------------------------

    # In tenant mode `reader` names the tenant whose files a read may see (None: every file,
    # for an admin and without tenants). A file it does not own is NotFound through the same
    # path, with the same message, as a file that does not exist.

    async def get_file(self, digest: Digest, reader: str | None = None) -> FileEntry:
        """A complete file's catalogue entry (no chunk list: for answers without a body)."""
        entry = await self.catalog.get_file(digest, reader)
        if entry is None:
            raise NotFound(f"no file {digest.hex}")
        return entry

    async def open_file(self, digest: Digest, reader: str | None = None) -> FileEntry:
        """A complete file that can be served whole (NotFound as for get_file; Unavailable
        when it uses a chunk set aside)."""
        entry = await self.get_file(digest, reader)
        if await self.catalog.damaged(entry.manifest_id):
            raise Unavailable(
                f"file {entry.digest.hex} uses a chunk that failed a check and was set aside;"
                " uploading the file again repairs it"
            )
        return entry

    async def read_plan(
        self, entry: FileEntry, start: int, length: int, reader: str | None = None
    ) -> AsyncGenerator[ReadSegment, None]:
        """The blob slices that make bytes [start, start+length) of a file, in order.

        The manifest is read DOWNLOAD_PAGE chunks at a time as the download goes: a file may
        list a million chunks, and holding its whole list (about 170 bytes a chunk) in every
        download would let a few dozen downloads of one small file exhaust the daemon's
        memory. A manifest never changes and its id is never reused. When it comes up short
        (the file was deleted and its manifest dropped meanwhile), the file is looked up
        again for `reader`: any manifest registered for the digest holds the same bytes, so
        the plan goes on from where it was; with no such file left it is NotFound (before
        the status line a 404; after it, the body is cut off).
        """
        stop = start + length
        pos = start
        for _ in range(READ_PLAN_TRIES):
            chunk_start, index = 0, 0
            while pos < stop:
                page = await self.catalog.manifest_page(entry.manifest_id, index, DOWNLOAD_PAGE)
                if not page:
                    break
                index += len(page)
                for hex_, size in page:
                    chunk_end = chunk_start + size
                    if chunk_end > pos:
                        offset = pos - chunk_start
                        n = min(size - offset, stop - pos)
                        yield ReadSegment(Digest(entry.digest.algo, hex_), offset, n)
                        pos += n
                        if pos >= stop:
                            return
                    chunk_start = chunk_end
            if pos >= stop:
                return
            again = await self.open_file(entry.digest, reader)
            if again.manifest_id == entry.manifest_id or again.size != entry.size:
                # Cannot happen for a healthy catalogue; refuse rather than serve bytes that
                # do not add up to what the ETag names.
                raise RuntimeError(
                    f"file {entry.digest.hex}: its manifest {entry.manifest_id} ends at byte"
                    f" {chunk_start}, not at {entry.size}"
                )
            entry = again
        raise NotFound(f"no file {entry.digest.hex}")

    async def open_segment(self, segment: ReadSegment) -> BlobReader:
        """An open reader of the segment's blob; the caller closes it. A blob the catalogue
        names but the store lacks (a damaged store) is Unavailable; a store that does not
        answer is StoreUnavailable."""
        try:
            return await self.blobs.open(segment.digest)
        except BlobMissing:
            raise Unavailable(
                f"chunk {segment.digest.hex} is missing from the blob store (casd fsck tells"
                " more; uploading the file again repairs it)"
            ) from None

    async def file_manifest(
        self, digest: Digest, reader: str | None = None
    ) -> tuple[FileEntry, int]:
        """The file and how many chunks its manifest lists; NotFound as for get_file."""
        entry = await self.get_file(digest, reader)
        count = await self.catalog.manifest_chunk_count(entry.manifest_id)
        if count is None:
            raise NotFound(f"no file {digest.hex}")
        return entry, count

    async def manifest_pages(
        self, entry: FileEntry, count: int, page: int
    ) -> AsyncIterator[list[tuple[str, int, int, str | None]]]:
        """(digest hex, size, offset, xxh3 or None) of every chunk of a file, `page` at a time,
        in order (xxh3 as Catalog.file_chunks_page says).

        Each page is its own read, so a slow reader holds no snapshot open. If the file is
        deleted meanwhile, its rows vanish: a manifest that comes up short of `count` chunks
        or of the file's size raises NotFound after the last page it got.
        """
        offset, seen = 0, 0
        while True:
            rows = await self.catalog.file_chunks_page(entry.manifest_id, seen, page)
            if not rows:
                break
            out = []
            for hex_, size, xxh3 in rows:
                out.append((hex_, size, offset, xxh3))
                offset += size
            seen += len(rows)
            yield out
            if len(rows) < page:
                break
        if seen != count or offset != entry.size:
            raise NotFound(f"file {entry.digest.hex} was deleted while its manifest was read")

    async def delete_file(
        self, digest: Digest, events: HookEvents | None = None, reader: str | None = None
    ) -> None:
        """Forget a complete file; `events` commit with it (see Catalog.delete_file). With
        `reader`, only that tenant's ownership: the file stays while another owns it."""
        if not await self._freeing(self.catalog.delete_file, digest, events, reader):
            raise NotFound(f"no file {digest.hex}")

    async def list_files(self, reader: str | None, after: str, limit: int) -> list[FileEntry]:
        """At most `limit` complete files whose digest sorts after `after`, in digest order:
        those tenant `reader` owns, under its names (None: every file)."""
        return await self.catalog.files_page(reader, after, limit)

    async def health(self) -> None:
        """Raises when the catalogue cannot be read, the data folder cannot be written or
        the blob store does not answer."""
        await self.catalog.ping()
        await self._run(self.blobs.check_writable)
        await self.blobs.ping()

    # ---- one-request uploads (protocol v1.1) ----------------------------------------------

    async def put_file(
        self,
        m: Manifest,
        body: AsyncIterator[bytes],
        tenant: Tenant | None = None,
        events: HookEvents | None = None,
    ) -> tuple[FileEntry, bool]:
        """A file of at most one chunk in one request (`PUT /v1/files/{digest}`): its bytes
        verified as a chunk PUT's are, then chunk, manifest and file recorded together.

        `m` is the handshake this request stands for (digest, size, ext, name, and the one
        chunk, which for a one-chunk file has the file's digest). Returns the file as merge
        answers it and whether this request completed it (False: it was complete already,
        the body was not read: a tenant only learns that of a file it owns)."""
        self.check_algo(m.digest)
        self.check_manifest(m)
        existing = await self.catalog.get_file(m.digest, _name(tenant))
        if existing is not None and existing.size == m.size:
            if not await self.catalog.damaged(existing.manifest_id):
                return dataclasses.replace(existing, ext=m.ext), False
            if tenant is not None:
                # Healing a file it owns adds nothing to what the tenant holds.
                tenant = dataclasses.replace(tenant, quota=None)
        await self._admit_upload()
        if not m.chunks:
            await self._empty_body(body, m.digest)
            return await self._store_file(m, "", None, False, tenant, events), True
        digest, size = m.digest, m.size
        check_stored = await self.catalog.has_chunk(digest)
        # Stored before the transaction, in parallel with other uploads; held to a quota, the
        # blob is placed only once the quota check in the catalogue's transaction passed.
        publish = not check_stored and (tenant is None or tenant.quota is None)
        published = False
        if size <= INGEST_BLOCK:
            # A small body is received whole, then hashed, checked, written, fsynced (and in
            # a local store linked in place) by one worker: one thread hop, not four.
            at_once = publish and isinstance(self.blobs, LocalBlobStore)
            temp, hasher = await self._take_small(body, digest, size, not check_stored, at_once)
            finished, published = not check_stored, at_once
        else:
            temp = await self._run(self.blobs.new_temp)
        try:
            if size > INGEST_BLOCK:
                hasher, finished = await self._ingest(temp, body, size, digest, not check_stored)
            xxh3 = hasher.xxh3()
            replace = check_stored and not await self._stored_is_sound(digest, size, xxh3)
            if not finished:
                await self._run(temp.finish)
            if publish and not published:
                with full_disk_refused():
                    await self.blobs.publish(temp, digest)
            return await self._store_file(m, xxh3, temp, replace, tenant, events), True
        finally:
            await asyncio.shield(self._run(temp.discard))

    async def _take_small(
        self,
        body: AsyncIterator[bytes],
        digest: Digest,
        size: int,
        durable: bool,
        place: bool = False,
    ) -> tuple[TempBlob, ChunkHasher]:
        """Receive a body of at most INGEST_BLOCK bytes whole, then in one worker: hash it,
        and only when it is `size` bytes hashing to `digest`, write it to a new temp file
        (fsynced when `durable`; with `place`, also linked into the local blob store and its
        folders fsynced, as `publish` does). The caller discards the temp file."""
        pieces: list[bytes] = []
        received = 0
        async for piece in body:
            received += len(piece)
            if received > size:
                raise SizeMismatch(
                    f"the body is longer than the {size} bytes the request gives file {digest.hex}"
                )
            pieces.append(piece)
        if received != size:
            raise SizeMismatch(
                f"the body has {received} bytes; the request gives file {digest.hex} {size} bytes"
            )

        def work() -> tuple[TempBlob | None, ChunkHasher]:
            hasher = ChunkHasher(digest.algo)
            for piece in pieces:
                hasher.update(piece)
            if hasher.digest() != digest:
                return None, hasher
            temp = self.blobs.new_temp()
            try:
                temp.write(pieces)
                if durable:
                    temp.finish()
                if place:
                    assert isinstance(self.blobs, LocalBlobStore)
                    self.blobs.place(temp, digest)
            except BaseException:
                temp.discard()
                raise
            return temp, hasher

        temp, hasher = await self._run(work)
        if temp is None:
            raise DigestMismatch(
                f"the body hashes to {hasher.digest().hex}, not to {digest.hex}; nothing was stored"
            )
        return temp, hasher

    async def _empty_body(self, body: AsyncIterator[bytes], digest: Digest) -> None:
        async for piece in body:
            if piece:
                raise SizeMismatch("the body is longer than the 0 bytes the request gives")
        actual = Digest(digest.algo, digest.algo.new().hexdigest())
        if actual != digest:
            raise DigestMismatch(
                f"the body hashes to {actual.hex}, not to {digest.hex}; nothing was stored"
            )

    async def _store_file(
        self,
        m: Manifest,
        xxh3: str,
        temp: TempBlob | None,
        replace: bool,
        tenant: Tenant | None,
        events: HookEvents | None,
    ) -> FileEntry:
        async def place(d: Digest) -> None:
            if temp is None:
                return
            if replace:
                await self.blobs.replace(temp, d)
            else:
                await self.blobs.ensure_stored(temp, d)

        # Its quota check takes turns with the tenant's handshakes and streamed opens, and
        # counts what open streamed uploads declared and have not listed yet.
        async with self._quota_turn(tenant, m.size) as held:
            now = self.clock()
            with full_disk_refused():
                entry, _stored = await self.catalog.store_file(
                    m,
                    chunks_key(m),
                    xxh3,
                    now,
                    place,
                    replace,
                    held,
                    events,
                    self._expiry(now),
                    secrets.token_hex(16),
                )
        if entry is None:
            raise NotFound(f"file {m.digest.hex} was deleted while it was stored")
        return entry
