"""Hashing a local file in one read, and the digest cache that spares rehashing it.

No network in here (and no aiohttp): `hash_file` and `file_digests` are blocking and meant
for a worker thread; `casd.client.transfer` runs them there.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from casd.chunking import Chunking, iter_chunks
from casd.client.errors import FileChangedError
from casd.digest import Algo, Digest

log = logging.getLogger("casd.client")

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 5 * MiB
# Hashing reads pieces of at most this size into two reused buffers, so its memory is two
# pieces whatever the chunk or file size.
HASH_PIECE = 4 * MiB
# A cache entry older than this many entries (by last use) is dropped.
CACHE_MAX_ENTRIES = 10_000
# File timestamps come from a clock that ticks in jiffies (up to 10 ms); a file written within
# one tick of the moment we start reading it could change again without its mtime moving,
# so its digests are not cached. Filesystems with whole-second timestamps get 2 s.
RACY_NS = 10_000_000
RACY_COARSE_NS = 2_000_000_000


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a local file: where it lies and its digest (lowercase hex)."""

    offset: int
    size: int
    digest: str


@dataclass(frozen=True)
class FileDigests:
    """A file's whole digest and its chunks, as one hashing pass (or the cache) found them.

    `chunk_size` is the fixed chunk size or the FastCDC average (`chunking.avg_size`).
    """

    algo: Algo
    digest: str
    size: int
    chunk_size: int
    chunks: tuple[ChunkSpan, ...]
    chunking: Chunking | None = None


def as_chunking(chunking: Chunking | str | None, chunk_size: int | None) -> Chunking:
    """A Chunking from the library's arguments: a Chunking, a kind string, or a fixed size."""
    if isinstance(chunking, Chunking):
        return chunking
    if chunking is None:
        return Chunking.fixed(DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)
    return Chunking.parse(chunking, chunk_size)


# --- hashing ---------------------------------------------------------------------------------


