"""Looking after a data folder beside a live daemon: gc (plan, execute), fsck, stats, ls, rm, export.

Everything here opens the catalogue directly, as its own process next to a possibly running
`casd serve`; the catalogue's digest lock makes that safe (docs/admin.md). The ordering
rules of gc are described at the maintenance section of casd/catalog/sqlite.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import sqlite3
import stat as statmod
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from casd.blobstore import (
    BlobStore,
    Reserve,
    StoredBlob,
    TempFile,
    fsync_dir,
    temp_busy,
)
from casd.catalog import (
    DELETING,
    LIVE,
    QUARANTINED,
    Catalog,
    ChunkRow,
    ChunkUsers,
    open_catalog,
)
from casd.config import Settings
from casd.digest import Algo, Digest
from casd.errors import CasdError, NotFound, StorageFull
from casd.models import FileEntry, FsckIssue, PendingUpload, Stats

log = logging.getLogger("casd.maintenance")

HASH_BLOCK = 1 << 20
# Chunks per gc transaction: each one holds the write lock, so the daemon waits at most
# for one batch of unlinks.
GC_BATCH = 500
# After each gc transaction, pause as long as it took (at least 5 ms, at most 100 ms):
# measured beside a busy daemon, this cut the daemon's worst handshake during a gc of
# 20,000 chunks from ~0.9 s to ~80 ms, for ~1.7x the gc time.
GC_PAUSE_MIN, GC_PAUSE_MAX = 0.005, 0.1
# Suspects rechecked per hold of the write lock in fsck.
RECHECK_BATCH = 200
# The daemon writes a chunk into tmp/ and renames it once verified; between its last write
# and the rename it may wait for the write lock (up to the busy timeout, 60 s). A temp file
# untouched for this long is a leftover, whatever --grace says.
TEMP_MIN_AGE = 600.0
# What one pending chunk entry costs in the catalogue: its manifest_chunks row and its entry
# in the by-digest index (measured: 100,000 entries of md5 chunks grow the database by
# 9.8 MB; until a checkpoint the WAL holds about as much again).
CATALOG_BYTES_PER_ENTRY = 100
# fsck --repair sets these aside: the chunk's stored bytes are wrong or gone.
REPAIRABLE = ("missing_blob", "wrong_size", "corrupt", "orphan_row")


class AdminError(CasdError):
    """A maintenance request that cannot be done as asked (the message says why)."""


# ---- gc ---------------------------------------------------------------------------------


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
    orphans: tuple[StoredBlob, ...] = ()  # blob files with no row, older than the grace
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
    chunk_bytes: int  # bytes of blob files unlinked
    temp_files: tuple[TempFile, ...]
    seconds: float
    orphans: tuple[StoredBlob, ...] = ()  # orphan blob files unlinked
    quarantined: int = 0  # quarantined chunk rows forgotten

    @property
    def bytes_freed(self) -> int:
        return (
            self.chunk_bytes + sum(t.size for t in self.temp_files)
            + sum(b.size for b in self.orphans)
        )


# ---- fsck -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FsckReport:
    issues: tuple[FsckIssue, ...]
    deep: bool
    blobs_checked: int
    bytes_checked: int
    seconds: float
    deleting: int  # rows a gc is retiring: neither a problem nor counted as stored
    temp_in_flight: int  # young temp files: chunks the daemon is receiving
    notes: tuple[FsckIssue, ...] = ()  # leftovers `casd gc` removes: not problems
    quarantined: tuple[str, ...] = ()  # digests --repair set aside

    @property
    def ok(self) -> bool:
        return not self.issues


@dataclass
class _Hashed:
    """One blob's hash pass: what the bytes hash to, and which inode was read."""

    xxh3: str
    digest: str | None
    ident: tuple[int, int, int]  # (inode, mtime_ns, size)


@dataclass
class _Suspect:
    hashed: _Hashed | None = None  # the hash pass, when it found the bytes wrong
    corrupt: str | None = None


_buffers = threading.local()


def _hash_file(path: Path, algo: Algo | None) -> _Hashed:
    """xxh3-128 of a file, plus its real digest when `algo` is given; 1 MiB reads."""
    x = xxhash.xxh3_128()
    h = algo.new() if algo is not None else None
    buf = getattr(_buffers, "buf", None)
    if buf is None:  # one per thread: allocating 1 MiB per small blob costs more than hashing it
        buf = _buffers.buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        while n := f.readinto(buf):
            x.update(view[:n])
            if h is not None:
                h.update(view[:n])
    return _Hashed(
        x.hexdigest(), h.hexdigest() if h else None, (st.st_ino, st.st_mtime_ns, st.st_size)
    )


