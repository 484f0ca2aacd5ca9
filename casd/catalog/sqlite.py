"""The SQLite catalogue engine (the embedded default): the catalogue of casd/catalog in one file.

Every write, the daemon's, the admin commands' and the migrations', goes through one
connection on one thread (GroupWriter), one transaction at a time, each `BEGIN IMMEDIATE` so
that it takes SQLite's write lock up front. That lock is this engine's digest lock: it locks
every digest at once, and it is also what serializes the daemon against `casd gc` running as
another process on the same data folder. Reads run on pools of
their own connections (WAL lets them run beside a writer): a quick lane for lookups by key,
and a bulk lane for the long lists of huge manifests, so that a client polling a
500,000-chunk upload never queues another client's handshake or health check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.resources
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import msgspec

from casd.catalog import (
    DELETING,
    LIVE,
    QUARANTINED,
    UNSEALED_KEY,
    ChunkRow,
    ChunkUsers,
    HookEvents,
    Locked,
    TenantUsage,
    WriteStats,
    check_seal,
    check_stream_batch,
    opened_stream,
    packed,
    placeholder,
    usage_table,
)
from casd.digest import Algo, Digest
from casd.errors import (
    BadRequest,
    FileDigestMismatch,
    Incomplete,
    QuotaExceeded,
    StorageFull,
    TooLarge,
    TooManyPending,
)
from casd.models import (
    ChunkList,
    ChunkRef,
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

# Enough to wait out a gc transaction on a busy disk; SQLite retries inside this budget.
BUSY_TIMEOUT_MS = 60_000
# A manifest with more entries than this has its chunk lists read on the bulk lane.
BULK_ENTRIES = 4096
# Quick reads (lookups by key, tens of microseconds each) one thread hop may carry together.
# The bulk lane's long lists go one by one, each on its own connection.
QUICK_BATCH = 64

_UPLOAD_COLUMNS = (
    "u.id, u.manifest_id, m.algo, m.digest, m.size, u.ext, u.name, u.state, u.expires_at,"
    " m.chunks_key, u.tenant"
)
_FILE_COLUMNS = "f.algo, f.digest, f.size, f.ext, f.name, f.created, f.manifest_id"
# A file as one tenant sees it: the shared row, under the name and ext that tenant gave it.
_TENANT_FILE = (
    "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id FROM files f"
    " JOIN tenant_files t ON t.digest = f.digest AND t.tenant = ?"
    " WHERE f.digest = ? AND f.algo = ?"
)


# The chunks of a file's manifest, read only while the file row still names that manifest:
# one statement, so the check and the list come from one snapshot. A manifest's chunk list
# never changes and its id is never given to another, so (file row, this list) is what one
# snapshot of both would have given.
_CHUNKS_OF_FILE = (
    "SELECT p.start, p.digests, p.sizes FROM files f"
    " JOIN manifest_parts p ON p.manifest_id = f.manifest_id"
    " WHERE f.digest = ? AND f.algo = ? AND f.manifest_id = ? ORDER BY p.start"
)
# The parts of a manifest's list that hold positions ?2 .. ?3 - 1.
_PARTS_OF_PAGE = (
    "SELECT start, digests, sizes FROM manifest_parts WHERE manifest_id = ?1 AND start < ?3"
    " AND start >= coalesce((SELECT max(start) FROM manifest_parts"
    " WHERE manifest_id = ?1 AND start <= ?2), 0) ORDER BY start"
)
# How often a download re-reads a file that is deleted and uploaded again under its feet.
_FILE_READ_TRIES = 3


def _upload(row) -> Upload:
    uid, manifest_id, algo, digest, size, ext, name, state, expires_at, key, tenant = row
    return Upload(
        uid,
        manifest_id,
        Digest(Algo(algo), digest),
        size,
        ext,
        name,
        UploadState(state),
        expires_at,
        sealed=key != UNSEALED_KEY,
        tenant=tenant,
    )


def _file(row) -> FileEntry:
    algo, digest, size, ext, name, created, manifest_id = row
    return FileEntry(Digest(Algo(algo), digest), size, ext, name, created, manifest_id)


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migrations/sqlite/NNNN_name.sql, in order."""
    found = []
    for res in importlib.resources.files("casd.migrations").joinpath("sqlite").iterdir():
        name = res.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, res.read_text()))
    return sorted(found)


def _statements(script: str) -> list[str]:
    """Split a schema script into complete statements (no executescript: it commits)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement in migration: {buf[:80]!r}")
    return out


class ReadPool:
    """`n` read-only sqlite3 connections on `n` threads of their own. Reads queued while
    every connection is busy go together to the next free one, up to `batch` of them in one
    read transaction: with hundreds of requests in flight, one thread hop serves many lookups
    instead of one each (the hop, not the lookup, is what costs). A read queued while a
    connection is free starts at once, alone.

    Every read sees one snapshot taken after it was queued, so it sees every write committed
    before it was asked for. One read's error is that read's alone.
    """

    def __init__(self, cons: list[sqlite3.Connection], thread: ThreadPoolExecutor, batch: int):
        self._cons = cons
        self._thread = thread
        self._batch = batch
        self._idle = list(cons)
        self._queue: deque[tuple[Callable, tuple, asyncio.Future]] = deque()
        self._running: set[asyncio.Future] = set()

    @classmethod
    async def open(
        cls, path: Path, synchronous: str, n: int, name: str, batch: int = 1
    ) -> ReadPool:
        thread = ThreadPoolExecutor(n, thread_name_prefix=f"casd-sql-{name}")

        def connect() -> sqlite3.Connection:
            con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for pragma in _pragmas(synchronous):
                con.execute(pragma)
            con.execute("PRAGMA query_only = ON")
            return con

        loop = asyncio.get_running_loop()
        cons: list[sqlite3.Connection] = []
        try:
            for _ in range(n):
                cons.append(await loop.run_in_executor(thread, connect))
        except BaseException:
            for con in cons:
                con.close()
            thread.shutdown(wait=False)
            raise
        return cls(cons, thread, batch)

    async def run(self, fn: Callable, *args):
        """fn(connection, *args) inside one read transaction (one snapshot); its result."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, fut))
        self._dispatch()
        # The read runs even if this caller goes away; the connection goes back only once
        # its thread is done with it.
        return await asyncio.shield(fut)

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._idle and self._queue:
            con = self._idle.pop()
            n = min(self._batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            calls = [(fn, args) for fn, args, _fut in batch]
            done = loop.run_in_executor(self._thread, _snapshot_batch, con, calls)
            self._running.add(done)
            done.add_done_callback(functools.partial(self._finished, con, batch))

    def _finished(self, con: sqlite3.Connection, batch: list, done: asyncio.Future) -> None:
        self._running.discard(done)
        self._idle.append(con)
        exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
        results = [(False, exc)] * len(batch) if exc is not None else done.result()
        for (_fn, _args, fut), (ok, value) in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)
        self._dispatch()

    async def close(self) -> None:
        while self._running or self._queue:
            await asyncio.gather(*self._running, return_exceptions=True)
            await asyncio.sleep(0)  # let the done callbacks dispatch what is still queued
        loop = asyncio.get_running_loop()
        for con in self._cons:
            await loop.run_in_executor(self._thread, con.close)
        self._thread.shutdown(wait=True)


def _snapshot_batch(con: sqlite3.Connection, calls: list) -> list[tuple[bool, object]]:
    """Each fn(con, *args) of `calls` in one read transaction; (ok, result or error) each."""
    out: list[tuple[bool, object]] = []
    con.execute("BEGIN")
    try:
        for fn, args in calls:
            try:
                out.append((True, fn(con, *args)))
            except Exception as exc:
                out.append((False, exc))
                if not con.in_transaction:
                    con.execute("BEGIN")
    finally:
        if con.in_transaction:
            con.execute("COMMIT")
    return out


def _fetch_all(con: sqlite3.Connection, sql: str, params: tuple) -> list:
    return con.execute(sql, params).fetchall()


def _chunks_of_file(hex_: str, algo: str, con: sqlite3.Connection, manifest_id: int) -> list:
    chunks = packed.unpack(con.execute(_CHUNKS_OF_FILE, (hex_, algo, manifest_id)))
    return list(zip(chunks.hexes, chunks.sizes, strict=True))


def _page_sync(con: sqlite3.Connection, manifest_id: int, start: int, limit: int) -> list:
    rows = con.execute(_PARTS_OF_PAGE, (manifest_id, start, start + limit))
    return packed.page(rows, start, limit)


def _file_chunks_page_sync(
    con: sqlite3.Connection, manifest_id: int, start: int, limit: int
) -> list[tuple[str, int, str | None]]:
    chunks = _page_sync(con, manifest_id, start, limit)
    want = sorted({h for h, _size in chunks})
    xxh3: dict[str, str] = {}
    for i in range(0, len(want), 500):
        part = want[i : i + 500]
        xxh3.update(
            con.execute(
                f"SELECT digest, NULLIF(xxh3, '') FROM chunks WHERE digest IN ({_marks(len(part))})",
                part,
            ).fetchall()
        )
    return [(h, size, xxh3.get(h)) for h, size in chunks]


