"""Looking after a data folder beside a live daemon: the `Maintenance` facade of the admin
commands (gc, fsck, stats, ls, rm, export, pending uploads).

Everything here opens the catalogue directly, as its own process next to a possibly running
`casd serve` and other daemons; the catalogue's digest lock makes that safe (docs/admin.md).
gc lives in casd/gc.py, fsck in casd/fsck.py; the ordering rules of gc are described at the
maintenance section of casd/catalog/sqlite.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from casd.blobstore import BlobMissing, BlobStore, Reserve, open_blobstore
from casd.catalog import Catalog, TenantUsage, open_catalog
from casd.config import Settings
from casd.digest import Digest
from casd.errors import AdminError, NotFound, StorageFull
from casd.fsck import Fsck, FsckReport
from casd.gc import GC_BATCH, Gc, GcPlan, GcResult
from casd.models import FileEntry, PendingUpload, Stats

__all__ = ["GC_BATCH", "AdminError", "FsckReport", "GcPlan", "GcResult", "Maintenance"]

log = logging.getLogger("casd.maintenance")

# What one pending chunk entry costs in the catalogue: its place in the packed list, its
# manifest_digests row and that row's entry in the by-digest index (measured: 100,000
# distinct md5 entries grow the database by 11.3 MB; until a checkpoint the WAL holds about
# as much again).
CATALOG_BYTES_PER_ENTRY = 115


# ---- the façade -------------------------------------------------------------------------


class Maintenance:
    """The admin commands over one data folder's catalogue and blob store."""

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
        self._gc = Gc(settings, catalog, blobs, clock)
        self._fsck = Fsck(settings, catalog, blobs, clock)

    @classmethod
    async def open(cls, settings: Settings, clock: Callable[[], float] = time.time) -> Maintenance:
        """Open an existing data folder; NotFound when there is no catalogue in it."""
        path = settings.catalog_path
        if settings.catalog is None and not path.is_file():
            raise NotFound(
                f"no casd catalogue at {path} (is --data or $CASD_DATA the daemon's data folder?)"
            )

        def open_it():
            return open_catalog(settings.catalog_where, synchronous=settings.sqlite_synchronous)

        try:
            catalog = await open_it()
        except sqlite3.OperationalError as exc:
            # With no daemon running, opening makes the WAL and its shared-memory file, and
            # a full disk fails that as "disk I/O error": the reserve is there for this.
            reserve = Reserve(settings.reserve_path, 0)
            if not await asyncio.to_thread(reserve.release):
                raise
            log.warning("%s; released the disk reserve %s", exc, settings.reserve_path)
            catalog = await open_it()
        blobs = open_blobstore(settings.blobs, settings.data_dir, settings.s3_endpoint)
        try:
            await blobs.start()
        except BaseException:
            await catalog.close()
            raise
        return cls(settings, catalog, blobs, clock)

    async def close(self) -> None:
        await self.catalog.close()
        await self.blobs.close()

    async def _freeing(self, fn, *args):
        """Run a change that frees space; on a full disk, delete the daemon's reserve file
        (its headroom is for exactly this) and run it once more."""
        try:
            return await fn(*args)
        except StorageFull:
            reserve = Reserve(self.settings.reserve_path, 0)
            if not await asyncio.to_thread(reserve.release):
                raise
            return await fn(*args)

    # -- gc --

    async def gc_plan(self, grace: float, temp_age: float | None = None) -> GcPlan:
        """What is garbage now: expired uploads, unused manifests, chunks, stale temp files."""
        return await self._gc.plan(grace, temp_age)

    async def gc_execute(
        self,
        plan: GcPlan,
        batch: int = GC_BATCH,
        progress: Callable[[str, int], None] | None = None,
    ) -> GcResult:
        """Carry out a plan, batch by batch, rechecking each item inside its transaction.

        On a full disk it deletes the daemon's reserve file and starts over (every item is
        rechecked, so what was done already is skipped).
        """
        return await self._freeing(self._gc.execute, plan, batch, progress)

    async def gc(self, grace: float, dry_run: bool = False, batch: int = GC_BATCH):
        """Plan, then (unless dry_run) execute: (plan, result or None)."""
        plan = await self.gc_plan(grace)
        if dry_run:
            return plan, None
        return plan, await self.gc_execute(plan, batch)

    # -- fsck --

    async def fsck(
        self, deep: bool = False, workers: int | None = None, repair: bool = False
    ) -> FsckReport:
        """Check every blob and every row against each other; report every problem.

        `repair`: set aside each chunk whose bytes are wrong or gone (see `Fsck._quarantine`).
        """
        return await self._fsck.check(deep, workers, repair)

    # -- stats, ls, rm --

    async def stats(self) -> Stats:
        c = await self.catalog.stats_counts(self.clock())
        return Stats(
            **c,
            catalog_bytes=await self.catalog.size_bytes(),
            pending_catalog_bytes=c["pending_entries"] * CATALOG_BYTES_PER_ENTRY,
        )

    async def tenants(self) -> dict[str, TenantUsage]:
        """What each tenant owns and has pending (tenant mode), by tenant name."""
        return await self.catalog.tenant_usage(self.clock())

    async def ls(self, tenant: str | None = None) -> list[FileEntry]:
        """Every complete file, or those `tenant` owns (under its names)."""
        return await self.catalog.list_files(tenant)

    async def rm(self, digest: Digest, tenant: str | None = None) -> None:
        """Remove a complete file from the catalogue, as an admin's DELETE /v1/files does
        (every tenant's ownership with it), or only `tenant`'s ownership of it, as that
        tenant's DELETE does (the file stays while another tenant owns it)."""
        if not await self._freeing(self.catalog.delete_file, digest, None, tenant):
            owner = f" owned by tenant {tenant!r}" if tenant is not None else ""
            raise NotFound(f"no file {digest.hex}{owner}")

    # -- pending uploads --

    async def uploads(self) -> list[PendingUpload]:
        return await self.catalog.pending_uploads()

    async def abort_uploads(self, ids: list[str]) -> list[str]:
        """Abort these pending uploads in one transaction; the ids that were found."""
        return await self._freeing(self.catalog.abort_uploads, ids)

    # -- export --

    async def export(
        self, digest: Digest, dest: Path, force: bool = False
    ) -> tuple[FileEntry, Path]:
        """Assemble a complete file at `dest` (a file path, or a folder to put it in)."""
        found = await self.catalog.file_with_chunks(digest)
        if found is None:
            raise NotFound(f"no file {digest.hex}")
        entry, chunks = found
        if dest.is_dir():
            dest = dest / f"{digest.hex}{entry.ext}"
        if not force and os.path.lexists(dest):
            raise AdminError(f"{dest} exists; pass --force to replace it")
        parts = [(Digest(digest.algo, h), size) for h, size in chunks]
        try:
            await self.blobs.assemble(parts, dest, entry.size)
        except BlobMissing as exc:
            raise AdminError(
                f"{exc}: the file was deleted meanwhile, or the store is damaged (run casd fsck)"
            ) from None
        except ValueError as exc:
            raise AdminError(f"{exc} (run casd fsck)") from None
        return entry, dest
