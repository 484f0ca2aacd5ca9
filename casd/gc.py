"""Garbage collection of a data folder, beside a live daemon: plan, then execute.

`Gc.plan` lists what is garbage now (expired uploads, unused manifests, unreferenced chunks,
orphan blobs, stale temp files, quarantined chunks no one needs); `Gc.execute` removes
it batch by batch, rechecking every item inside its transaction. The ordering rules are
described at the maintenance section of casd/catalog/sqlite.py.
"""

from __future__ import annotations

import asyncio
import os
import stat as statmod
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from casd.blobstore import BlobStore, TempFile, temp_busy
from casd.catalog import Catalog, ChunkRow
from casd.config import Settings
from casd.digest import Digest
from casd.errors import AdminError

# Chunks per gc transaction: each one holds the write lock, so the daemon waits at most
# for one batch of unlinks.
GC_BATCH = 500
# After each gc transaction, pause as long as it took (at least 5 ms, at most 100 ms):
# measured beside a busy daemon, this cut the daemon's worst handshake during a gc of
# 20,000 chunks from ~0.9 s to ~80 ms, for ~1.7x the gc time.
GC_PAUSE_MIN, GC_PAUSE_MAX = 0.005, 0.1
# The daemon writes a chunk into tmp/ and renames it once verified; between its last write
# and the rename it may wait for the write lock (up to the busy timeout, 60 s). A temp file
# untouched for this long is a leftover, whatever --grace says.
TEMP_MIN_AGE = 600.0


@dataclass(frozen=True)
class OrphanBlob:
    """A stored blob, named like a blob, with no catalogue row; `where` names it for people."""

    digest: Digest
    where: str
    size: int
    mtime: float


@dataclass(frozen=True)
class GcPlan:
    """What a gc would remove at `now`; executing it rechecks every item first."""

    now: float
    grace: float
    temp_age: float
    expired_uploads: tuple[tuple[str, int], ...]  # (upload id, file size)
    unused_manifests: tuple[int, ...]
    chunks: tuple[ChunkRow, ...]  # live, unreferenced, older than the grace period
    unfinished: tuple[ChunkRow, ...]  # DELETING rows an earlier gc did not finish
    temp_files: tuple[TempFile, ...]
    orphans: tuple[OrphanBlob, ...] = ()  # blobs with no row, older than the grace
    quarantined: int = 0  # quarantined chunks no file or live upload needs any more

    @property
    def chunk_bytes(self) -> int:
        return sum(c.size for c in self.chunks) + sum(c.size for c in self.unfinished)

    @property
    def temp_bytes(self) -> int:
        return sum(t.size for t in self.temp_files)

    @property
    def orphan_bytes(self) -> int:
        return sum(b.size for b in self.orphans)

    @property
    def bytes(self) -> int:
        return self.chunk_bytes + self.temp_bytes + self.orphan_bytes


@dataclass(frozen=True)
class GcResult:
    uploads: int
    manifests: int
    chunks: tuple[ChunkRow, ...]  # rows deleted
    kept: int  # planned chunks found in use again when their turn came
    chunk_bytes: int  # bytes of blobs removed
    temp_files: tuple[TempFile, ...]
    seconds: float
    orphans: tuple[OrphanBlob, ...] = ()  # orphan blobs removed
    quarantined: int = 0  # quarantined chunk rows forgotten

    @property
    def bytes_freed(self) -> int:
        return (
            self.chunk_bytes
            + sum(t.size for t in self.temp_files)
            + sum(b.size for b in self.orphans)
        )