class _Daemon:
    """What the daemon asks of the catalogue (SqliteCatalog, at the end of this module)."""

    def __init__(self, quick: ReadPool, bulk: ReadPool, group: GroupWriter, path: Path):
        self._quick = quick
        self._bulk = bulk
        self._group = group
        self._path = path

    @classmethod
    async def open(
        cls, path: Path, synchronous: str = "FULL", readers: int = 2, bulk_readers: int = 2
    ) -> Self:
        """Open (creating and migrating as needed) the catalogue at `path`."""
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous level {synchronous!r}")
        group = await GroupWriter.open(path, synchronous)
        opened: list = []
        try:
            await group.alone(_migrate)
            opened.append(
                await ReadPool.open(path, synchronous, readers, "read", batch=QUICK_BATCH)
            )
            opened.append(await ReadPool.open(path, synchronous, bulk_readers, "bulk"))
        except BaseException:
            for pool in opened:
                await pool.close()
            await group.close()
            raise
        return cls(opened[0], opened[1], group, path)

    @property
    def writer(self) -> WriteStats:
        """The batching writer, for its queue depth and commit observer (metrics)."""
        return self._group

    async def count_expired_pending(self, now: float) -> int:
        """Pending uploads expired at `now` that gc has not removed yet (a metric)."""
        row = await self._one(
            "SELECT count(*) FROM uploads WHERE state = 'pending' AND expires_at <= ?", (now,)
        )
        return row[0]

    async def close(self) -> None:
        await self._group.close()
        await self._quick.close()
        await self._bulk.close()

    async def read(self, fn: Callable, *args, bulk: bool = False):
        """Run fn(sqlite3 connection, *args) in one read transaction, so every query it makes
        sees the same snapshot; on the bulk lane when it reads long lists."""
        return await (self._bulk if bulk else self._quick).run(fn, *args)

    async def _read_manifest(self, fn: Callable, manifest_id: int):
        """fn(connection, manifest_id), on the lane its manifest's length calls for."""
        result = await self._quick.run(_unless_huge, fn, manifest_id)
        if result is _HUGE:
            result = await self._bulk.run(fn, manifest_id)
        return result

    async def _one(self, sql: str, params: Iterable = ()):
        rows = await self._quick.run(_fetch_all, sql, tuple(params))
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Iterable = (), bulk: bool = False):
        return await self.read(_fetch_all, sql, tuple(params), bulk=bulk)

    # ---- reads ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self._one("SELECT count(*) FROM schema_migrations")

    async def get_file(self, digest: Digest, tenant: str | None = None) -> FileEntry | None:
        if tenant is None:
            row = await self._one(
                f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ? AND f.algo = ?",
                (digest.hex, digest.algo.value),
            )
        else:
            row = await self._one(_TENANT_FILE, (tenant, digest.hex, digest.algo.value))
        return _file(row) if row else None

    async def files_page(self, tenant: str | None, after: str, limit: int) -> list[FileEntry]:
        if tenant is None:
            rows = await self._all(
                f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest > ? ORDER BY f.digest LIMIT ?",
                (after, limit),
            )
        else:
            rows = await self._all(
                "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id"
                " FROM tenant_files t JOIN files f ON f.digest = t.digest"
                " WHERE t.tenant = ? AND t.digest > ? ORDER BY t.digest LIMIT ?",
                (tenant, after, limit),
            )
        return [_file(r) for r in rows]

    async def file_with_chunks(
        self, digest: Digest, tenant: str | None = None
    ) -> tuple[FileEntry, list[tuple[str, int]]] | None:
        """A file and its (digest hex, size) chunks in order, as one snapshot gives them.

        None when there is no such file. Safe beside a delete and new handshakes committing
        meanwhile: the chunk list is read in the same statement that checks the file row
        still names its manifest, so a download never gets one manifest's chunks under
        another file's ETag.
        """
        for _ in range(_FILE_READ_TRIES):
            entry = await self.get_file(digest, tenant)
            if entry is None:
                return None
            if entry.size == 0:
                return entry, []
            # A huge manifest's list goes on the bulk lane, so downloads of a file of a
            # million chunks do not queue other clients' lookups.
            chunks = await self._read_manifest(
                functools.partial(_chunks_of_file, digest.hex, digest.algo.value),
                entry.manifest_id,
            )
            if chunks:
                return entry, chunks
            # Deleted, and perhaps uploaded again, between the two statements: look again.
        return None

    async def get_upload(self, upload_id: str) -> Upload | None:
        row = await self._one(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.id = ?",
            (upload_id,),
        )
        return _upload(row) if row else None

    async def manifest_size_of(self, manifest_id: int, digest: Digest) -> int | None:
        """The size the manifest gives `digest`, or None when it is not in the manifest."""
        row = await self._one(
            "SELECT size FROM manifest_digests WHERE manifest_id = ? AND digest = ?",
            (manifest_id, digest.hex),
        )
        return row[0] if row else None

    async def has_chunk(self, digest: Digest) -> bool:
        row = await self._one(
            "SELECT 1 FROM chunks WHERE digest = ? AND state = ?", (digest.hex, LIVE)
        )
        return row is not None

    async def present_chunks(self, digests: set[str]) -> set[str]:
        """Those of `digests` that are stored (live)."""
        if not digests:
            return set()
        marks = ",".join("?" * len(digests))
        rows = await self._all(
            f"SELECT digest FROM chunks WHERE state = ? AND digest IN ({marks})",
            (LIVE, *digests),
        )
        return {r[0] for r in rows}

    async def damaged(self, manifest_id: int) -> bool:
        """True when the manifest uses a quarantined chunk (its file cannot be served whole)."""
        row = await self._one(_DAMAGED, (manifest_id,))
        return row is not None

    async def missing(self, manifest_id: int, tenant: str | None = None) -> list[str]:
        """Chunk digests the manifest needs and the store lacks (or `tenant` never proved it
        holds), once each, in manifest order."""
        return await self._read_manifest(
            functools.partial(_missing_sync, tenant=tenant), manifest_id
        )

    async def manifest_chunks(self, manifest_id: int) -> list[tuple[str, int]]:
        """(digest hex, size) of every chunk of a manifest, in order."""
        return await self._read_manifest(_manifest_chunks_sync, manifest_id)

    async def manifest_chunk_count(self, manifest_id: int) -> int | None:
        """How many chunks a manifest lists, or None when it is gone."""
        row = await self._one("SELECT chunk_count FROM manifests WHERE id = ?", (manifest_id,))
        return row[0] if row else None

    async def manifest_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int]]:
        """(digest hex, size) of up to `limit` chunks of a manifest from position `start` on."""
        return await self.read(_page_sync, manifest_id, start, limit)

    async def file_chunks_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int, str | None]]:
        """See casd.catalog.Catalog.file_chunks_page."""
        # A quarantine row made for a blob never verified here holds '' for its xxh3.
        return await self.read(_file_chunks_page_sync, manifest_id, start, limit)

    # ---- the daemon's writes: queued, committed together ----------------------------

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
        """See casd.catalog.Catalog.begin_upload; one transaction."""
        return await self._group.run(
            _begin_upload, manifest, chunks_key, now, expires_at, new_id, client, budget, tenant
        )

    async def touch_upload(self, upload_id: str, now: float, expires_at: float) -> bool:
        """Push a live pending upload's expiry forward; False when there is none."""
        return await self._group.run(_touch_upload, upload_id, now, expires_at)

    # ---- streamed uploads (protocol v1.1) -----------------------------------------------

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
        """See casd.catalog.Catalog.begin_stream."""
        return await self._group.run(
            _begin_stream, algo, ext, name, now, expires_at, new_id, client, tenant, size, budget
        )

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
        """See casd.catalog.Catalog.append_stream."""
        return await self._group.run(
            _append_stream,
            upload_id,
            start,
            chunks,
            now,
            expires_at,
            limits,
            client,
            budget,
            tenant,
        )

    async def seal_stream(
        self, upload_id: str, digest: Digest, size: int, chunks_key: str
    ) -> Upload | None:
        """See casd.catalog.Catalog.seal_stream."""
        return await self._group.run(_seal_stream, upload_id, digest, size, chunks_key)

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
        """See casd.catalog.Catalog.publish_chunk."""
        ahead = _PlaceAhead(self._group, place, digest, replace)
        return await self._group.run(
            _publish_chunk,
            ahead,
            digest,
            size,
            xxh3,
            now,
            place,
            touch,
            replace,
        )

    async def register_file(
        self, upload_id: str, now: float, events: HookEvents | None = None
    ) -> FileEntry | None:
        """See casd.catalog.Catalog.register_file."""
        return await self._group.run(_register_file, upload_id, now, events)

    async def drop_pending_upload(self, upload_id: str) -> bool:
        """Forget a still-pending upload (and its manifest unless a file uses it).

        False when there is no such upload or it was merged meanwhile: the check and the
        delete are one transaction, so an abort racing a merge is decided once, either way.
        """
        return await self._group.run(_drop_pending_upload, upload_id)

    async def delete_file(
        self, digest: Digest, events: HookEvents | None = None, tenant: str | None = None
    ) -> bool:
        """See casd.catalog.Catalog.delete_file."""
        return await self._group.run(_delete_file, digest, events, tenant)

    async def prove_chunk(self, tenant: str, digest: Digest) -> bool:
        """See casd.catalog.Catalog.prove_chunk."""
        return await self._group.run(_prove_chunk, tenant, digest)

    # ---- webhook queue ------------------------------------------------------------------

    async def hook_events(self, url: str, limit: int) -> list[tuple[int, str, str]]:
        """The oldest queued (id, kind, body) for one receiver URL, in order."""
        return await self._all(
            "SELECT id, kind, body FROM hook_events WHERE url = ? ORDER BY id LIMIT ?",
            (url, limit),
        )

    async def count_hook_events(self) -> int:
        """Events waiting for delivery, all receivers together (a metric)."""
        row = await self._one("SELECT count(*) FROM hook_events")
        return row[0]

    async def hook_event_done(self, event_id: int) -> None:
        await self._group.run(_hook_event_done, event_id)

    # ---- one-request uploads (protocol v1.1) ----------------------------------------------

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
        """See casd.catalog.Catalog.store_file: one transaction (one group commit).

        Held to a quota, `place` runs in its turn, after the quota check (never ahead of the
        batch): a refused file leaves no blob behind."""
        lock: Callable = (
            self._group.under_lock
            if tenant is not None and tenant.quota is not None
            else _PlaceAhead(self._group, place, manifest.digest, replace)
        )
        return await self._group.run(
            _store_file, lock, manifest, chunks_key, xxh3, now, place, replace, tenant, events
        )


