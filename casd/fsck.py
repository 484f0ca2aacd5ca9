"""fsck of a data folder, beside a live daemon: every blob against every row, with --repair.

The checker collects every problem instead of stopping at the first: disk first, then rows;
suspects are judged again on facts read under the write lock, when nothing moves.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from casd.blobstore import BlobHash, BlobInfo, BlobStore
from casd.catalog import Catalog, ChunkRow, ChunkUsers
from casd.config import Settings
from casd.digest import Digest
from casd.gc import TEMP_MIN_AGE
from casd.models import ChunkState, FsckIssue, FsckKind

# Blobs handed to the store's hasher at a time (bounds what one fsck holds in flight).
HASH_BATCH = 10_000
# Suspects rechecked per hold of the write lock in fsck.
RECHECK_BATCH = 200
# fsck --repair sets these aside: the chunk's stored bytes are wrong or gone.
REPAIRABLE = frozenset(
    {FsckKind.MISSING_BLOB, FsckKind.WRONG_SIZE, FsckKind.CORRUPT, FsckKind.ORPHAN_ROW}
)


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
class _Suspect:
    hashed: BlobHash | None = None  # the hash pass, when it found the bytes wrong
    corrupt: str | None = None


def _file_names(users: ChunkUsers) -> tuple[str, ...]:
    seen = dict.fromkeys(
        f"{f.digest.hex}{f.ext}" + (f" ({f.name})" if f.name else "") for f, _ in users.files
    )
    return tuple(seen)


def _judge(
    hex_: str, users: ChunkUsers, stored: int | None, corrupt: str | None
) -> list[FsckIssue]:
    """The problems of one chunk, from facts read under the write lock and its blob's size
    (None: no blob stored)."""
    row = users.row
    files = _file_names(users)
    live = row if row is not None and row.state == ChunkState.LIVE else None
    out: list[FsckIssue] = []
    uploads = f"; live uploads using it: {', '.join(users.uploads)}" if users.uploads else ""
    if users.files and not live:
        if row is None:
            why = "no catalogue row"
        elif row.state == ChunkState.QUARANTINED:
            why = "been set aside by fsck --repair (uploading it again heals the files)"
        else:
            why = "its row is being deleted by gc"
        on_disk = ", though a blob file is on disk" if stored is not None else ""
        out.append(
            FsckIssue(
                FsckKind.MISSING_BLOB,
                hex_,
                f"complete files use it, but it has {why}{on_disk}",
                files,
            )
        )
    if live is not None:
        for size in sorted({s for _f, s in users.files if s != live.size}):
            out.append(
                FsckIssue(
                    FsckKind.WRONG_SIZE,
                    hex_,
                    f"a file's manifest gives it {size} bytes, its row says {live.size}",
                    files,
                )
            )
        if stored is None:
            kind = FsckKind.MISSING_BLOB if users.files else FsckKind.ORPHAN_ROW
            out.append(
                FsckIssue(
                    kind,
                    hex_,
                    f"the row says {live.size} bytes, the blob file is gone{uploads}",
                    files,
                )
            )
        elif stored != live.size:
            out.append(
                FsckIssue(
                    FsckKind.WRONG_SIZE,
                    hex_,
                    f"the blob file has {stored} bytes, the row says {live.size}{uploads}",
                    files,
                )
            )
        elif corrupt is not None:
            out.append(FsckIssue(FsckKind.CORRUPT, hex_, corrupt + uploads, files))
    elif row is None and stored is not None:
        out.append(
            FsckIssue(FsckKind.ORPHAN_FILE, hex_, "a blob file with no catalogue row", files)
        )
    return out


def _is_note(issue: FsckIssue) -> bool:
    """Leftovers `casd gc` removes by itself: a temp file, a blob file no row and no file
    names (a daemon killed between linking a verified blob and recording it)."""
    return issue.kind == FsckKind.TEMP_FILE or (
        issue.kind == FsckKind.ORPHAN_FILE and issue.digest is not None and not issue.files
    )


def _verdict(row: ChunkRow, hashed: BlobHash) -> str | None:
    """Why a blob's bytes are not the row's, or None when they are."""
    if hashed.digest is not None and hashed.digest != row.digest.hex:
        return f"its bytes hash to {row.digest.algo.value} {hashed.digest}, not to its name"
    if hashed.xxh3 != row.xxh3:
        return f"its bytes hash to xxh3-128 {hashed.xxh3}; the row recorded {row.xxh3}"
    return None


class Fsck:
    """fsck over one data folder's catalogue and blob store (see `Maintenance`)."""

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

    async def check(
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
        on_disk: list[BlobInfo] = [b async for b in self.blobs.list()]
        temps = await asyncio.to_thread(lambda: list(self.blobs.temp_files()))
        rows = {r.digest.hex: r for r in await cat.all_chunks()}
        wanted = await cat.file_chunk_sizes()

        issues: list[FsckIssue] = []
        suspects: dict[str, _Suspect] = {}
        disk: dict[str, BlobInfo] = {}
        for b in on_disk:
            if b.digest is None:
                issues.append(
                    FsckIssue(
                        FsckKind.ORPHAN_FILE, None, f"{b.where} is not named or placed like a blob"
                    )
                )
            else:
                disk[b.digest.hex] = b
        for hex_, size in wanted:
            r = rows.get(hex_)
            if r is None or r.state != ChunkState.LIVE or r.size != size:
                suspects.setdefault(hex_, _Suspect())
        jobs: list[tuple[ChunkRow, BlobInfo]] = []
        for hex_, r in rows.items():
            blob = disk.get(hex_)
            if r.state != ChunkState.LIVE:
                continue
            if blob is None or blob.size != r.size:
                suspects.setdefault(hex_, _Suspect())
            else:
                jobs.append((r, blob))
        for hex_ in disk.keys() - rows.keys():
            suspects.setdefault(hex_, _Suspect())

        if not (deep or self.blobs.quick_rehash):
            jobs = []  # listed with their sizes, which were compared above
        checked, nbytes = await self._hash_all(jobs, deep, workers, suspects)

        items = sorted(suspects.items())
        for i in range(0, len(items), RECHECK_BATCH):
            issues += await self._recheck(dict(items[i : i + RECHECK_BATCH]), now, deep)
        quarantined: list[str] = []
        if repair:
            bad = sorted({i.digest for i in issues if i.kind in REPAIRABLE and i.digest})
            for i in range(0, len(bad), RECHECK_BATCH):
                part = {h: suspects.get(h, _Suspect()) for h in bad[i : i + RECHECK_BATCH]}
                quarantined += await self._quarantine(part, now, deep)
        stale_before = now - TEMP_MIN_AGE
        in_flight = 0
        for t in temps:
            if t.mtime < stale_before and not t.busy:
                issues.append(
                    FsckIssue(
                        FsckKind.TEMP_FILE,
                        None,
                        f"{t.path} ({t.size} bytes) is a leftover temp file;"
                        " `casd gc` removes it once it is older than the grace period",
                    )
                )
            else:
                in_flight += 1
        deleting = sum(1 for r in rows.values() if r.state == ChunkState.DELETING)
        return FsckReport(
            tuple(i for i in issues if not _is_note(i)),
            deep,
            checked,
            nbytes,
            time.monotonic() - started,
            deleting,
            in_flight,
            tuple(i for i in issues if _is_note(i)),
            tuple(quarantined),
        )

    async def heal(self, manifest_id: int, workers: int = 2) -> list[str]:
        """Set aside the chunks of one manifest whose stored bytes are wrong or gone, as
        --repair does; the digests set aside, in order.

        For a merge whose chunks do not hash to the file's digest: each distinct chunk's blob
        is read once and its size and xxh3-128 compared with what was recorded when its bytes
        were verified. A chunk set aside is missing again, so the client sends it again."""
        now = self.clock()
        suspects: dict[str, _Suspect] = {}
        seen: set[str] = set()
        start = 0
        while page := await self.catalog.file_chunks_page(manifest_id, start, HASH_BATCH):
            start += len(page)
            todo = []
            for hex_, size, xxh3 in page:
                if hex_ not in seen and xxh3 is not None:
                    seen.add(hex_)
                    todo.append((hex_, size, xxh3))
            results = await self.blobs.hash_blobs(
                [(Digest.parse_any(h), None) for h, _, _ in todo], workers
            )
            for (hex_, size, xxh3), res in zip(todo, results, strict=True):
                if isinstance(res, OSError):
                    suspects[hex_] = _Suspect()
                elif res.size != size or res.xxh3 != xxh3:
                    suspects[hex_] = _Suspect(res, f"its bytes hash to xxh3-128 {res.xxh3}")
        items = sorted(suspects.items())
        quarantined: list[str] = []
        for i in range(0, len(items), RECHECK_BATCH):
            quarantined += await self._quarantine(dict(items[i : i + RECHECK_BATCH]), now, False)
        return quarantined

    async def _quarantine(self, batch: dict[str, _Suspect], now: float, deep: bool) -> list[str]:
        """Judge again under the write lock; move the blobs of chunks still found wrong or gone
        to quarantine/ and mark them absent in the same transaction.

        From the commit on, handshakes list those chunks as missing (also for complete files
        that use them, which answer "pending" until healed) and downloads of such files are
        refused; a PUT of the chunk stores it again and heals every file using it.
        """

        async def decide(facts: dict[str, ChunkUsers]) -> list[tuple[Digest, int]]:
            chosen = []
            judged = await self._judge_all(batch, facts, deep)
            for hex_ in sorted({i.digest for i in judged if i.kind in REPAIRABLE and i.digest}):
                users = facts[hex_]
                digest = Digest.parse_any(hex_)
                if users.row is not None and users.row.state == ChunkState.QUARANTINED:
                    continue
                if users.row is not None:
                    size = users.row.size
                elif users.files:
                    size = users.files[0][1]
                else:
                    continue
                await self.blobs.quarantine(digest)
                chosen.append((digest, size))
            return chosen

        chosen = await self.catalog.quarantine(batch.keys(), now, decide)
        return [d.hex for d, _ in chosen]

    async def _hash_all(
        self,
        jobs: list[tuple[ChunkRow, BlobInfo]],
        deep: bool,
        workers: int | None,
        suspects: dict[str, _Suspect],
    ) -> tuple[int, int]:
        """Hash every listed blob; mismatches and vanished blobs become suspects."""
        workers = workers or min(4, os.cpu_count() or 1)
        checked = nbytes = 0
        for i in range(0, len(jobs), HASH_BATCH):
            part = jobs[i : i + HASH_BATCH]
            results = await self.blobs.hash_blobs(
                [(r.digest, r.digest.algo if deep else None) for r, _b in part], workers
            )
            for (r, _b), res in zip(part, results, strict=True):
                hex_ = r.digest.hex
                if isinstance(res, OSError):
                    suspects.setdefault(hex_, _Suspect())
                    continue
                checked += 1
                nbytes += res.size
                bad = _verdict(r, res)
                if bad:
                    suspects[hex_] = _Suspect(res, bad)
        return checked, nbytes

    async def _recheck(self, batch: dict[str, _Suspect], now: float, deep: bool) -> list[FsckIssue]:
        """Judge suspects on facts read under the write lock, when nothing moves."""

        issues: list[FsckIssue] = []

        async def probe(facts: dict[str, ChunkUsers]) -> None:
            issues[:] = await self._judge_all(batch, facts, deep)

        await self.catalog.chunk_users(batch.keys(), now, probe)
        return issues

    async def _judge_all(
        self, batch: dict[str, _Suspect], facts: dict[str, ChunkUsers], deep: bool
    ) -> list[FsckIssue]:
        out = []
        for hex_, s in batch.items():
            users = facts[hex_]
            digest = Digest.parse_any(hex_)
            algo = digest.algo
            info = await self.blobs.stat(digest)
            if users.row is None and info is not None and info.in_flight:
                # Stored by a daemon that has not committed its row yet. Not an orphan.
                continue
            ident = None if info is None else info.version
            size = None if info is None else info.size
            corrupt = None
            row = users.row
            if s.corrupt is not None and info is not None and row is not None:
                if s.hashed is not None and s.hashed.version == ident:
                    corrupt = _verdict(row, s.hashed)
                else:
                    # The blob was replaced since it was hashed (re-uploaded): hash it again.
                    results = await self.blobs.hash_blobs([(digest, algo if deep else None)], 1)
                    res = results[0]
                    if isinstance(res, OSError):
                        size = None
                    else:
                        corrupt = _verdict(row, res)
            out += _judge(hex_, users, size, corrupt)
        return out

    # -- stats, ls, rm --
