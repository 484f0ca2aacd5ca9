"""Transfers: `CasdClient` uploads only the chunks a server lacks, and downloads verified.

Talks to a casd server over HTTP exactly as docs/PROTOCOL.md describes, through one aiohttp
ClientSession. It imports nothing of the server side: only leaves (`casd.digest`,
`casd.protocol`) and the rest of `casd.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

import aiohttp

from casd import protocol
from casd.chunking import Chunking
from casd.client.delta import (
    ManifestChunk,
    Source,
    guess_chunkings,
    parse_manifest,
    plan_runs,
    pwrite_all,
    pwritev_all,
    read_verified,
    reuse_index,
)
from casd.client.errors import (
    CasdClientError,
    CasdConnectionError,
    CasdHTTPError,
    CasdIntegrityError,
    FileChangedError,
)
from casd.client.hashing import (
    HASH_PIECE,
    Buffer,
    ByteBudget,
    ChunkSpan,
    DigestCache,
    FileDigests,
    MiB,
    as_chunking,
    cached_digests,
    default_cache_dir,
    file_digests,
    remember,
    stream_digests,
)
from casd.client.values import (
    DownloadSummary,
    FileRef,
    Phase,
    Progress,
    ProgressCallback,
    UploadSummary,
    ext_of,
)
from casd.digest import Algo

log = logging.getLogger("casd.client")

# Four chunk requests keep a server's disk and both hashes busy while one answer is on its
# way back, and in a browser leave two of its six HTTP/1.1 connections per host free for
# the handshake, the merge and the page itself. casd.js uses the same default.
DEFAULT_CONCURRENCY = 4
DEFAULT_SERVER = "http://127.0.0.1:8080"
# Retries of one request, and their backoff: full jitter over 0.25 s doubling, at most 8 s
# (a Retry-After is honoured up to the same cap). Six retries ride through a daemon
# restart of several seconds. casd.js uses the same numbers.
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF = 0.25
DEFAULT_MAX_BACKOFF = 8.0
# How `casd upload` and CasdClient.upload cut a file when told nothing (see docs/chunking.md
# for the measurements behind the choice).
DEFAULT_CHUNKING = "fixed"
# How a chunked download is verified when told nothing: each chunk against the server's
# manifest ("full" also hashes the whole file; docs/client.md compares them).
VERIFY_MODES = ("chunks", "full")
DEFAULT_VERIFY = "chunks"
# A chunked download asks for adjacent chunks together, one Range request per run of at
# most this many bytes (and of at most its share of the download, so that `concurrency`
# streams have work): a request per chunk cost the server a manifest lookup per chunk, and
# the client a request's overhead per 1 MiB chunk of FastCDC. Runs end where a chunk is
# already local. Memory stays at about two chunks per stream.
RUN_BYTES = 64 * MiB
# Chunk bodies and downloads move through the event loop in pieces of this size.
IO_PIECE = 1 * MiB
# Handshake -> send -> merge rounds before giving up when the server keeps losing the upload
# (expired or aborted between requests) or reports chunks still missing at merge.
MAX_ROUNDS = 3
# A streamed upload (protocol v1.1) holds at most this many bytes of chunks read and hashed
# but not yet sent or found stored (at least one chunk, whatever its size): the bound on the
# queue between the hashing thread and the senders.
STREAM_BUFFER = 64 * MiB
# Digests one batch lists when the server does not say how many it takes.
DEFAULT_MAX_BATCH = 1024
# A file of one chunk up to this size goes in one request (protocol v1.1), read whole. Above
# it the handshake comes first: a file the server has already is then not sent again.
ONE_REQUEST_MAX = 1 * MiB


@dataclass(frozen=True)
class _Pushed:
    """What sending a file's chunks and merging them came to."""

    url: str
    chunks_sent: int
    bytes_sent: int
    instant: bool
    transfer_seconds: float
    merge_seconds: float