class GroupWriter:
    """The engine's one write path: one sqlite3 connection on one thread. Write operations
    are plain functions of the connection; every operation queued while a transaction runs
    goes into the next one, each in its own savepoint, so N concurrent requests share one
    BEGIN IMMEDIATE ... COMMIT (and one fsync) instead of queueing for N of them.

    An operation that must do something "while the digest is locked" (a `Locked` callback,
    see casd.catalog) calls `under_lock(fn, arg)` on this thread: the coroutine runs on the
    event loop while this thread, and so SQLite's write lock, waits for it.
    """

    MAX_BATCH = 256

    def __init__(
        self, con: sqlite3.Connection, thread: ThreadPoolExecutor, loop: asyncio.AbstractEventLoop
    ):
        self._con = con
        self._thread = thread
        self._loop = loop
        self._queue: list[tuple[Callable, tuple, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        # Told each transaction's duration in seconds (metrics); None costs nothing.
        self.on_commit: Callable[[float], None] | None = None

    @property
    def depth(self) -> int:
        """Write operations waiting for the next transaction."""
        return len(self._queue)

    @classmethod
    async def open(cls, path: Path, synchronous: str) -> GroupWriter:
        thread = ThreadPoolExecutor(1, thread_name_prefix="casd-sql-writer")

        def connect() -> sqlite3.Connection:
            con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in _pragmas(synchronous, WRITER_CACHE_KIB):
                    con.execute(pragma)
            except BaseException:
                con.close()
                raise
            return con

        loop = asyncio.get_running_loop()
        try:
            con = await loop.run_in_executor(thread, connect)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(con, thread, loop)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._con.close)
        self._thread.shutdown(wait=True)

    def under_lock(self, fn: Locked, arg):
        """Await fn(arg) on the event loop from the writer thread, inside the running write
        transaction; its result or error. Only for write operations (they run on this thread)."""
        return asyncio.run_coroutine_threadsafe(_awaited(fn, arg), self._loop).result()

    async def alone(self, fn: Callable, *args):
        """fn(connection, *args) on the writer thread with no transaction open around it (it
        opens its own): for migrations, which must change pragmas between transactions."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, _full_disk_named, fn, self._con, args
        )

    async def run(self, fn: Callable, *args):
        """Run fn(connection, *args) inside the next write transaction; its result or error."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        # The batch runs even if this caller goes away: its work commits as one unit.
        return await asyncio.shield(fut)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(
                        self._thread, _full_disk_named, self._transact, batch, ()
                    )
                except BaseException as exc:
                    results = [(False, exc)] * len(batch)
                if self.on_commit is not None:
                    self.on_commit(time.perf_counter() - started)
                for (_fn, _args, fut), (ok, value) in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(value) if ok else fut.set_exception(value)
        finally:
            self._flusher = None

    def _transact(self, batch) -> list[tuple[bool, object]]:
        con = self._con
        results: list[tuple[bool, object]] = []
        con.execute("BEGIN IMMEDIATE")
        try:
            self._place_ahead(con, batch)
            for fn, args, _fut in batch:
                con.execute("SAVEPOINT op")
                try:
                    value = fn(con, *args)
                except Exception as exc:
                    if not con.in_transaction:
                        # SQLite rolled the whole transaction back (SQLITE_FULL does): the
                        # batch's earlier operations are undone too, so it fails as a whole.
                        raise
                    con.execute("ROLLBACK TO op")
                    con.execute("RELEASE op")
                    results.append((False, _named(exc)))
                else:
                    con.execute("RELEASE op")
                    results.append((True, value))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return results

    def _place_ahead(self, con: sqlite3.Connection, batch) -> None:
        """Await the `place` callbacks of the batch's publishes all at once, under the lock
        this transaction holds, before the operations run.

        One at a time, each would be a round trip through a busy event loop while the write
        lock, and every commit queued behind it, waits: with a hundred chunks in a batch,
        most of the transaction's time. Only a publish that will call `place` is placed
        ahead (its digest not live yet, or `replace`), and only the first of the batch for
        each digest: a second one finds the first one's row live and calls nothing.
        """
        planned: list[_PlaceAhead] = []
        seen: set[str] = set()
        for _fn, args, _fut in batch:
            ahead = args[0] if args else None
            if ahead == self.under_lock:
                # An operation that works on blobs under the lock (gc, quarantine, a probe)
                # may change what a later publish would find: those place in their turn.
                break
            if (
                isinstance(ahead, _PlaceAhead)
                and ahead.digest.hex not in seen
                and ahead.needed(con)
            ):
                seen.add(ahead.digest.hex)
                planned.append(ahead)
        if not planned:
            return
        outcomes = asyncio.run_coroutine_threadsafe(_gather_places(planned), self._loop).result()
        for ahead, outcome in zip(planned, outcomes, strict=True):
            ahead.outcome = outcome


class _PlaceAhead:
    """The `lock` a publish operation calls with its `place` callback: answered from the
    batch's placing ahead (GroupWriter._place_ahead) when that placed it, else run under
    the lock then, as `GroupWriter.under_lock` does."""

    __slots__ = ("digest", "group", "outcome", "place", "replace")

    def __init__(self, group: GroupWriter, place: Locked, digest: Digest, replace: bool):
        self.group = group
        self.place = place
        self.digest = digest
        self.replace = replace
        self.outcome: tuple[bool, object] | None = None

    def needed(self, con: sqlite3.Connection) -> bool:
        """Whether the operation will call `place` (as _publish_chunk decides it)."""
        return self.replace or not _is_live(con, self.digest)

    def __call__(self, fn: Locked, arg):
        outcome, self.outcome = self.outcome, None
        if outcome is None or fn is not self.place or arg != self.digest:
            return self.group.under_lock(fn, arg)
        ok, value = outcome
        if not ok:
            raise value  # type: ignore[misc]
        return value


async def _gather_places(planned: list[_PlaceAhead]) -> list[tuple[bool, object]]:
    async def one(ahead: _PlaceAhead) -> tuple[bool, object]:
        try:
            return True, await ahead.place(ahead.digest)
        except Exception as exc:
            return False, exc

    return list(await asyncio.gather(*(one(a) for a in planned)))


def _is_live(con: sqlite3.Connection, digest: Digest) -> bool:
    row = con.execute(
        "SELECT 1 FROM chunks WHERE digest = ? AND state = ?", (digest.hex, LIVE)
    ).fetchone()
    return row is not None


async def _awaited(fn: Locked, arg):
    return await fn(arg)


def _named(exc: Exception) -> Exception:
    """A full disk is StorageFull (told by SQLite's error code, whatever the message says)."""
    if isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
        full = StorageFull("the data folder's disk is full")
        full.__cause__ = exc
        return full
    return exc


def _full_disk_named(fn: Callable, first, args: tuple):
    try:
        return fn(first, *args)
    except sqlite3.Error as exc:
        named = _named(exc)
        if named is exc:
            raise
        raise named from exc


def _pragmas(synchronous: str, cache_kib: int = 32768) -> list[str]:
    return [
        f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
        "PRAGMA journal_mode = WAL",
        f"PRAGMA synchronous = {synchronous}",
        "PRAGMA foreign_keys = ON",
        "PRAGMA temp_store = MEMORY",
        f"PRAGMA cache_size = -{cache_kib}",
    ]


# The writer's page cache, in KiB. A 200,000-chunk handshake writes about 20 MiB of pages in
# one transaction; a cache that holds them all until the commit (32 MiB, as the readers have)
# kept them resident in the daemon for good. Past this SQLite writes dirty pages to the WAL
# early (the same frames, before the commit instead of at it); what the writer reads again
# and again, the tables' upper B-tree pages, fits many times over.
WRITER_CACHE_KIB = 8192


# ---- write operations: run by GroupWriter inside a transaction, on its thread ------------


def _queue_events(con, events: HookEvents | None, entry: FileEntry | None) -> None:
    """Queue `events`' rows for `entry` (None: the operation changed nothing) in the
    caller's transaction, dropping the oldest past the bound."""
    if events is None:
        return
    events.queued = events.dropped = 0  # a retried transaction starts over
    if entry is None:
        return
    rows = events.rows(entry)
    con.executemany(
        "INSERT INTO hook_events (url, kind, body, created) VALUES (?, ?, ?, ?)",
        [(url, kind, body, events.now) for url, kind, body in rows],
    )
    (count,) = con.execute("SELECT count(*) FROM hook_events").fetchone()
    excess = max(count - events.max_rows, 0)
    if excess:
        con.execute(
            "DELETE FROM hook_events WHERE id IN (SELECT id FROM hook_events ORDER BY id LIMIT ?)",
            (excess,),
        )
    events.queued, events.dropped = len(rows), excess


def _hook_event_done(con, event_id) -> None:
    con.execute("DELETE FROM hook_events WHERE id = ?", (event_id,))


_PENDING_OF_MANIFEST = (
    f"SELECT {_UPLOAD_COLUMNS} FROM manifests m JOIN uploads u ON u.manifest_id = m.id"
    " WHERE m.digest = ? AND m.size = ? AND m.chunks_key = ? AND u.state = 'pending'"
    " AND u.tenant = ? ORDER BY u.expires_at DESC LIMIT 1"
)
_UPLOAD_BY_ID = (
    f"SELECT {_UPLOAD_COLUMNS} FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
    " WHERE u.id = ?"
)


def _begin_upload(
    con: sqlite3.Connection,
    manifest: Manifest,
    chunks_key: str,
    now: float,
    expires_at: float,
    new_id: str,
    client: str,
    budget: PendingBudget | None,
    tenant: Tenant | None = None,
) -> tuple[Upload, list[str]]:
    d = manifest.digest
    owner = tenant.name if tenant is not None else ""
    who = tenant.name if tenant is not None else None
    chunks = ChunkList.of(manifest.chunks)
    uses = packed.distinct(chunks)
    row = con.execute(_PENDING_OF_MANIFEST, (d.hex, manifest.size, chunks_key, owner)).fetchone()
    existing = _upload(row) if row else None
    if existing is not None and existing.expires_at > now:
        con.execute("UPDATE uploads SET expires_at = ? WHERE id = ?", (expires_at, existing.id))
        upload = dataclasses.replace(existing, expires_at=expires_at)
        return upload, _missing_sync(con, upload.manifest_id, who, uses)
    if existing is not None:
        _drop_upload_sync(con, existing.id, existing.manifest_id)
    if budget is not None:
        _check_budget(con, budget, client, len(manifest.chunks), now)
    if tenant is not None and tenant.quota is not None:
        _check_quota(con, tenant.name, tenant.quota, manifest.size, now)
    manifest_id: int = con.execute(
        "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (d.algo.value, d.hex, manifest.size, chunks_key, len(chunks), now),
    ).fetchone()[0]
    _insert_list(con, manifest_id, chunks, 0, uses)
    stored = None
    if tenant is None:
        # One pass over the stored digests counts them and their size clashes: a clash is
        # looked up only when there is one, and the missing list knows which side to read.
        stored, clashes = con.execute(_STORED_AND_CLASHES, (manifest_id, LIVE)).fetchone()
        clash = con.execute(_CLASH, (manifest_id, LIVE)).fetchone() if clashes else None
    else:
        clash = con.execute(_CLASH + _PROVED, (manifest_id, LIVE, tenant.name)).fetchone()
    if clash:
        # Say which claim is wrong, never the stored size: that is someone else's fact.
        raise BadRequest(
            f"chunk {clash[0]} does not have the size {clash[1]} this manifest gives it"
        )
    con.execute(
        "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at, client,"
        " tenant) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
        (new_id, manifest_id, manifest.ext, manifest.name, now, expires_at, client, owner),
    )
    upload = Upload(
        new_id,
        manifest_id,
        d,
        manifest.size,
        manifest.ext,
        manifest.name,
        UploadState.PENDING,
        expires_at,
        tenant=owner,
    )
    return upload, _missing_sync(con, manifest_id, who, uses, stored)


def _insert_list(
    con: sqlite3.Connection,
    manifest_id: int,
    chunks: ChunkList,
    start: int,
    uses: dict[str, int],
) -> None:
    """Store `chunks` as the manifest's list from position `start` on, and the digests of
    `uses` (digest: size) it did not use yet."""
    con.executemany(
        "INSERT INTO manifest_parts (manifest_id, start, digests, sizes) VALUES (?, ?, ?, ?)",
        [(manifest_id, *part) for part in packed.parts(chunks, start)],
    )
    # One statement for them all: the digests go as one JSON object (digest: size) that
    # SQLite reads itself, not a row of bound parameters each; its keys in digest order, so
    # the table's and its index's pages fill in order, not at random.
    con.execute(
        "INSERT INTO manifest_digests (manifest_id, digest, size) SELECT ?, key, value"
        " FROM json_each(CAST(? AS TEXT)) WHERE true ON CONFLICT DO NOTHING",
        (manifest_id, msgspec.json.encode(uses, order="sorted")),
    )


# A chunk of the new manifest stored with another size than the manifest gives it. In tenant
# mode only chunks this tenant proved count (append _PROVED): a size clash with a chunk it
# never held would tell it that someone stored that digest. Its PUT fails verification.
_CLASH = (
    "SELECT mc.digest, mc.size, c.size FROM manifest_digests mc"
    " JOIN chunks c ON c.digest = mc.digest"
    " WHERE mc.manifest_id = ? AND c.state = ? AND c.size <> mc.size"
)
_STORED_AND_CLASHES = (
    "SELECT count(*), count(nullif(c.size <> mc.size, 0)) FROM manifest_digests mc"
    " JOIN chunks c ON c.digest = mc.digest WHERE mc.manifest_id = ? AND c.state = ?"
)
_PROVED = " AND EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = ? AND t.digest = mc.digest)"
_PROVED_CHUNK = (
    " AND EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = ? AND t.digest = c.digest)"
)


def _tenant_usage(con: sqlite3.Connection, tenant: str, now: float) -> tuple[int, int]:
    """(bytes of the files `tenant` owns, bytes of its live pending uploads)."""
    owned = con.execute(
        "SELECT coalesce(sum(size), 0) FROM tenant_files WHERE tenant = ?", (tenant,)
    ).fetchone()[0]
    pending = con.execute(
        "SELECT coalesce(sum(m.size), 0) FROM uploads u INDEXED BY uploads_pending_by_tenant"
        " JOIN manifests m ON m.id = u.manifest_id"
        " WHERE u.tenant = ? AND u.state = 'pending' AND u.expires_at > ?",
        (tenant, now),
    ).fetchone()[0]
    return owned, pending


def _check_quota(con: sqlite3.Connection, tenant: str, quota: int, size: int, now: float) -> None:
    """Raise QuotaExceeded unless `size` more bytes fit the tenant's quota. Called inside the
    write transaction that records the upload, so two handshakes cannot both take the rest."""
    owned, pending = _tenant_usage(con, tenant, now)
    if owned + pending + size > quota:
        raise QuotaExceeded(
            f"tenant {tenant!r} has a quota of {quota} bytes and uses {owned + pending}"
            f" ({owned} in files, {pending} in pending uploads); this {size}-byte file would"
            " take it over: delete files or abort uploads first",
            quota=quota,
            usage=owned + pending,
        )


def _begin_stream(
    con: sqlite3.Connection,
    algo: Algo,
    ext: str,
    name: str,
    now: float,
    expires_at: float,
    new_id: str,
    client: str,
    tenant: Tenant | None = None,
    size: int | None = None,
    budget: PendingBudget | None = None,
) -> Upload:
    owner = tenant.name if tenant is not None else ""
    if budget is not None:
        _check_budget(con, budget, client, 1, now)
    if tenant is not None and tenant.quota is not None:
        if size is None:
            raise ValueError("a tenant's streamed upload needs its declared size")
        _check_quota(con, tenant.name, tenant.quota, size, now)
    digest = placeholder(algo)
    manifest_id: int = con.execute(
        "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
        " VALUES (?, ?, 0, ?, 0, ?) RETURNING id",
        (algo.value, digest.hex, UNSEALED_KEY, now),
    ).fetchone()[0]
    con.execute(
        "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at, client,"
        " tenant) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
        (new_id, manifest_id, ext, name, now, expires_at, client, owner),
    )
    return opened_stream(new_id, manifest_id, algo, ext, name, expires_at, owner)


def _append_stream(
    con: sqlite3.Connection,
    upload_id: str,
    start: int,
    chunks: list[ChunkRef],
    now: float,
    expires_at: float,
    limits: StreamLimits,
    client: str,
    budget: PendingBudget | None,
    tenant: Tenant | None = None,
) -> StreamBatch | None:
    row = con.execute(
        "SELECT m.id, m.chunk_count, m.size FROM uploads u JOIN manifests m"
        " ON m.id = u.manifest_id WHERE u.id = ? AND u.state = 'pending'"
        " AND u.expires_at > ? AND m.chunks_key = ?",
        (upload_id, now, UNSEALED_KEY),
    ).fetchone()
    if row is None:
        return None
    manifest_id, count, size = row
    check_stream_batch(start, chunks, count, size, limits)
    if budget is not None and chunks:
        _check_budget(con, budget, client, len(chunks), now)
    if tenant is not None and tenant.quota is not None and chunks:
        # What the daemon reserved at open lives in that daemon only: the catalogue holds
        # what every daemon's uploads listed to the quota, batch by batch.
        _check_quota(con, tenant.name, tenant.quota, sum(c.size for c in chunks), now)
    listed = ChunkList.of(chunks)
    uses = packed.distinct(listed)
    batch = sorted(uses)
    marks = ",".join("?" * len(batch))
    # In tenant mode a stored chunk counts (for a clash, and as present) only when the tenant
    # proved it: see _CLASH. A clash with one it never proved is not told; its PUT fails.
    proved, by = ("", ()) if tenant is None else (_PROVED_CHUNK, (tenant.name,))
    if batch:
        # A digest this upload listed before with another size, or stored with another size.
        clash = con.execute(
            f"SELECT digest, size FROM manifest_digests WHERE manifest_id = ? AND digest IN ({marks})"
            f" UNION ALL SELECT digest, size FROM chunks c WHERE digest IN ({marks}) AND state = ?"
            + proved,
            (manifest_id, *batch, *batch, LIVE, *by),
        ).fetchall()
        for hex_, known in clash:
            if uses[hex_] != known:
                # Say which claim is wrong, never the stored size: that is someone else's fact.
                raise BadRequest(
                    f"chunk {hex_} does not have the size {uses[hex_]} this upload gives it"
                )
    _insert_list(con, manifest_id, listed, start, uses)
    added = sum(c.size for c in chunks)
    con.execute(
        "UPDATE manifests SET chunk_count = ?, size = ? WHERE id = ?",
        (count + len(chunks), size + added, manifest_id),
    )
    con.execute("UPDATE uploads SET expires_at = ? WHERE id = ?", (expires_at, upload_id))
    present = (
        {
            r[0]
            for r in con.execute(
                f"SELECT digest FROM chunks c WHERE digest IN ({marks}) AND state = ?" + proved,
                (*batch, LIVE, *by),
            )
        }
        if batch
        else set()
    )
    missing = list(dict.fromkeys(c.hex for c in chunks if c.hex not in present))
    return StreamBatch(count + len(chunks), size + added, missing)


def _seal_stream(
    con: sqlite3.Connection, upload_id: str, digest: Digest, size: int, chunks_key: str
) -> Upload | None:
    row = con.execute(_UPLOAD_BY_ID + " AND u.state = 'pending'", (upload_id,)).fetchone()
    if row is None:
        return None
    upload = _upload(row)
    if upload.sealed:
        return upload
    check_seal(upload, digest, size)
    con.execute(
        "UPDATE manifests SET digest = ?, chunks_key = ? WHERE id = ?",
        (digest.hex, chunks_key, upload.manifest_id),
    )
    return dataclasses.replace(upload, digest=digest, sealed=True)


def _check_budget(
    con: sqlite3.Connection, budget: PendingBudget, client: str, entries: int, now: float
) -> None:
    """Raise unless `entries` more pending chunk entries fit `client`'s share and the total."""
    if entries > budget.per_client:
        raise TooLarge(
            f"the manifest has {entries} chunk entries; a client may hold at most"
            f" {budget.per_client} in pending uploads"
        )
    mine = con.execute(_PENDING_ENTRIES + " AND u.client = ?", (now, client)).fetchone()[0]
    if mine + entries > budget.per_client:
        raise TooManyPending(
            f"your pending uploads hold {mine} chunk entries; this one would take them over"
            f" the limit of {budget.per_client}: merge or abort some, or wait for them to expire",
            pending=mine,
            limit=budget.per_client,
        )
    total = con.execute(_PENDING_ENTRIES, (now,)).fetchone()[0]
    if total + entries > budget.total:
        raise TooManyPending(
            f"pending uploads hold {total} chunk entries; this one would take them over the"
            f" server's limit of {budget.total}: try again later",
            pending=total,
            limit=budget.total,
        )


def _touch_upload(con: sqlite3.Connection, upload_id: str, now: float, expires_at: float) -> bool:
    cur = con.execute(
        "UPDATE uploads SET expires_at = ? WHERE id = ? AND state = 'pending' AND expires_at > ?",
        (expires_at, upload_id, now),
    )
    return cur.rowcount == 1


def _publish_chunk(
    con: sqlite3.Connection,
    lock: Callable,
    digest: Digest,
    size: int,
    xxh3: str,
    now: float,
    place: Locked[Digest, None],
    touch: tuple[str, float] | None,
    replace: bool = False,
) -> bool:
    if touch is not None:
        # Never revives an upload that expired meanwhile (gc may already be emptying it).
        con.execute(
            "UPDATE uploads SET expires_at = ? WHERE id = ? AND state = 'pending'"
            " AND expires_at > ?",
            (touch[1], touch[0], now),
        )
    if not replace and _is_live(con, digest):
        return False
    lock(place, digest)
    con.execute(
        "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
        " size = excluded.size, xxh3 = excluded.xxh3, created = excluded.created,"
        " state = excluded.state",
        (digest.hex, digest.algo.value, size, xxh3, now, LIVE),
    )
    return True


def _register_file(
    con: sqlite3.Connection, upload_id: str, now: float, events: HookEvents | None
) -> FileEntry | None:
    _queue_events(con, events, None)
    row = con.execute(_UPLOAD_BY_ID, (upload_id,)).fetchone()
    if row is None:
        return None
    upload = _upload(row)
    merging = upload.state == "pending"
    if merging:
        if upload.expires_at <= now:
            return None
        missing = _missing_sync(con, upload.manifest_id, upload.tenant or None)
        if missing:
            raise Incomplete(f"{len(missing)} chunk(s) are still missing", missing)
        d = upload.digest
        con.execute(
            "INSERT INTO files (digest, algo, size, manifest_id, ext, name, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
            (d.hex, d.algo.value, upload.size, upload.manifest_id, upload.ext, upload.name, now),
        )
        con.execute("UPDATE uploads SET state = 'merged' WHERE id = ?", (upload_id,))
    frow = con.execute(
        f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ?", (upload.digest.hex,)
    ).fetchone()
    if frow is None:
        return None
    entry = _file(frow)
    if entry.size != upload.size:
        raise FileDigestMismatch(
            f"a file of {upload.size} bytes cannot be stored under {entry.digest.hex}"
        )
    if upload.tenant:
        if merging:
            _own_file(con, upload, entry, now)
        trow = con.execute(
            _TENANT_FILE, (upload.tenant, upload.digest.hex, upload.digest.algo.value)
        ).fetchone()
        if trow is None:
            return None  # merged once, and this tenant deleted the file since
        entry = _file(trow)
    if merging:
        _queue_events(con, events, entry)
    return entry


def _own_file(con: sqlite3.Connection, upload: Upload, entry: FileEntry, now: float) -> None:
    """The merging tenant owns the file, and holds every chunk of it: those of its own
    manifest, and those of the manifest the file row was first stored with (it has all
    the file's bytes, so no chunk of it is news to it)."""
    con.execute(
        "INSERT INTO tenant_files (tenant, digest, size, ext, name, created)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, digest) DO NOTHING",
        (upload.tenant, upload.digest.hex, upload.size, upload.ext, upload.name, now),
    )
    con.execute(
        "INSERT INTO tenant_chunks (tenant, digest) SELECT DISTINCT ?, digest"
        " FROM manifest_digests WHERE manifest_id IN (?, ?) ON CONFLICT DO NOTHING",
        (upload.tenant, upload.manifest_id, entry.manifest_id),
    )


def _prove_chunk(con: sqlite3.Connection, tenant: str, digest: Digest) -> bool:
    return (
        con.execute(
            "INSERT INTO tenant_chunks (tenant, digest) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (tenant, digest.hex),
        ).rowcount
        == 1
    )


def _drop_pending_upload(con: sqlite3.Connection, upload_id: str) -> bool:
    row = con.execute(
        "DELETE FROM uploads WHERE id = ? AND state = 'pending' RETURNING manifest_id",
        (upload_id,),
    ).fetchone()
    if row is None:
        return False
    _drop_manifest_if_unused_sync(con, row[0])
    return True


def _delete_file(
    con: sqlite3.Connection, digest: Digest, events: HookEvents | None, tenant: str | None
) -> bool:
    _queue_events(con, events, None)
    if tenant is None:
        row = con.execute(
            f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ? AND f.algo = ?",
            (digest.hex, digest.algo.value),
        ).fetchone()
    else:
        row = con.execute(_TENANT_FILE, (tenant, digest.hex, digest.algo.value)).fetchone()
    if row is None:
        return False
    entry = _file(row)
    manifest_id = entry.manifest_id
    if tenant is not None:
        con.execute(
            "DELETE FROM tenant_files WHERE tenant = ? AND digest = ?", (tenant, digest.hex)
        )
        # Its own merged uploads go, so its repeated merge cannot answer "complete".
        con.execute(
            "DELETE FROM uploads WHERE manifest_id IN (SELECT id FROM manifests WHERE digest = ?)"
            " AND state = 'merged' AND tenant = ?",
            (digest.hex, tenant),
        )
        if con.execute("SELECT 1 FROM tenant_files WHERE digest = ?", (digest.hex,)).fetchone():
            _queue_events(con, events, entry)
            return True  # another tenant still owns it: the file stays
    con.execute("DELETE FROM tenant_files WHERE digest = ?", (digest.hex,))
    con.execute("DELETE FROM files WHERE digest = ?", (digest.hex,))
    # The merged uploads that built it go too, so a repeated merge cannot answer "complete"
    # for a file that is gone.
    con.execute("DELETE FROM uploads WHERE manifest_id = ? AND state = 'merged'", (manifest_id,))
    _drop_manifest_if_unused_sync(con, manifest_id)
    _queue_events(con, events, entry)
    return True


# The digests of a manifest that are stored: the missing list is the manifest's digests
# less these, one set operation in Python.
_PRESENT = (
    "SELECT mc.digest FROM manifest_digests mc JOIN chunks c ON c.digest = mc.digest"
    " WHERE mc.manifest_id = ? AND c.state = ?"
)
# In tenant mode a chunk is present only when it is stored and this tenant proved it holds it.
_PRESENT_FOR_TENANT = _PRESENT + (
    " AND EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = ? AND t.digest = mc.digest)"
)
_COUNT_PRESENT = _PRESENT.replace("SELECT mc.digest", "SELECT count(*)", 1)
_COUNT_PRESENT_FOR_TENANT = _PRESENT_FOR_TENANT.replace("SELECT mc.digest", "SELECT count(*)", 1)
# The complements: the digests of a manifest that are missing.
_ABSENT = (
    "SELECT mc.digest FROM manifest_digests mc WHERE mc.manifest_id = ?"
    " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.digest = mc.digest AND c.state = ?)"
)
_ABSENT_FOR_TENANT = (
    "SELECT mc.digest FROM manifest_digests mc WHERE mc.manifest_id = ?"
    " AND (NOT EXISTS (SELECT 1 FROM chunks c WHERE c.digest = mc.digest AND c.state = ?)"
    " OR NOT EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = ? AND t.digest = mc.digest))"
)
# Sum of the chunk entries of live pending uploads (append "AND u.client = ?" for one client).
# The partial index holds pending uploads only; merged ones, kept a day, are never read.
# A pending upload holds at least one entry: an open streamed upload that lists nothing yet
# still has its rows.
_PENDING_ENTRIES = (
    "SELECT coalesce(sum(max(m.chunk_count, 1)), 0) FROM uploads u"
    " INDEXED BY uploads_pending_by_client"
    " JOIN manifests m ON m.id = u.manifest_id WHERE u.state = 'pending' AND u.expires_at > ?"
)
# Starts from the partial index of quarantined chunks (empty on a healthy store), never from
# the manifest's entries: a complete handshake of a 1,000,000-chunk file stays one lookup.
# The literal 2 is QUARANTINED: a bound parameter would not match the partial index.
_DAMAGED = (
    "SELECT 1 FROM chunks c INDEXED BY chunks_quarantined CROSS JOIN manifest_digests mc"
    " ON mc.digest = c.digest WHERE c.state = 2 AND mc.manifest_id = ? LIMIT 1"
)
_DROP_MANIFEST_IF_UNUSED = (
    "DELETE FROM manifests WHERE id = ?"
    " AND NOT EXISTS (SELECT 1 FROM files WHERE manifest_id = ?)"
    " AND NOT EXISTS (SELECT 1 FROM uploads WHERE manifest_id = ?)"
)


def _missing_sync(
    con: sqlite3.Connection,
    manifest_id: int,
    tenant: str | None = None,
    uses: dict[str, int] | None = None,
    stored: int | None = None,
) -> list[str]:
    """The manifest's digests, once each in manifest order, less those stored (and, with
    `tenant`, proved). `uses`: the manifest's distinct digests when the caller has them;
    `stored`: how many of them are stored, when it counted them (without a tenant)."""
    # Counted first, then the smaller side is read: the digests stored, when they are fewer
    # than half, else those missing (a list that is mostly stored never brings its 200,000
    # digests over, and a complete one, a merge's, is never unpacked).
    if stored is None:
        if tenant is None:
            count = con.execute(_COUNT_PRESENT, (manifest_id, LIVE))
        else:
            count = con.execute(_COUNT_PRESENT_FOR_TENANT, (manifest_id, LIVE, tenant))
        stored = count.fetchone()[0]
    if uses is None:
        distinct = con.execute(
            "SELECT count(*) FROM manifest_digests WHERE manifest_id = ?", (manifest_id,)
        ).fetchone()[0]
        if stored == distinct:
            return []
        uses = packed.distinct(_list_sync(con, manifest_id))
    if stored == 0:
        return list(uses)
    if stored <= len(uses) // 2:
        if tenant is None:
            present = con.execute(_PRESENT, (manifest_id, LIVE))
        else:
            present = con.execute(_PRESENT_FOR_TENANT, (manifest_id, LIVE, tenant))
        have = {r[0] for r in present}
        return [h for h in uses if h not in have]
    if tenant is None:
        rows = con.execute(_ABSENT, (manifest_id, LIVE))
    else:
        rows = con.execute(_ABSENT_FOR_TENANT, (manifest_id, LIVE, tenant))
    absent = {r[0] for r in rows}
    return [h for h in uses if h in absent]


def _list_sync(con: sqlite3.Connection, manifest_id: int) -> ChunkList:
    return packed.unpack(
        con.execute(
            "SELECT start, digests, sizes FROM manifest_parts WHERE manifest_id = ? ORDER BY start",
            (manifest_id,),
        )
    )


def _manifest_chunks_sync(con: sqlite3.Connection, manifest_id: int) -> list[tuple[str, int]]:
    chunks = _list_sync(con, manifest_id)
    return list(zip(chunks.hexes, chunks.sizes, strict=True))


_HUGE = object()


def _unless_huge(con: sqlite3.Connection, fn: Callable, manifest_id: int):
    """fn(con, manifest_id), or _HUGE without running it when the manifest is long."""
    row = con.execute("SELECT chunk_count FROM manifests WHERE id = ?", (manifest_id,)).fetchone()
    if row is not None and row[0] > BULK_ENTRIES:
        return _HUGE
    return fn(con, manifest_id)


def _drop_upload_sync(con: sqlite3.Connection, upload_id: str, manifest_id: int) -> None:
    con.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
    _drop_manifest_if_unused_sync(con, manifest_id)


def _drop_manifest_if_unused_sync(con: sqlite3.Connection, manifest_id: int) -> None:
    con.execute(_DROP_MANIFEST_IF_UNUSED, (manifest_id, manifest_id, manifest_id))


def _migrate(con: sqlite3.Connection) -> None:
    """Apply every migration not yet recorded, each in its own immediate transaction.

    Foreign keys are not enforced while a migration runs (a table rebuild drops a table that
    others reference; with enforcement on, the drop would cascade into their rows); instead
    every reference is checked before the migration commits.
    """
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
    )
    # Only takes effect outside a transaction, hence here and not inside each one.
    con.execute("PRAGMA foreign_keys = OFF")
    try:
        for version, name, sql in _migrations():
            con.execute("BEGIN IMMEDIATE")
            try:
                done = con.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone()
                if not done:
                    for stmt in _statements(sql):
                        con.execute(stmt)
                    step = _PYTHON_STEPS.get(version)
                    if step is not None:
                        step(con)
                    broken = con.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(
                            f"migration {name} would leave {len(broken)} broken references,"
                            f" first {tuple(broken[0])}"
                        )
                    con.execute(
                        "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
    finally:
        con.execute("PRAGMA foreign_keys = ON")


def _pack_existing_manifests(con: sqlite3.Connection) -> None:
    """Migration 0006's second half: each manifest_chunks list becomes packed parts (in seq
    order, positions 0..n-1 as before), checked against its chunk_count, and the old table
    is dropped."""
    counts = dict(con.execute("SELECT id, chunk_count FROM manifests").fetchall())
    rows = con.execute(
        "SELECT manifest_id, digest, size FROM manifest_chunks ORDER BY manifest_id, seq"
    )

    def flush(manifest_id: int, chunks: ChunkList) -> None:
        if counts.get(manifest_id, len(chunks)) != len(chunks):
            raise RuntimeError(
                f"manifest {manifest_id} says it has {counts[manifest_id]} chunks but lists"
                f" {len(chunks)}: not converted"
            )
        con.executemany(
            "INSERT INTO manifest_parts (manifest_id, start, digests, sizes) VALUES (?, ?, ?, ?)",
            [(manifest_id, *part) for part in packed.parts(chunks)],
        )

    # One manifest's list in memory at a time.
    current: int | None = None
    hexes: list[str] = []
    sizes: list[int] = []
    for batch in iter(lambda: rows.fetchmany(65536), []):
        for manifest_id, hex_, size in batch:
            if manifest_id != current:
                if current is not None:
                    flush(current, ChunkList(hexes, sizes))
                current, hexes, sizes = manifest_id, [], []
            hexes.append(hex_)
            sizes.append(size)
    if current is not None:
        flush(current, ChunkList(hexes, sizes))
    con.execute("DROP TABLE manifest_chunks")


# Python steps of migrations, run after the migration's statements in its transaction.
_PYTHON_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {6: _pack_existing_manifests}


# ---- maintenance (gc, fsck, stats) ----
#
# The queries of the admin commands (casd/maintenance.py). gc retires a chunk in two committed
# steps, both under SQLite's write lock, the lock `publish_chunk` holds while it renames a
# blob into place and marks its row live:
#   1. mark_garbage: live -> DELETING, only where nothing references the chunk (rechecked in
#      that transaction) and it is older than the grace period;
#   2. retire_chunks: for rows still DELETING, unlink the blob, delete the row, commit.
# The daemon treats a DELETING row as absent, so a client re-uploading that chunk revives the
# row and step 2 skips it. A kill between step 2's unlink and its commit leaves a DELETING
# row without a file: garbage in progress, which the next gc finishes.


# "Something relies on this chunk": a complete file, or an upload still pending and not
# expired at `now` (the one `?`). `{c}` names the chunks table in the calling statement.
_REFERENCED = (
    "EXISTS (SELECT 1 FROM manifest_digests mc WHERE mc.digest = {c}.digest AND ("
    "EXISTS (SELECT 1 FROM files f WHERE f.manifest_id = mc.manifest_id)"
    " OR EXISTS (SELECT 1 FROM uploads u WHERE u.manifest_id = mc.manifest_id"
    " AND u.state = 'pending' AND u.expires_at > ?)))"
)
_CHUNK_COLUMNS = "c.digest, c.algo, c.size, c.xxh3, c.state, c.created"


def _chunk_row(row) -> ChunkRow:
    digest, algo, size, xxh3, state, created = row
    return ChunkRow(Digest(Algo(algo), digest), size, xxh3, state, created)


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _delete_manifest_if_unused(con: sqlite3.Connection, manifest_id: int) -> int:
    """Like _drop_manifest_if_unused_sync, but says whether it deleted (1) or not (0)."""
    return con.execute(_DROP_MANIFEST_IF_UNUSED, (manifest_id, manifest_id, manifest_id)).rowcount


def _chunk_users(con: sqlite3.Connection, hex_: str, now: float) -> ChunkUsers:
    row = con.execute(
        f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.digest = ?", (hex_,)
    ).fetchone()
    files = tuple(
        (_file(r[:-1]), r[-1])
        for r in con.execute(
            f"SELECT DISTINCT {_FILE_COLUMNS}, mc.size FROM manifest_digests mc"
            " JOIN files f ON f.manifest_id = mc.manifest_id WHERE mc.digest = ?"
            " ORDER BY f.digest",
            (hex_,),
        ).fetchall()
    )
    uploads = tuple(
        r[0]
        for r in con.execute(
            "SELECT DISTINCT u.id FROM manifest_digests mc JOIN uploads u"
            " ON u.manifest_id = mc.manifest_id WHERE mc.digest = ? AND u.state = 'pending'"
            " AND u.expires_at > ? ORDER BY u.id",
            (hex_, now),
        ).fetchall()
    )
    return ChunkUsers(_chunk_row(row) if row else None, files, uploads)


def _drop_expired_uploads(con, ids: list[str], now: float) -> tuple[int, int]:
    uploads = manifests = 0
    for uid in ids:
        row = con.execute(
            "DELETE FROM uploads WHERE id = ? AND expires_at <= ? RETURNING manifest_id",
            (uid, now),
        ).fetchone()
        if row is not None:
            uploads += 1
            manifests += _delete_manifest_if_unused(con, row[0])
    return uploads, manifests


def _drop_unused_manifests(con, ids: list[int]) -> int:
    return sum(_delete_manifest_if_unused(con, mid) for mid in ids)


def _mark_garbage(con, digests: list[str], now: float, cutoff: float) -> list[ChunkRow]:
    rows = con.execute(
        f"UPDATE chunks SET state = ? WHERE digest IN ({_marks(len(digests))})"
        f" AND state = ? AND created < ? AND NOT {_REFERENCED.format(c='chunks')}"
        " RETURNING digest, algo, size, xxh3, state, created",
        (DELETING, *digests, LIVE, cutoff, now),
    ).fetchall()
    return [_chunk_row(r) for r in rows]


def _retire_chunks(con, lock: Callable, digests: list[str], unlink: Locked) -> list[ChunkRow]:
    rows = [
        _chunk_row(r)
        for r in con.execute(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c"
            f" WHERE c.digest IN ({_marks(len(digests))}) AND c.state = ?",
            (*digests, DELETING),
        ).fetchall()
    ]
    if rows:
        lock(unlink, rows)
        gone = [r.digest.hex for r in rows]
        con.execute(
            f"DELETE FROM chunks WHERE digest IN ({_marks(len(rows))}) AND state = ?",
            (*gone, DELETING),
        )
        # Nothing relied on these chunks; their proofs go with them (re-sent, they are new).
        con.execute(f"DELETE FROM tenant_chunks WHERE digest IN ({_marks(len(gone))})", gone)
    return rows


def _drop_unused_quarantined(con, now: float) -> int:
    return con.execute(
        f"DELETE FROM chunks WHERE state = ? AND NOT {_REFERENCED.format(c='chunks')}",
        (QUARANTINED, now),
    ).rowcount


_ROWED_OR_FILED = (
    "SELECT digest FROM chunks WHERE digest IN ({m})"
    " UNION SELECT mc.digest FROM manifest_digests mc JOIN files f"
    " ON f.manifest_id = mc.manifest_id WHERE mc.digest IN ({m})"
)


def _retire_orphans(con, lock: Callable, digests: list[str], unlink: Locked):
    rows = con.execute(
        _ROWED_OR_FILED.format(m=_marks(len(digests))), (*digests, *digests)
    ).fetchall()
    return lock(unlink, set(digests) - {r[0] for r in rows})


def _quarantine(con, lock: Callable, digests: list[str], now: float, decide: Locked):
    facts = {d: _chunk_users(con, d, now) for d in digests}
    chosen = lock(decide, facts)
    con.executemany(
        "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
        " VALUES (?, ?, ?, '', ?, ?) ON CONFLICT (digest) DO UPDATE SET"
        " state = excluded.state",
        [(d.hex, d.algo.value, size, now, QUARANTINED) for d, size in chosen],
    )
    return chosen


def _chunk_users_locked(con, lock: Callable, digests: list[str], now: float, probe):
    facts = {d: _chunk_users(con, d, now) for d in digests}
    answer = lock(probe, facts) if probe is not None else None
    return facts, answer


def _abort_uploads(con, ids: list[str]) -> list[str]:
    found = []
    for uid in ids:
        row = con.execute(
            "DELETE FROM uploads WHERE id = ? AND state = 'pending' RETURNING manifest_id",
            (uid,),
        ).fetchone()
        if row is not None:
            found.append(uid)
            _delete_manifest_if_unused(con, row[0])
    return found


class _Admin:
    """What gc, fsck, stats and ls ask of the catalogue (mixed into SqliteCatalog)."""

    _group: GroupWriter
    _path: Path
    _one: Callable
    _all: Callable

    # -- gc: plan (reads) --

    async def expired_uploads(self, now: float) -> list[tuple[str, int]]:
        rows = await self._all(
            "SELECT u.id, m.size FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.expires_at <= ? ORDER BY u.expires_at, u.id",
            (now,),
        )
        return [(r[0], r[1]) for r in rows]

    async def unused_manifests(self, now: float) -> list[int]:
        rows = await self._all(
            "SELECT m.id FROM manifests m"
            " WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.manifest_id = m.id)"
            " AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.manifest_id = m.id"
            " AND u.expires_at > ?) ORDER BY m.id",
            (now,),
        )
        return [r[0] for r in rows]

    async def garbage_chunks(self, now: float, cutoff: float) -> list[ChunkRow]:
        rows = await self._all(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.state = ? AND c.created < ?"
            f" AND NOT {_REFERENCED.format(c='c')} ORDER BY c.digest",
            (LIVE, cutoff, now),
        )
        return [_chunk_row(r) for r in rows]

    async def deleting_chunks(self) -> list[ChunkRow]:
        rows = await self._all(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.state = ? ORDER BY c.digest",
            (DELETING,),
        )
        return [_chunk_row(r) for r in rows]

    # -- gc: execute (each call is one short write transaction) --

    async def drop_expired_uploads(self, ids: list[str], now: float) -> tuple[int, int]:
        return await self._group.run(_drop_expired_uploads, ids, now)

    async def drop_unused_manifests(self, ids: list[int]) -> int:
        return await self._group.run(_drop_unused_manifests, ids)

    async def mark_garbage(self, digests: list[str], now: float, cutoff: float) -> list[ChunkRow]:
        if not digests:
            return []
        return await self._group.run(_mark_garbage, digests, now, cutoff)

    async def retire_chunks(
        self, digests: list[str], unlink: Locked[list[ChunkRow], object]
    ) -> list[ChunkRow]:
        if not digests:
            return []
        return await self._group.run(_retire_chunks, self._group.under_lock, digests, unlink)

    async def unused_quarantined(self, now: float) -> int:
        row = await self._one(
            f"SELECT count(*) FROM chunks c WHERE c.state = ? AND NOT {_REFERENCED.format(c='c')}",
            (QUARANTINED, now),
        )
        return row[0]

    async def drop_unused_quarantined(self, now: float) -> int:
        return await self._group.run(_drop_unused_quarantined, now)

    # -- gc: orphan blob files (a file under blobs/ with no row, left by a kill) --

    async def orphans(self, digests: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(digests), 500):
            part = digests[i : i + 500]
            rows = await self._all(_ROWED_OR_FILED.format(m=_marks(len(part))), (*part, *part))
            out.update(set(part) - {r[0] for r in rows})
        return out

    async def retire_orphans(self, digests: list[str], unlink: Locked[set[str], object]) -> object:
        if not digests:
            return await unlink(set())
        return await self._group.run(_retire_orphans, self._group.under_lock, digests, unlink)

    # -- fsck --

    async def quarantine(
        self,
        digests: Iterable[str],
        now: float,
        decide: Locked[dict[str, ChunkUsers], list[tuple[Digest, int]]],
    ) -> list[tuple[Digest, int]]:
        return await self._group.run(
            _quarantine, self._group.under_lock, list(digests), now, decide
        )

    async def all_chunks(self) -> list[ChunkRow]:
        rows = await self._all(f"SELECT {_CHUNK_COLUMNS} FROM chunks c")
        return [_chunk_row(r) for r in rows]

    async def file_chunk_sizes(self) -> list[tuple[str, int]]:
        rows = await self._all(
            "SELECT DISTINCT mc.digest, mc.size FROM files f"
            " JOIN manifest_digests mc ON mc.manifest_id = f.manifest_id"
        )
        return [(r[0], r[1]) for r in rows]

    async def chunk_users(
        self,
        digests: Iterable[str],
        now: float,
        probe: Locked[dict[str, ChunkUsers], object] | None = None,
    ) -> tuple[dict[str, ChunkUsers], object]:
        return await self._group.run(
            _chunk_users_locked, self._group.under_lock, list(digests), now, probe
        )

    # -- stats, ls --

    async def stats_counts(self, now: float) -> dict[str, int]:
        files, logical = await self._one("SELECT count(*), coalesce(sum(size), 0) FROM files")
        chunks, physical = await self._one(
            "SELECT count(*), coalesce(sum(size), 0) FROM chunks WHERE state = ?", (LIVE,)
        )
        deleting = (await self._one("SELECT count(*) FROM chunks WHERE state = ?", (DELETING,)))[0]
        pending, pending_bytes = await self._one(
            "SELECT count(*), coalesce(sum(m.size), 0) FROM uploads u"
            " JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.state = 'pending' AND u.expires_at > ?",
            (now,),
        )
        expired = (await self._one("SELECT count(*) FROM uploads WHERE expires_at <= ?", (now,)))[0]
        entries = (await self._one(_PENDING_ENTRIES, (now,)))[0]
        quarantined = (
            await self._one("SELECT count(*) FROM chunks WHERE state = ?", (QUARANTINED,))
        )[0]
        return {
            "pending_entries": entries,
            "quarantined_chunks": quarantined,
            "files": files,
            "logical_bytes": logical,
            "chunks": chunks,
            "physical_bytes": physical,
            "pending_uploads": pending,
            "pending_bytes": pending_bytes,
            "deleting_chunks": deleting,
            "expired_uploads": expired,
        }

    async def pending_uploads(self) -> list[PendingUpload]:
        """Every upload not merged yet (expired ones too, until gc drops them), oldest first."""
        rows = await self._all(
            "SELECT u.id, m.algo, m.digest, m.size, m.chunk_count, u.name, u.created,"
            " u.expires_at, u.client FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.state = 'pending' ORDER BY u.created, u.id"
        )
        return [PendingUpload(r[0], Digest(Algo(r[1]), r[2]), *r[3:]) for r in rows]

    async def abort_uploads(self, ids: list[str]) -> list[str]:
        return await self._group.run(_abort_uploads, ids)

    async def size_bytes(self) -> int:
        size = 0
        for p in (self._path, self._path.with_name(self._path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
        return size

    async def list_files(self, tenant: str | None = None) -> list[FileEntry]:
        if tenant is None:
            rows = await self._all(
                f"SELECT {_FILE_COLUMNS} FROM files f ORDER BY f.created, f.digest"
            )
        else:
            rows = await self._all(
                "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id"
                " FROM tenant_files t JOIN files f ON f.digest = t.digest WHERE t.tenant = ?"
                " ORDER BY t.created, t.digest",
                (tenant,),
            )
        return [_file(r) for r in rows]

    async def tenant_usage(self, now: float) -> dict[str, TenantUsage]:
        """See casd.catalog.Catalog.tenant_usage."""
        owned = await self._all(
            "SELECT tenant, count(*), coalesce(sum(size), 0) FROM tenant_files GROUP BY tenant"
        )
        pending = await self._all(
            "SELECT u.tenant, count(*), coalesce(sum(m.size), 0) FROM uploads u"
            " JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.tenant <> '' AND u.state = 'pending' AND u.expires_at > ? GROUP BY u.tenant",
            (now,),
        )
        return usage_table(owned, pending)


class SqliteCatalog(_Daemon, _Admin):
    """The catalogue in one SQLite file: the `Catalog` interface of casd.catalog, whose
    docstrings give each method's contract."""


def _store_file(
    con: sqlite3.Connection,
    lock: Callable,
    manifest: Manifest,
    chunks_key: str,
    xxh3: str,
    now: float,
    place: Locked[Digest, None],
    replace: bool,
    tenant: Tenant | None,
    events: HookEvents | None,
) -> tuple[FileEntry | None, bool]:
    """A one-request upload's catalogue work (see _Daemon.store_file): the checks first, so a
    refusal writes nothing; then the chunk as _publish_chunk records it, the manifest and
    file as _begin_upload and _register_file would, the tenant's ownership as _own_file."""
    _queue_events(con, events, None)
    d = manifest.digest
    frow = con.execute(
        f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ?", (d.hex,)
    ).fetchone()
    entry = _file(frow) if frow is not None else None
    if entry is not None and (entry.size != manifest.size or entry.digest.algo is not d.algo):
        raise FileDigestMismatch(f"a file of {manifest.size} bytes cannot be stored under {d.hex}")
    owned = tenant is not None and (
        con.execute(_TENANT_FILE, (tenant.name, d.hex, d.algo.value)).fetchone() is not None
    )
    if tenant is not None and tenant.quota is not None and not owned:
        _check_quota(con, tenant.name, tenant.quota, manifest.size, now)
    stored = False
    if manifest.chunks:
        if replace or not _is_live(con, d):
            lock(place, d)
            con.execute(
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, xxh3 = excluded.xxh3, created = excluded.created,"
                " state = excluded.state",
                (d.hex, d.algo.value, manifest.size, xxh3, now, LIVE),
            )
            stored = True
        if tenant is not None:
            stored = _prove_chunk(con, tenant.name, d) or stored
    if entry is None:
        manifest_id: int = con.execute(
            "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (d.algo.value, d.hex, manifest.size, chunks_key, len(manifest.chunks), now),
        ).fetchone()[0]
        chunks = ChunkList.of(manifest.chunks)
        _insert_list(con, manifest_id, chunks, 0, packed.distinct(chunks))
        con.execute(
            "INSERT INTO files (digest, algo, size, manifest_id, ext, name, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (d.hex, d.algo.value, manifest.size, manifest_id, manifest.ext, manifest.name, now),
        )
        entry = FileEntry(d, manifest.size, manifest.ext, manifest.name, now, manifest_id)
    if tenant is not None:
        con.execute(
            "INSERT INTO tenant_files (tenant, digest, size, ext, name, created)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, digest) DO NOTHING",
            (tenant.name, d.hex, manifest.size, manifest.ext, manifest.name, now),
        )
        # It sent every byte of the file: no chunk of the file's stored manifest is news to it.
        con.execute(
            "INSERT INTO tenant_chunks (tenant, digest) SELECT ?, digest"
            " FROM manifest_digests WHERE manifest_id = ? ON CONFLICT DO NOTHING",
            (tenant.name, entry.manifest_id),
        )
        trow = con.execute(_TENANT_FILE, (tenant.name, d.hex, d.algo.value)).fetchone()
        entry = _file(trow)
    _queue_events(con, events, entry)
    return entry, stored
