"""The casd client library: deduplicating, resumable uploads and verified, resumable downloads.

Talks to a casd server over HTTP exactly as docs PROTOCOL.md describes, through one aiohttp
ClientSession. It imports nothing of the server side: only the leaf `casd.digest`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from casd.digest import Algo, Digest

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 5 * MiB
DEFAULT_CONCURRENCY = 4
DEFAULT_SERVER = "http://127.0.0.1:8080"

# Hashing reads pieces of at most this size into two reused buffers, so its memory is two
# pieces whatever the chunk or file size.
HASH_PIECE = 4 * MiB
# Chunk bodies and downloads move through the event loop in pieces of this size.
IO_PIECE = 1 * MiB
# Handshake -> send -> merge rounds before giving up when the server keeps losing the upload
# (expired or aborted between requests) or reports chunks still missing at merge.
MAX_ROUNDS = 3
# A cache entry older than this many entries (by last use) is dropped.
CACHE_MAX_ENTRIES = 10_000
# File timestamps come from a clock that ticks in jiffies (up to 10 ms); a file written within
# one tick of the moment we start reading it could change again without its mtime moving,
# so its digests are not cached. Filesystems with whole-second timestamps get 2 s.
RACY_NS = 10_000_000
RACY_COARSE_NS = 2_000_000_000

_EXT = re.compile(r"\.[A-Za-z0-9_-]{1,16}\Z")
_FILE_PATH = re.compile(r"/v1/files/([0-9a-fA-F]+)(\.[A-Za-z0-9_-]{1,16})?\Z")


# --- errors ---------------------------------------------------------------------------------


class CasdClientError(Exception):
    """Anything the client could not do; `status`/`code` are set when the server refused."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body or {}


class CasdHTTPError(CasdClientError):
    """The server answered with an error (`status`, `code` and `message` from its JSON body)."""


class CasdConnectionError(CasdClientError):
    """The server could not be reached, or the connection kept failing after every retry."""


class CasdIntegrityError(CasdClientError):
    """Bytes are not what their digest says: a downloaded file, or a file that changed."""


class FileChangedError(CasdIntegrityError):
    """The local file changed between hashing and sending; running again rehashes it."""


# --- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a local file: where it lies and its digest (lowercase hex)."""

    offset: int
    size: int
    digest: str


@dataclass(frozen=True)
class FileDigests:
    """A file's whole digest and its chunks, as one hashing pass (or the cache) found them."""

    algo: Algo
    digest: str
    size: int
    chunk_size: int
    chunks: tuple[ChunkSpan, ...]


@dataclass(frozen=True)
class Progress:
    """A progress report: phase is "hash", "upload" or "download"; done never exceeds total."""

    phase: str
    bytes_done: int
    bytes_total: int
    chunks_done: int = 0
    chunks_total: int = 0


@dataclass(frozen=True)
class UploadSummary:
    """What an upload did. sent + skipped = total; "sent" counts chunks the server acknowledged."""

    path: str
    digest: str
    algo: str
    size: int
    url: str
    chunks_total: int
    chunks_sent: int
    bytes_sent: int
    chunks_skipped: int
    bytes_skipped: int
    instant: bool
    cached: bool
    hash_seconds: float
    transfer_seconds: float
    merge_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DownloadSummary:
    """What a download did: the verified file at `path`, and how much came over the wire."""

    path: str
    digest: str
    algo: str
    size: int
    url: str
    bytes_received: int
    resumed_from: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


# --- hashing ---------------------------------------------------------------------------------