def _read_exact(f, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise FileChangedError(f"{f.name}: file shrank while it was being read")
        got += n


def hash_stream(
    f,
    size: int,
    chunk_size: int,
    algo: Algo,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[str, list[str]]:
    """Hash `size` bytes of an unbuffered binary file in one read: (file digest, chunk digests).

    Blocking; run it in a thread. The whole-file hash runs in the calling thread and the chunk
    hashes in one helper thread over the same buffer, so the two use two cores; hashlib drops
    the GIL for large buffers. Two buffers of at most HASH_PIECE alternate, so the next piece
    is read while the helper still hashes the previous one.
    """
    if chunk_size < 1:
        raise ValueError("chunk size must be at least 1 byte")
    piece = min(chunk_size, HASH_PIECE, max(size, 1))
    views = [memoryview(bytearray(piece)), memoryview(bytearray(piece))]
    whole = algo.new()
    digests: list[str] = []
    # Only the helper thread touches `current`; jobs run in submission order.
    current = [algo.new()]

    def feed(view: memoryview, chunk_ends: bool) -> None:
        current[0].update(view)
        if chunk_ends:
            digests.append(current[0].hexdigest())
            current[0] = algo.new()

    jobs: list[Future | None] = [None, None]
    with ThreadPoolExecutor(1, thread_name_prefix="casd-hash") as helper:
        offset = 0
        i = 0
        while offset < size:
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError
            chunk_end = min((offset // chunk_size + 1) * chunk_size, size)
            n = min(piece, chunk_end - offset)
            slot = i & 1
            job = jobs[slot]
            if job is not None:
                job.result()  # the helper is done with this buffer
            view = views[slot][:n]
            _read_exact(f, view)
            jobs[slot] = helper.submit(feed, view, offset + n == chunk_end)
            whole.update(view)
            offset += n
            i += 1
            if on_bytes is not None:
                on_bytes(offset)
        for job in jobs:
            if job is not None:
                job.result()
    return whole.hexdigest(), digests


def hash_stream_cdc(
    f,
    size: int,
    chunking: Chunking,
    algo: Algo,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[str, list[ChunkSpan]]:
    """Cut `size` bytes of a binary file by `chunking` and hash them in the same read.

    Blocking; run it in a thread. The cutter (pyfastcdc, which drops the GIL) runs in the
    calling thread; the whole-file hash and the chunk hash of each chunk run at the same time
    on two threads over the cutter's buffer, which must not move until both are done, so
    memory stays at the cutter's two maximum chunks.
    """
    whole = algo.new()
    spans: list[ChunkSpan] = []
    end = 0

    with ThreadPoolExecutor(1, thread_name_prefix="casd-hash") as helper:
        for offset, view in iter_chunks(f, chunking):
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError
            n = len(view)
            if offset + n > size:
                raise FileChangedError(f"{f.name}: file grew while it was being read")
            job = helper.submit(_digest_of, algo, view)
            whole.update(view)
            spans.append(ChunkSpan(offset, n, job.result()))
            end = offset + n
            if on_bytes is not None:
                on_bytes(end)
    if end != size:
        raise FileChangedError(f"{f.name}: file shrank while it was being read")
    return whole.hexdigest(), spans


def _digest_of(algo: Algo, view: memoryview) -> str:
    h = algo.new()
    h.update(view)
    return h.hexdigest()


def _spans(size: int, chunk_size: int, digests: list[str]) -> tuple[ChunkSpan, ...]:
    return tuple(
        ChunkSpan(off, min(chunk_size, size - off), d)
        for off, d in zip(range(0, size, chunk_size), digests, strict=True)
    )


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _racy(st: os.stat_result, started_ns: int) -> bool:
    """True when the file may change again without its stat changing (see RACY_NS)."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    coarse = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    return newest >= started_ns - (RACY_COARSE_NS if coarse else RACY_NS)


def hash_file(
    path: str | os.PathLike,
    *,
    chunk_size: int | None = None,
    algo: Algo | str = Algo.MD5,
    chunking: Chunking | str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> FileDigests:
    """The file's digest and its chunks' digests, from one read (blocking).

    Chunks are fixed-size (`chunk_size`, default 5 MiB) unless `chunking` says otherwise: a
    `Chunking`, or "fixed"/"fastcdc" with `chunk_size` as the size or average.
    """
    algo = Algo.parse(algo) if not isinstance(algo, Algo) else algo
    rule = as_chunking(chunking, chunk_size)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        return _hash_open(f, size, rule, algo, on_bytes, stop)


def _hash_open(
    f,
    size: int,
    rule: Chunking,
    algo: Algo,
    on_bytes: Callable[[int], None] | None,
    stop: threading.Event | None,
) -> FileDigests:
    if rule.kind == "fixed":
        whole, digests = hash_stream(f, size, rule.avg_size, algo, on_bytes, stop)
        spans = _spans(size, rule.avg_size, digests)
    else:
        whole, span_list = hash_stream_cdc(f, size, rule, algo, on_bytes, stop)
        spans = tuple(span_list)
    return FileDigests(algo, whole, size, rule.avg_size, spans, rule)


# --- hashing while sending (protocol v1.1) ----------------------------------------------------

# A chunk's bytes as the reader hands them on: a fresh buffer per chunk, never reused.
Buffer = bytes | bytearray


class ByteBudget:
    """Bytes of chunks read but not yet sent or dropped: the bounded queue between the
    hashing thread (which takes) and the sender (which gives back). One chunk is always
    allowed, however large, so a chunk over the budget still goes through alone."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int, stop: threading.Event | None = None) -> None:
        """Block until `n` more bytes fit; CancelledError once `stop` is set."""
        with self._cond:
            while self.used and self.used + n > self.limit:
                if stop is not None and stop.is_set():
                    raise asyncio.CancelledError
                self._cond.wait(0.1)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _chunk_reads(f, size: int, rule: Chunking) -> Iterator[tuple[int, int, Callable[[], Buffer]]]:
    """(offset, length, read) of each chunk in order; read() gives its bytes in a new buffer,
    and must be called before the next step."""
    if rule.kind == "fixed":
        step = rule.avg_size
        for offset in range(0, size, step):
            n = min(step, size - offset)

            def read(n: int = n) -> Buffer:
                buf = bytearray(n)
                _read_exact(f, memoryview(buf))
                return buf

            yield offset, n, read
        return
    end = 0
    for offset, view in iter_chunks(f, rule):
        if offset + len(view) > size:
            raise FileChangedError(f"{f.name}: file grew while it was being read")
        end = offset + len(view)

        def copy(view: memoryview = view) -> Buffer:
            return bytes(view)

        yield offset, len(view), copy
    if end != size:
        raise FileChangedError(f"{f.name}: file shrank while it was being read")


def stream_digests(
    f,
    size: int,
    rule: Chunking,
    algo: Algo,
    emit: Callable[[ChunkSpan, Buffer], None],
    budget: ByteBudget,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> FileDigests:
    """Read a file once, handing each chunk's bytes to `emit` with its digest, in order, as
    soon as it is hashed; the file's digest comes from the same buffers, and is known last.

    Blocking; run it in a thread. The whole-file hash runs in the calling thread and each
    chunk's hash on one helper thread (two cores, as `hash_stream`). Before reading a chunk
    it takes its size from `budget`; whoever `emit` hands the bytes to gives them back.
    """
    whole = algo.new()
    spans: list[ChunkSpan] = []
    held: tuple[int, int, Buffer, Future] | None = None

    def hand_on(held: tuple[int, int, Buffer, Future]) -> None:
        offset, n, data, job = held
        span = ChunkSpan(offset, n, job.result())
        spans.append(span)
        emit(span, data)

    with ThreadPoolExecutor(1, thread_name_prefix="casd-hash") as helper:
        for offset, n, read in _chunk_reads(f, size, rule):
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError
            budget.take(n, stop)
            data = read()
            job = helper.submit(_digest_of, algo, memoryview(data))
            whole.update(data)
            if held is not None:
                hand_on(held)
            held = (offset, n, data, job)
            if on_bytes is not None:
                on_bytes(offset + n)
        if held is not None:
            hand_on(held)
    return FileDigests(algo, whole.hexdigest(), size, rule.avg_size, tuple(spans), rule)


# --- digest cache ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/casd, else ~/.cache/casd."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "casd"


class DigestCache:
    """Chunk digests of files already hashed, keyed by path, stat, chunking and algorithm.

    A SQLite file. Best effort: any problem with the file (unwritable, locked, corrupt) makes
    the cache miss or skip, never fails an upload; a corrupt file is replaced on the next
    write. The key names the cut rule with its parameters (`Chunking.key`), so fixed and
    FastCDC digests of one file, or two averages, never stand in for each other.
    """

    # `chunk_sizes` holds the sizes of content-defined chunks (8 bytes each, little-endian);
    # fixed-size chunks are derived from the file size and leave it empty.
    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS chunk_digests (
            path TEXT NOT NULL, chunking TEXT NOT NULL, algo TEXT NOT NULL,
            dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
            file_digest TEXT NOT NULL, chunk_digests BLOB NOT NULL, chunk_sizes BLOB NOT NULL,
            used REAL NOT NULL,
            PRIMARY KEY (path, chunking, algo))
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "digests.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=2.0, isolation_level=None)
        # A cache needs no durability: losing it to a power cut costs one rehash, and a
        # corrupt file is detected and replaced. Skipping fsync keeps a cached re-upload fast.
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute(self._SCHEMA)
        return conn

    def get(
        self, realpath: str, st: os.stat_result, chunking: Chunking | int, algo: Algo
    ) -> FileDigests | None:
        """The cached digests for this exact file state, or None (an int means fixed size)."""
        rule = chunking if isinstance(chunking, Chunking) else Chunking.fixed(chunking)
        try:
            conn = self._connect()
            try:
                row = conn.execute(
                    "SELECT dev, ino, size, mtime_ns, ctime_ns, file_digest, chunk_digests,"
                    " chunk_sizes FROM chunk_digests"
                    " WHERE path = ? AND chunking = ? AND algo = ?",
                    (realpath, rule.key, algo.value),
                ).fetchone()
                if row is None or tuple(row[:5]) != _stat_key(st):
                    return None
                conn.execute(
                    "UPDATE chunk_digests SET used = ?"
                    " WHERE path = ? AND chunking = ? AND algo = ?",
                    (time.time(), realpath, rule.key, algo.value),
                )
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("digest cache unreadable, ignoring it: %s", exc)
            return None
        return self._decode(row, st.st_size, rule, algo)

    @staticmethod
    def _decode(row, size: int, rule: Chunking, algo: Algo) -> FileDigests | None:
        file_digest, blob, sizes_blob = row[5], row[6], row[7]
        width = algo.hex_len // 2
        if (
            not isinstance(blob, bytes)
            or not isinstance(sizes_blob, bytes)
            or not isinstance(file_digest, str)
            or len(file_digest) != algo.hex_len
        ):
            return None
        try:
            Digest.parse(algo, file_digest)
        except ValueError:
            return None
        digests = [blob[i : i + width].hex() for i in range(0, len(blob), width)]
        if rule.kind == "fixed":
            if len(digests) != -(-size // rule.avg_size) or len(blob) % width:
                return None
            spans = _spans(size, rule.avg_size, digests)
        else:
            if len(sizes_blob) % 8 or len(sizes_blob) // 8 != len(digests) or len(blob) % width:
                return None
            sizes = array.array("Q", sizes_blob)
            if sys.byteorder != "little":
                sizes.byteswap()
            if sum(sizes) != size or (size and min(sizes) < 1):
                return None
            offsets = itertools.accumulate(sizes, initial=0)
            # offsets has one entry more than sizes (the end of the file): zip stops before it.
            spans = tuple(
                ChunkSpan(o, n, d) for o, n, d in zip(offsets, sizes, digests, strict=False)
            )
        return FileDigests(algo, file_digest.lower(), size, rule.avg_size, spans, rule)

    def put(self, realpath: str, st: os.stat_result, fd: FileDigests) -> None:
        """Remember `fd` for this file state, replacing what the path had; never raises."""
        rule = fd.chunking or Chunking.fixed(fd.chunk_size)
        blob = b"".join(bytes.fromhex(c.digest) for c in fd.chunks)
        sizes = array.array("Q", [] if rule.kind == "fixed" else [c.size for c in fd.chunks])
        if sys.byteorder != "little":
            sizes.byteswap()
        row = (
            realpath,
            rule.key,
            fd.algo.value,
            *_stat_key(st),
            fd.digest,
            blob,
            sizes.tobytes(),
            time.time(),
        )
        for attempt in range(2):
            try:
                conn = self._connect()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(
                        "INSERT OR REPLACE INTO chunk_digests VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", row
                    )
                    conn.execute(
                        "DELETE FROM chunk_digests WHERE rowid IN (SELECT rowid FROM"
                        " chunk_digests ORDER BY used DESC LIMIT -1 OFFSET ?)",
                        (CACHE_MAX_ENTRIES,),
                    )
                    conn.execute("COMMIT")
                finally:
                    conn.close()
                return
            except sqlite3.DatabaseError as exc:
                # Exactly DatabaseError (not its OperationalError subclass, e.g. "locked")
                # means the file is not a usable database: start a fresh one, once.
                if type(exc) is sqlite3.DatabaseError and attempt == 0:
                    log.debug("digest cache corrupt, replacing it: %s", exc)
                    try:
                        self.path.unlink()
                    except OSError:
                        return
                    continue
                log.debug("digest cache not written: %s", exc)
                return
            except OSError as exc:
                log.debug("digest cache not written: %s", exc)
                return

    def forget(self, realpath: str) -> None:
        """Drop every entry of this path; never raises."""
        try:
            conn = self._connect()
            try:
                conn.execute("DELETE FROM chunk_digests WHERE path = ?", (realpath,))
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("digest cache not written: %s", exc)


def cached_digests(
    path: str | os.PathLike, rule: Chunking, algo: Algo, cache: DigestCache
) -> FileDigests | None:
    """The cache's digests for the file as it is now, or None."""
    realpath = os.path.realpath(path)
    try:
        st = os.stat(realpath)
    except OSError:
        return None
    return cache.get(realpath, st, rule, algo)


def remember(
    path: str | os.PathLike,
    before: os.stat_result,
    started_ns: int,
    fd: FileDigests,
    cache: DigestCache,
) -> None:
    """Cache `fd` for the file read from `before`, if it has not changed since (nor can
    without its stat changing); never raises."""
    realpath = os.path.realpath(path)
    try:
        after = os.stat(realpath)
    except OSError:
        return
    if _stat_key(before) == _stat_key(after) and not _racy(after, started_ns):
        cache.put(realpath, after, fd)


def file_digests(
    path: str | os.PathLike,
    *,
    chunk_size: int | None = None,
    algo: Algo,
    cache: DigestCache | None,
    chunking: Chunking | str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[FileDigests, bool]:
    """(digests, came_from_cache) for a file: the cache when it knows this state, else hashing.

    Chunking as for `hash_file`.
    """
    rule = as_chunking(chunking, chunk_size)
    realpath = os.path.realpath(path)
    started_ns = time.time_ns()
    with open(realpath, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if cache is not None:
            hit = cache.get(realpath, before, rule, algo)
            if hit is not None:
                if on_bytes is not None:
                    on_bytes(hit.size)
                return hit, True
        fd = _hash_open(f, before.st_size, rule, algo, on_bytes, stop)
        after = os.fstat(f.fileno())
    if cache is not None and _stat_key(before) == _stat_key(after) and not _racy(after, started_ns):
        cache.put(realpath, after, fd)
    return fd, False