def _is_file(path: Path) -> bool:
    try:
        return statmod.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _batches(items, n: int):
    items = list(items)
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Gc:
    """gc over one data folder's catalogue and blob store (see `Maintenance`)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        blobs: BlobStore,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.catalog = catalog
        self.blobs = blobs
        self.clock = clock

    async def plan(self, grace: float, temp_age: float | None = None) -> GcPlan:
        """What is garbage now: expired uploads, unused manifests, chunks, stale temp files."""
        if grace < 0:
            raise AdminError("the grace period cannot be negative")
        now = self.clock()
        if temp_age is None:
            temp_age = max(grace, TEMP_MIN_AGE)
        cat = self.catalog
        expired = await cat.expired_uploads(now)
        manifests = await cat.unused_manifests(now)
        chunks = await cat.garbage_chunks(now, now - grace)
        unfinished = await cat.deleting_chunks()
        temps = await asyncio.to_thread(self._stale_temps, now - temp_age)
        orphans = await self._orphans(now - grace)
        quarantined = await cat.unused_quarantined(now)
        return GcPlan(
            now,
            grace,
            temp_age,
            tuple(expired),
            tuple(manifests),
            tuple(chunks),
            tuple(unfinished),
            tuple(temps),
            tuple(orphans),
            quarantined,
        )

    async def _orphans(self, before: float) -> list[OrphanBlob]:
        """Blob files untouched since `before` with no row, that no complete file uses."""
        old = [
            OrphanBlob(b.digest, b.where, b.size, b.mtime)
            async for b in self.blobs.list()
            if b.digest is not None and b.mtime < before
        ]
        unrowed = await self.catalog.orphans([b.digest.hex for b in old])
        return [b for b in old if b.digest.hex in unrowed]

    def _stale_temps(self, before: float) -> list[TempFile]:
        return [
            t
            for t in self.blobs.temp_files()
            if t.mtime < before and not t.busy and _is_file(t.path)
        ]

    async def execute(
        self,
        plan: GcPlan,
        batch: int,
        progress: Callable[[str, int], None] | None,
    ) -> GcResult:
        if batch < 1:
            raise AdminError("the batch size must be at least 1")
        started = time.monotonic()
        cat = self.catalog
        report = progress or (lambda _what, _n: None)
        uploads = manifests = 0
        for ids in _batches([u for u, _ in plan.expired_uploads], batch):
            async with self._turn():
                u, m = await cat.drop_expired_uploads(ids, plan.now)
            uploads, manifests = uploads + u, manifests + m
            report("uploads", u)
        for ids in _batches(plan.unused_manifests, batch):
            async with self._turn():
                m = await cat.drop_unused_manifests(ids)
            manifests += m
            report("manifests", m)
        # Two steps per batch: mark (a chunk a client relies on again since the plan stays
        # live), then unlink and forget under the write lock (a revived row is skipped).
        # Rows an earlier, interrupted gc marked go straight to the second step.
        freed = 0

        async def unlink(rows: list[ChunkRow]) -> None:
            nonlocal freed
            # Concurrently: the write lock is held meanwhile, and an object store answers
            # each delete in a round trip.
            gone = await asyncio.gather(*(self.blobs.delete(r.digest) for r in rows))
            freed += sum(r.size for r, g in zip(rows, gone, strict=True) if g)

        async def retire(rows: list[ChunkRow]) -> None:
            async with self._turn():
                done = await cat.retire_chunks([r.digest.hex for r in rows], unlink)
            retired.extend(done)
            report("chunks", len(done))

        retired: list[ChunkRow] = []
        for rows in _batches(plan.unfinished, batch):
            await retire(rows)
        marked = 0
        cutoff = plan.now - plan.grace
        for rows in _batches(plan.chunks, batch):
            async with self._turn():
                now_deleting = await cat.mark_garbage(
                    [r.digest.hex for r in rows], plan.now, cutoff
                )
            marked += len(now_deleting)
            if now_deleting:
                await retire(now_deleting)
        temps = await asyncio.to_thread(
            self._remove_temps, plan.temp_files, plan.now - plan.temp_age
        )
        report("temp_files", len(temps))
        orphans: list[OrphanBlob] = []
        for blobs in _batches(plan.orphans, batch):
            by_hex = {b.digest.hex: b for b in blobs}

            async def unlink_orphans(still: set[str], by_hex=by_hex) -> None:
                # With the digests locked: no daemon writes their rows meanwhile, and one
                # that stored such a blob a moment ago puts it back under the same lock.
                for h in sorted(still):
                    b = by_hex[h]
                    if await self.blobs.delete_if_older(b.digest, cutoff):
                        orphans.append(b)

            async with self._turn():
                await cat.retire_orphans(sorted(by_hex), unlink_orphans)
        report("orphans", len(orphans))
        quarantined = 0
        if plan.quarantined:
            async with self._turn():
                quarantined = await cat.drop_unused_quarantined(plan.now)
        return GcResult(
            uploads,
            manifests,
            tuple(retired),
            len(plan.chunks) - marked,
            freed,
            tuple(temps),
            time.monotonic() - started,
            tuple(orphans),
            quarantined,
        )

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One gc transaction, then a pause in proportion to it.

        SQLite hands its write lock to no one in particular: a daemon transaction that
        found it taken sleeps and retries (1, 2, 5 ... up to 100 ms apart), and a gc that
        took it again at once would keep winning until it is done. The pause lets it in.
        """
        started = time.monotonic()
        yield
        held = time.monotonic() - started
        await asyncio.sleep(min(GC_PAUSE_MAX, max(GC_PAUSE_MIN, held)))

    @staticmethod
    def _remove_temps(temps: Iterable[TempFile], before: float) -> list[TempFile]:
        removed = []
        for t in temps:
            try:
                # Recheck: a temp file the daemon wrote to since the plan is not a leftover.
                if os.lstat(t.path).st_mtime >= before or temp_busy(t.path):
                    continue
                os.unlink(t.path)
            except FileNotFoundError:
                continue
            removed.append(t)
        return removed
