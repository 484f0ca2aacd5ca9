"""The PostgreSQL catalogue engine: one catalogue shared by several daemons and admin commands.

Every operation is one transaction on a connection of a pool (asyncpg), READ COMMITTED for
writes, REPEATABLE READ READ ONLY for reads that make several statements (one snapshot).
Locks (docs/admin.md gives the argument that they keep the catalogue's invariant):

- the digest lock: `pg_advisory_xact_lock` on the first 64 bits of a chunk digest, held
  while `publish_chunk` checks the row, places the blob and writes the row, while gc retires
  a blob (unlinks it, drops the row), while gc drops orphan blobs, and while fsck probes or
  quarantines. Several digests are locked in ascending key order (no lock-order cycles);
- the reference lock: one advisory key, taken shared by the writes that make a chunk
  relied upon (begin_upload, register_file) and exclusive by gc's mark step, so gc's "is
  anything using this chunk?" sees every reference committed or about to commit;
- the budget lock: one advisory key, exclusive, while a new upload checks the pending
  budget and inserts its rows, so two daemons cannot both take the last of it;
- a manifest lock on the file digest while begin_upload looks for an upload to resume, so
  the same manifest sent to two daemons at once gets one upload;
- the upload row (`SELECT ... FOR UPDATE`) while it is merged, resumed or aborted.

A database that cannot be reached or drops the connection is Unavailable (nothing was
written; the client retries); a deadlock or serialization failure is retried here.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import asyncpg

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
    check_seal,
    check_stream_batch,
    opened_stream,
    packed,
    placeholder,
    usage_table,
)
from casd.config import masked
from casd.digest import Algo, Digest
from casd.errors import (
    BadRequest,
    FileDigestMismatch,
    Incomplete,
    QuotaExceeded,
    TooLarge,
    TooManyPending,
    Unavailable,
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

log = logging.getLogger("casd.catalog")

# Advisory lock keys of their own; digest keys are the digests' first 64 bits, and a clash
# with these would only make two operations wait for each other, never break a rule.
_MIGRATE_KEY = 0x6361_7364_0000_0001
_REFERENCE_KEY = 0x6361_7364_0000_0002
_BUDGET_KEY = 0x6361_7364_0000_0003

# A statement slower than this, or a connection not made within CONNECT_TIMEOUT, gives up:
# the request gets 503 and the client retries, instead of hanging on a stuck database.
COMMAND_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
_RETRIES = 5  # deadlocks (two gc processes) and serialization failures

_UPLOAD_COLUMNS = (
    "u.id, u.manifest_id, m.algo, m.digest, m.size, u.ext, u.name, u.state, u.expires_at,"
    " m.chunks_key, u.tenant"
)
_FILE_COLUMNS = "f.algo, f.digest, f.size, f.ext, f.name, f.created, f.manifest_id"
# A file as one tenant sees it: the shared row, under the name and ext that tenant gave it.
_TENANT_FILE = (
    "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id FROM files f"
    " JOIN tenant_files t ON t.digest = f.digest AND t.tenant = $3"
    " WHERE f.digest = $1 AND f.algo = $2"
)
_CHUNK_COLUMNS = "c.digest, c.algo, c.size, c.xxh3, c.state, c.created"
_UPLOAD_BY_ID = (
    f"SELECT {_UPLOAD_COLUMNS} FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
    " WHERE u.id = $1"
)
# "Something relies on this chunk": a complete file, or an upload pending and unexpired at
# `now` (parameter ${n}). `{c}` names the chunks table in the calling statement.
_REFERENCED = (
    "EXISTS (SELECT 1 FROM manifest_digests mc WHERE mc.digest = {c}.digest AND ("
    "EXISTS (SELECT 1 FROM files f WHERE f.manifest_id = mc.manifest_id)"
    " OR EXISTS (SELECT 1 FROM uploads u WHERE u.manifest_id = mc.manifest_id"
    " AND u.state = 'pending' AND u.expires_at > ${n})))"
)
# The digests of a manifest that are missing (stored, and in tenant mode also proved by the
# tenant, is present): the missing list is these in manifest order.
_ABSENT = (
    "SELECT mc.digest FROM manifest_digests mc WHERE mc.manifest_id = $1"
    " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.digest = mc.digest AND c.state = 0)"
)
_ABSENT_FOR_TENANT = (
    "SELECT mc.digest FROM manifest_digests mc WHERE mc.manifest_id = $1"
    " AND (NOT EXISTS (SELECT 1 FROM chunks c WHERE c.digest = mc.digest AND c.state = 0)"
    " OR NOT EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = $2 AND t.digest = mc.digest))"
)
_LIST = "SELECT start, digests, sizes FROM manifest_parts WHERE manifest_id = $1 ORDER BY start"
# The parts of a manifest's list that hold positions $2 .. $3 - 1.
_PARTS_OF_PAGE = (
    "SELECT start, digests, sizes FROM manifest_parts WHERE manifest_id = $1 AND start < $3"
    " AND start >= coalesce((SELECT max(start) FROM manifest_parts"
    " WHERE manifest_id = $1 AND start <= $2), 0) ORDER BY start"
)
# A chunk of a new manifest stored with another size than it gives; in tenant mode only the
# chunks this tenant proved (as in the SQLite engine, which says why).
_CLASH = (
    "SELECT mc.digest, mc.size, c.size FROM manifest_digests mc"
    " JOIN chunks c ON c.digest = mc.digest"
    " WHERE mc.manifest_id = $1 AND c.state = $2 AND c.size <> mc.size"
)
_PROVED = " AND EXISTS (SELECT 1 FROM tenant_chunks t WHERE t.tenant = $3 AND t.digest = mc.digest)"
# The same for a stored chunk `c`, when the tenant (parameter n, text) is not null.
_PROVED_IF_TENANT = (
    " AND (${n}::text IS NULL OR EXISTS"
    " (SELECT 1 FROM tenant_chunks t WHERE t.tenant = ${n} AND t.digest = c.digest))"
)
# A pending upload holds at least one entry: an open streamed upload that lists nothing yet
# still has its rows.
_PENDING_ENTRIES = (
    "SELECT coalesce(sum(GREATEST(m.chunk_count, 1)), 0) FROM uploads u"
    " JOIN manifests m ON m.id = u.manifest_id WHERE u.state = 'pending' AND u.expires_at > $1"
)
_DROP_MANIFEST_IF_UNUSED = (
    "DELETE FROM manifests WHERE id = $1"
    " AND NOT EXISTS (SELECT 1 FROM files WHERE manifest_id = $1)"
    " AND NOT EXISTS (SELECT 1 FROM uploads WHERE manifest_id = $1)"
)
_ROWED_OR_FILED = (
    "SELECT digest FROM chunks WHERE digest = ANY($1::text[])"
    " UNION SELECT mc.digest FROM manifest_digests mc JOIN files f"
    " ON f.manifest_id = mc.manifest_id WHERE mc.digest = ANY($1::text[])"
)


def digest_key(hex_: str) -> int:
    """The advisory lock key of a chunk digest: its first 64 bits, as a signed bigint."""
    key = int(hex_[:16], 16)
    return key - (1 << 64) if key >= 1 << 63 else key


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
    algo, digest, size, ext, name, created, manifest_id = tuple(row)[:7]
    return FileEntry(Digest(Algo(algo), digest), size, ext, name, created, manifest_id)


def _chunk_row(row) -> ChunkRow:
    digest, algo, size, xxh3, state, created = row
    return ChunkRow(Digest(Algo(algo), digest), size, xxh3, state, created)


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migrations/postgres/NNNN_name.sql, in order."""
    found = []
    for res in importlib.resources.files("casd.migrations").joinpath("postgres").iterdir():
        name = res.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, res.read_text()))
    return sorted(found)