def _read_exact(f, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise FileChangedError(f"{f.name}: file shrank while it was being read")
        got += n


def hash_stream(f, size: int, chunk_size: int, algo: Algo,
                on_bytes: Callable[[int], None] | None = None,
                stop: threading.Event | None = None) -> tuple[str, list[str]]:
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
            if jobs[slot] is not None:
                jobs[slot].result()  # the helper is done with this buffer
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


def hash_file(path: str | os.PathLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
              algo: Algo | str = Algo.MD5,
              on_bytes: Callable[[int], None] | None = None,
              stop: threading.Event | None = None) -> FileDigests:
    """The file's digest and its fixed-size chunks' digests, from one read (blocking)."""
    algo = Algo.parse(algo) if not isinstance(algo, Algo) else algo
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        whole, digests = hash_stream(f, size, chunk_size, algo, on_bytes, stop)
    return FileDigests(algo, whole, size, chunk_size, _spans(size, chunk_size, digests))


# --- digest cache ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/casd, else ~/.cache/casd."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "casd"


class DigestCache:
    """Chunk digests of files already hashed, keyed by path, stat and chunking (a SQLite file).

    Best effort: any problem with the file (unwritable, locked, corrupt) makes the cache miss
    or skip, never fails an upload; a corrupt file is replaced on the next write.
    """

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS digests (
            path TEXT NOT NULL, chunk_size INTEGER NOT NULL, algo TEXT NOT NULL,
            dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
            file_digest TEXT NOT NULL, chunk_digests BLOB NOT NULL, used REAL NOT NULL,
            PRIMARY KEY (path, chunk_size, algo))
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

    def get(self, realpath: str, st: os.stat_result, chunk_size: int,
            algo: Algo) -> FileDigests | None:
        """The cached digests for this exact file state, or None."""
        try:
            conn = self._connect()
            try:
                row = conn.execute(
                    "SELECT dev, ino, size, mtime_ns, ctime_ns, file_digest, chunk_digests"
                    " FROM digests WHERE path = ? AND chunk_size = ? AND algo = ?",
                    (realpath, chunk_size, algo.value),
                ).fetchone()
                if row is None or tuple(row[:5]) != _stat_key(st):
                    return None
                conn.execute(
                    "UPDATE digests SET used = ? WHERE path = ? AND chunk_size = ? AND algo = ?",
                    (time.time(), realpath, chunk_size, algo.value),
                )
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("digest cache unreadable, ignoring it: %s", exc)
            return None
        return self._decode(row, st.st_size, chunk_size, algo)

    @staticmethod
    def _decode(row, size: int, chunk_size: int, algo: Algo) -> FileDigests | None:
        file_digest, blob = row[5], row[6]
        width = algo.hex_len // 2
        n_chunks = -(-size // chunk_size)
        if (not isinstance(blob, bytes) or len(blob) != n_chunks * width
                or not isinstance(file_digest, str) or len(file_digest) != algo.hex_len):
            return None
        try:
            Digest.parse(algo, file_digest)
        except ValueError:
            return None
        digests = [blob[i:i + width].hex() for i in range(0, len(blob), width)]
        return FileDigests(algo, file_digest.lower(), size, chunk_size,
                           _spans(size, chunk_size, digests))

    def put(self, realpath: str, st: os.stat_result, fd: FileDigests) -> None:
        """Remember `fd` for this file state, replacing what the path had; never raises."""
        blob = b"".join(bytes.fromhex(c.digest) for c in fd.chunks)
        row = (realpath, fd.chunk_size, fd.algo.value, *_stat_key(st), fd.digest, blob,
               time.time())
        for attempt in range(2):
            try:
                conn = self._connect()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT OR REPLACE INTO digests VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                                 row)
                    conn.execute(
                        "DELETE FROM digests WHERE rowid IN (SELECT rowid FROM digests"
                        " ORDER BY used DESC LIMIT -1 OFFSET ?)", (CACHE_MAX_ENTRIES,))
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
                conn.execute("DELETE FROM digests WHERE path = ?", (realpath,))
            finally:
                conn.close()
        except (sqlite3.Error, OSError) as exc:
            log.debug("digest cache not written: %s", exc)


def file_digests(path: str | os.PathLike, *, chunk_size: int, algo: Algo,
                 cache: DigestCache | None,
                 on_bytes: Callable[[int], None] | None = None,
                 stop: threading.Event | None = None) -> tuple[FileDigests, bool]:
    """(digests, came_from_cache) for a file: the cache when it knows this state, else hashing."""
    realpath = os.path.realpath(path)
    started_ns = time.time_ns()
    with open(realpath, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if cache is not None:
            hit = cache.get(realpath, before, chunk_size, algo)
            if hit is not None:
                if on_bytes is not None:
                    on_bytes(hit.size)
                return hit, True
        whole, digests = hash_stream(f, before.st_size, chunk_size, algo, on_bytes, stop)
        after = os.fstat(f.fileno())
    fd = FileDigests(algo, whole, before.st_size, chunk_size,
                     _spans(before.st_size, chunk_size, digests))
    if cache is not None and _stat_key(before) == _stat_key(after) \
            and not _racy(after, started_ns):
        cache.put(realpath, after, fd)
    return fd, False


# --- references to stored files --------------------------------------------------------------


@dataclass(frozen=True)
class FileRef:
    """A stored file named by digest, with the server it lives on when a URL said so."""

    digest: Digest
    ext: str = ""
    server: str | None = None

    @property
    def path(self) -> str:
        return f"/v1/files/{self.digest.hex}{self.ext}"

    @classmethod
    def parse(cls, text: str) -> FileRef:
        """'<digest>', '<digest>.ext', '/v1/files/<digest>.ext' or 'http://host/v1/files/...'."""
        text = text.strip()
        server = None
        path = text
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{text!r} is not an http(s) URL")
            server, path = f"{parts.scheme}://{parts.netloc}", parts.path
        if "/" not in path:
            path = "/v1/files/" + path
        m = _FILE_PATH.search(path)
        if not m:
            raise ValueError(
                f"{text!r} is neither a digest (32 or 64 hexadecimal characters) "
                "nor a casd file URL (…/v1/files/DIGEST.ext)"
            )
        prefix = path[: m.start()]
        if server is not None and prefix:
            server += prefix
        return cls(Digest.parse_any(m.group(1)), (m.group(2) or "").lower(), server)


def ext_of(name: str) -> str:
    """The extension casd accepts for a file name ('.iso'), or '' when it has none it can take."""
    ext = os.path.splitext(name)[1]
    return ext.lower() if _EXT.match(ext) else ""


# --- the client -------------------------------------------------------------------------------


class CasdClient:
    """An async casd client on one aiohttp session; use `async with CasdClient(url) as c:`.

    Connection errors, timeouts and 5xx answers are retried `retries` times with exponential
    backoff and full jitter; 4xx answers never are. A connection refused before the server
    ever answered fails at once: that is a wrong address or a stopped server, not a blip.
    """

    def __init__(self, server: str = DEFAULT_SERVER, *, token: str | None = None,
                 retries: int = 5, backoff: float = 0.25, max_backoff: float = 8.0,
                 timeout: aiohttp.ClientTimeout | None = None,
                 cache_dir: str | os.PathLike | None = None):
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{server!r} is not a server URL (example: http://127.0.0.1:8080)")
        self.server = server.rstrip("/")
        self.token = token
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout or aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=300)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._reached = False

    async def __aenter__(self) -> CasdClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def _headers(self, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        # The token goes only to the configured server, never to a host a URL pointed at.
        if self.token and (url == self.server or url.startswith(self.server + "/")):
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    async def _retry_wait(self, attempt: int, what: str, err: CasdClientError) -> None:
        if attempt > self.retries:
            raise err
        delay = self._delay(attempt)
        log.debug("%s failed (%s); retry %d/%d in %.2fs", what, err, attempt, self.retries, delay)
        await asyncio.sleep(delay)

    def _connection_error(self, exc: BaseException, url: str) -> CasdClientError:
        if isinstance(exc.__cause__, CasdClientError):
            return exc.__cause__  # our own body generator failed (e.g. the file shrank)
        if isinstance(exc, aiohttp.ClientConnectorError):
            errno = getattr(exc.os_error, "errno", None)
            why = os.strerror(errno) if errno else str(exc.os_error or exc)
            return CasdConnectionError(f"cannot reach {self.server}: {why}")
        if isinstance(exc, TimeoutError):
            return CasdConnectionError(f"{url}: the server did not answer in time")
        return CasdConnectionError(f"{url}: connection lost ({exc.__class__.__name__}: {exc})")

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    body: Callable[[], AsyncIterator[bytes]] | None = None,
                    content_length: int | None = None, what: str = "",
                    want_answer: bool = True) -> tuple[int, dict]:
        """One API request with retries; the decoded JSON answer, or an exception."""
        url = self.server + path
        what = what or f"{method} {path}"
        attempt = 0
        while True:
            headers = self._headers(url)
            if content_length is not None:
                headers["Content-Length"] = str(content_length)
                headers["Content-Type"] = "application/octet-stream"
                # Chunk answers then skip the `missing` list, which this client never reads.
                headers["Prefer"] = "return=minimal"
            try:
                async with self._sess().request(
                    method, url, json=json_body,
                    data=body() if body is not None else None, headers=headers,
                ) as resp:
                    raw = await resp.read()
                    self._reached = True
                    if resp.status < 400:
                        if not want_answer:
                            return resp.status, {}
                        return resp.status, _json_answer(raw, url, resp.status)
                    err = _http_error(resp.status, resp.reason, raw, what)
                    if resp.status < 500:
                        raise err
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                err = self._connection_error(exc, url)
                if not isinstance(err, CasdConnectionError):
                    raise err from None
                if isinstance(exc, aiohttp.ClientConnectorError) and not self._reached:
                    raise err from None
            attempt += 1
            await self._retry_wait(attempt, what, err)

    # --- upload ---

    async def upload(self, path: str | os.PathLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                     concurrency: int = DEFAULT_CONCURRENCY, algo: Algo | str = Algo.MD5,
                     ext: str | None = None, name: str | None = None,
                     on_progress: ProgressCallback | None = None,
                     use_cache: bool = True) -> UploadSummary:
        """Upload a file, sending only the chunks the server lacks; rerun it to resume."""
        algo = algo if isinstance(algo, Algo) else Algo.parse(algo)
        if chunk_size < 1:
            raise ValueError("chunk size must be at least 1 byte")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        path = Path(path)
        name = (name if name is not None else path.name)[:255]
        ext = ext_of(name) if ext is None else ext
        cache = DigestCache(self.cache_dir or default_cache_dir()) if use_cache else None
        started = time.perf_counter()
        fd, cached = await self._file_digests(path, chunk_size, algo, cache, on_progress)
        hash_seconds = time.perf_counter() - started
        try:
            result = await self._push(path, fd, ext, name, concurrency, on_progress)
        except FileChangedError:
            if not cached:
                raise
            # The cache vouched for a file state that no longer holds (it was rewritten
            # within one timestamp tick): forget it and hash the real bytes.
            log.debug("%s: cached digests are stale; rehashing", path)
            cache.forget(os.path.realpath(path))
            t = time.perf_counter()
            fd, cached = await self._file_digests(path, chunk_size, algo, cache, on_progress)
            hash_seconds += time.perf_counter() - t
            result = await self._push(path, fd, ext, name, concurrency, on_progress)
        url, sent_chunks, sent_bytes, instant, transfer_s, merge_s = result
        return UploadSummary(
            path=str(path), digest=fd.digest, algo=algo.value, size=fd.size,
            url=self.server + url if url.startswith("/") else url,
            chunks_total=len(fd.chunks), chunks_sent=sent_chunks, bytes_sent=sent_bytes,
            chunks_skipped=len(fd.chunks) - sent_chunks, bytes_skipped=fd.size - sent_bytes,
            instant=instant, cached=cached, hash_seconds=hash_seconds,
            transfer_seconds=transfer_s, merge_seconds=merge_s,
            seconds=time.perf_counter() - started,
        )

    async def _file_digests(self, path: Path, chunk_size: int, algo: Algo,
                            cache: DigestCache | None,
                            on_progress: ProgressCallback | None) -> tuple[FileDigests, bool]:
        loop = asyncio.get_running_loop()
        on_bytes = None
        if on_progress is not None:
            total = os.stat(path).st_size

            def on_bytes(done: int) -> None:
                loop.call_soon_threadsafe(on_progress, Progress("hash", done, total))

        stop = threading.Event()
        try:
            return await asyncio.to_thread(
                file_digests, path, chunk_size=chunk_size, algo=algo, cache=cache,
                on_bytes=on_bytes, stop=stop)
        except asyncio.CancelledError:
            stop.set()  # let the hashing thread end now rather than read the whole file
            raise

    async def _push(self, path: Path, fd: FileDigests, ext: str, name: str, concurrency: int,
                    on_progress: ProgressCallback | None):
        key = fd.algo.value
        manifest = {
            "algo": key, key: fd.digest, "size": fd.size, "ext": ext, "name": name,
            "chunks": [{key: c.digest, "size": c.size} for c in fd.chunks],
        }
        first = {}
        for c in fd.chunks:
            first.setdefault(c.digest, c)
        sent: dict[str, int] = {}
        transfer_s = merge_s = 0.0
        for round_no in range(1, MAX_ROUNDS + 1):
            t = time.perf_counter()
            _, hs = await self._call("POST", "/v1/handshake", json_body=manifest,
                                     what="handshake")
            if hs.get("status") == "complete":
                transfer_s += time.perf_counter() - t
                return _url(hs), len(sent), sum(sent.values()), not sent, transfer_s, merge_s
            upload_id = _field(hs, "upload_id", str)
            missing = _missing(hs, first)
            try:
                await self._send(path, upload_id, [first[d] for d in missing], concurrency,
                                 sent, on_progress)
                transfer_s += time.perf_counter() - t
                t = time.perf_counter()
                _, merged = await self._call("POST", f"/v1/uploads/{upload_id}/merge",
                                             what="merge")
                merge_s += time.perf_counter() - t
                return _url(merged), len(sent), sum(sent.values()), False, transfer_s, merge_s
            except CasdHTTPError as exc:
                # The upload expired or was aborted meanwhile, or chunks went missing:
                # a fresh handshake says what is still needed.
                if exc.code not in ("not_found", "incomplete") or round_no == MAX_ROUNDS:
                    raise
                log.debug("upload %s: %s; handshaking again", upload_id, exc)
        raise AssertionError("unreachable")

    async def _send(self, path: Path, upload_id: str, todo: list[ChunkSpan], concurrency: int,
                    sent: dict[str, int], on_progress: ProgressCallback | None) -> None:
        """PUT each chunk of `todo`, at most `concurrency` at a time; record them in `sent`."""
        if not todo:
            return
        total_bytes = sum(c.size for c in todo)
        done = {"bytes": 0, "chunks": 0}
        # A shared iterator is the bounded queue: each worker takes the next chunk only when
        # its previous request is answered, so at most `concurrency` are in flight.
        queue = iter(todo)

        async def worker() -> None:
            for chunk in queue:
                await self._put_chunk(path, upload_id, chunk)
                sent[chunk.digest] = chunk.size
                done["bytes"] += chunk.size
                done["chunks"] += 1
                if on_progress is not None:
                    on_progress(Progress("upload", done["bytes"], total_bytes,
                                         done["chunks"], len(todo)))

        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _put_chunk(self, path: Path, upload_id: str, chunk: ChunkSpan) -> None:
        try:
            await self._call(
                "PUT", f"/v1/uploads/{upload_id}/chunks/{chunk.digest}",
                body=lambda: _file_slice(path, chunk.offset, chunk.size),
                content_length=chunk.size, what=f"chunk at offset {chunk.offset}",
                # Even a minimal answer is not needed: the status says it all.
                want_answer=False,
            )
        except CasdHTTPError as exc:
            if exc.code in ("digest_mismatch", "size_mismatch"):
                raise FileChangedError(
                    f"{path} changed after it was hashed (the chunk at offset {chunk.offset} "
                    "no longer matches); run the upload again",
                    status=exc.status, code=exc.code, body=exc.body,
                ) from None
            raise

    # --- download ---

    async def download(self, ref: str | FileRef, dest: str | os.PathLike | None = None, *,
                       on_progress: ProgressCallback | None = None) -> DownloadSummary:
        """Fetch a stored file to `dest`, resuming a partial earlier try, verifying its digest.

        Bytes go to a hidden temp file beside `dest`, which is renamed into place only once
        the digest matches; an interrupted download leaves the temp file for the next try.
        """
        if not isinstance(ref, FileRef):
            ref = FileRef.parse(ref)
        url = (ref.server or self.server) + ref.path
        default_name = f"{ref.digest.hex}{ref.ext}"
        dest = Path(dest) if dest is not None else Path(default_name)
        if dest.is_dir():
            dest = dest / default_name
        part = dest.parent / f".{dest.name[:150]}.{ref.digest.hex[:16]}.casd-part"
        started = time.perf_counter()
        sink = await asyncio.to_thread(_Sink.open, part, ref.digest.algo)
        try:
            resumed_from, received = await self._fetch(url, sink, on_progress)
            await asyncio.to_thread(sink.finish)
        except BaseException:
            await asyncio.to_thread(sink.close, discard_if_empty=True)
            raise
        if sink.hexdigest() != ref.digest.hex:
            part.unlink(missing_ok=True)
            raise CasdIntegrityError(
                f"{url}: the downloaded bytes hash to {sink.hexdigest()}, not {ref.digest.hex};"
                " nothing was written")
        await asyncio.to_thread(_publish, part, dest)
        return DownloadSummary(
            path=str(dest), digest=ref.digest.hex, algo=ref.digest.algo.value,
            size=sink.pos, url=url, bytes_received=received, resumed_from=resumed_from,
            seconds=time.perf_counter() - started,
        )

    async def _fetch(self, url: str, sink: _Sink, on_progress: ProgressCallback | None):
        """Stream the file into `sink`, resuming by Range after cuts; (resumed_from, received)."""
        resumed_from = sink.pos
        received = 0
        attempt = 0
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="casd-write") as writer:
            while True:
                start = sink.pos
                headers = self._headers(url, {"Accept-Encoding": "identity"})
                if start:
                    headers["Range"] = f"bytes={start}-"
                try:
                    # The stored bytes themselves, never a decoded form: Range offsets and
                    # the digest are about those.
                    async with self._sess().get(url, headers=headers,
                                                auto_decompress=False) as resp:
                        self._reached = True
                        total = await self._begin_body(resp, url, sink, start, writer)
                        if total is None:
                            continue  # the partial bytes were useless; start over
                        pending: list[asyncio.Future] = []
                        pieces: list[bytes] = []
                        batch = 0
                        got = sink.pos  # 0 again if the server answered 200 to a Range
                        try:
                            async for data in resp.content.iter_any():
                                pieces.append(data)
                                batch += len(data)
                                if batch >= IO_PIECE:
                                    # Written and hashed in the writer thread while the
                                    # loop receives the next batch; at most two in flight.
                                    pending.append(loop.run_in_executor(
                                        writer, sink.write, pieces))
                                    received += batch
                                    got += batch
                                    pieces, batch = [], 0
                                    attempt = 0  # progress was made: reset the retry budget
                                    if len(pending) > 1:
                                        await pending.pop(0)
                                    if on_progress is not None:
                                        on_progress(Progress("download", got, total))
                        finally:
                            # Whatever arrived is kept, so a retry resumes after it.
                            if pieces:
                                received += batch
                                pending.append(loop.run_in_executor(writer, sink.write, pieces))
                            for fut in pending:
                                await fut
                        if sink.pos != total:
                            raise aiohttp.ClientPayloadError(
                                f"body ended at byte {sink.pos} of {total}")
                        if on_progress is not None:
                            on_progress(Progress("download", total, total))
                        return resumed_from, received
                except (TimeoutError, aiohttp.ClientConnectionError,
                        aiohttp.ClientPayloadError) as exc:
                    err = self._connection_error(exc, url)
                    if isinstance(exc, aiohttp.ClientConnectorError) and not self._reached:
                        raise err from None
                except CasdHTTPError as exc:
                    if exc.status is None or exc.status < 500:
                        raise
                    err = exc
                attempt += 1
                await self._retry_wait(attempt, f"download of {url}", err)

    async def _begin_body(self, resp: aiohttp.ClientResponse, url: str, sink: _Sink,
                          start: int, writer: ThreadPoolExecutor) -> int | None:
        """Check a download answer and align `sink` with it: the file's total size, or None."""
        loop = asyncio.get_running_loop()
        if resp.status == 416 and start:
            # Our partial file is not shorter than the stored file: it is wrong; restart.
            await loop.run_in_executor(writer, sink.truncate)
            return None
        if resp.status >= 400:
            raise _http_error(resp.status, resp.reason, await resp.read(), f"download of {url}")
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise CasdClientError(f"{url}: unusable Content-Range answer to a resume")
            return int(m.group(3))
        if resp.status != 200:
            raise CasdClientError(f"{url}: unexpected HTTP {resp.status} {resp.reason}")
        if start:
            # The server sent the whole file instead of the range: take it from byte 0.
            await loop.run_in_executor(writer, sink.truncate)
        if resp.content_length is None:
            raise CasdClientError(f"{url}: the server did not say how long the file is")
        return resp.content_length


class _Sink:
    """A temp file being downloaded into, hashed as it grows (blocking; one thread at a time)."""

    def __init__(self, path: Path, f, algo: Algo):
        self.path = path
        self.f = f
        self.algo = algo
        self.h = algo.new()
        self.pos = 0

    @classmethod
    def open(cls, path: Path, algo: Algo) -> _Sink:
        """Open (or create) the temp file and hash what an earlier try already left in it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        sink = cls(path, os.fdopen(fd, "r+b", buffering=0), algo)
        try:
            while True:
                data = sink.f.read(HASH_PIECE)
                if not data:
                    break
                sink.h.update(data)
                sink.pos += len(data)
        except BaseException:
            sink.close()
            raise
        return sink

    def write(self, pieces: list[bytes]) -> None:
        for data in pieces:
            view = memoryview(data)
            while view:
                view = view[self.f.write(view):]
            self.h.update(data)
            self.pos += len(data)

    def truncate(self) -> None:
        self.f.seek(0)
        self.f.truncate()
        self.h = self.algo.new()
        self.pos = 0

    def hexdigest(self) -> str:
        return self.h.hexdigest()

    def finish(self) -> None:
        os.fsync(self.f.fileno())
        self.f.close()

    def close(self, discard_if_empty: bool = False) -> None:
        """Close; an empty temp file holds nothing worth resuming, so it can go."""
        self.f.close()
        if discard_if_empty and self.pos == 0:
            self.path.unlink(missing_ok=True)


def _publish(part: Path, dest: Path) -> None:
    """Rename the verified temp file into place and make the rename durable."""
    os.replace(part, dest)
    try:
        dir_fd = os.open(dest.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


async def _file_slice(path: Path, offset: int, size: int) -> AsyncIterator[bytes]:
    """Stream `size` bytes of the file from `offset`, read in a worker thread piece by piece."""
    loop = asyncio.get_running_loop()
    fd = await loop.run_in_executor(None, os.open, path, os.O_RDONLY)
    try:
        pos, end = offset, offset + size
        while pos < end:
            data = await loop.run_in_executor(None, os.pread, fd, min(IO_PIECE, end - pos), pos)
            if not data:
                raise FileChangedError(f"{path} shrank after it was hashed; run the upload again")
            pos += len(data)
            yield data
    finally:
        os.close(fd)


def _json_answer(raw: bytes, url: str, status: int) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise CasdClientError(f"{url}: HTTP {status} answer is not JSON") from None
    if not isinstance(value, dict):
        raise CasdClientError(f"{url}: HTTP {status} answer is not a JSON object")
    return value


def _http_error(status: int, reason: str | None, raw: bytes, what: str) -> CasdHTTPError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = str(body.get("message") or body["error"])
        return CasdHTTPError(f"{what}: {message} ({status} {body['error']})",
                             status=status, code=body["error"], body=body)
    return CasdHTTPError(f"{what}: HTTP {status} {reason or ''}".rstrip(), status=status)


def _field(answer: dict, key: str, kind: type):
    value = answer.get(key)
    if not isinstance(value, kind):
        raise CasdClientError(f"the server's answer lacks {key!r}: {answer!r:.200}")
    return value


def _url(answer: dict) -> str:
    return _field(answer, "url", str)


def _missing(answer: dict, known: dict[str, ChunkSpan]) -> list[str]:
    missing = _field(answer, "missing", list)
    out = []
    for d in missing:
        d = d.lower() if isinstance(d, str) else d
        if d not in known:
            raise CasdClientError(f"the server asked for a chunk not in the manifest: {d!r}")
        out.append(d)
    return out


# --- one-call helpers ---------------------------------------------------------------------------


async def upload(path: str | os.PathLike, *, server: str = DEFAULT_SERVER,
                 token: str | None = None, **options) -> UploadSummary:
    """Upload one file with a short-lived client; options as for CasdClient.upload."""
    async with CasdClient(server, token=token) as client:
        return await client.upload(path, **options)


async def download(ref: str, dest: str | os.PathLike | None = None, *,
                   server: str = DEFAULT_SERVER, token: str | None = None,
                   on_progress: ProgressCallback | None = None) -> DownloadSummary:
    """Download one file (by digest or URL) with a short-lived client."""
    async with CasdClient(server, token=token) as client:
        return await client.download(ref, dest, on_progress=on_progress)