def _hash_group(group: list[tuple[Path, Algo | None]]) -> list[_Hashed | OSError]:
    out: list[_Hashed | OSError] = []
    for path, algo in group:
        try:
            out.append(_hash_file(path, algo))
        except OSError as exc:
            out.append(exc)
    return out


def _groups(jobs: list, size_of: Callable, target: int = 8 * HASH_BLOCK, most: int = 512):
    """Consecutive runs of jobs of about `target` bytes (at most `most` jobs): one thread
    hand-off per run, so a store of small blobs is not dominated by hand-offs."""
    group: list = []
    total = 0
    for job in jobs:
        group.append(job)
        total += size_of(job)
        if total >= target or len(group) >= most:
            yield group
            group, total = [], 0
    if group:
        yield group


def _is_file(path: Path) -> bool:
    try:
        return statmod.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _ident(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _windowed(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """(item, fn(item)) in order, computed in `pool` with at most `window` in flight."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            it, fut = pending.popleft()
            yield it, fut.result()
    for it, fut in pending:
        yield it, fut.result()


def _file_names(users: ChunkUsers) -> tuple[str, ...]:
    seen = dict.fromkeys(
        f"{f.digest.hex}{f.ext}" + (f" ({f.name})" if f.name else "") for f, _ in users.files
    )
    return tuple(seen)


def _judge(hex_: str, users: ChunkUsers, ident, corrupt: str | None) -> list[FsckIssue]:
    """The problems of one chunk, from facts read under the write lock and its blob's stat."""
    row = users.row
    files = _file_names(users)
    live = row is not None and row.state == LIVE
    out: list[FsckIssue] = []
    uploads = f"; live uploads using it: {', '.join(users.uploads)}" if users.uploads else ""
    if users.files and not live:
        if row is None:
            why = "no catalogue row"
        elif row.state == QUARANTINED:
            why = "been set aside by fsck --repair (uploading it again heals the files)"
        else:
            why = "its row is being deleted by gc"
        on_disk = ", though a blob file is on disk" if ident is not None else ""
        out.append(FsckIssue(
            "missing_blob", hex_, f"complete files use it, but it has {why}{on_disk}", files
        ))
    if live:
        for size in sorted({s for _f, s in users.files if s != row.size}):
            out.append(FsckIssue(
                "wrong_size", hex_,
                f"a file's manifest gives it {size} bytes, its row says {row.size}", files,
            ))
        if ident is None:
            kind = "missing_blob" if users.files else "orphan_row"
            out.append(FsckIssue(
                kind, hex_, f"the row says {row.size} bytes, the blob file is gone{uploads}", files
            ))
        elif ident[2] != row.size:
            out.append(FsckIssue(
                "wrong_size", hex_,
                f"the blob file has {ident[2]} bytes, the row says {row.size}{uploads}", files,
            ))
        elif corrupt is not None:
            out.append(FsckIssue("corrupt", hex_, corrupt + uploads, files))
    elif row is None and ident is not None:
        out.append(FsckIssue("orphan_file", hex_, "a blob file with no catalogue row", files))
    return out


def _is_note(issue: FsckIssue) -> bool:
    """Leftovers `casd gc` removes by itself: a temp file, a blob file no row and no file
    names (a daemon killed between linking a verified blob and recording it)."""
    return issue.kind == "temp_file" or (
        issue.kind == "orphan_file" and issue.digest is not None and not issue.files
    )


# ---- the façade -------------------------------------------------------------------------


class Maintenance:
    """The admin commands over one data folder's catalogue and blob store."""

    def __init__(
        self, settings: Settings, catalog: Catalog, blobs: BlobStore,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.catalog = catalog
        self.blobs = blobs
        self.clock = clock

    @classmethod
    async def open(
        cls, settings: Settings, clock: Callable[[], float] = time.time
    ) -> Maintenance:
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
        return cls(settings, catalog, BlobStore(settings.blobs_dir, settings.tmp_dir), clock)

    async def close(self) -> None:
        await self.catalog.close()

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
            now, grace, temp_age, tuple(expired), tuple(manifests), tuple(chunks),
            tuple(unfinished), tuple(temps), tuple(orphans), quarantined,
        )

    async def _orphans(self, before: float) -> list[StoredBlob]:
        """Blob files untouched since `before` with no row, that no complete file uses."""
        old = await asyncio.to_thread(
            lambda: [b for b in self.blobs.walk() if b.digest is not None and b.mtime < before]
        )
        unrowed = await self.catalog.orphans([b.digest.hex for b in old])
        return [b for b in old if b.digest.hex in unrowed]

    def _stale_temps(self, before: float) -> list[TempFile]:
        return [
            t for t in self.blobs.temp_files()
            if t.mtime < before and not t.busy and _is_file(t.path)
        ]

    async def gc_execute(
        self, plan: GcPlan, batch: int = GC_BATCH,
        progress: Callable[[str, int], None] | None = None,
    ) -> GcResult:
        """Carry out a plan, batch by batch, rechecking each item inside its transaction.

        On a full disk it deletes the daemon's reserve file and starts over (every item is
        rechecked, so what was done already is skipped).
        """
        return await self._freeing(self._gc_execute, plan, batch, progress)

    async def _gc_execute(
        self, plan: GcPlan, batch: int, progress: Callable[[str, int], None] | None,
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
            freed += await asyncio.to_thread(self._unlink_blobs, rows)

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
        orphans: list[StoredBlob] = []
        for blobs in _batches(plan.orphans, batch):
            by_hex = {b.digest.hex: b for b in blobs}

            async def unlink_orphans(still: set[str], by_hex=by_hex) -> None:
                orphans.extend(await asyncio.to_thread(
                    self._unlink_orphans, [by_hex[h] for h in sorted(still)], cutoff
                ))

            async with self._turn():
                await cat.retire_orphans(sorted(by_hex), unlink_orphans)
        report("orphans", len(orphans))
        quarantined = 0
        if plan.quarantined:
            async with self._turn():
                quarantined = await cat.drop_unused_quarantined(plan.now)
        return GcResult(
            uploads, manifests, tuple(retired), len(plan.chunks) - marked, freed,
            tuple(temps), time.monotonic() - started, tuple(orphans), quarantined,
        )

    @staticmethod
    def _unlink_orphans(blobs: list[StoredBlob], before: float) -> list[StoredBlob]:
        """Called under the write lock with blobs that still have no row: unlink the old ones
        whose inode is not a temp file a daemon still holds (linked, row not yet written)."""
        removed = []
        for b in blobs:
            try:
                if os.lstat(b.path).st_mtime >= before or temp_busy(b.path):
                    continue
                os.unlink(b.path)
            except FileNotFoundError:
                continue
            removed.append(b)
        return removed

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

    def _unlink_blobs(self, rows: list[ChunkRow]) -> int:
        return sum(r.size for r in rows if self.blobs.remove(r.digest))

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

        `repair`: set aside each chunk whose bytes are wrong or gone (see `_quarantine`).
        """
        started = time.monotonic()
        now = self.clock()
        cat = self.catalog
        # Disk first, then rows: a blob the daemon publishes meanwhile has its file before
        # its row, so it shows up (at worst) as a suspect, which the locked recheck clears.
        on_disk: list[StoredBlob] = await asyncio.to_thread(lambda: list(self.blobs.walk()))
        temps = await asyncio.to_thread(lambda: list(self.blobs.temp_files()))
        rows = {r.digest.hex: r for r in await cat.all_chunks()}
        wanted = await cat.file_chunk_sizes()

        issues: list[FsckIssue] = []
        suspects: dict[str, _Suspect] = {}
        disk: dict[str, StoredBlob] = {}
        for b in on_disk:
            if b.digest is None:
                issues.append(FsckIssue(
                    "orphan_file", None, f"{b.path} is not named or placed like a blob"
                ))
            else:
                disk[b.digest.hex] = b
        for hex_, size in wanted:
            r = rows.get(hex_)
            if r is None or r.state != LIVE or r.size != size:
                suspects.setdefault(hex_, _Suspect())
        jobs: list[tuple[ChunkRow, StoredBlob]] = []
        for hex_, r in rows.items():
            b = disk.get(hex_)
            if r.state != LIVE:
                continue
            if b is None or b.size != r.size:
                suspects.setdefault(hex_, _Suspect())
            else:
                jobs.append((r, b))
        for hex_ in disk.keys() - rows.keys():
            suspects.setdefault(hex_, _Suspect())

        checked, nbytes = await asyncio.to_thread(self._hash_all, jobs, deep, workers, suspects)

        items = sorted(suspects.items())
        for i in range(0, len(items), RECHECK_BATCH):
            issues += await self._recheck(dict(items[i:i + RECHECK_BATCH]), now, deep)
        quarantined: list[str] = []
        if repair:
            bad = sorted({i.digest for i in issues if i.kind in REPAIRABLE and i.digest})
            for i in range(0, len(bad), RECHECK_BATCH):
                part = {h: suspects.get(h, _Suspect()) for h in bad[i:i + RECHECK_BATCH]}
                quarantined += await self._quarantine(part, now, deep)
        stale_before = now - TEMP_MIN_AGE
        in_flight = 0
        for t in temps:
            if t.mtime < stale_before and not t.busy:
                issues.append(FsckIssue(
                    "temp_file", None, f"{t.path} ({t.size} bytes) is a leftover temp file;"
                    " `casd gc` removes it once it is older than the grace period"
                ))
            else:
                in_flight += 1
        deleting = sum(1 for r in rows.values() if r.state == DELETING)
        return FsckReport(
            tuple(i for i in issues if not _is_note(i)), deep, checked, nbytes,
            time.monotonic() - started, deleting, in_flight,
            tuple(i for i in issues if _is_note(i)), tuple(quarantined),
        )

    async def _quarantine(self, batch: dict[str, _Suspect], now: float, deep: bool) -> list[str]:
        """Judge again under the write lock; move the blobs of chunks still found wrong or gone
        to quarantine/ and mark them absent in the same transaction.

        From the commit on, handshakes list those chunks as missing (also for complete files
        that use them, which answer "pending" until healed) and downloads of such files are
        refused; a PUT of the chunk stores it again and heals every file using it.
        """
        folder = self.settings.quarantine_dir

        def move(facts: dict[str, ChunkUsers]) -> list[tuple[Digest, int]]:
            chosen = []
            judged = self._judge_all(batch, facts, deep)
            for hex_ in sorted({i.digest for i in judged if i.kind in REPAIRABLE}):
                users = facts[hex_]
                digest = Digest(Algo.for_hex_len(len(hex_)), hex_)
                if users.row is not None and users.row.state == QUARANTINED:
                    continue
                if users.row is not None:
                    size = users.row.size
                elif users.files:
                    size = users.files[0][1]
                else:
                    continue
                self.blobs.quarantine(digest, folder)
                chosen.append((digest, size))
            return chosen

        async def decide(facts: dict[str, ChunkUsers]) -> list[tuple[Digest, int]]:
            return await asyncio.to_thread(move, facts)

        chosen = await self.catalog.quarantine(batch.keys(), now, decide)
        return [d.hex for d, _ in chosen]

    def _hash_all(
        self, jobs: list[tuple[ChunkRow, StoredBlob]], deep: bool, workers: int | None,
        suspects: dict[str, _Suspect],
    ) -> tuple[int, int]:
        """Hash every listed blob in threads; mismatches and vanished files become suspects."""
        workers = workers or min(4, os.cpu_count() or 1)
        checked = nbytes = 0

        def work(group: list[tuple[ChunkRow, StoredBlob]]):
            return _hash_group([(b.path, r.digest.algo if deep else None) for r, b in group])

        with ThreadPoolExecutor(workers, thread_name_prefix="casd-fsck") as pool:
            groups = _groups(jobs, lambda job: job[1].size)
            for group, results in _windowed(pool, work, groups, workers * 2):
                for (r, _b), res in zip(group, results, strict=True):
                    hex_ = r.digest.hex
                    if isinstance(res, OSError):
                        suspects.setdefault(hex_, _Suspect())
                        continue
                    checked += 1
                    nbytes += res.ident[2]
                    bad = _verdict(r, res)
                    if bad:
                        suspects[hex_] = _Suspect(res, bad)
        return checked, nbytes

    async def _recheck(
        self, batch: dict[str, _Suspect], now: float, deep: bool
    ) -> list[FsckIssue]:
        """Judge suspects on facts read under the write lock, when nothing moves."""

        async def probe(facts: dict[str, ChunkUsers]) -> list[FsckIssue]:
            return await asyncio.to_thread(self._judge_all, batch, facts, deep)

        _facts, issues = await self.catalog.chunk_users(batch.keys(), now, probe)
        return issues

    def _judge_all(
        self, batch: dict[str, _Suspect], facts: dict[str, ChunkUsers], deep: bool
    ) -> list[FsckIssue]:
        out = []
        for hex_, s in batch.items():
            users = facts[hex_]
            algo = Algo.for_hex_len(len(hex_))
            path = self.blobs.path(Digest(algo, hex_))
            if users.row is None and temp_busy(path):
                # Linked into place by a daemon that has not committed its row yet: the
                # inode is its temp file's, still locked. In flight, not an orphan.
                continue
            ident = _ident(path)
            corrupt = None
            row = users.row
            if s.corrupt is not None and ident is not None and row is not None:
                if s.hashed is not None and s.hashed.ident == ident:
                    corrupt = _verdict(row, s.hashed)
                else:
                    # The blob was replaced since it was hashed (re-uploaded): hash it again.
                    try:
                        corrupt = _verdict(row, _hash_file(path, algo if deep else None))
                    except FileNotFoundError:
                        ident = None
            out += _judge(hex_, users, ident, corrupt)
        return out

    # -- stats, ls, rm --

    async def stats(self) -> Stats:
        c = await self.catalog.stats_counts(self.clock())
        path = self.settings.catalog_path
        size = 0
        for p in (path, path.with_name(path.name + "-wal")):
            try:
                size += p.stat().st_size
            except FileNotFoundError:
                pass
        return Stats(
            **c, catalog_bytes=size,
            pending_catalog_bytes=c["pending_entries"] * CATALOG_BYTES_PER_ENTRY,
        )

    async def ls(self) -> list[FileEntry]:
        return await self.catalog.list_files()

    async def rm(self, digest: Digest) -> None:
        """Remove a complete file from the catalogue, as DELETE /v1/files does."""
        if not await self._freeing(self.catalog.delete_file, digest):
            raise NotFound(f"no file {digest.hex}")

    # -- pending uploads --

    async def uploads(self) -> list[PendingUpload]:
        return await self.catalog.pending_uploads()

    async def abort_uploads(self, ids: list[str]) -> list[str]:
        """Abort these pending uploads in one transaction; the ids that were found."""
        return await self._freeing(self.catalog.abort_uploads, ids)

    # -- export --

    async def export(self, digest: Digest, dest: Path, force: bool = False) -> tuple[FileEntry, Path]:
        """Assemble a complete file at `dest` (a file path, or a folder to put it in)."""
        found = await self.catalog.file_with_chunks(digest)
        if found is None:
            raise NotFound(f"no file {digest.hex}")
        entry, chunks = found
        if dest.is_dir():
            dest = dest / f"{digest.hex}{entry.ext}"
        if not force and os.path.lexists(dest):
            raise AdminError(f"{dest} exists; pass --force to replace it")
        parts = [(self.blobs.path(Digest(digest.algo, h)), size) for h, size in chunks]
        await asyncio.to_thread(_assemble, parts, dest, entry.size)
        return entry, dest


def _verdict(row: ChunkRow, hashed: _Hashed) -> str | None:
    """Why a blob's bytes are not the row's, or None when they are."""
    if hashed.digest is not None and hashed.digest != row.digest.hex:
        return f"its bytes hash to {row.digest.algo.value} {hashed.digest}, not to its name"
    if hashed.xxh3 != row.xxh3:
        return f"its bytes hash to xxh3-128 {hashed.xxh3}; the row recorded {row.xxh3}"
    return None


def _batches(items, n: int):
    items = list(items)
    for i in range(0, len(items), n):
        yield items[i:i + n]


# errno values with which copy_file_range says "not here": fall back to read/write.
_NO_COPY_RANGE = {
    errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM,
    errno.EBADF,
}


def _assemble(parts: list[tuple[Path, int]], dest: Path, total: int) -> None:
    """Concatenate blobs into a temp file beside `dest`, check its size, rename it in place."""
    temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.casd-export")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        use_range = hasattr(os, "copy_file_range")
        for path, size in parts:
            try:
                src = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise AdminError(
                    f"chunk {path.name} is gone: the file was deleted meanwhile, or the store"
                    " is damaged (run casd fsck)"
                ) from None
            try:
                have = os.fstat(src).st_size
                if have != size:
                    raise AdminError(
                        f"chunk {path.name} has {have} bytes, the manifest says {size}"
                        " (run casd fsck)"
                    )
                left = size
                while left and use_range:
                    try:
                        n = os.copy_file_range(src, fd, left)
                    except OSError as exc:
                        if exc.errno not in _NO_COPY_RANGE:
                            raise
                        use_range = False
                        break
                    if n == 0:
                        break
                    left -= n
                while left:
                    data = os.read(src, min(left, HASH_BLOCK))
                    if not data:
                        raise AdminError(f"chunk {path.name} ended {left} bytes early")
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    left -= len(data)
            finally:
                os.close(src)
        os.fsync(fd)
        written = os.fstat(fd).st_size
        if written != total:
            raise AdminError(f"assembled {written} bytes, the file has {total}")
        os.close(fd)
        fd = -1
        os.replace(temp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