class CasdClient:
    """An async casd client on one aiohttp session; use `async with CasdClient(url) as c:`.

    Connection errors, timeouts, 408, 429 and 5xx answers (the errors whose `retryable` is
    true) are retried `retries` times with exponential backoff and full jitter, or after the
    server's Retry-After, capped at `max_backoff`; other 4xx answers never are. A connection
    refused before the server ever answered fails at once: that is a wrong address or a
    stopped server, not a blip.
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        *,
        token: str | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        timeout: aiohttp.ClientTimeout | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{server!r} is not a server URL (example: http://127.0.0.1:8080)")
        self.server = server.rstrip("/")
        self.token = token
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout or aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._reached = False
        # What GET /v1/capabilities said (None: not asked yet): streamed uploads, batch size.
        self._stream_offer: bool | None = None
        # Whether PUT /v1/files/{digest} (a v1.1 one-request upload) works (None: not tried
        # yet; False: the server is older, use the handshake). Learnt from the first try,
        # so a client that uploads one small file asks no GET /v1/capabilities first.
        self._file_put: bool | None = None
        self._max_batch = DEFAULT_MAX_BATCH

    async def __aenter__(self) -> Self:
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

    def _delay(self, attempt: int, err: CasdClientError) -> float:
        if err.retry_after is not None:
            return min(self.max_backoff, err.retry_after)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))

    async def _retry_wait(self, attempt: int, what: str, err: CasdClientError) -> None:
        if attempt > self.retries:
            raise err
        delay = self._delay(attempt, err)
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

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: Callable[[], AsyncIterator[bytes | memoryview] | bytes] | None = None,
        content_length: int | None = None,
        what: str = "",
        want_answer: bool = True,
        base: str | None = None,
    ) -> tuple[int, dict]:
        """One API request with retries; the decoded JSON answer, or an exception."""
        url = (base or self.server) + path
        what = what or f"{method} {path}"
        attempt = 0
        err: CasdClientError
        while True:
            headers = self._headers(url)
            if content_length is not None:
                headers["Content-Length"] = str(content_length)
                headers["Content-Type"] = "application/octet-stream"
                # Chunk answers then skip the `missing` list, which this client never reads.
                headers["Prefer"] = protocol.PREFER_MINIMAL
            try:
                async with self._sess().request(
                    method,
                    url,
                    json=json_body,
                    data=body() if body is not None else None,
                    headers=headers,
                ) as resp:
                    raw = await resp.read()
                    self._reached = True
                    if resp.status < 400:
                        if not want_answer:
                            return resp.status, {}
                        return resp.status, _json_answer(raw, url, resp.status)
                    err = _http_error(resp, raw, what)
                    if not err.retryable:
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

    async def upload(
        self,
        path: str | os.PathLike,
        *,
        chunk_size: int | None = None,
        chunking: Chunking | str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        algo: Algo | str = Algo.MD5,
        ext: str | None = None,
        name: str | None = None,
        on_progress: ProgressCallback | None = None,
        use_cache: bool = True,
    ) -> UploadSummary:
        """Upload a file, sending only the chunks the server lacks; rerun it to resume.

        `chunking` is a `Chunking`, or "fixed"/"fastcdc" with `chunk_size` as the size or
        FastCDC average (each kind's default when None). Without `chunking`, a `chunk_size`
        alone means fixed chunks of that size, as before; neither means DEFAULT_CHUNKING.
        """
        algo = algo if isinstance(algo, Algo) else Algo.parse(algo)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk size must be at least 1 byte")
        if chunking is None and chunk_size is None:
            chunking = DEFAULT_CHUNKING
        chunking = as_chunking(chunking, chunk_size)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        path = Path(path)
        name = (name if name is not None else path.name)[:255]
        ext = ext_of(name) if ext is None else ext
        cache = DigestCache(self.cache_dir or default_cache_dir()) if use_cache else None
        started = time.perf_counter()
        # A small file of one chunk goes in one request (v1.1) where the server takes it:
        # read and hashed in one go (a stream would save nothing), and the bytes hashed are
        # the bytes sent.
        small = None
        if self._file_put is not False:
            limit = min(chunking.min_size, ONE_REQUEST_MAX)
            small = await asyncio.to_thread(_read_small, path, algo, chunking, limit)
        # Digests the cache knows make a v1 handshake the quickest way; without them, a
        # server that offers it gets the chunks while the file is still being hashed.
        if (
            small is None
            and await self._streams()
            and (
                cache is None
                or await asyncio.to_thread(cached_digests, path, chunking, algo, cache) is None
            )
        ):
            streamed = await self._stream_upload(
                path, chunking, algo, ext, name, concurrency, on_progress, cache, started
            )
            if streamed is not None:
                return streamed
        if small is not None:
            data, fd = small
            cached = False
            _report(on_progress, Phase.HASHING, fd, done=True)
        else:
            fd, cached = await self._file_digests(path, chunking, algo, cache, on_progress)
        hash_seconds = time.perf_counter() - started
        try:
            put = None
            if small is not None:
                put = await self._put_file(data, fd, ext, name, on_progress)
            result = put or await self._push(path, fd, ext, name, concurrency, on_progress)
        except FileChangedError:
            if not cached or cache is None:
                raise
            # The cache vouched for a file state that no longer holds (it was rewritten
            # within one timestamp tick): forget it and hash the real bytes.
            log.debug("%s: cached digests are stale; rehashing", path)
            cache.forget(os.path.realpath(path))
            t = time.perf_counter()
            fd, cached = await self._file_digests(path, chunking, algo, cache, on_progress)
            hash_seconds += time.perf_counter() - t
            result = await self._push(path, fd, ext, name, concurrency, on_progress)
        _report(on_progress, Phase.DONE, fd, done=True)
        return UploadSummary(
            path=str(path),
            digest=fd.digest,
            algo=algo.value,
            size=fd.size,
            url=self.server + result.url if result.url.startswith("/") else result.url,
            chunks_total=len(fd.chunks),
            chunks_sent=result.chunks_sent,
            bytes_sent=result.bytes_sent,
            chunks_skipped=len(fd.chunks) - result.chunks_sent,
            bytes_skipped=fd.size - result.bytes_sent,
            instant=result.instant,
            cached=cached,
            hash_seconds=hash_seconds,
            transfer_seconds=result.transfer_seconds,
            merge_seconds=result.merge_seconds,
            seconds=time.perf_counter() - started,
        )

    # --- one-request upload (protocol v1.1) ---

    async def _put_file(
        self,
        data: bytes,
        fd: FileDigests,
        ext: str,
        name: str,
        on_progress: ProgressCallback | None,
    ) -> _Pushed | None:
        """PUT a file of at most one chunk whole; None when the server does not take it (an
        older server: 405, or 404 from something in front of it), and from then on this
        client handshakes. 201: this request stored it; 200: it was complete already."""
        query = urlencode({"name": name}) if name else ""
        target = f"/v1/files/{fd.digest}{ext}" + (f"?{query}" if query else "")
        _report(on_progress, Phase.UPLOADING, fd, done=False)
        t = time.perf_counter()
        try:
            status, answer = await self._call(
                "PUT",
                target,
                body=lambda: data,
                content_length=fd.size,
                what="file",
            )
        except CasdHTTPError as exc:
            if exc.status in (404, 405) and self._file_put is None:
                self._file_put = False
                return None
            raise
        self._file_put = True
        seconds = time.perf_counter() - t
        _report(on_progress, Phase.UPLOADING, fd, done=True)
        if status == 201:
            return _Pushed(_url(answer), len(fd.chunks), fd.size, False, seconds, 0.0)
        return _Pushed(_url(answer), 0, 0, True, seconds, 0.0)

    # --- streamed upload (protocol v1.1) ---

    async def _streams(self) -> bool:
        """Whether the server offers streamed uploads; asked once per client."""
        if self._stream_offer is None:
            try:
                _, caps = await self._call("GET", "/v1/capabilities", what="capabilities")
            except CasdHTTPError as exc:
                if exc.status not in (404, 405):
                    raise
                caps = {}  # a v1 server
            except CasdConnectionError:
                # Unreachable for now: upload by v1, which hashes first and then reports
                # the same error if the server is still away; ask again next time.
                return False
            self._stream_offer = caps.get("stream_uploads") is True
            batch = caps.get("max_batch")
            if isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1:
                self._max_batch = batch
        return self._stream_offer

    async def _stream_upload(
        self,
        path: Path,
        rule: Chunking,
        algo: Algo,
        ext: str,
        name: str,
        concurrency: int,
        on_progress: ProgressCallback | None,
        cache: DigestCache | None,
        started: float,
    ) -> UploadSummary | None:
        """Open a streamed upload, list and send chunks as they are hashed, merge with the
        file's digest. None when the server lost the upload (expired, aborted, gc'd chunks):
        the caller then uploads by v1, as a rerun would."""
        key = algo.value
        # The size read is the size declared: the server holds the upload to it (a tenant's
        # quota is checked against it), and a file that changes size meanwhile fails.
        size = (await asyncio.to_thread(os.stat, path)).st_size
        try:
            _, opened = await self._call(
                "POST",
                "/v1/uploads",
                json_body={"algo": key, "ext": ext, "name": name, "size": size},
                what="open upload",
            )
        except CasdHTTPError as exc:
            if exc.code != protocol.NOT_FOUND:
                raise
            self._stream_offer = None  # restarted without v1.1 since it was asked: ask again
            return None
        upload_id = _field(opened, "upload_id", str)
        try:
            return await self._stream_to(
                upload_id, path, size, rule, algo, concurrency, on_progress, cache, started
            )
        except CasdHTTPError as exc:
            if exc.code not in (protocol.NOT_FOUND, protocol.INCOMPLETE):
                await self._forget_upload(upload_id)
                raise
            log.debug("streamed upload %s: %s; uploading by v1", upload_id, exc)
            return None
        except BaseException:
            await self._forget_upload(upload_id)
            raise

    async def _forget_upload(self, upload_id: str) -> None:
        """Abort an upload this client gives up on, so that it stops counting against the
        pending budget; best effort (it expires anyway)."""

        async def delete() -> None:
            async with self._sess().delete(
                f"{self.server}/v1/uploads/{upload_id}",
                headers=self._headers(self.server),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                await resp.read()

        with contextlib.suppress(aiohttp.ClientError, TimeoutError, asyncio.CancelledError):
            await asyncio.shield(delete())

    async def _stream_to(
        self,
        upload_id: str,
        path: Path,
        size: int,
        rule: Chunking,
        algo: Algo,
        concurrency: int,
        on_progress: ProgressCallback | None,
        cache: DigestCache | None,
        started: float,
    ) -> UploadSummary:
        loop = asyncio.get_running_loop()
        key = algo.value
        budget = ByteBudget(STREAM_BUFFER)
        stop = threading.Event()
        ready: asyncio.Queue[tuple[ChunkSpan, Buffer] | None] = asyncio.Queue()
        to_send: asyncio.Queue[tuple[ChunkSpan, Buffer] | None] = asyncio.Queue(concurrency)
        realpath = os.path.realpath(path)
        sent: dict[str, int] = {}
        hash_done: list[float] = []

        def emit(span: ChunkSpan, data: Buffer) -> None:
            loop.call_soon_threadsafe(ready.put_nowait, (span, data))

        # Progress: "hashing" while the file is read (its chunks_done already counting the
        # chunks acknowledged, since sending overlaps reading), then "uploading" for what is
        # left to send once it is read: two phases in order, as for v1, never interleaved.
        read = [0]
        queued_bytes = [0]

        def report() -> None:
            if on_progress is None:
                return
            if not hash_done:
                on_progress(Progress(Phase.HASHING, min(read[0], size), size, len(sent)))
            else:
                acked = sum(sent.values())
                on_progress(Progress(Phase.UPLOADING, acked, queued_bytes[0], len(sent)))

        def on_bytes(done: int) -> None:
            read[0] = done
            loop.call_soon_threadsafe(report)

        def read_and_hash() -> tuple[FileDigests, os.stat_result, int]:
            started_ns = time.time_ns()
            try:
                with open(realpath, "rb", buffering=0) as f:
                    before = os.fstat(f.fileno())
                    if before.st_size != size:
                        raise FileChangedError(f"{path} changed size while it was being uploaded")
                    fd = stream_digests(f, size, rule, algo, emit, budget, on_bytes, stop)
                hash_done.append(time.perf_counter())
                loop.call_soon_threadsafe(report)  # the "uploading" phase begins
                return fd, before, started_ns
            finally:
                loop.call_soon_threadsafe(ready.put_nowait, None)

        async def list_batches() -> None:
            start = 0
            queued: set[str] = set()
            ended = False
            while not ended:
                batch: list[tuple[ChunkSpan, Buffer]] = []
                item = await ready.get()
                while item is not None:
                    batch.append(item)
                    if len(batch) >= self._max_batch or ready.empty():
                        break
                    item = ready.get_nowait()
                ended = item is None
                if not batch:
                    continue
                missing = await self._list_batch(upload_id, key, start, batch)
                start += len(batch)
                for span, data in batch:
                    if span.digest in missing and span.digest not in queued:
                        queued.add(span.digest)
                        queued_bytes[0] += span.size
                        await to_send.put((span, data))
                    else:
                        budget.give(len(data))
            for _ in range(concurrency):
                await to_send.put(None)

        async def send() -> None:
            while (item := await to_send.get()) is not None:
                span, data = item
                try:
                    await self._put_bytes(upload_id, span, data)
                finally:
                    budget.give(len(data))
                sent[span.digest] = span.size
                report()

        hashing = asyncio.create_task(asyncio.to_thread(read_and_hash))
        tasks = [asyncio.create_task(list_batches())]
        tasks += [asyncio.create_task(send()) for _ in range(concurrency)]
        try:
            await asyncio.gather(hashing, *tasks)
        except BaseException:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(hashing, *tasks, return_exceptions=True)
            raise
        fd, before, started_ns = hashing.result()
        transfer_done = time.perf_counter()
        _report(on_progress, Phase.MERGING, fd, done=True)
        _, merged = await self._call(
            "POST",
            f"/v1/uploads/{upload_id}/merge",
            json_body={"algo": key, key: fd.digest, "size": fd.size},
            what="merge",
        )
        merge_seconds = time.perf_counter() - transfer_done
        if cache is not None:
            await asyncio.to_thread(remember, realpath, before, started_ns, fd, cache)
        _report(on_progress, Phase.DONE, fd, done=True)
        url = _url(merged)
        return UploadSummary(
            path=str(path),
            digest=fd.digest,
            algo=key,
            size=fd.size,
            url=self.server + url if url.startswith("/") else url,
            chunks_total=len(fd.chunks),
            chunks_sent=len(sent),
            bytes_sent=sum(sent.values()),
            chunks_skipped=len(fd.chunks) - len(sent),
            bytes_skipped=fd.size - sum(sent.values()),
            # The merge found the file stored already (and hashed nothing again).
            instant=merged.get("instant") is True and not sent,
            cached=False,
            hash_seconds=hash_done[0] - started,
            transfer_seconds=transfer_done - started,
            merge_seconds=merge_seconds,
            seconds=time.perf_counter() - started,
        )

    async def _list_batch(
        self, upload_id: str, key: str, start: int, batch: list[tuple[ChunkSpan, Buffer]]
    ) -> set[str]:
        """Add a batch of digests to a streamed upload; those the server lacks."""
        body = {
            "algo": key,
            "start": start,
            "chunks": [{key: span.digest, "size": span.size} for span, _ in batch],
        }
        try:
            _, answer = await self._call(
                "POST", f"/v1/uploads/{upload_id}/chunks", json_body=body, what="digest batch"
            )
        except CasdHTTPError as exc:
            # A retry after an answer that was lost: the batch is in, what it lacks unknown.
            # Sending every chunk of it is safe (the server drops those it holds).
            if exc.code == protocol.OFFSET_MISMATCH and exc.body.get("count") == start + len(batch):
                return {span.digest for span, _ in batch}
            raise
        known = {span.digest: span for span, _ in batch}
        return set(_missing(answer, known))

    async def _put_bytes(self, upload_id: str, span: ChunkSpan, data: Buffer) -> None:
        async def pieces() -> AsyncIterator[memoryview]:
            view = memoryview(data)
            for i in range(0, len(view), IO_PIECE):
                yield view[i : i + IO_PIECE]

        await self._call(
            "PUT",
            f"/v1/uploads/{upload_id}/chunks/{span.digest}",
            body=pieces,
            content_length=span.size,
            what=f"chunk at offset {span.offset}",
            want_answer=False,
        )

    async def _file_digests(
        self,
        path: Path,
        chunking: Chunking,
        algo: Algo,
        cache: DigestCache | None,
        on_progress: ProgressCallback | None,
    ) -> tuple[FileDigests, bool]:
        loop = asyncio.get_running_loop()
        on_bytes = None
        if on_progress is not None:
            total = os.stat(path).st_size

            def on_bytes(done: int) -> None:
                loop.call_soon_threadsafe(on_progress, Progress(Phase.HASHING, done, total))

        stop = threading.Event()
        try:
            return await asyncio.to_thread(
                file_digests,
                path,
                chunking=chunking,
                algo=algo,
                cache=cache,
                on_bytes=on_bytes,
                stop=stop,
            )
        except asyncio.CancelledError:
            stop.set()  # let the hashing thread end now rather than read the whole file
            raise

    async def _push(
        self,
        path: Path,
        fd: FileDigests,
        ext: str,
        name: str,
        concurrency: int,
        on_progress: ProgressCallback | None,
    ) -> _Pushed:
        """Handshake, send what is missing, merge; again while the server loses the upload."""
        key = fd.algo.value
        manifest = {
            "algo": key,
            key: fd.digest,
            "size": fd.size,
            "ext": ext,
            "name": name,
            "chunks": [{key: c.digest, "size": c.size} for c in fd.chunks],
        }
        first: dict[str, ChunkSpan] = {}
        for c in fd.chunks:
            first.setdefault(c.digest, c)
        sent: dict[str, int] = {}
        transfer_s = merge_s = 0.0
        for round_no in range(1, MAX_ROUNDS + 1):
            _report(on_progress, Phase.HANDSHAKE, fd, done=False)
            t = time.perf_counter()
            _, hs = await self._call("POST", "/v1/handshake", json_body=manifest, what="handshake")
            if hs.get("status") == "complete":
                transfer_s += time.perf_counter() - t
                return _Pushed(
                    _url(hs), len(sent), sum(sent.values()), not sent, transfer_s, merge_s
                )
            upload_id = _field(hs, "upload_id", str)
            missing = _missing(hs, first)
            try:
                await self._send(
                    path, upload_id, [first[d] for d in missing], concurrency, sent, on_progress
                )
                transfer_s += time.perf_counter() - t
                _report(on_progress, Phase.MERGING, fd, done=True)
                t = time.perf_counter()
                _, merged = await self._call("POST", f"/v1/uploads/{upload_id}/merge", what="merge")
                merge_s += time.perf_counter() - t
                return _Pushed(
                    _url(merged), len(sent), sum(sent.values()), False, transfer_s, merge_s
                )
            except CasdHTTPError as exc:
                # The upload expired or was aborted meanwhile, or chunks went missing:
                # a fresh handshake says what is still needed.
                lost = exc.code in (protocol.NOT_FOUND, protocol.INCOMPLETE)
                if not lost or round_no == MAX_ROUNDS:
                    raise
                log.debug("upload %s: %s; handshaking again", upload_id, exc)
        raise AssertionError("unreachable")

    async def _send(
        self,
        path: Path,
        upload_id: str,
        todo: list[ChunkSpan],
        concurrency: int,
        sent: dict[str, int],
        on_progress: ProgressCallback | None,
    ) -> None:
        """PUT each chunk of `todo`, at most `concurrency` at a time; record them in `sent`."""
        total_bytes = sum(c.size for c in todo)
        # The phase begins even when nothing is missing, as in casd.js.
        if on_progress is not None:
            on_progress(Progress(Phase.UPLOADING, 0, total_bytes, 0, len(todo)))
        if not todo:
            return
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
                    on_progress(
                        Progress(
                            Phase.UPLOADING, done["bytes"], total_bytes, done["chunks"], len(todo)
                        )
                    )

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
                "PUT",
                f"/v1/uploads/{upload_id}/chunks/{chunk.digest}",
                body=lambda: _file_slice(path, chunk.offset, chunk.size),
                content_length=chunk.size,
                what=f"chunk at offset {chunk.offset}",
                # Even a minimal answer is not needed: the status says it all.
                want_answer=False,
            )
        except CasdHTTPError as exc:
            if exc.code in (protocol.DIGEST_MISMATCH, protocol.SIZE_MISMATCH):
                raise FileChangedError(
                    f"{path} changed after it was hashed (the chunk at offset {chunk.offset} "
                    "no longer matches); run the upload again",
                    status=exc.status,
                    code=exc.code,
                    body=exc.body,
                ) from None
            raise

    # --- download ---

    async def download(
        self,
        ref: str | FileRef,
        dest: str | os.PathLike | None = None,
        *,
        reuse: Iterable[str | os.PathLike] = (),
        chunking: Chunking | str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_progress: ProgressCallback | None = None,
        use_cache: bool = True,
        verify: str = DEFAULT_VERIFY,
    ) -> DownloadSummary:
        """Fetch a stored file to `dest`, every byte verified, resuming an earlier try.

        When the server offers the file's manifest (GET .../chunks), chunks are fetched in
        runs of adjacent chunks, one Range request per run, on `concurrency` streams, each
        chunk checked (see `verify`) on a pool of threads; chunks that a `reuse` file holds (found by cutting it as the stored file
        was cut: `chunking`, or guessed from the manifest; the digest cache spares the
        rehash) or that an earlier try left are copied locally, also verified. A server
        without manifests gets one GET, hashed whole. Bytes go to a hidden temp file beside
        `dest`, renamed into place only once verified; an interrupted download leaves it for
        the next try.

        `verify`: "chunks" checks each chunk against the server's manifest (by its xxh3-128
        when the manifest gives one, else by its digest); "full" also hashes the assembled
        file and compares it with the digest asked for, before it is published
        (docs/client.md says what each guarantees). A single GET always checks the file.
        """
        if not isinstance(ref, FileRef):
            ref = FileRef.parse(ref)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        rule = (
            None
            if chunking is None
            else (chunking if isinstance(chunking, Chunking) else Chunking.parse(chunking))
        )
        base = ref.server or self.server
        url = base + ref.path
        default_name = f"{ref.digest.hex}{ref.ext}"
        dest = Path(dest) if dest is not None else Path(default_name)
        if dest.is_dir():
            dest = dest / default_name
        part = dest.parent / f".{dest.name[:150]}.{ref.digest.hex[:16]}.casd-part"
        started = time.perf_counter()
        try:
            _, answer = await self._call(
                "GET", ref.path + "/chunks", base=base, what=f"manifest of {ref.digest.hex}"
            )
        except CasdHTTPError as exc:
            if exc.status != 404:
                raise
            # A server without manifests (or an unknown file: the GET says which).
            log.debug("%s: no chunk manifest (%s); one GET", url, exc)
        else:
            chunks = parse_manifest(answer, ref.digest, url)
            cache = DigestCache(self.cache_dir or default_cache_dir()) if use_cache else None
            return await self._download_chunks(
                url,
                ref,
                chunks,
                dest,
                part,
                list(reuse),
                rule,
                cache,
                concurrency,
                on_progress,
                started,
                verify == "full",
            )
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
                " nothing was written"
            )
        await asyncio.to_thread(_publish, part, dest)
        if on_progress is not None:
            on_progress(Progress(Phase.DONE, sink.pos, sink.pos))
        return DownloadSummary(
            path=str(dest),
            digest=ref.digest.hex,
            algo=ref.digest.algo.value,
            size=sink.pos,
            url=url,
            bytes_received=received,
            resumed_from=resumed_from,
            seconds=time.perf_counter() - started,
        )

    async def _download_chunks(
        self,
        url: str,
        ref: FileRef,
        chunks: list[ManifestChunk],
        dest: Path,
        part: Path,
        reuse: list,
        rule: Chunking | None,
        cache: DigestCache | None,
        concurrency: int,
        on_progress: ProgressCallback | None,
        started: float,
        full: bool,
    ) -> DownloadSummary:
        """Fill `part` chunk by chunk (reused, resumed or fetched), each verified; publish it.

        Unless `full`, the whole-file digest is not recomputed: the chunks tile the file and
        each matches the manifest the server checked the file's digest against when it
        merged the upload, and one more MD5 pass over the file would bound the download by
        one core again. With `full`, that pass runs after the last chunk, before publishing.
        """
        algo = ref.digest.algo
        size = sum(c.size for c in chunks)
        # An empty file's digest costs nothing to check, and a manifest of no chunks is
        # otherwise checked by nothing at all.
        full = full or not chunks
        loop = asyncio.get_running_loop()
        # Hashing and disk work: one thread per core, at least two, so verification keeps
        # pace with the network instead of being bound by one MD5 core.
        threads = max(2, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="casd-verify")
        # What an earlier try left, measured before the temp file is sized for this one.
        have = await loop.run_in_executor(pool, _part_length, part)
        fd = await loop.run_in_executor(pool, _open_part, part, size)
        # A whole file that fails the full check is wrong in a way no retry of it mends.
        bad = False
        done = {"bytes": 0, "chunks": 0}
        stats = {
            "fetched": 0,
            "fetched_bytes": 0,
            "reused": 0,
            "reused_bytes": 0,
            "resumed_bytes": 0,
        }

        def progress() -> None:
            if on_progress is not None:
                on_progress(
                    Progress(Phase.DOWNLOADING, done["bytes"], size, done["chunks"], len(chunks))
                )

        try:
            progress()
            todo = await self._reuse_local(
                chunks,
                fd,
                part,
                have,
                reuse,
                rule,
                cache,
                algo,
                pool,
                2 * threads,
                done,
                stats,
                progress,
            )
            runs = plan_runs(todo, concurrency, RUN_BYTES)
            queue = iter(runs)

            def fetched(c: ManifestChunk) -> None:
                stats["fetched"] += 1
                stats["fetched_bytes"] += c.size
                done["bytes"] += c.size
                done["chunks"] += 1
                progress()

            async def worker() -> None:
                for run in queue:
                    await self._fetch_run(url, run, fd, algo, pool, fetched)

            tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(runs)))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            await loop.run_in_executor(pool, os.fsync, fd)
            if full:
                got = await loop.run_in_executor(pool, _hash_fd, fd, size, algo)
                if got != ref.digest.hex:
                    bad = True
                    raise CasdIntegrityError(
                        f"{url}: every chunk matched the server's manifest, but the whole file"
                        f" hashes to {got}, not {ref.digest.hex}: the manifest does not describe"
                        " that file; nothing was written"
                    )
        finally:
            # No thread may still write through `fd` when it closes (its number could be
            # reused at once): queued work is dropped, running work finishes first.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
            os.close(fd)
            if bad:
                part.unlink(missing_ok=True)
        await asyncio.to_thread(_publish, part, dest)
        if on_progress is not None:
            on_progress(Progress(Phase.DONE, size, size, len(chunks), len(chunks)))
        checks = sorted({"xxh3-128" if c.xxh3 is not None else algo.value for c in chunks})
        return DownloadSummary(
            path=str(dest),
            digest=ref.digest.hex,
            algo=algo.value,
            size=size,
            url=url,
            bytes_received=stats["fetched_bytes"],
            resumed_from=stats["resumed_bytes"],
            seconds=time.perf_counter() - started,
            chunked=True,
            chunks_total=len(chunks),
            chunks_fetched=stats["fetched"],
            bytes_fetched=stats["fetched_bytes"],
            chunks_reused=stats["reused"],
            bytes_reused=stats["reused_bytes"],
            verified="file" if full else "chunks",
            chunk_check="+".join(checks),
        )

    async def _reuse_local(
        self,
        chunks: list[ManifestChunk],
        fd: int,
        part: Path,
        have: int,
        reuse: list,
        rule: Chunking | None,
        cache: DigestCache | None,
        algo: Algo,
        pool: ThreadPoolExecutor,
        window: int,
        done: dict,
        stats: dict,
        progress: Callable[[], None],
    ) -> list[ManifestChunk]:
        """Verify what an earlier try left, copy what `reuse` files hold; the chunks left."""
        loop = asyncio.get_running_loop()
        wanted = {c.digest for c in chunks}
        index: dict[str, Source] = {}
        if reuse and chunks:
            rules = [rule] if rule is not None else guess_chunkings(chunks)
            if not rules:
                log.warning(
                    "the stored file's chunk sizes fit no rule casd cuts by; no local file is"
                    " reused unless chunking= (--chunking) says how it was cut"
                )
            index = await loop.run_in_executor(pool, reuse_index, reuse, rules, wanted, algo, cache)
        part_path = os.fspath(part)

        def settle(c: ManifestChunk) -> str | None:
            """ "resumed" or "reused" when the chunk is in place, verified; else None."""
            if (
                c.offset + c.size <= have
                and read_verified(part_path, c.offset, c, algo) is not None
            ):
                return "resumed"
            src = index.get(c.digest)
            if src is not None:
                data = read_verified(src.path, src.offset, c, algo)
                if data is not None:
                    pwrite_all(fd, data, c.offset)
                    return "reused"
            return None

        if not have and not index:
            return list(chunks)
        todo: list[ManifestChunk] = []
        # A window of futures keeps every thread busy without queueing the whole file.
        pending: list[tuple[ManifestChunk, asyncio.Future]] = []

        async def drain_one() -> None:
            c, fut = pending.pop(0)
            how = await fut
            if how is None:
                todo.append(c)
                return
            if how == "resumed":
                stats["resumed_bytes"] += c.size
            stats["reused"] += 1
            stats["reused_bytes"] += c.size
            done["bytes"] += c.size
            done["chunks"] += 1
            progress()

        for c in chunks:
            pending.append((c, loop.run_in_executor(pool, settle, c)))
            if len(pending) >= window:
                await drain_one()
        while pending:
            await drain_one()
        return todo

    async def _fetch_run(
        self,
        url: str,
        run: list[ManifestChunk],
        fd: int,
        algo: Algo,
        pool: ThreadPoolExecutor,
        fetched: Callable[[ManifestChunk], None],
    ) -> None:
        """GET a run of adjacent chunks with one Range request; retried.

        Each chunk is checked and written in `pool` as soon as its last byte arrives, while
        the next one streams in (one chunk behind the network); `fetched` is called once
        it is written. A cut, or a chunk that does not match, asks again from the first
        chunk not yet written; a chunk corrupted three times is refused.
        """
        loop = asyncio.get_running_loop()
        i = 0  # run[i] is the first chunk not yet written
        attempt = 0
        corrupted: dict[int, int] = {}
        err: CasdClientError
        while i < len(run):
            first, last = run[i], run[-1]
            what = f"bytes {first.offset}-{last.offset + last.size - 1} of {url}"
            headers = self._headers(
                url,
                {
                    "Accept-Encoding": "identity",
                    "Range": f"bytes={first.offset}-{last.offset + last.size - 1}",
                },
            )
            began = i
            pending: tuple[int, asyncio.Future] | None = None  # the chunk being written

            async def settle() -> None:
                """Wait for the pending chunk: written, or _Corrupted."""
                nonlocal i, pending
                if pending is None:
                    return
                (j, fut), pending = pending, None
                if not await fut:
                    raise _Corrupted(j)
                i = j + 1
                fetched(run[j])

            try:
                try:
                    async with self._sess().get(
                        url, headers=headers, auto_decompress=False
                    ) as resp:
                        self._reached = True
                        if resp.status >= 400:
                            err = _http_error(resp, await resp.read(), what)
                            if not err.retryable:
                                raise err
                        elif resp.status != 206:
                            raise CasdClientError(
                                f"{what}: the server answered HTTP {resp.status} to a Range request"
                            )
                        else:
                            j, pieces, got = i, [], 0
                            async for data in resp.content.iter_any():
                                view = memoryview(data)
                                while view and j < len(run):
                                    # Slices of what arrived, never copies.
                                    take = view[: run[j].size - got]
                                    view = view[len(take) :]
                                    pieces.append(take)
                                    got += len(take)
                                    if got == run[j].size:
                                        await settle()
                                        pending = (
                                            j,
                                            loop.run_in_executor(
                                                pool, _verify_and_write, fd, pieces, run[j], algo
                                            ),
                                        )
                                        j, pieces, got = j + 1, [], 0
                            await settle()
                            if j < len(run):
                                raise aiohttp.ClientPayloadError(
                                    f"body ended at byte {run[j].offset + got}"
                                )
                            return
                finally:
                    # Whatever stopped the stream, the chunk already complete is kept if good.
                    if pending is not None:
                        await settle()
            except _Corrupted as exc:
                corrupted[exc.index] = corrupted.get(exc.index, 0) + 1
                c = run[exc.index]
                if corrupted[exc.index] > min(2, self.retries):
                    # Corruption is not a blip worth the full budget: two refetches, then no.
                    raise CasdIntegrityError(
                        f"chunk at offset {c.offset} of {url}: the bytes received do not match"
                        f" the chunk's digest {c.digest}; the file was not written (the chunks"
                        " verified so far are kept for the next try)"
                    ) from None
                continue
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                err = self._connection_error(exc, url)
                if isinstance(exc, aiohttp.ClientConnectorError) and not self._reached:
                    raise err from None
            if i > began:
                attempt = 0  # progress was made: the retry budget starts again
            attempt += 1
            await self._retry_wait(attempt, what, err)

    async def _fetch(
        self, url: str, sink: _Sink, on_progress: ProgressCallback | None
    ) -> tuple[int, int]:
        """Stream the file into `sink`, resuming by Range after cuts; (resumed_from, received)."""
        resumed_from = sink.pos
        received = 0
        attempt = 0
        with ThreadPoolExecutor(1, thread_name_prefix="casd-write") as writer:
            while True:
                start = sink.pos
                headers = self._headers(url, {"Accept-Encoding": "identity"})
                if start:
                    headers["Range"] = f"bytes={start}-"
                try:
                    # The stored bytes themselves, never a decoded form: Range offsets and
                    # the digest are about those.
                    async with self._sess().get(
                        url, headers=headers, auto_decompress=False
                    ) as resp:
                        self._reached = True
                        total = await self._begin_body(resp, url, sink, start, writer)
                        if total is None:
                            continue  # the partial bytes were useless; start over
                        body_start = sink.pos  # 0 again if the server answered 200 to a Range
                        try:
                            await _stream_into(sink, resp, total, writer, on_progress)
                        finally:
                            received += sink.pos - body_start
                            if sink.pos > body_start:
                                attempt = 0  # progress was made: reset the retry budget
                        if sink.pos != total:
                            raise aiohttp.ClientPayloadError(
                                f"body ended at byte {sink.pos} of {total}"
                            )
                        if on_progress is not None:
                            on_progress(Progress(Phase.DOWNLOADING, total, total))
                        return resumed_from, received
                except (
                    TimeoutError,
                    aiohttp.ClientConnectionError,
                    aiohttp.ClientPayloadError,
                ) as exc:
                    err = self._connection_error(exc, url)
                    if isinstance(exc, aiohttp.ClientConnectorError) and not self._reached:
                        raise err from None
                except CasdHTTPError as exc:
                    if not exc.retryable:
                        raise
                    err = exc
                attempt += 1
                await self._retry_wait(attempt, f"download of {url}", err)

    async def _begin_body(
        self,
        resp: aiohttp.ClientResponse,
        url: str,
        sink: _Sink,
        start: int,
        writer: ThreadPoolExecutor,
    ) -> int | None:
        """Check a download answer and align `sink` with it: the file's total size, or None."""
        loop = asyncio.get_running_loop()
        if resp.status == 416 and start:
            # Our partial file is not shorter than the stored file: it is wrong; restart.
            await loop.run_in_executor(writer, sink.truncate)
            return None
        if resp.status >= 400:
            raise _http_error(resp, await resp.read(), f"download of {url}")
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