def _unavailable(exc: BaseException) -> bool:
    """True for the failures that mean "the database is not answering", not "this is wrong"."""
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        # 08 connection, 53 insufficient resources, 57 operator intervention (shutdown,
        # cancelled by timeout), 58 system error.
        return state[:2] in ("08", "53", "57", "58")
    return False


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") in (
        "40001",
        "40P01",
    )


async def _lock_digests(con: asyncpg.Connection, digests: Iterable[str]) -> None:
    """Take the digest lock of each of `digests`, in ascending key order."""
    # One at a time, in order: a set-returning form would not promise the order.
    for key in sorted({digest_key(d) for d in digests}):
        await con.execute("SELECT pg_advisory_xact_lock($1)", key)


class _Theirs(Exception):
    """An error raised by a Locked callback: carried out of the transaction unchanged (its
    writes rolled back), never taken for a database failure."""

    def __init__(self, error: Exception):
        self.error = error


async def _locked(fn: Locked, arg):
    """Await a Locked callback inside the transaction; its errors stay its own."""
    try:
        return await fn(arg)
    except Exception as exc:
        raise _Theirs(exc) from exc


class _Writes:
    """Depth and commit timing of the engine's transactions (metrics)."""

    def __init__(self) -> None:
        self.depth = 0
        self.on_commit: Callable[[float], None] | None = None


