"""The client library: the one-pass hashing pipeline, the digest cache, and transfers against a
real `casd serve` (directly, and through a 127.0.0.1 proxy that injects faults)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
import tracemalloc
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from casd.client import (
    RACY_NS,
    CasdClient,
    CasdConnectionError,
    CasdHTTPError,
    CasdIntegrityError,
    DigestCache,
    FileChangedError,
    FileRef,
    Progress,
    ext_of,
    file_digests,
    hash_file,
)
from casd.digest import Algo
from helpers import settle

MiB = 1024 * 1024
CHUNK = 5 * MiB


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own digest cache folder, never the user's."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "casd"


def fast_client(url: str, **kw) -> CasdClient:
    """A client whose retries wait milliseconds, so fault tests stay quick."""
    kw.setdefault("backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return CasdClient(url, **kw)


# --- the hashing pipeline ---------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["md5", "sha256"])
@pytest.mark.parametrize(
    "size,chunk_size",
    [
        (0, 64 * 1024),
        (1, 64 * 1024),
        (64 * 1024 - 1, 64 * 1024),
        (64 * 1024, 64 * 1024),
        (64 * 1024 + 1, 64 * 1024),
        (3 * 64 * 1024 + 7, 64 * 1024),
        (10, 3),
        # 5 MiB chunks are read in 4 MiB pieces: pieces must restart at each chunk boundary.
        (2 * CHUNK + 4 * MiB + 5, CHUNK),
        (9 * MiB, 9 * MiB),
    ],
)
def test_hash_file_matches_hashlib(tmp_path, algo, size, chunk_size, rng):
    data = rng.write(tmp_path / "f", size, size)
    fd = hash_file(tmp_path / "f", chunk_size=chunk_size, algo=algo)
    assert fd.digest == hashlib.new(algo, data).hexdigest()
    assert fd.size == size
    pieces = [(off, data[off : off + chunk_size]) for off in range(0, size, chunk_size)]
    expected = [(off, len(p), hashlib.new(algo, p).hexdigest()) for off, p in pieces]
    assert [(c.offset, c.size, c.digest) for c in fd.chunks] == expected


@pytest.mark.slow
def test_hashing_memory_is_a_few_chunks_not_the_file(tmp_path, rng):
    path = tmp_path / "big"
    size = 200 * MiB
    with open(path, "wb") as f:
        f.write(rng.bytes(MiB))  # some real bytes, the rest a hole that reads as zeros
        f.truncate(size)
    expected = hashlib.md5()
    with open(path, "rb") as f:
        while piece := f.read(8 * MiB):
            expected.update(piece)
    tracemalloc.start()
    try:
        fd = hash_file(path, chunk_size=CHUNK, algo="md5")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fd.digest == expected.hexdigest()
    assert len(fd.chunks) == 40
    assert peak < 3 * CHUNK, f"hashing a 200 MiB file peaked at {peak / MiB:.1f} MiB"


def test_hashing_stops_when_asked(tmp_path):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(400 * MiB)
    stop = threading.Event()
    seen: list[int] = []

    def on_bytes(done: int) -> None:
        seen.append(done)
        stop.set()  # as a cancelled upload does after Ctrl-C

    with pytest.raises(asyncio.CancelledError):
        file_digests(
            path, chunk_size=CHUNK, algo=Algo.MD5, cache=None, on_bytes=on_bytes, stop=stop
        )
    assert seen == [4 * MiB], "hashing went on after it was told to stop"


# --- the digest cache ---------------------------------------------------------------------------


def test_cache_answers_for_an_unchanged_file_and_not_for_a_changed_one(tmp_path, cache_home, rng):
    path = tmp_path / "f"
    rng.write(path, 3 * MiB + 1, 1)
    settle(path)
    cache = DigestCache(cache_home)
    first, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert not cached
    again, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert cached and again == first

    # Another chunk size or algorithm is another entry.
    _, cached = file_digests(path, chunk_size=2 * MiB, algo=Algo.MD5, cache=cache)
    assert not cached
    _, cached = file_digests(path, chunk_size=MiB, algo=Algo.SHA256, cache=cache)
    assert not cached

    # Same size, new bytes: the stat changes, so the cache must not answer.
    data = rng.write(path, 3 * MiB + 1, 2)
    settle(path)
    changed, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert not cached
    assert changed.digest == hashlib.md5(data).hexdigest()


def test_cache_skips_a_file_written_a_moment_ago(tmp_path, cache_home, rng):
    # Its mtime could stay the same through another write in the same clock tick. Whether
    # hashing starts within RACY_NS of the write is the scheduler's to say: on a loaded
    # machine it may start later, and then caching is right. So an attempt counts only when
    # hashing had ended, hence started, within RACY_NS of the file's newest timestamp.
    cache = DigestCache(cache_home)
    for attempt in range(100):
        path = tmp_path / f"f{attempt}"
        rng.write(path, 1000)
        file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
        hashed_by = time.time_ns()
        st = path.stat()
        if hashed_by - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            break
    else:
        pytest.fail(f"no file was hashed within {RACY_NS} ns of being written in 100 tries")
    _, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert not cached


def test_corrupt_cache_is_ignored_then_replaced(tmp_path, cache_home, rng):
    path = tmp_path / "f"
    data = rng.write(path, 2 * MiB + 3)
    settle(path)
    cache_home.mkdir(parents=True)
    (cache_home / "digests.sqlite").write_bytes(b"this is not a database" * 100)
    cache = DigestCache(cache_home)
    fd, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert not cached and fd.digest == hashlib.md5(data).hexdigest()
    _, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert cached


def test_cache_entry_with_wrong_shape_is_a_miss(tmp_path, cache_home, rng):
    path = tmp_path / "f"
    data = rng.write(path, 2 * MiB + 3)
    settle(path)
    cache = DigestCache(cache_home)
    file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    with sqlite3.connect(cache_home / "digests.sqlite") as conn:
        conn.execute("UPDATE chunk_digests SET chunk_digests = x'00'")
    fd, cached = file_digests(path, chunk_size=MiB, algo=Algo.MD5, cache=cache)
    assert not cached and fd.digest == hashlib.md5(data).hexdigest()


# --- names and references -----------------------------------------------------------------------


def test_file_ref_parsing():
    md5 = "9e107d9d372bb6826bd81d3542a419d6"
    sha = "ab" * 32
    assert FileRef.parse(md5) == FileRef(FileRef.parse(md5).digest, "", None)
    assert FileRef.parse(md5.upper()).digest.hex == md5
    assert FileRef.parse(sha).digest.algo is Algo.SHA256
    ref = FileRef.parse(f"http://127.0.0.1:9/v1/files/{md5}.ISO")
    assert (ref.server, ref.ext, ref.path) == ("http://127.0.0.1:9", ".iso", f"/v1/files/{md5}.iso")
    assert FileRef.parse(f"/v1/files/{md5}.mp4").path == f"/v1/files/{md5}.mp4"
    prefixed = FileRef.parse(f"https://h.example/casd/v1/files/{md5}")
    assert prefixed.server == "https://h.example/casd"
    for bad in ["", "abc", md5[:-1], "g" * 32, f"ftp://h/v1/files/{md5}", "http://h/other/x"]:
        with pytest.raises(ValueError):
            FileRef.parse(bad)


def test_ext_of_keeps_only_what_the_server_accepts():
    assert ext_of("holiday.MP4") == ".mp4"
    assert ext_of("archive.tar.gz") == ".gz"
    assert ext_of("README") == ""
    assert ext_of("weird.ext with space") == ""
    assert ext_of("long." + "x" * 17) == ""


# --- against a real daemon ------------------------------------------------------------------------


async def roundtrip(client: CasdClient, src: Path, dest: Path, **upload_kw):
    summary = await client.upload(src, **upload_kw)
    got = await client.download(summary.url, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert got.digest == summary.digest
    return summary


@pytest.mark.parametrize("algo", ["md5", "sha256"])
async def test_round_trip_byte_exact_for_edge_sizes(daemon, tmp_path, algo, rng):
    stored: set[bytes] = set()  # chunks an earlier size sent (a 1-byte chunk may recur)
    async with CasdClient(daemon.url) as client:
        for size in (0, 1, CHUNK, CHUNK + 1):
            src = tmp_path / f"f{size}.bin"
            data = rng.write(src, size, size)
            s = await roundtrip(client, src, tmp_path / f"out{size}", algo=algo)
            assert s.digest == hashlib.new(algo, data).hexdigest()
            assert s.algo == algo and s.size == size
            assert s.chunks_total == -(-size // CHUNK)
            assert s.url == f"{daemon.url}/v1/files/{s.digest}.bin"
            new = [
                c for c in (data[i : i + CHUNK] for i in range(0, size, CHUNK)) if c not in stored
            ]
            assert (s.chunks_sent, s.bytes_sent) == (len(new), sum(map(len, new)))
            stored.update(new)
            assert not s.instant


@pytest.mark.slow
async def test_50mib_round_trip_then_instant_reupload(v1_daemon, tmp_path, rng):
    # v1: "instant" is the handshake's answer, which a streamed (v1.1) upload never asks.
    daemon = v1_daemon
    src = tmp_path / "big.iso"
    rng.write(src, 50 * MiB, 50)
    progress: list[Progress] = []
    async with CasdClient(daemon.url) as client:
        first = await roundtrip(client, src, tmp_path / "out.iso", on_progress=progress.append)
        assert (first.chunks_sent, first.bytes_sent, first.instant) == (10, 50 * MiB, False)
        assert [p.bytes_done for p in progress if p.phase == "hashing"][-1] == 50 * MiB
        assert [p.chunks_done for p in progress if p.phase == "uploading"] == list(range(11))

        # Hashed again (no cache): the server knows the file, so nothing is sent.
        second = await client.upload(src, use_cache=False)
        assert second.instant and not second.cached
        assert (second.chunks_sent, second.bytes_sent) == (0, 0)
        assert (second.chunks_skipped, second.bytes_skipped) == (10, 50 * MiB)
        assert (second.digest, second.url) == (first.digest, first.url)


def phases(reports: list[Progress]) -> list[str]:
    """The phases in the order they began (each once per run of reports)."""
    out: list[str] = []
    for p in reports:
        if not out or out[-1] != p.phase:
            out.append(p.phase)
    return out


@pytest.fixture
def v1_daemon(daemon_factory):
    """A daemon that offers only protocol v1 (the handshake flow), as before v1.1."""
    return daemon_factory("--no-stream-uploads")


async def test_progress_phases_are_those_of_casd_js(v1_daemon, tmp_path, rng):
    daemon = v1_daemon
    parts = [rng.bytes(MiB, i) for i in range(3)]
    src, shuffled = tmp_path / "f.bin", tmp_path / "g.bin"
    src.write_bytes(b"".join(parts))
    shuffled.write_bytes(b"".join(reversed(parts)))  # a new file made of known chunks
    first: list[Progress] = []
    again: list[Progress] = []
    known: list[Progress] = []
    fetched: list[Progress] = []
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunk_size=MiB, on_progress=first.append, use_cache=False)
        await client.upload(src, chunk_size=MiB, on_progress=again.append, use_cache=False)
        k = await client.upload(shuffled, chunk_size=MiB, on_progress=known.append)
        await client.download(s.url, tmp_path / "out", on_progress=fetched.append)
    # The same names and order as casd.js's onProgress (tests/test_browser.py checks those).
    assert phases(first) == ["hashing", "handshake", "uploading", "merging", "done"]
    assert phases(again) == ["hashing", "handshake", "done"]
    # Nothing to send, but the file is new: the upload phase still begins, as in casd.js.
    assert (k.chunks_sent, k.instant) == (0, False)
    assert phases(known) == ["hashing", "handshake", "uploading", "merging", "done"]
    assert phases(fetched) == ["downloading", "done"]
    assert first[-1] == Progress("done", 3 * MiB, 3 * MiB, 3, 3)
    assert all(p.bytes_done <= p.bytes_total for p in first + again + known + fetched)


async def test_reupload_of_an_unchanged_file_uses_the_digest_cache(daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 12 * MiB)
    settle(src)
    async with CasdClient(daemon.url) as client:
        first = await client.upload(src)
        hashed: list[Progress] = []
        second = await client.upload(src, on_progress=hashed.append)
    assert not first.cached and second.cached and second.instant
    assert second.digest == first.digest
    # A cache hit reports the whole file at once: no piece-by-piece hashing happened.
    assert [p.bytes_done for p in hashed if p.phase == "hashing"] == [12 * MiB]


async def test_stale_cache_entry_is_caught_by_the_server_and_the_file_rehashed(
    daemon, tmp_path, cache_home, rng
):
    src = tmp_path / "f.bin"
    data = rng.write(src, 2 * MiB + 1, 1)
    settle(src)
    file_digests(src, chunk_size=MiB, algo=Algo.MD5, cache=DigestCache(cache_home))
    # Make the entry lie, as if the file had been rewritten without its stat changing.
    other = rng.bytes(len(data), 2)
    lie = b"".join(hashlib.md5(other[i : i + MiB]).digest() for i in range(0, len(other), MiB))
    with sqlite3.connect(cache_home / "digests.sqlite") as conn:
        conn.execute(
            "UPDATE chunk_digests SET file_digest = ?, chunk_digests = ?",
            (hashlib.md5(other).hexdigest(), lie),
        )
    async with CasdClient(daemon.url) as client:
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB)
    assert s.digest == hashlib.md5(data).hexdigest() and not s.cached
    # The fresh digests replaced the lie.
    again, cached = file_digests(src, chunk_size=MiB, algo=Algo.MD5, cache=DigestCache(cache_home))
    assert cached and again.digest == s.digest


async def test_one_changed_region_sends_exactly_one_chunk(daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = bytearray(rng.write(src, 4 * CHUNK, 7))
    async with CasdClient(daemon.url) as client:
        await client.upload(src)
        data[CHUNK : 2 * CHUNK] = rng.bytes(CHUNK, 8)
        src.write_bytes(data)
        s = await roundtrip(client, src, tmp_path / "out")
    assert (s.chunks_sent, s.bytes_sent) == (1, CHUNK)
    assert (s.chunks_skipped, s.bytes_skipped) == (3, 3 * CHUNK)
    assert s.digest == hashlib.md5(data).hexdigest() and not s.instant


async def test_repeated_chunks_are_sent_once(daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    block = rng.bytes(MiB, 3)
    src.write_bytes(block * 5 + b"tail")
    async with CasdClient(daemon.url) as client:
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB)
    assert (s.chunks_total, s.chunks_sent, s.bytes_sent) == (6, 2, MiB + 4)


async def test_daemon_killed_mid_upload_then_rerun_sends_only_the_rest(daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 12 * MiB, 12)
    total, killed_after, concurrency = 12, 4, 2
    acked: list[int] = []
    killed: list[bool] = []

    def kill_after_some(p: Progress) -> None:
        # Any phase: with v1.1 chunks are acknowledged while the file is still being read.
        if p.phase in ("hashing", "uploading"):
            acked.append(p.chunks_done)
            if p.chunks_done == killed_after and not killed:
                killed.append(True)
                daemon.kill()

    async with fast_client(daemon.url, retries=2) as client:
        with pytest.raises(CasdConnectionError):
            await client.upload(
                src, chunk_size=MiB, concurrency=concurrency, on_progress=kill_after_some
            )
    # A response already read when the daemon died is still acknowledged afterwards.
    assert killed_after <= max(acked) <= killed_after + concurrency - 1

    daemon.start()
    async with CasdClient(daemon.url) as client:
        rerun = await roundtrip(
            client, src, tmp_path / "out", chunk_size=MiB, concurrency=concurrency
        )
    # Every acknowledged chunk survived; requests in flight at the kill may or may not have.
    assert rerun.chunks_sent <= total - max(acked)
    assert rerun.chunks_sent >= total - killed_after - (concurrency - 1)
    assert rerun.chunks_sent + rerun.chunks_skipped == total


async def test_upload_rides_through_a_daemon_restart(daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 8 * MiB, 8)

    restarted: list[bool] = []

    def restart_midway(p: Progress) -> None:
        # Any phase, once: with v1.1 chunks are acknowledged while the file is still read.
        if p.chunks_done == 3 and not restarted:
            restarted.append(True)
            daemon.restart()  # kill -9, then up again on the same port before any retry

    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunk_size=MiB, concurrency=2, on_progress=restart_midway)
        await client.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert (s.chunks_sent, s.bytes_sent, s.instant) == (8, 8 * MiB, False)
    assert restarted


async def test_file_changed_after_hashing_is_a_clear_error_and_rerun_works(
    v1_daemon, tmp_path, rng
):
    # v1: the whole file is hashed before any chunk goes (v1.1 sends each chunk as it is read).
    daemon = v1_daemon
    src = tmp_path / "f.bin"
    size = 3 * MiB
    rng.write(src, size, 1)

    def scribble_when_hashed(p: Progress) -> None:
        if p.phase == "hashing" and p.bytes_done == size:
            with open(src, "r+b") as f:
                f.seek(2 * MiB)  # the last chunk, so the first two go through
                f.write(b"changed!")

    async with CasdClient(daemon.url) as client:
        with pytest.raises(FileChangedError) as info:
            await client.upload(
                src, chunk_size=MiB, concurrency=1, on_progress=scribble_when_hashed
            )
        assert info.value.code == "digest_mismatch"
        assert "changed after it was hashed" in str(info.value)
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB)
    assert s.chunks_sent == 1  # chunks are sent in file order, one at a time here


# --- through a fault-injecting proxy ------------------------------------------------------------


def is_file_put(path: str) -> bool:
    return path.startswith("/v1/files/")


class FaultProxy:
    """Forwards to a daemon, answering scripted faults first and recording every request.

    A fault is a status, or (status, headers) for an answer that carries e.g. Retry-After.
    With `no_manifest`, GET .../chunks answers 404, as a server older than manifests does,
    so downloads take the single-GET path.
    """

    HOP = ("Content-Length", "Content-Type", "Content-Range", "ETag", "Accept-Ranges")

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.seen: list[tuple[str, str, str | None]] = []
        self.times: list[float] = []  # time.monotonic() of each request in `seen`
        self.authorizations: list[str | None] = []
        self.chunk_faults: list[int | tuple[int, dict[str, str]]] = []  # next chunk PUTs
        self.handshake_faults: list[int | tuple[int, dict[str, str]]] = []
        self.cut_next_get_after: int | None = None  # bytes, once, of a file GET
        self.no_manifest = False
        self.session: aiohttp.ClientSession | None = None
        self.url = ""  # set once the proxy listens

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def session_ctx(_app):
            self.session = aiohttp.ClientSession(auto_decompress=False)
            yield
            await self.session.close()

        app.cleanup_ctx.append(session_ctx)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Range")))
        self.times.append(time.monotonic())
        self.authorizations.append(request.headers.get("Authorization"))
        body = await request.read()
        faults = None
        if request.method == "PUT" and ("/chunks/" in request.path or is_file_put(request.path)):
            faults = self.chunk_faults  # a one-request upload's PUT carries its one chunk
        elif request.path == "/v1/handshake":
            faults = self.handshake_faults
        manifest = request.method in ("GET", "HEAD") and request.path.endswith("/chunks")
        if manifest and self.no_manifest:
            return web.json_response({"error": "not_found", "message": "no such route"}, status=404)
        if faults:
            fault = faults.pop(0)
            status, headers = fault if isinstance(fault, tuple) else (fault, {})
            return web.json_response(
                {"error": "injected", "message": f"injected {status}"},
                status=status,
                headers=headers,
            )
        headers = {
            k: v
            for k in ("Authorization", "Range", "Content-Type")
            if (v := request.headers.get(k)) is not None
        }
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as up:
            resp = web.StreamResponse(
                status=up.status,
                headers={k: v for k in self.HOP if (v := up.headers.get(k)) is not None},
            )
            cut = None
            if request.method == "GET" and not manifest:
                cut, self.cut_next_get_after = self.cut_next_get_after, None
            await resp.prepare(request)
            sent = 0
            async for data in up.content.iter_chunked(64 * 1024):
                if cut is not None and sent + len(data) >= cut:
                    await resp.write(data[: cut - sent])
                    request.transport.close()  # flushes what was written, then hangs up
                    return resp
                await resp.write(data)
                sent += len(data)
            await resp.write_eof()
            return resp

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and fragment in p)


async def fronting(upstream: str, aiohttp_server) -> FaultProxy:
    """A FaultProxy serving in front of `upstream`, its own url set."""
    fp = FaultProxy(upstream)
    server = await aiohttp_server(fp.app())
    fp.url = str(server.make_url("")).rstrip("/")
    return fp


@pytest.fixture
async def proxy(daemon, aiohttp_server):
    return await fronting(daemon.url, aiohttp_server)


@pytest.fixture
async def v1_proxy(v1_daemon, aiohttp_server):
    """The proxy in front of a v1-only daemon: faults scripted for the handshake flow."""
    return await fronting(v1_daemon.url, aiohttp_server)


async def test_5xx_and_507_answers_are_retried_through(v1_proxy, tmp_path, rng):
    proxy = v1_proxy
    src = tmp_path / "f.bin"
    rng.write(src, 4 * MiB + 5)
    proxy.handshake_faults = [503]
    proxy.chunk_faults = [503, 507, 500, 503]
    async with fast_client(proxy.url) as client:
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB)
    assert (s.chunks_sent, s.bytes_sent) == (5, 4 * MiB + 5)
    assert proxy.chunk_faults == [] and proxy.handshake_faults == []
    assert proxy.count("PUT", "/chunks/") == 5 + 4
    assert proxy.count("POST", "/v1/handshake") == 2


async def test_5xx_answers_to_a_streamed_upload_are_retried_through(proxy, tmp_path, rng):
    # The default daemon offers v1.1: no handshake, the same chunk PUTs and their retries.
    src = tmp_path / "f.bin"
    rng.write(src, 4 * MiB + 5)
    proxy.chunk_faults = [503, 507, 500, 503]
    async with fast_client(proxy.url) as client:
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB)
    assert (s.chunks_sent, s.bytes_sent) == (5, 4 * MiB + 5)
    assert proxy.chunk_faults == []
    assert proxy.count("PUT", "/chunks/") == 5 + 4
    assert proxy.count("POST", "/v1/handshake") == 0
    assert proxy.count("POST", "/v1/uploads") >= 1


async def test_408_and_429_answers_are_retried_through(v1_proxy, tmp_path, rng):
    proxy = v1_proxy
    src = tmp_path / "f.bin"
    rng.write(src, 2 * MiB + 5)
    proxy.handshake_faults = [429]
    proxy.chunk_faults = [408, 429]
    async with fast_client(proxy.url) as client:
        s = await roundtrip(client, src, tmp_path / "out", chunk_size=MiB, concurrency=1)
    assert (s.chunks_sent, s.bytes_sent) == (3, 2 * MiB + 5)
    assert proxy.chunk_faults == [] and proxy.handshake_faults == []
    assert proxy.count("PUT", "/chunks/") == 3 + 2
    assert proxy.count("POST", "/v1/handshake") == 2


async def test_retry_after_is_honoured_up_to_max_backoff(proxy, tmp_path, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 100)
    proxy.chunk_faults = [(429, {"Retry-After": "1"})]
    # Jitter alone would retry within milliseconds; the server asked for a second.
    async with fast_client(proxy.url, backoff=0.001, max_backoff=5) as client:
        await client.upload(src)
    puts = [
        t
        for (m, p, _), t in zip(proxy.seen, proxy.times, strict=True)
        if m == "PUT" and is_file_put(p)  # a file of one chunk goes in one request
    ]
    assert len(puts) == 2 and puts[1] - puts[0] >= 0.9

    other = tmp_path / "g.bin"
    rng.write(other, 100, "other")
    proxy.chunk_faults = [(503, {"Retry-After": "3600"})]
    # An hour is more than max_backoff allows: the retry comes after 0.05 s at most.
    async with fast_client(proxy.url, max_backoff=0.05) as client:
        await asyncio.wait_for(client.upload(other), 30)
    assert proxy.chunk_faults == []


@pytest.mark.parametrize("chunk_size", [None, 64], ids=["one request", "chunks"])
async def test_retries_are_bounded(proxy, tmp_path, rng, chunk_size):
    src = tmp_path / "f.bin"
    rng.write(src, 100)
    proxy.chunk_faults = [503] * 10
    async with fast_client(proxy.url, retries=3) as client:
        with pytest.raises(CasdHTTPError) as info:
            await client.upload(src, chunk_size=chunk_size, concurrency=1)
    assert info.value.status == 503 and info.value.retryable
    where = "/v1/files/" if chunk_size is None else "/chunks/"
    assert proxy.count("PUT", where) == 4


async def test_4xx_is_not_retried(v1_proxy, tmp_path, rng):
    proxy = v1_proxy
    src = tmp_path / "f.bin"
    rng.write(src, 100)
    proxy.handshake_faults = [400]
    async with fast_client(proxy.url) as client:
        with pytest.raises(CasdHTTPError) as info:
            await client.upload(src, chunk_size=64)  # two chunks: a handshake
    assert (info.value.status, info.value.code) == (400, "injected")
    assert not info.value.retryable
    assert proxy.count("POST", "/v1/handshake") == 1


async def test_token_is_sent_and_a_refusal_is_clear(daemon_factory, tmp_path, rng):
    d = daemon_factory("--token", "s3cret")
    src = tmp_path / "f.bin"
    rng.write(src, 1000)
    async with fast_client(d.url) as client:
        with pytest.raises(CasdHTTPError) as info:
            await client.upload(src)
    assert (info.value.status, info.value.code) == (401, "unauthorized")
    async with fast_client(d.url, token="s3cret") as client:
        await roundtrip(client, src, tmp_path / "out")


async def test_token_goes_only_to_the_configured_server(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 1000)
    async with CasdClient(proxy.url, token="s3cret") as client:
        s = await client.upload(src)
    assert set(proxy.authorizations) == {"Bearer s3cret"}
    proxy.authorizations.clear()
    # The same file through a URL naming another host (the proxy) than the client's server.
    async with CasdClient(daemon.url, token="s3cret") as client:
        await client.download(s.url, tmp_path / "out")
    assert proxy.authorizations and set(proxy.authorizations) == {None}
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


async def test_unreachable_server_fails_at_once(tmp_path, unused_tcp_port, rng):
    src = tmp_path / "f.bin"
    rng.write(src, 10)
    async with CasdClient(f"http://127.0.0.1:{unused_tcp_port}", backoff=10) as client:
        # backoff=10 would make any retry take seconds; the test's timeout catches that.
        with pytest.raises(CasdConnectionError, match="cannot reach"):
            await asyncio.wait_for(client.upload(src), 5)


async def test_download_resumes_after_a_cut_connection(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 6 * MiB + 11, 6)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, algo="sha256")
    proxy.no_manifest = True
    proxy.cut_next_get_after = 2 * MiB + 3
    dest = tmp_path / "out.bin"
    async with fast_client(proxy.url) as client:
        got = await client.download(s.digest, dest)
    assert dest.read_bytes() == data
    ranges = [r for m, p, r in proxy.seen if m == "GET" and not p.endswith("/chunks")]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 2 * MiB + 3
    # Nothing already received was fetched again.
    assert got.bytes_received == len(data)
    assert list(tmp_path.glob(".*casd-part")) == []


async def test_interrupted_download_leaves_a_part_file_the_next_run_resumes(
    proxy, daemon, tmp_path, rng
):
    src = tmp_path / "f.bin"
    data = rng.write(src, 5 * MiB, 5)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src)
    proxy.no_manifest = True
    proxy.cut_next_get_after = 3 * MiB
    dest = tmp_path / "out.bin"
    async with fast_client(proxy.url, retries=0) as client:
        with pytest.raises(CasdConnectionError, match="connection lost"):
            await client.download(s.url.replace(daemon.url, proxy.url), dest)
    assert not dest.exists()
    (part,) = tmp_path.glob(".*casd-part")
    assert 0 < part.stat().st_size <= 3 * MiB

    partial = part.stat().st_size
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, dest)
    assert dest.read_bytes() == data
    assert got.resumed_from == partial
    assert got.bytes_received == len(data) - got.resumed_from
    assert not part.exists()


async def test_corrupt_partial_download_is_caught_and_not_published(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 3 * MiB, 3)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src)
    proxy.no_manifest = True
    proxy.cut_next_get_after = MiB
    dest = tmp_path / "out.bin"
    async with fast_client(proxy.url, retries=0) as client:
        with pytest.raises(CasdConnectionError):
            await client.download(s.digest, dest)
    (part,) = tmp_path.glob(".*casd-part")
    with open(part, "r+b") as f:
        f.write(b"\xff" * 10)  # a bit flip on disk between the two runs

    async with CasdClient(proxy.url) as client:
        with pytest.raises(CasdIntegrityError):
            await client.download(s.digest, dest)
        assert not dest.exists() and not part.exists()
        await client.download(s.digest, dest)
    assert dest.read_bytes() == data


async def test_download_of_an_unknown_file_is_a_clear_404_and_leaves_nothing(daemon, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    async with CasdClient(daemon.url) as client:
        with pytest.raises(CasdHTTPError) as info:
            await client.download("0" * 32, folder)
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert list(folder.iterdir()) == []