async def _stream_into(
    sink: _Sink,
    resp: aiohttp.ClientResponse,
    total: int,
    writer: ThreadPoolExecutor,
    on_progress: ProgressCallback | None,
) -> None:
    """Write a download answer's body into `sink` until it ends or breaks off.

    Batches of IO_PIECE are written and hashed in the writer thread while the loop receives
    the next one, at most two in flight. Whatever arrived is written even when the body
    breaks off, so a retry resumes after it; `sink.pos` then says how far it got.
    """
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future] = []
    pieces: list[bytes] = []
    batch = 0
    got = sink.pos
    try:
        async for data in resp.content.iter_any():
            pieces.append(data)
            batch += len(data)
            if batch >= IO_PIECE:
                pending.append(loop.run_in_executor(writer, sink.write, pieces))
                got += batch
                pieces, batch = [], 0
                if len(pending) > 1:
                    await pending.pop(0)
                if on_progress is not None:
                    on_progress(Progress(Phase.DOWNLOADING, got, total))
    finally:
        if pieces:
            pending.append(loop.run_in_executor(writer, sink.write, pieces))
        for fut in pending:
            await fut


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
                view = view[self.f.write(view) :]
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


def _open_part(part: Path, size: int) -> int:
    """Open (or create) the temp file of a chunked download, at the file's final length."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _part_length(part: Path) -> int:
    """How many bytes an earlier try left in the temp file (0 when there is none)."""
    try:
        return part.stat().st_size
    except OSError:
        return 0


class _Corrupted(Exception):
    """The chunk at this index of a run arrived with bytes that do not match it."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


