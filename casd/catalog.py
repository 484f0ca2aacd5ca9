"""The SQLite catalogue: the only module that speaks SQL.

All writes go through one connection, one transaction at a time, each `BEGIN IMMEDIATE` so
that it takes SQLite's write lock up front; that lock is also what serializes the daemon
against `casd gc` running as another process on the same data folder. Reads use a second
connection (WAL lets them run beside a writer).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from casd.digest import Algo, Digest
from casd.errors import BadRequest, FileDigestMismatch, Incomplete, StorageFull
from casd.models import FileEntry, Manifest, Upload

LIVE = 0
DELETING = 1

# Enough to wait out a gc transaction on a busy disk; SQLite retries inside this budget.
BUSY_TIMEOUT_MS = 60_000

_UPLOAD_COLUMNS = (
    "u.id, u.manifest_id, m.algo, m.digest, m.size, u.ext, u.name, u.state, u.expires_at"
)
_FILE_COLUMNS = "f.algo, f.digest, f.size, f.ext, f.name, f.created, f.manifest_id"


def _upload(row) -> Upload:
    uid, manifest_id, algo, digest, size, ext, name, state, expires_at = row
    return Upload(uid, manifest_id, Digest(Algo(algo), digest), size, ext, name, state, expires_at)


def _file(row) -> FileEntry:
    algo, digest, size, ext, name, created, manifest_id = row
    return FileEntry(Digest(Algo(algo), digest), size, ext, name, created, manifest_id)


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migrations/NNNN_name.sql, in order."""
    found = []
    for res in importlib.resources.files("casd.migrations").iterdir():
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