class PostgresCatalog:
    """The catalogue in a PostgreSQL database: the `Catalog` interface of casd.catalog, whose
    docstrings give each method's contract."""

    def __init__(self, pool: asyncpg.Pool, url: str):
        self._pool = pool
        self._url = url
        self._writes = _Writes()

    @classmethod
    async def open(cls, url: str, readers: int = 4) -> PostgresCatalog:
        """Connect to `url`, migrating the schema as needed (safe when several daemons start
        at once). Unavailable, naming the URL without its password, when it cannot."""
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=max(4, readers + 4),
                command_timeout=COMMAND_TIMEOUT,
                timeout=CONNECT_TIMEOUT,
            )
        except Exception as exc:
            raise Unavailable(
                f"cannot open the catalogue database {masked(url)}: {_describe(exc, url)}"
            ) from None
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT * 2) as con:
                await _migrate(con)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, Exception) and _unavailable(exc):
                raise Unavailable(
                    f"cannot open the catalogue database {masked(url)}: {_describe(exc, url)}"
                ) from None
            raise
        return cls(pool, url)

    @property
    def writer(self) -> _Writes:
        return self._writes

    async def close(self) -> None:
        await self._pool.close()

    async def _run(
        self, fn: Callable[..., Awaitable], *args, read: bool = False, snapshot: bool = False
    ):
        """fn(connection, *args) in one write transaction, or (`read`) as one statement that
        is its own snapshot, or (`snapshot`) in one read-only REPEATABLE READ transaction for
        several statements; failures of the database made Unavailable, deadlocks retried."""
        read = read or snapshot
        for attempt in range(_RETRIES):
            started = time.perf_counter()
            if not read:
                self._writes.depth += 1
            try:
                async with self._pool.acquire(timeout=COMMAND_TIMEOUT) as con:
                    if read and not snapshot:
                        result = await fn(con, *args)
                    else:
                        tx = (
                            con.transaction(isolation="repeatable_read", readonly=True)
                            if snapshot
                            else con.transaction()
                        )
                        async with tx:
                            result = await fn(con, *args)
            except _Theirs as theirs:
                raise theirs.error from None
            except Exception as exc:
                if _retryable(exc) and attempt + 1 < _RETRIES:
                    await asyncio.sleep(0.01 * (attempt + 1))
                    continue
                if _unavailable(exc) or _retryable(exc):
                    raise Unavailable(
                        f"the catalogue database is not answering: {_describe(exc, self._url)}"
                    ) from exc
                raise
            finally:
                if not read:
                    self._writes.depth -= 1
            if not read and self._writes.on_commit is not None:
                self._writes.on_commit(time.perf_counter() - started)
            return result
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *args) -> list:
        return await self._run(_fetch, sql, args, read=True)

    async def _one(self, sql: str, *args):
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    # ---- daemon reads ----

    async def ping(self) -> None:
        await self._one("SELECT count(*) FROM schema_migrations")

    async def count_expired_pending(self, now: float) -> int:
        row = await self._one(
            "SELECT count(*) FROM uploads WHERE state = 'pending' AND expires_at <= $1", now
        )
        return row[0]

    async def get_file(self, digest: Digest, tenant: str | None = None) -> FileEntry | None:
        row = await self._run(_get_file, digest, tenant, read=True)
        return _file(row) if row else None

    async def files_page(self, tenant: str | None, after: str, limit: int) -> list[FileEntry]:
        if tenant is None:
            rows = await self._fetch(
                f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest > $1 ORDER BY f.digest"
                " LIMIT $2",
                after,
                limit,
            )
        else:
            rows = await self._fetch(
                "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id"
                " FROM tenant_files t JOIN files f ON f.digest = t.digest"
                " WHERE t.tenant = $1 AND t.digest > $2 ORDER BY t.digest LIMIT $3",
                tenant,
                after,
                limit,
            )
        return [_file(r) for r in rows]

    async def file_with_chunks(
        self, digest: Digest, tenant: str | None = None
    ) -> tuple[FileEntry, list[tuple[str, int]]] | None:
        async def read(con):
            row = await _get_file(con, digest, tenant)
            if row is None:
                return None
            entry = _file(row)
            chunks = packed.unpack(await con.fetch(_LIST, entry.manifest_id))
            return entry, list(zip(chunks.hexes, chunks.sizes, strict=True))

        return await self._run(read, snapshot=True)

    async def get_upload(self, upload_id: str) -> Upload | None:
        row = await self._one(_UPLOAD_BY_ID, upload_id)
        return _upload(row) if row else None

    async def manifest_size_of(self, manifest_id: int, digest: Digest) -> int | None:
        row = await self._one(
            "SELECT size FROM manifest_digests WHERE manifest_id = $1 AND digest = $2",
            manifest_id,
            digest.hex,
        )
        return row[0] if row else None

    async def has_chunk(self, digest: Digest) -> bool:
        row = await self._one(
            "SELECT 1 FROM chunks WHERE digest = $1 AND state = $2", digest.hex, LIVE
        )
        return row is not None

    async def present_chunks(self, digests: set[str]) -> set[str]:
        if not digests:
            return set()
        rows = await self._fetch(
            "SELECT digest FROM chunks WHERE state = $1 AND digest = ANY($2::text[])",
            LIVE,
            list(digests),
        )
        return {r[0] for r in rows}

    async def damaged(self, manifest_id: int) -> bool:
        row = await self._one(
            "SELECT 1 FROM chunks c JOIN manifest_digests mc ON mc.digest = c.digest"
            " WHERE c.state = 2 AND mc.manifest_id = $1 LIMIT 1",
            manifest_id,
        )
        return row is not None

    async def missing(self, manifest_id: int, tenant: str | None = None) -> list[str]:
        return await self._run(_missing, manifest_id, tenant, snapshot=True)

    async def manifest_chunks(self, manifest_id: int) -> list[tuple[str, int]]:
        chunks = packed.unpack(await self._fetch(_LIST, manifest_id))
        return list(zip(chunks.hexes, chunks.sizes, strict=True))

    async def manifest_chunk_count(self, manifest_id: int) -> int | None:
        row = await self._one("SELECT chunk_count FROM manifests WHERE id = $1", manifest_id)
        return row[0] if row else None

    async def manifest_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int]]:
        rows = await self._fetch(_PARTS_OF_PAGE, manifest_id, start, start + limit)
        return packed.page(rows, start, limit)

    async def file_chunks_page(
        self, manifest_id: int, start: int, limit: int
    ) -> list[tuple[str, int, str | None]]:
        # A quarantine row made for a blob never verified here holds '' for its xxh3.
        async def read(con):
            rows = await con.fetch(_PARTS_OF_PAGE, manifest_id, start, start + limit)
            chunks = packed.page(rows, start, limit)
            found = await con.fetch(
                "SELECT digest, NULLIF(xxh3, '') FROM chunks WHERE digest = ANY($1::text[])",
                list({h for h, _size in chunks}),
            )
            xxh3 = {r[0]: r[1] for r in found}
            return [(h, size, xxh3.get(h)) for h, size in chunks]

        return await self._run(read, snapshot=True)

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
        return await self._run(
            _begin_upload, manifest, chunks_key, now, expires_at, new_id, client, budget, tenant
        )

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
        return await self._run(
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
        return await self._run(
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
        return await self._run(_seal_stream, upload_id, digest, size, chunks_key)

    async def touch_upload(self, upload_id: str, now: float, expires_at: float) -> bool:
        async def touch(con):
            status = await con.execute(
                "UPDATE uploads SET expires_at = $1 WHERE id = $2 AND state = 'pending'"
                " AND expires_at > $3",
                expires_at,
                upload_id,
                now,
            )
            return status.endswith(" 1")

        return await self._run(touch)

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
        async def publish(con):
            if touch is not None:
                await con.execute(
                    "UPDATE uploads SET expires_at = $1 WHERE id = $2 AND state = 'pending'"
                    " AND expires_at > $3",
                    touch[1],
                    touch[0],
                    now,
                )
            await _lock_digests(con, [digest.hex])
            if not replace and await con.fetchval(
                "SELECT 1 FROM chunks WHERE digest = $1 AND state = $2", digest.hex, LIVE
            ):
                return False
            await _locked(place, digest)
            await con.execute(
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, xxh3 = excluded.xxh3, created = excluded.created,"
                " state = excluded.state",
                digest.hex,
                digest.algo.value,
                size,
                xxh3,
                now,
                LIVE,
            )
            return True

        return await self._run(publish)

    async def register_file(
        self, upload_id: str, now: float, events: HookEvents | None = None
    ) -> FileEntry | None:
        return await self._run(_register_file, upload_id, now, events)

    async def drop_pending_upload(self, upload_id: str) -> bool:
        async def drop(con):
            mid = await con.fetchval(
                "DELETE FROM uploads WHERE id = $1 AND state = 'pending' RETURNING manifest_id",
                upload_id,
            )
            if mid is None:
                return False
            await con.execute(_DROP_MANIFEST_IF_UNUSED, mid)
            return True

        return await self._run(drop)

    async def delete_file(
        self, digest: Digest, events: HookEvents | None = None, tenant: str | None = None
    ) -> bool:
        async def delete(con):
            await _queue_events(con, events, None)
            if tenant is not None:
                row = await con.fetchrow(
                    _TENANT_FILE + " FOR UPDATE OF f", *_file_key(digest, tenant)
                )
                if row is None:
                    return False
                entry = _file(row)
                await con.execute(
                    "DELETE FROM tenant_files WHERE tenant = $1 AND digest = $2",
                    tenant,
                    digest.hex,
                )
                # Its own merged uploads go, so its repeated merge cannot answer "complete".
                await con.execute(
                    "DELETE FROM uploads WHERE manifest_id IN"
                    " (SELECT id FROM manifests WHERE digest = $1)"
                    " AND state = 'merged' AND tenant = $2",
                    digest.hex,
                    tenant,
                )
                if await con.fetchval(
                    "SELECT 1 FROM tenant_files WHERE digest = $1 LIMIT 1", digest.hex
                ):
                    await _queue_events(con, events, entry)
                    return True  # another tenant still owns it: the file stays
            # The file row first, then its owners: a tenant's merge locks them in that order.
            row = await con.fetchrow(
                "DELETE FROM files f WHERE f.digest = $1 AND f.algo = $2"
                f" RETURNING {_FILE_COLUMNS}",
                digest.hex,
                digest.algo.value,
            )
            if row is None:
                return False
            await con.execute("DELETE FROM tenant_files WHERE digest = $1", digest.hex)
            if tenant is None:
                entry = _file(row)
            mid = entry.manifest_id
            # The merged uploads that built it go too, so a repeated merge cannot answer
            # "complete" for a file that is gone.
            await con.execute(
                "DELETE FROM uploads WHERE manifest_id = $1 AND state = 'merged'", mid
            )
            await con.execute(_DROP_MANIFEST_IF_UNUSED, mid)
            await _queue_events(con, events, entry)
            return True

        return await self._run(delete)

    async def prove_chunk(self, tenant: str, digest: Digest) -> bool:
        async def prove(con):
            status = await con.execute(
                "INSERT INTO tenant_chunks (tenant, digest) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                tenant,
                digest.hex,
            )
            return _count(status) == 1

        return await self._run(prove)

    # ---- webhook queue ----

    async def hook_events(self, url: str, limit: int) -> list[tuple[int, str, str]]:
        rows = await self._fetch(
            "SELECT id, kind, body FROM hook_events WHERE url = $1 ORDER BY id LIMIT $2",
            url,
            limit,
        )
        return [tuple(r) for r in rows]

    async def count_hook_events(self) -> int:
        return (await self._one("SELECT count(*) FROM hook_events"))[0]

    async def hook_event_done(self, event_id: int) -> None:
        async def done(con):
            await con.execute("DELETE FROM hook_events WHERE id = $1", event_id)

        await self._run(done)

    # ---- gc: plan ----

    async def expired_uploads(self, now: float) -> list[tuple[str, int]]:
        rows = await self._fetch(
            "SELECT u.id, m.size FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.expires_at <= $1 ORDER BY u.expires_at, u.id",
            now,
        )
        return [(r[0], r[1]) for r in rows]

    async def unused_manifests(self, now: float) -> list[int]:
        rows = await self._fetch(
            "SELECT m.id FROM manifests m"
            " WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.manifest_id = m.id)"
            " AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.manifest_id = m.id"
            " AND u.expires_at > $1) ORDER BY m.id",
            now,
        )
        return [r[0] for r in rows]

    async def garbage_chunks(self, now: float, cutoff: float) -> list[ChunkRow]:
        rows = await self._fetch(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.state = $1 AND c.created < $2"
            f" AND NOT {_REFERENCED.format(c='c', n=3)} ORDER BY c.digest",
            LIVE,
            cutoff,
            now,
        )
        return [_chunk_row(r) for r in rows]

    async def deleting_chunks(self) -> list[ChunkRow]:
        rows = await self._fetch(
            f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.state = $1 ORDER BY c.digest",
            DELETING,
        )
        return [_chunk_row(r) for r in rows]

    # ---- gc: execute ----

    async def drop_expired_uploads(self, ids: list[str], now: float) -> tuple[int, int]:
        async def drop(con):
            uploads = manifests = 0
            for uid in ids:
                mid = await con.fetchval(
                    "DELETE FROM uploads WHERE id = $1 AND expires_at <= $2 RETURNING manifest_id",
                    uid,
                    now,
                )
                if mid is not None:
                    uploads += 1
                    manifests += _count(await con.execute(_DROP_MANIFEST_IF_UNUSED, mid))
            return uploads, manifests

        return await self._run(drop)

    async def drop_unused_manifests(self, ids: list[int]) -> int:
        async def drop(con):
            n = 0
            for mid in ids:
                n += _count(await con.execute(_DROP_MANIFEST_IF_UNUSED, mid))
            return n

        return await self._run(drop)

    async def mark_garbage(self, digests: list[str], now: float, cutoff: float) -> list[ChunkRow]:
        if not digests:
            return []

        async def mark(con):
            # Exclusive: waits for every begin_upload/register_file in flight, so the check
            # below sees each reference they make (READ COMMITTED: a fresh snapshot per
            # statement, taken after the lock).
            await con.execute("SELECT pg_advisory_xact_lock($1)", _REFERENCE_KEY)
            rows = await con.fetch(
                "UPDATE chunks c SET state = $1 WHERE c.digest = ANY($2::text[])"
                f" AND c.state = $3 AND c.created < $4 AND NOT {_REFERENCED.format(c='c', n=5)}"
                f" RETURNING {_CHUNK_COLUMNS}",
                DELETING,
                digests,
                LIVE,
                cutoff,
                now,
            )
            return sorted((_chunk_row(r) for r in rows), key=lambda r: r.digest.hex)

        return await self._run(mark)

    async def retire_chunks(
        self, digests: list[str], unlink: Locked[list[ChunkRow], object]
    ) -> list[ChunkRow]:
        if not digests:
            return []

        async def retire(con):
            await _lock_digests(con, digests)
            rows = [
                _chunk_row(r)
                for r in await con.fetch(
                    f"SELECT {_CHUNK_COLUMNS} FROM chunks c"
                    " WHERE c.digest = ANY($1::text[]) AND c.state = $2 ORDER BY c.digest",
                    digests,
                    DELETING,
                )
            ]
            if rows:
                await _locked(unlink, rows)
                gone = [r.digest.hex for r in rows]
                await con.execute(
                    "DELETE FROM chunks WHERE digest = ANY($1::text[]) AND state = $2",
                    gone,
                    DELETING,
                )
                # Nothing relied on these chunks; their proofs go with them.
                await con.execute("DELETE FROM tenant_chunks WHERE digest = ANY($1::text[])", gone)
            return rows

        return await self._run(retire)

    async def unused_quarantined(self, now: float) -> int:
        row = await self._one(
            "SELECT count(*) FROM chunks c WHERE c.state = $1"
            f" AND NOT {_REFERENCED.format(c='c', n=2)}",
            QUARANTINED,
            now,
        )
        return row[0]

    async def drop_unused_quarantined(self, now: float) -> int:
        async def drop(con):
            return _count(
                await con.execute(
                    "DELETE FROM chunks c WHERE c.state = $1"
                    f" AND NOT {_REFERENCED.format(c='c', n=2)}",
                    QUARANTINED,
                    now,
                )
            )

        return await self._run(drop)

    async def orphans(self, digests: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(digests), 1000):
            part = digests[i : i + 1000]
            rows = await self._fetch(_ROWED_OR_FILED, part)
            out.update(set(part) - {r[0] for r in rows})
        return out

    async def retire_orphans(self, digests: list[str], unlink: Locked[set[str], object]) -> object:
        if not digests:
            return await unlink(set())

        async def retire(con):
            await _lock_digests(con, digests)
            rows = await con.fetch(_ROWED_OR_FILED, digests)
            return await _locked(unlink, set(digests) - {r[0] for r in rows})

        return await self._run(retire)

    # ---- fsck ----

    async def quarantine(
        self,
        digests: Iterable[str],
        now: float,
        decide: Locked[dict[str, ChunkUsers], list[tuple[Digest, int]]],
    ) -> list[tuple[Digest, int]]:
        wanted = list(digests)

        async def set_aside(con):
            await _lock_digests(con, wanted)
            facts = {d: await _chunk_users(con, d, now) for d in wanted}
            chosen = await _locked(decide, facts)
            await con.executemany(
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES ($1, $2, $3, '', $4, $5) ON CONFLICT (digest) DO UPDATE SET"
                " state = excluded.state",
                [(d.hex, d.algo.value, size, now, QUARANTINED) for d, size in chosen],
            )
            return chosen

        return await self._run(set_aside)

    async def all_chunks(self) -> list[ChunkRow]:
        rows = await self._fetch(f"SELECT {_CHUNK_COLUMNS} FROM chunks c")
        return [_chunk_row(r) for r in rows]

    async def file_chunk_sizes(self) -> list[tuple[str, int]]:
        rows = await self._fetch(
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
        wanted = list(digests)

        async def look(con):
            await _lock_digests(con, wanted)
            facts = {d: await _chunk_users(con, d, now) for d in wanted}
            answer = await _locked(probe, facts) if probe is not None else None
            return facts, answer

        return await self._run(look)

    # ---- stats, ls, uploads ----

    async def stats_counts(self, now: float) -> dict[str, int]:
        async def count(con):
            files, logical = await con.fetchrow(
                "SELECT count(*), coalesce(sum(size), 0) FROM files"
            )
            chunks, physical = await con.fetchrow(
                "SELECT count(*), coalesce(sum(size), 0) FROM chunks WHERE state = $1", LIVE
            )
            deleting = await con.fetchval("SELECT count(*) FROM chunks WHERE state = $1", DELETING)
            pending, pending_bytes = await con.fetchrow(
                "SELECT count(*), coalesce(sum(m.size), 0) FROM uploads u"
                " JOIN manifests m ON m.id = u.manifest_id"
                " WHERE u.state = 'pending' AND u.expires_at > $1",
                now,
            )
            expired = await con.fetchval("SELECT count(*) FROM uploads WHERE expires_at <= $1", now)
            entries = await con.fetchval(_PENDING_ENTRIES, now)
            quarantined = await con.fetchval(
                "SELECT count(*) FROM chunks WHERE state = $1", QUARANTINED
            )
            return {
                "pending_entries": int(entries),
                "quarantined_chunks": quarantined,
                "files": files,
                "logical_bytes": int(logical),
                "chunks": chunks,
                "physical_bytes": int(physical),
                "pending_uploads": pending,
                "pending_bytes": int(pending_bytes),
                "deleting_chunks": deleting,
                "expired_uploads": expired,
            }

        return await self._run(count, snapshot=True)

    async def pending_uploads(self) -> list[PendingUpload]:
        rows = await self._fetch(
            "SELECT u.id, m.algo, m.digest, m.size, m.chunk_count, u.name, u.created,"
            " u.expires_at, u.client FROM uploads u JOIN manifests m ON m.id = u.manifest_id"
            " WHERE u.state = 'pending' ORDER BY u.created, u.id"
        )
        return [PendingUpload(r[0], Digest(Algo(r[1]), r[2]), *tuple(r)[3:]) for r in rows]

    async def abort_uploads(self, ids: list[str]) -> list[str]:
        async def abort(con):
            found = []
            for uid in ids:
                mid = await con.fetchval(
                    "DELETE FROM uploads WHERE id = $1 AND state = 'pending' RETURNING manifest_id",
                    uid,
                )
                if mid is not None:
                    found.append(uid)
                    await con.execute(_DROP_MANIFEST_IF_UNUSED, mid)
            return found

        return await self._run(abort)

    async def size_bytes(self) -> int:
        return (await self._one("SELECT pg_database_size(current_database())"))[0]

    async def list_files(self, tenant: str | None = None) -> list[FileEntry]:
        if tenant is None:
            rows = await self._fetch(
                f"SELECT {_FILE_COLUMNS} FROM files f ORDER BY f.created, f.digest"
            )
        else:
            rows = await self._fetch(
                "SELECT f.algo, f.digest, f.size, t.ext, t.name, t.created, f.manifest_id"
                " FROM tenant_files t JOIN files f ON f.digest = t.digest WHERE t.tenant = $1"
                " ORDER BY t.created, t.digest",
                tenant,
            )
        return [_file(r) for r in rows]

    async def tenant_usage(self, now: float) -> dict[str, TenantUsage]:
        async def usage(con):
            owned = await con.fetch(
                "SELECT tenant, count(*), coalesce(sum(size), 0) FROM tenant_files GROUP BY tenant"
            )
            pending = await con.fetch(
                "SELECT u.tenant, count(*), coalesce(sum(m.size), 0) FROM uploads u"
                " JOIN manifests m ON m.id = u.manifest_id WHERE u.tenant <> ''"
                " AND u.state = 'pending' AND u.expires_at > $1 GROUP BY u.tenant",
                now,
            )
            return usage_table(owned, pending)

        return await self._run(usage, snapshot=True)

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
        """See casd.catalog.Catalog.store_file: here the handshake's, chunk PUT's and merge's
        transactions in turn, under an upload `new_id` (a failure between them leaves a
        pending upload that expires at `expires_at`)."""
        upload, _missing = await self.begin_upload(
            manifest, chunks_key, now, expires_at, new_id, "", None, tenant
        )
        stored = False
        if manifest.chunks:
            d = manifest.digest
            stored = await self.publish_chunk(
                d, manifest.size, xxh3, now, place, (upload.id, expires_at), replace
            )
            if tenant is not None:
                stored = await self.prove_chunk(tenant.name, d) or stored
        return await self.register_file(upload.id, now, events), stored


# ---- operations: functions of a connection inside a transaction -----------------------


async def _fetch(con: asyncpg.Connection, sql: str, args: tuple) -> list:
    return await con.fetch(sql, *args)


def _count(status: str) -> int:
    """The row count of a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[1])


def _describe(exc: BaseException, url: str) -> str:
    """An error's text with the URL's password masked, should the driver have quoted it."""
    text = f"{type(exc).__name__}: {exc}"
    return text.replace(url, masked(url))


async def _missing(
    con: asyncpg.Connection,
    manifest_id: int,
    tenant: str | None = None,
    uses: dict[str, int] | None = None,
) -> list[str]:
    """The manifest's digests, once each in manifest order, less those stored (and, with
    `tenant`, proved). `uses`: the manifest's distinct digests when the caller has them."""
    # One anti-join gives the missing set (on PostgreSQL, where the planner reads it as one
    # hash join); the manifest's order comes from its list, unpacked only when some are.
    if tenant is None:
        rows = await con.fetch(_ABSENT, manifest_id)
    else:
        rows = await con.fetch(_ABSENT_FOR_TENANT, manifest_id, tenant)
    if not rows:
        return []
    absent = {r[0] for r in rows}
    del rows
    if uses is None:
        uses = packed.distinct(packed.unpack(await con.fetch(_LIST, manifest_id)))
    if len(absent) == len(uses):
        return list(uses)
    return [h for h in uses if h in absent]


async def _insert_list(
    con: asyncpg.Connection,
    manifest_id: int,
    chunks: ChunkList,
    start: int,
    uses: dict[str, int],
    fresh: bool,
) -> None:
    """Store `chunks` as the manifest's list from position `start` on, and the digests of
    `uses` (digest: size) it did not use yet (`fresh`: it used none)."""
    await con.copy_records_to_table(
        "manifest_parts",
        columns=("manifest_id", "start", "digests", "sizes"),
        records=[(manifest_id, *part) for part in packed.parts(chunks, start)],
    )
    if fresh:
        await con.copy_records_to_table(
            "manifest_digests",
            columns=("manifest_id", "digest", "size"),
            records=[(manifest_id, h, uses[h]) for h in sorted(uses)],
        )
    else:
        await con.execute(
            "INSERT INTO manifest_digests (manifest_id, digest, size)"
            " SELECT $1, * FROM unnest($2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
            manifest_id,
            list(uses),
            list(uses.values()),
        )


def _file_key(digest: Digest, tenant: str) -> tuple[str, str, str]:
    return digest.hex, digest.algo.value, tenant


async def _get_file(con: asyncpg.Connection, digest: Digest, tenant: str | None):
    """The file row, or (`tenant`) the file as that tenant owns it; None when there is none."""
    if tenant is None:
        return await con.fetchrow(
            f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = $1 AND f.algo = $2",
            digest.hex,
            digest.algo.value,
        )
    return await con.fetchrow(_TENANT_FILE, *_file_key(digest, tenant))


async def _begin_upload(
    con: asyncpg.Connection,
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
    await con.execute("SELECT pg_advisory_xact_lock_shared($1)", _REFERENCE_KEY)
    # The same manifest sent to two daemons at once resumes one upload, as on one daemon.
    # (Flipping a bit keeps it apart from the digest lock of a one-chunk file's chunk.)
    await con.execute("SELECT pg_advisory_xact_lock($1)", digest_key(d.hex) ^ 1)
    row = await con.fetchrow(
        f"SELECT {_UPLOAD_COLUMNS} FROM manifests m JOIN uploads u ON u.manifest_id = m.id"
        " WHERE m.digest = $1 AND m.size = $2 AND m.chunks_key = $3 AND u.state = 'pending'"
        " AND u.tenant = $4 ORDER BY u.expires_at DESC LIMIT 1 FOR UPDATE OF u",
        d.hex,
        manifest.size,
        chunks_key,
        owner,
    )
    existing = _upload(row) if row else None
    if existing is not None and existing.expires_at > now:
        await con.execute(
            "UPDATE uploads SET expires_at = $1 WHERE id = $2", expires_at, existing.id
        )
        upload = Upload(
            existing.id,
            existing.manifest_id,
            existing.digest,
            existing.size,
            existing.ext,
            existing.name,
            existing.state,
            expires_at,
            tenant=existing.tenant,
        )
        return upload, await _missing(con, upload.manifest_id, who, uses)
    if existing is not None:
        await con.execute("DELETE FROM uploads WHERE id = $1", existing.id)
        await con.execute(_DROP_MANIFEST_IF_UNUSED, existing.manifest_id)
    if budget is not None:
        await con.execute("SELECT pg_advisory_xact_lock($1)", _BUDGET_KEY)
        await _check_budget(con, budget, client, len(manifest.chunks), now)
    if tenant is not None and tenant.quota is not None:
        await _check_quota(con, tenant.name, tenant.quota, manifest.size, now)
    manifest_id = await con.fetchval(
        "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        d.algo.value,
        d.hex,
        manifest.size,
        chunks_key,
        len(chunks),
        now,
    )
    await _insert_list(con, manifest_id, chunks, 0, uses, fresh=True)
    if tenant is None:
        clash = await con.fetchrow(_CLASH + " LIMIT 1", manifest_id, LIVE)
    else:
        clash = await con.fetchrow(_CLASH + _PROVED + " LIMIT 1", manifest_id, LIVE, owner)
    if clash:
        # Say which claim is wrong, never the stored size: that is someone else's fact.
        raise BadRequest(
            f"chunk {clash[0]} does not have the size {clash[1]} this manifest gives it"
        )
    await con.execute(
        "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at, client,"
        " tenant) VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8)",
        new_id,
        manifest_id,
        manifest.ext,
        manifest.name,
        now,
        expires_at,
        client,
        owner,
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
    return upload, await _missing(con, manifest_id, who, uses)


async def _check_quota(
    con: asyncpg.Connection, tenant: str, quota: int, size: int, now: float
) -> None:
    """Raise QuotaExceeded unless `size` more bytes fit the tenant's quota. The tenant's lock
    (an advisory key from its name) is held to the commit, so two daemons' handshakes for
    one tenant cannot both take the last of it."""
    await con.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", "tenant:" + tenant)
    owned = int(
        await con.fetchval(
            "SELECT coalesce(sum(size), 0) FROM tenant_files WHERE tenant = $1", tenant
        )
    )
    pending = int(
        await con.fetchval(
            "SELECT coalesce(sum(m.size), 0) FROM uploads u JOIN manifests m"
            " ON m.id = u.manifest_id WHERE u.tenant = $1 AND u.state = 'pending'"
            " AND u.expires_at > $2",
            tenant,
            now,
        )
    )
    if owned + pending + size > quota:
        raise QuotaExceeded(
            f"tenant {tenant!r} has a quota of {quota} bytes and uses {owned + pending}"
            f" ({owned} in files, {pending} in pending uploads); this {size}-byte file would"
            " take it over: delete files or abort uploads first",
            quota=quota,
            usage=owned + pending,
        )


async def _begin_stream(
    con: asyncpg.Connection,
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
        await _check_budget(con, budget, client, 1, now)
    if tenant is not None and tenant.quota is not None:
        if size is None:
            raise ValueError("a tenant's streamed upload needs its declared size")
        await _check_quota(con, tenant.name, tenant.quota, size, now)
    digest = placeholder(algo)
    manifest_id = await con.fetchval(
        "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
        " VALUES ($1, $2, 0, $3, 0, $4) RETURNING id",
        algo.value,
        digest.hex,
        UNSEALED_KEY,
        now,
    )
    await con.execute(
        "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at, client,"
        " tenant) VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8)",
        new_id,
        manifest_id,
        ext,
        name,
        now,
        expires_at,
        client,
        owner,
    )
    return opened_stream(new_id, manifest_id, algo, ext, name, expires_at, owner)


async def _append_stream(
    con: asyncpg.Connection,
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
    # New references to chunks: gc's mark waits for this transaction (see _begin_upload).
    await con.execute("SELECT pg_advisory_xact_lock_shared($1)", _REFERENCE_KEY)
    row = await con.fetchrow(
        "SELECT m.id, m.chunk_count, m.size FROM uploads u JOIN manifests m"
        " ON m.id = u.manifest_id WHERE u.id = $1 AND u.state = 'pending'"
        " AND u.expires_at > $2 AND m.chunks_key = $3 FOR UPDATE OF u, m",
        upload_id,
        now,
        UNSEALED_KEY,
    )
    if row is None:
        return None
    manifest_id, count, size = row
    check_stream_batch(start, chunks, count, size, limits)
    if budget is not None and chunks:
        await con.execute("SELECT pg_advisory_xact_lock($1)", _BUDGET_KEY)
        await _check_budget(con, budget, client, len(chunks), now)
    if tenant is not None and tenant.quota is not None and chunks:
        # What the daemon reserved at open lives in that daemon only: the catalogue holds
        # what every daemon's uploads listed to the quota, batch by batch.
        await _check_quota(con, tenant.name, tenant.quota, sum(c.size for c in chunks), now)
    listed = ChunkList.of(chunks)
    uses = packed.distinct(listed)
    batch = sorted(uses)
    owner = tenant.name if tenant is not None else None
    # A digest this upload listed before with another size, or stored with another size. In
    # tenant mode a stored chunk counts (for a clash, and as present) only when the tenant
    # proved it: see _CLASH. A clash with one it never proved is not told; its PUT fails.
    clash = await con.fetch(
        "SELECT digest, size FROM manifest_digests WHERE manifest_id = $1"
        " AND digest = ANY($2::text[]) UNION ALL SELECT digest, size FROM chunks c"
        " WHERE digest = ANY($2::text[]) AND state = $3" + _PROVED_IF_TENANT.format(n=4),
        manifest_id,
        batch,
        LIVE,
        owner,
    )
    for hex_, known in clash:
        if uses[hex_] != known:
            # Say which claim is wrong, never the stored size: that is someone else's fact.
            raise BadRequest(
                f"chunk {hex_} does not have the size {uses[hex_]} this upload gives it"
            )
    await _insert_list(con, manifest_id, listed, start, uses, fresh=False)
    added = sum(c.size for c in chunks)
    await con.execute(
        "UPDATE manifests SET chunk_count = $1, size = $2 WHERE id = $3",
        count + len(chunks),
        size + added,
        manifest_id,
    )
    await con.execute("UPDATE uploads SET expires_at = $1 WHERE id = $2", expires_at, upload_id)
    rows = await con.fetch(
        "SELECT digest FROM chunks c WHERE digest = ANY($1::text[]) AND state = $2"
        + _PROVED_IF_TENANT.format(n=3),
        batch,
        LIVE,
        owner,
    )
    present = {r[0] for r in rows}
    missing = list(dict.fromkeys(c.hex for c in chunks if c.hex not in present))
    return StreamBatch(count + len(chunks), size + added, missing)


async def _seal_stream(
    con: asyncpg.Connection, upload_id: str, digest: Digest, size: int, chunks_key: str
) -> Upload | None:
    row = await con.fetchrow(
        _UPLOAD_BY_ID + " AND u.state = 'pending' FOR UPDATE OF u, m", upload_id
    )
    if row is None:
        return None
    upload = _upload(row)
    if upload.sealed:
        return upload
    check_seal(upload, digest, size)
    await con.execute(
        "UPDATE manifests SET digest = $1, chunks_key = $2 WHERE id = $3",
        digest.hex,
        chunks_key,
        upload.manifest_id,
    )
    return Upload(
        upload.id,
        upload.manifest_id,
        digest,
        upload.size,
        upload.ext,
        upload.name,
        upload.state,
        upload.expires_at,
        True,
        tenant=upload.tenant,
    )


async def _check_budget(
    con: asyncpg.Connection, budget: PendingBudget, client: str, entries: int, now: float
) -> None:
    """Raise unless `entries` more pending chunk entries fit `client`'s share and the total."""
    if entries > budget.per_client:
        raise TooLarge(
            f"the manifest has {entries} chunk entries; a client may hold at most"
            f" {budget.per_client} in pending uploads"
        )
    mine = int(await con.fetchval(_PENDING_ENTRIES + " AND u.client = $2", now, client))
    if mine + entries > budget.per_client:
        raise TooManyPending(
            f"your pending uploads hold {mine} chunk entries; this one would take them over"
            f" the limit of {budget.per_client}: merge or abort some, or wait for them to expire",
            pending=mine,
            limit=budget.per_client,
        )
    total = int(await con.fetchval(_PENDING_ENTRIES, now))
    if total + entries > budget.total:
        raise TooManyPending(
            f"pending uploads hold {total} chunk entries; this one would take them over the"
            f" server's limit of {budget.total}: try again later",
            pending=total,
            limit=budget.total,
        )


async def _queue_events(
    con: asyncpg.Connection, events: HookEvents | None, entry: FileEntry | None
) -> None:
    """Queue `events`' rows for `entry` (None: the operation changed nothing) in the
    caller's transaction, dropping the oldest past the bound."""
    if events is None:
        return
    events.queued = events.dropped = 0  # a retried transaction starts over
    if entry is None:
        return
    rows = events.rows(entry)
    await con.executemany(
        "INSERT INTO hook_events (url, kind, body, created) VALUES ($1, $2, $3, $4)",
        [(url, kind, body, events.now) for url, kind, body in rows],
    )
    count = await con.fetchval("SELECT count(*) FROM hook_events")
    excess = max(count - events.max_rows, 0)
    if excess:
        await con.execute(
            "DELETE FROM hook_events WHERE id IN (SELECT id FROM hook_events ORDER BY id LIMIT $1)",
            excess,
        )
    events.queued, events.dropped = len(rows), excess


async def _register_file(
    con: asyncpg.Connection, upload_id: str, now: float, events: HookEvents | None
) -> FileEntry | None:
    await _queue_events(con, events, None)
    # Shared: no gc marks a chunk garbage between the missing check and the file's commit.
    await con.execute("SELECT pg_advisory_xact_lock_shared($1)", _REFERENCE_KEY)
    row = await con.fetchrow(_UPLOAD_BY_ID + " FOR UPDATE OF u", upload_id)
    if row is None:
        return None
    upload = _upload(row)
    merging = upload.state == "pending"
    if merging:
        if upload.expires_at <= now:
            return None
        missing = await _missing(con, upload.manifest_id, upload.tenant or None)
        if missing:
            raise Incomplete(f"{len(missing)} chunk(s) are still missing", missing)
        d = upload.digest
        if upload.tenant:
            # A tenant's delete of the last ownership holds this row's lock until it has
            # deleted the row: wait for it, so this new owner never joins a file being removed.
            await con.execute("SELECT 1 FROM files WHERE digest = $1 FOR UPDATE", d.hex)
        await con.execute(
            "INSERT INTO files (digest, algo, size, manifest_id, ext, name, created)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (digest) DO NOTHING",
            d.hex,
            d.algo.value,
            upload.size,
            upload.manifest_id,
            upload.ext,
            upload.name,
            now,
        )
        await con.execute("UPDATE uploads SET state = 'merged' WHERE id = $1", upload_id)
    frow = await con.fetchrow(
        f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = $1", upload.digest.hex
    )
    if frow is None:
        return None
    entry = _file(frow)
    if entry.size != upload.size:
        raise FileDigestMismatch(
            f"a file of {upload.size} bytes cannot be stored under {entry.digest.hex}"
        )
    if upload.tenant:
        if merging:
            await _own_file(con, upload, entry, now)
        trow = await con.fetchrow(_TENANT_FILE, *_file_key(upload.digest, upload.tenant))
        if trow is None:
            return None  # merged once, and this tenant deleted the file since
        entry = _file(trow)
    if merging:
        await _queue_events(con, events, entry)
    return entry


async def _own_file(con: asyncpg.Connection, upload: Upload, entry: FileEntry, now: float) -> None:
    """The merging tenant owns the file and holds every chunk of it (see the SQLite engine)."""
    await con.execute(
        "INSERT INTO tenant_files (tenant, digest, size, ext, name, created)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, digest) DO NOTHING",
        upload.tenant,
        upload.digest.hex,
        upload.size,
        upload.ext,
        upload.name,
        now,
    )
    await con.execute(
        "INSERT INTO tenant_chunks (tenant, digest) SELECT DISTINCT $1::text, digest"
        " FROM manifest_digests WHERE manifest_id = ANY($2::bigint[]) ON CONFLICT DO NOTHING",
        upload.tenant,
        [upload.manifest_id, entry.manifest_id],
    )


async def _chunk_users(con: asyncpg.Connection, hex_: str, now: float) -> ChunkUsers:
    row = await con.fetchrow(f"SELECT {_CHUNK_COLUMNS} FROM chunks c WHERE c.digest = $1", hex_)
    files = tuple(
        (_file(r), r[7])
        for r in await con.fetch(
            f"SELECT DISTINCT {_FILE_COLUMNS}, mc.size FROM manifest_digests mc"
            " JOIN files f ON f.manifest_id = mc.manifest_id WHERE mc.digest = $1"
            " ORDER BY f.digest",
            hex_,
        )
    )
    uploads = tuple(
        r[0]
        for r in await con.fetch(
            "SELECT DISTINCT u.id FROM manifest_digests mc JOIN uploads u"
            " ON u.manifest_id = mc.manifest_id WHERE mc.digest = $1 AND u.state = 'pending'"
            " AND u.expires_at > $2 ORDER BY u.id",
            hex_,
            now,
        )
    )
    return ChunkUsers(_chunk_row(row) if row else None, files, uploads)


async def _migrate(con: asyncpg.Connection) -> None:
    """Apply every migration not yet recorded, each in its own transaction, under a session
    advisory lock: daemons starting together migrate one after the other."""
    await con.execute("SELECT pg_advisory_lock($1)", _MIGRATE_KEY)
    try:
        await con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"
        )
        for version, name, sql in _migrations():
            async with con.transaction():
                if await con.fetchval(
                    "SELECT 1 FROM schema_migrations WHERE version = $1", version
                ):
                    continue
                await con.execute(sql)
                await con.execute(
                    "INSERT INTO schema_migrations (version, name, applied) VALUES ($1, $2, $3)",
                    version,
                    name,
                    time.time(),
                )
                log.info("catalogue migrated to %s", name)
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_KEY)