def _verify_and_write(fd: int, pieces: list[memoryview], c: ManifestChunk, algo: Algo) -> bool:
    """Write `pieces` at the chunk's place if they are the chunk's bytes; whether it did."""
    if not c.matches_pieces(pieces, algo):
        return False
    pwritev_all(fd, pieces, c.offset)
    return True


def _hash_fd(fd: int, size: int, algo: Algo) -> str:
    """The digest of the first `size` bytes of an open file, read in HASH_PIECE pieces."""
    h = algo.new()
    pos = 0
    while pos < size:
        data = os.pread(fd, min(HASH_PIECE, size - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h.hexdigest()


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


def _read_small(
    path: Path, algo: Algo, chunking: Chunking, limit: int
) -> tuple[bytes, FileDigests] | None:
    """The bytes and digests of a file of at most `limit` bytes (one chunk, or none when
    empty), read in one go; None for a larger file."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            return None
        data = f.read(size + 1)
    if len(data) > size:
        return None  # it grew meanwhile: the usual way copes
    h = algo.new()
    h.update(data)
    digest = h.hexdigest()
    chunks = (ChunkSpan(0, len(data), digest),) if data else ()
    return data, FileDigests(algo, digest, len(data), chunking.avg_size, chunks, chunking)


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


def _http_error(resp: aiohttp.ClientResponse, raw: bytes, what: str) -> CasdHTTPError:
    status = resp.status
    retry_after = _retry_after(resp.headers.get("Retry-After"))
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = str(body.get("message") or body["error"])
        return CasdHTTPError(
            f"{what}: {message} ({status} {body['error']})",
            status=status,
            code=body["error"],
            body=body,
            retry_after=retry_after,
        )
    return CasdHTTPError(
        f"{what}: HTTP {status} {resp.reason or ''}".rstrip(),
        status=status,
        retry_after=retry_after,
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


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


def _report(
    on_progress: ProgressCallback | None, phase: Phase, fd: FileDigests, *, done: bool
) -> None:
    """A progress report for a phase without a byte count: none or all of the file."""
    if on_progress is not None:
        n = len(fd.chunks)
        on_progress(Progress(phase, fd.size if done else 0, fd.size, n if done else 0, n))


# --- one-call helpers ---------------------------------------------------------------------------


async def upload(
    path: str | os.PathLike, *, server: str = DEFAULT_SERVER, token: str | None = None, **options
) -> UploadSummary:
    """Upload one file with a short-lived client; options as for CasdClient.upload."""
    async with CasdClient(server, token=token) as client:
        return await client.upload(path, **options)


async def download(
    ref: str,
    dest: str | os.PathLike | None = None,
    *,
    server: str = DEFAULT_SERVER,
    token: str | None = None,
    **options,
) -> DownloadSummary:
    """Download one file (by digest or URL) with a short-lived client; options as for
    CasdClient.download."""
    async with CasdClient(server, token=token) as client:
        return await client.download(ref, dest, **options)