async def _connect(path: Path, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute("PRAGMA temp_store = MEMORY")
    await db.execute("PRAGMA cache_size = -32768")
    return db


class Catalog:
    """Manifests, uploads, chunks and files, and the transactions that change them."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self._db = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, synchronous: str = "FULL") -> "Catalog":
        """Open (creating and migrating as needed) the catalogue at `path`."""
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous level {synchronous!r}")
        writer = await _connect(path, synchronous)
        try:
            await _migrate(writer)
            reader = await _connect(path, synchronous)
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader)

    async def close(self) -> None:
        await self._reader.close()
        await self._db.close()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        async with self._write_lock:
            db = self._db
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    await asyncio.shield(db.rollback())
                    raise
                else:
                    await asyncio.shield(db.commit())
            except sqlite3.OperationalError as exc:
                if "full" in str(exc):
                    raise StorageFull("the data folder's disk is full") from exc
                raise

    async def _one(self, sql: str, params: Iterable = ()):
        async with self._reader.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def _all(self, sql: str, params: Iterable = ()):
        async with self._reader.execute(sql, tuple(params)) as cur:
            return await cur.fetchall()

    # ---- reads ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self._one("SELECT count(*) FROM schema_migrations")

    async def get_file(self, digest: Digest) -> FileEntry | None:
        row = await self._one(
            f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ? AND f.algo = ?",
            (digest.hex, digest.algo.value),
        )
        return _file(row) if row else None

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
            "SELECT size FROM manifest_chunks WHERE manifest_id = ? AND digest = ? LIMIT 1",
            (manifest_id, digest.hex),
        )
        return row[0] if row else None

    async def has_chunk(self, digest: Digest) -> bool:
        row = await self._one(
            "SELECT 1 FROM chunks WHERE digest = ? AND state = ?", (digest.hex, LIVE)
        )
        return row is not None

    async def missing(self, manifest_id: int) -> list[str]:
        """Chunk digests the manifest needs and the store lacks, once each, in manifest order."""
        return await _missing(self._reader, manifest_id)

    async def manifest_chunks(self, manifest_id: int) -> list[tuple[str, int]]:
        """(digest hex, size) of every chunk of a manifest, in order."""
        return await self._all(
            "SELECT digest, size FROM manifest_chunks WHERE manifest_id = ? ORDER BY seq",
            (manifest_id,),
        )

    # ---- writes ---------------------------------------------------------------------

    async def begin_upload(
        self, manifest: Manifest, chunks_key: str, now: float, expires_at: float, new_id: str
    ) -> tuple[Upload, list[str]]:
        """Find the live pending upload of this exact manifest or create one; one transaction."""
        d = manifest.digest
        async with self.write() as db:
            async with db.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM manifests m JOIN uploads u"
                " ON u.manifest_id = m.id"
                " WHERE m.digest = ? AND m.size = ? AND m.chunks_key = ? AND u.state = 'pending'"
                " ORDER BY u.expires_at DESC LIMIT 1",
                (d.hex, manifest.size, chunks_key),
            ) as cur:
                row = await cur.fetchone()
            existing = _upload(row) if row else None
            if existing is not None and existing.expires_at > now:
                await db.execute(
                    "UPDATE uploads SET expires_at = ? WHERE id = ?", (expires_at, existing.id)
                )
                upload = dataclasses.replace(existing, expires_at=expires_at)
                return upload, await _missing(db, upload.manifest_id)
            if existing is not None:
                await _drop_upload(db, existing.id, existing.manifest_id)
            async with db.execute(
                "INSERT INTO manifests (algo, digest, size, chunks_key, chunk_count, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (d.algo.value, d.hex, manifest.size, chunks_key, len(manifest.chunks), now),
            ) as cur:
                manifest_id = cur.lastrowid
            await db.executemany(
                "INSERT INTO manifest_chunks (manifest_id, seq, digest, size) VALUES (?, ?, ?, ?)",
                ((manifest_id, i, c.digest.hex, c.size) for i, c in enumerate(manifest.chunks)),
            )
            async with db.execute(
                "SELECT mc.digest, mc.size, c.size FROM manifest_chunks mc"
                " JOIN chunks c ON c.digest = mc.digest"
                " WHERE mc.manifest_id = ? AND c.state = ? AND c.size <> mc.size LIMIT 1",
                (manifest_id, LIVE),
            ) as cur:
                clash = await cur.fetchone()
            if clash:
                raise BadRequest(
                    f"chunk {clash[0]} is stored with size {clash[2]}, the manifest says {clash[1]}"
                )
            await db.execute(
                "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (new_id, manifest_id, manifest.ext, manifest.name, now, expires_at),
            )
            upload = Upload(
                new_id, manifest_id, d, manifest.size, manifest.ext, manifest.name, "pending",
                expires_at,
            )
            return upload, await _missing(db, manifest_id)

    async def touch_upload(self, upload_id: str, now: float, expires_at: float) -> bool:
        """Push a live pending upload's expiry forward; False when there is none."""
        async with self.write() as db:
            async with db.execute(
                "UPDATE uploads SET expires_at = ? WHERE id = ? AND state = 'pending'"
                " AND expires_at > ?",
                (expires_at, upload_id, now),
            ) as cur:
                return cur.rowcount == 1

    async def publish_chunk(
        self,
        digest: Digest,
        size: int,
        xxh3: str,
        now: float,
        place: Callable[[], Awaitable[None]],
        touch: tuple[str, float] | None = None,
    ) -> bool:
        """Put a verified blob in place and record it; False when it was already stored.

        `place` renames the blob file into place. It runs inside the write transaction so
        that gc, which unlinks blob files under the same lock, can never interleave between
        the rename and the row: no row ever names a file that gc removed. `touch` is an
        (upload id, new expiry) pushed forward in the same transaction.
        """
        async with self.write() as db:
            if touch is not None:
                await db.execute(
                    "UPDATE uploads SET expires_at = ? WHERE id = ? AND state = 'pending'",
                    (touch[1], touch[0]),
                )
            async with db.execute(
                "SELECT 1 FROM chunks WHERE digest = ? AND state = ?", (digest.hex, LIVE)
            ) as cur:
                if await cur.fetchone():
                    return False
            await place()
            await db.execute(
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET"
                " size = excluded.size, xxh3 = excluded.xxh3, created = excluded.created,"
                " state = excluded.state",
                (digest.hex, digest.algo.value, size, xxh3, now, LIVE),
            )
            return True

    async def register_file(self, upload_id: str, now: float) -> FileEntry | None:
        """Turn a fully present pending upload into a complete file; None if no such upload.

        Idempotent: a merged upload answers the file it became.
        """
        async with self.write() as db:
            async with db.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM uploads u JOIN manifests m"
                " ON m.id = u.manifest_id WHERE u.id = ?",
                (upload_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            upload = _upload(row)
            if upload.state == "pending":
                if upload.expires_at <= now:
                    return None
                missing = await _missing(db, upload.manifest_id)
                if missing:
                    raise Incomplete(f"{len(missing)} chunk(s) are still missing", missing)
                d = upload.digest
                await db.execute(
                    "INSERT INTO files (digest, algo, size, manifest_id, ext, name, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                    (d.hex, d.algo.value, upload.size, upload.manifest_id, upload.ext,
                     upload.name, now),
                )
                await db.execute(
                    "UPDATE uploads SET state = 'merged' WHERE id = ?", (upload_id,)
                )
            async with db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.digest = ?",
                (upload.digest.hex,),
            ) as cur:
                frow = await cur.fetchone()
            if frow is None:
                return None
            entry = _file(frow)
            if entry.size != upload.size:
                raise FileDigestMismatch(
                    f"another file of {entry.size} bytes is already stored under"
                    f" {entry.digest.hex}"
                )
            return entry

    async def drop_upload(self, upload_id: str) -> bool:
        """Forget an upload (and its manifest unless a file uses it); False if unknown."""
        async with self.write() as db:
            async with db.execute(
                "SELECT manifest_id FROM uploads WHERE id = ?", (upload_id,)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return False
            await _drop_upload(db, upload_id, row[0])
            return True

    async def delete_file(self, digest: Digest) -> bool:
        """Remove a file from the catalogue; its chunks are left for gc. False if unknown."""
        async with self.write() as db:
            async with db.execute(
                "SELECT manifest_id FROM files WHERE digest = ? AND algo = ?",
                (digest.hex, digest.algo.value),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return False
            manifest_id = row[0]
            await db.execute("DELETE FROM files WHERE digest = ?", (digest.hex,))
            # The merged uploads that built it go too, so a repeated merge cannot answer
            # "complete" for a file that is gone.
            await db.execute(
                "DELETE FROM uploads WHERE manifest_id = ? AND state = 'merged'", (manifest_id,)
            )
            await _drop_manifest_if_unused(db, manifest_id)
            return True


async def _missing(db: aiosqlite.Connection, manifest_id: int) -> list[str]:
    async with db.execute(
        "SELECT mc.digest FROM manifest_chunks mc WHERE mc.manifest_id = ?"
        " AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.digest = mc.digest AND c.state = ?)"
        " ORDER BY mc.seq",
        (manifest_id, LIVE),
    ) as cur:
        rows = await cur.fetchall()
    return list(dict.fromkeys(r[0] for r in rows))


async def _drop_upload(db: aiosqlite.Connection, upload_id: str, manifest_id: int) -> None:
    await db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
    await _drop_manifest_if_unused(db, manifest_id)


async def _drop_manifest_if_unused(db: aiosqlite.Connection, manifest_id: int) -> None:
    await db.execute(
        "DELETE FROM manifests WHERE id = ?"
        " AND NOT EXISTS (SELECT 1 FROM files WHERE manifest_id = ?)"
        " AND NOT EXISTS (SELECT 1 FROM uploads WHERE manifest_id = ?)",
        (manifest_id, manifest_id, manifest_id),
    )


async def _migrate(db: aiosqlite.Connection) -> None:
    """Apply every migration not yet recorded, each in its own immediate transaction."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
    )
    for version, name, sql in _migrations():
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            ) as cur:
                done = await cur.fetchone()
            if not done:
                for stmt in _statements(sql):
                    await db.execute(stmt)
                await db.execute(
                    "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
            await db.commit()
        except BaseException:
            await db.rollback()
            raise
