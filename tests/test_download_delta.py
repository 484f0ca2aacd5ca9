"""Chunked downloads against a real `casd serve`: Range requests for the manifest's chunks,
each verified; chunks reused from local files; corruption on the way caught; resumption;
the single GET kept for servers without manifests."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
import threading
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from casd.chunking import Chunking, chunk_spans
from casd.client import (
    CasdClient,
    CasdClientError,
    CasdConnectionError,
    CasdIntegrityError,
    DigestCache,
    Phase,
    delta,
    file_digests,
)
from casd.digest import Algo
from helpers import RandomData, insertion_case, settle

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "casd"


class Proxy:
    """Forwards to a daemon on 127.0.0.1 and records each request; can corrupt Range answers
    (flip one byte of the next `flip` of them), cut one answer, or play a server without
    manifests."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.seen: list[tuple[str, str, str | None]] = []
        self.flip = 0
        self.cut_range_after: int | None = None  # Range answers served before one is cut
        self.no_manifest = False
        # Paths served from another path upstream, and an edit of every manifest answer:
        # a server that answers with the wrong file's chunks, or an older one.
        self.paths: dict[str, str] = {}
        self.edit_manifest: Callable[[dict], dict] | None = None
        self.in_flight = 0
        self.most_in_flight = 0
        self.session: aiohttp.ClientSession | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def session_ctx(_app):
            self.session = aiohttp.ClientSession(auto_decompress=False)
            yield
            await self.session.close()

        app.cleanup_ctx.append(session_ctx)
        return app

    def ranges(self) -> list[str]:
        return [r for m, _, r in self.seen if m == "GET" and r is not None]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.seen.append((request.method, request.path, rng))
        if self.no_manifest and request.path.endswith("/chunks"):
            return web.json_response({"error": "not_found", "message": "no route"}, status=404)
        headers = {
            k: v
            for k in ("Authorization", "Range", "Content-Type")
            if (v := request.headers.get(k)) is not None
        }
        body = await request.read()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            path = self.paths.get(request.path, request.path)
            async with self.session.request(
                request.method, self.upstream + path, headers=headers, data=body or None
            ) as up:
                data = bytearray(await up.read())
                if self.edit_manifest is not None and path.endswith("/chunks") and up.ok:
                    data = bytearray(json.dumps(self.edit_manifest(json.loads(data))).encode())
                # Hold the answer a moment so concurrent requests overlap visibly.
                await asyncio.sleep(0.01 if rng else 0)
                out = {
                    k: v
                    for k in ("Content-Type", "Content-Range", "ETag")
                    if (v := up.headers.get(k)) is not None
                }
                if rng and up.status == 206:
                    if self.flip:
                        self.flip -= 1
                        data[len(data) // 2] ^= 0x01
                    if self.cut_range_after is not None:
                        if self.cut_range_after == 0:
                            self.cut_range_after = None
                            resp = web.StreamResponse(
                                status=206, headers={**out, "Content-Length": str(len(data))}
                            )
                            await resp.prepare(request)
                            await resp.write(bytes(data[: len(data) // 2]))
                            request.transport.close()
                            return resp
                        self.cut_range_after -= 1
                return web.Response(status=up.status, body=bytes(data), headers=out)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def proxy(daemon, aiohttp_server):
    p = Proxy(daemon.url)
    server = await aiohttp_server(p.app())
    p.url = str(server.make_url("")).rstrip("/")
    return p


def range_length(header: str) -> int:
    first, last = header.removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1


def fast(url: str, **kw) -> CasdClient:
    return CasdClient(url, backoff=0.01, max_backoff=0.05, **kw)


def edit(data: bytes, rng, insert: bool) -> bytes:
    """An overwrite of 64 KiB in the middle, and an insertion near the front if asked."""
    mid = len(data) // 2
    data = data[:mid] + rng.bytes(64 * KiB, "over") + data[mid + 64 * KiB :]
    return data[:1000] + rng.bytes(KiB, "ins") + data[1000:] if insert else data


async def test_plain_download_fetches_runs_of_chunks_by_range_in_parallel(
    proxy, daemon, tmp_path, rng
):
    """Adjacent chunks come in one Range request each run, a run being at most a
    `concurrency`-th of the file, so every stream has work."""
    src = tmp_path / "f.bin"
    data = rng.write(src, 6 * MiB + 5)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    seen = []
    async with CasdClient(proxy.url) as client:
        got = await client.download(
            s.digest, tmp_path / "out.bin", concurrency=3, on_progress=seen.append
        )
    assert (tmp_path / "out.bin").read_bytes() == data
    assert got.chunked and (got.chunks_total, got.chunks_fetched, got.chunks_reused) == (7, 7, 0)
    assert got.bytes_fetched == got.bytes_received == len(data)
    assert sorted(proxy.ranges()) == sorted(
        f"bytes={o}-{min(o + 2 * MiB, len(data)) - 1}" for o in range(0, len(data), 2 * MiB)
    )
    assert 2 <= proxy.most_in_flight <= 3
    assert seen[-1].phase == Phase.DONE and seen[-2].bytes_done == len(data)
    assert list(tmp_path.glob(".*casd-part")) == []


@pytest.mark.parametrize(
    "rule",
    [Chunking.fastcdc(64 * KiB), Chunking.fixed(256 * KiB)],
    ids=["fastcdc-insert-and-overwrite", "fixed-overwrite"],
)
async def test_reuse_of_an_older_version_fetches_only_changed_chunks(
    proxy, daemon, tmp_path, rng, rule
):
    # One fixed draw: how many FastCDC chunks an edit disturbs depends on the bytes, and a
    # few percent of random draws disturb more than the bound below (see insertion_case).
    fixed = RandomData(0, "an older version")
    old = tmp_path / "old.bin"
    old_data = fixed.write(old, 4 * MiB, 1)
    new = tmp_path / "new.bin"
    new_data = edit(old_data, fixed, insert=rule.kind == "fastcdc")
    new.write_bytes(new_data)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(new, chunking=rule)
    out = tmp_path / "out.bin"
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, out, reuse=[old])
    assert out.read_bytes() == new_data
    assert got.chunks_fetched + got.chunks_reused == got.chunks_total == s.chunks_total
    assert got.bytes_fetched + got.bytes_reused == len(new_data)
    # Only the chunks not reused were asked for, each once.
    assert len(proxy.ranges()) <= got.chunks_fetched
    assert sum(range_length(r) for r in proxy.ranges()) == got.bytes_fetched
    if rule.kind == "fastcdc":
        # An insertion and an overwrite: a few chunks around each, never the whole file.
        assert 2 <= got.chunks_fetched <= 6 and got.bytes_fetched <= 6 * rule.max_size
    else:
        # The overwrite lies inside one chunk (an insertion would shift every fixed chunk).
        assert (got.chunks_fetched, got.bytes_fetched) == (1, 256 * KiB)


async def test_chunk_corrupted_on_the_way_is_fetched_again(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 3 * MiB)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    proxy.flip = 1
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert proxy.flip == 0 and len(proxy.ranges()) == 4 and got.chunks_fetched == 3


async def test_chunk_always_corrupted_is_refused_and_nothing_published(
    proxy, daemon, tmp_path, rng
):
    src = tmp_path / "f.bin"
    rng.write(src, 2 * MiB)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    proxy.flip = 1000
    dest = tmp_path / "out.bin"
    async with fast(proxy.url) as client:
        with pytest.raises(CasdIntegrityError, match="do not match the chunk's digest"):
            await client.download(s.digest, dest, concurrency=1)
    assert not dest.exists()
    assert len(proxy.ranges()) == 3  # the first try and two more, then a refusal


async def test_reuse_chunks_are_verified_even_when_the_digest_cache_vouches_for_them(
    proxy, daemon, tmp_path, rng, cache_home
):
    old = tmp_path / "old.bin"
    old_data = rng.write(old, 2 * MiB, 1)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(old, chunking="fixed", chunk_size=512 * KiB)
    # The local file now holds other bytes, but its digest cache entry claims the stored
    # chunks (a cache that went stale within one timestamp tick looks just like this).
    old.write_bytes(bytes(len(old_data)))
    settle(old)
    rule = Chunking.fixed(512 * KiB)
    file_digests(old, chunking=rule, algo=Algo.MD5, cache=DigestCache(cache_home))
    lie = b"".join(
        hashlib.md5(old_data[i : i + 512 * KiB]).digest()
        for i in range(0, len(old_data), 512 * KiB)
    )
    with sqlite3.connect(cache_home / "digests.sqlite") as conn:
        assert conn.execute("UPDATE chunk_digests SET chunk_digests = ?", (lie,)).rowcount == 1
    out = tmp_path / "out.bin"
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, out, reuse=[old])
    assert out.read_bytes() == old_data
    assert (got.chunks_reused, got.chunks_fetched) == (0, 4)


async def test_interrupted_chunked_download_resumes_with_what_it_had(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 4 * MiB)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    # One stream asks for the four chunks at once; its answer breaks off after two.
    proxy.cut_range_after = 0
    dest = tmp_path / "out.bin"
    async with fast(proxy.url, retries=0) as client:
        with pytest.raises(CasdConnectionError):
            await client.download(s.digest, dest, concurrency=1)
    assert not dest.exists()
    assert proxy.ranges() == [f"bytes=0-{4 * MiB - 1}"]
    (part,) = tmp_path.glob(".*casd-part")
    proxy.seen.clear()
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, dest, concurrency=1)
    assert dest.read_bytes() == data
    assert got.chunks_reused == 2 and got.resumed_from == 2 * MiB
    assert got.chunks_fetched == 2 and proxy.ranges() == [f"bytes={2 * MiB}-{4 * MiB - 1}"]
    assert not part.exists()


async def test_a_run_cut_short_resumes_from_its_first_chunk_not_written(
    proxy, daemon, tmp_path, rng
):
    """Within one download: the chunks of a run that arrived whole are kept, and the run is
    asked for again from the first chunk that did not."""
    src = tmp_path / "f.bin"
    data = rng.write(src, 4 * MiB)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    proxy.cut_range_after = 0
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin", concurrency=1)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert proxy.ranges() == [f"bytes=0-{4 * MiB - 1}", f"bytes={2 * MiB}-{4 * MiB - 1}"]
    assert (got.chunks_fetched, got.bytes_fetched) == (4, 4 * MiB)


async def test_server_without_manifests_gets_one_verified_get(proxy, daemon, tmp_path, rng):
    src = tmp_path / "f.bin"
    data = rng.write(src, 2 * MiB + 1)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src)
    proxy.no_manifest = True
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin", reuse=[src])
    assert (tmp_path / "out.bin").read_bytes() == data
    assert not got.chunked and got.bytes_received == len(data)
    assert [(m, r) for m, p, r in proxy.seen if not p.endswith("/chunks")] == [("GET", None)]


async def test_chunking_given_for_reuse_is_the_rule_used(proxy, daemon, tmp_path, rng):
    old = tmp_path / "old.bin"
    old_data, new_data = insertion_case(2 * MiB, KiB)
    old.write_bytes(old_data)
    new = tmp_path / "new.bin"
    new.write_bytes(new_data)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(new, chunking="fastcdc", chunk_size=32 * KiB)
    async with CasdClient(proxy.url) as client:
        wrong = await client.download(
            s.digest, tmp_path / "a.bin", reuse=[old], chunking=Chunking.fixed(32 * KiB)
        )
        right = await client.download(
            s.digest, tmp_path / "b.bin", reuse=[old], chunking=Chunking.fastcdc(32 * KiB)
        )
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == new_data
    assert wrong.chunks_fetched > right.chunks_fetched
    assert right.chunks_fetched <= 3 and right.chunks_reused > 20


async def test_reuse_paths_that_are_no_regular_file_are_skipped(proxy, daemon, tmp_path, rng):
    """A folder, a missing path, a device and a FIFO among the reuse files: each is skipped
    with a warning, the download completes and takes what the real file holds. (A FIFO
    blocks whoever opens it for reading until some writer comes: a client that opened it
    would hang.)"""
    old = tmp_path / "old.bin"
    data = rng.write(old, 2 * MiB)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(old, chunking="fixed", chunk_size=512 * KiB)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reuse = [fifo, tmp_path, tmp_path / "missing", "/dev/zero", old]
    async with CasdClient(proxy.url) as client:
        task = asyncio.create_task(client.download(s.digest, tmp_path / "out.bin", reuse=reuse))
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            # A reader is stuck in open(): let it through (a writer comes and goes), then fail.
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            await asyncio.gather(task, return_exceptions=True)
            pytest.fail("the download blocked opening a FIFO named as a reuse file")
        got = task.result()
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (got.chunks_reused, got.chunks_fetched) == (4, 0)


async def test_an_unrelated_reuse_file_is_cut_once(proxy, daemon, tmp_path, monkeypatch):
    """The chunk sizes of a FastCDC file rule out all averages but its own, so a reuse file
    that holds none of its chunks is read once, not once per guessed average."""
    fixed = RandomData(0, "an unrelated reuse file")
    new = tmp_path / "new.bin"
    data = fixed.write(new, 8 * MiB, "new")
    unrelated = tmp_path / "unrelated.bin"
    fixed.write(unrelated, 8 * MiB, "unrelated")
    async with CasdClient(daemon.url) as client:
        s = await client.upload(new, chunking="fastcdc", chunk_size=16 * KiB)
    cuts: list[Chunking] = []
    real = delta.file_digests

    def spy(path, **kw):
        cuts.append(kw["chunking"])
        return real(path, **kw)

    monkeypatch.setattr(delta, "file_digests", spy)
    async with CasdClient(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin", reuse=[unrelated])
    assert (tmp_path / "out.bin").read_bytes() == data
    assert got.chunks_reused == 0
    assert cuts == [Chunking.fastcdc(16 * KiB)]


@pytest.mark.parametrize("avg", [4 * KiB, 64 * KiB, MiB])
def test_the_guessed_rules_always_hold_the_one_that_cut_the_file(avg, rng):
    """Whatever the bytes, the rule that cut a file is among the guesses, first when its
    chunks are many; sizes no FastCDC average could give guess nothing."""
    for n in range(4):
        data = rng.bytes(64 * avg + n * 7919, n)
        spans = chunk_spans(io.BytesIO(data), Chunking.fastcdc(avg))
        chunks = [delta.ManifestChunk(o, size, "0" * 32) for o, size in spans]
        guesses = delta.guess_chunkings(chunks)
        assert guesses[0] == Chunking.fastcdc(avg) and len(guesses) <= 3
    sizes = [1500, 90_000, 3000]  # 1500 needs an average of at most 6000, 90000 one of 22500
    chunks = [delta.ManifestChunk(sum(sizes[:i]), n, "0" * 32) for i, n in enumerate(sizes)]
    assert delta.guess_chunkings(chunks) == []
    assert delta.guess_chunkings(chunks[:1]) == [Chunking.fixed(1500)]


# ---- what a chunked download checks each chunk against, and the whole-file check ---------------


async def upload_fixed(daemon, tmp_path, rng, size: int, name: str = "f.bin"):
    src = tmp_path / name
    data = rng.write(src, size, name)
    async with CasdClient(daemon.url) as client:
        s = await client.upload(src, chunking="fixed", chunk_size=MiB)
    return s, data


def each_chunk(change: Callable[[dict], None]) -> Callable[[dict], dict]:
    def edit(manifest: dict) -> dict:
        for c in manifest["chunks"]:
            change(c)
        return manifest

    return edit


async def test_chunks_are_checked_by_the_manifests_xxh3_when_it_gives_one(
    proxy, daemon, tmp_path, rng
):
    """With xxh3 in the manifest the chunk digest is not what is checked: a manifest whose
    digests are wrong but whose xxh3s are right still downloads; a wrong xxh3 is refused."""
    s, data = await upload_fixed(daemon, tmp_path, rng, 2 * MiB + 3)
    proxy.edit_manifest = each_chunk(lambda c: c.update(digest="0" * 32))
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == data
    assert (got.verified, got.chunk_check, got.chunks_fetched) == ("chunks", "xxh3-128", 3)

    proxy.edit_manifest = each_chunk(lambda c: c.update(xxh3="0" * 32))
    async with fast(proxy.url) as client:
        with pytest.raises(CasdIntegrityError, match="do not match"):
            await client.download(s.digest, tmp_path / "b.bin", concurrency=1)
    assert not (tmp_path / "b.bin").exists()


async def test_a_manifest_without_xxh3_is_checked_by_chunk_digest(proxy, daemon, tmp_path, rng):
    """A server that does not send the optional field: each chunk is checked by its MD5, and
    a byte flipped on the way is still caught and fetched again."""
    s, data = await upload_fixed(daemon, tmp_path, rng, 3 * MiB)
    proxy.edit_manifest = each_chunk(lambda c: c.pop("xxh3"))
    proxy.flip = 1
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (got.verified, got.chunk_check) == ("chunks", "md5")
    assert proxy.flip == 0 and len(proxy.ranges()) == 4


async def test_a_malformed_xxh3_is_refused(proxy, daemon, tmp_path, rng):
    s, _ = await upload_fixed(daemon, tmp_path, rng, MiB)
    proxy.edit_manifest = each_chunk(lambda c: c.update(xxh3="XYZ"))
    async with fast(proxy.url) as client:
        with pytest.raises(CasdClientError, match="malformed xxh3"):
            await client.download(s.digest, tmp_path / "out.bin")
    assert proxy.ranges() == []


async def test_verify_full_refuses_a_manifest_of_another_file(proxy, daemon, tmp_path, rng):
    """What only the whole-file check catches: a server answering for digest A with the
    manifest and bytes of file B. Each chunk matches B's manifest, so a chunk-checked
    download takes B; `verify="full"` hashes the result, refuses it and keeps nothing."""
    a, _ = await upload_fixed(daemon, tmp_path, rng, 2 * MiB, "a.bin")
    b, b_data = await upload_fixed(daemon, tmp_path, rng, 2 * MiB, "b.bin")
    a_path, b_path = f"/v1/files/{a.digest}", f"/v1/files/{b.digest}"
    proxy.paths = {a_path: b_path, a_path + "/chunks": b_path + "/chunks"}

    def claim_a(manifest: dict) -> dict:
        manifest["md5"] = a.digest
        return manifest

    proxy.edit_manifest = claim_a
    async with fast(proxy.url) as client:
        fooled = await client.download(a.digest, tmp_path / "chunks.bin")
        assert fooled.verified == "chunks"
        assert (tmp_path / "chunks.bin").read_bytes() == b_data
        with pytest.raises(CasdIntegrityError, match="the manifest does not describe"):
            await client.download(a.digest, tmp_path / "full.bin", verify="full")
    assert not (tmp_path / "full.bin").exists()
    assert list(tmp_path.glob(".full.bin*")) == []


async def test_verify_full_publishes_the_file_it_checked(proxy, daemon, tmp_path, rng):
    s, data = await upload_fixed(daemon, tmp_path, rng, 2 * MiB + 1)
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin", verify="full")
        with pytest.raises(ValueError, match="verify must be one of"):
            await client.download(s.digest, tmp_path / "x.bin", verify="none")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (got.verified, got.chunk_check, got.chunks_fetched) == ("file", "xxh3-128", 3)


def test_pieces_are_written_whole_however_short_each_write(tmp_path, monkeypatch):
    """pwritev may write less than asked; every byte still lands at its place."""
    real = os.pwritev

    def short(fd, views, offset):
        return real(fd, [bytes(views[0])[:1000]], offset)

    monkeypatch.setattr(delta.os, "pwritev", short)
    pieces = [os.urandom(n) for n in (10, 2500, 0, 1, 4096)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        delta.pwritev_all(fd, pieces, 7)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(7) + b"".join(pieces)


def test_a_chunk_is_written_in_slices_of_at_most_write_slice(tmp_path, monkeypatch):
    """A multi-MiB chunk goes to the page cache WRITE_SLICE bytes at a time (a write of the
    whole chunk costs several times the kernel time on a VM that reports free memory to its
    host), and every byte still lands at its place, pieces split across slices included."""
    real = os.pwritev
    sizes: list[int] = []

    def counted(fd, views, offset):
        sizes.append(sum(len(v) for v in views))
        return real(fd, views, offset)

    monkeypatch.setattr(delta.os, "pwritev", counted)
    slice_ = delta.WRITE_SLICE
    pieces = [os.urandom(n) for n in (slice_ - 3, 7, 3 * slice_ + 1, 0, 5)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        delta.pwritev_all(fd, pieces, 11)
        delta.pwrite_all(fd, pieces[2], 11 + sum(map(len, pieces)))
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(11) + b"".join(pieces) + pieces[2]
    assert max(sizes) == slice_
    assert sum(sizes) == sum(map(len, pieces)) + len(pieces[2])


def test_runs_are_adjacent_chunks_within_their_share_of_the_bytes():
    chunks = [delta.ManifestChunk(o, 10, f"{o:032x}") for o in range(0, 100, 10)]
    offsets = lambda runs: [[c.offset for c in run] for run in runs]  # noqa: E731
    # Four streams: runs of at most 25 bytes; a gap (chunk 30 is local) ends a run.
    todo = [c for c in chunks if c.offset != 30]
    assert offsets(delta.plan_runs(todo, 4, 1000)) == [
        [0, 10],
        [20],
        [40, 50],
        [60, 70],
        [80, 90],
    ]
    # One stream, but at most 30 bytes a run.
    assert offsets(delta.plan_runs(chunks, 1, 30)) == [
        [0, 10, 20],
        [30, 40, 50],
        [60, 70, 80],
        [90],
    ]
    # A chunk larger than the limit is a run of its own.
    big = [delta.ManifestChunk(0, 50, "a" * 32), delta.ManifestChunk(50, 5, "b" * 32)]
    assert offsets(delta.plan_runs(big, 4, 20)) == [[0], [50]]
    assert delta.plan_runs([], 4, 20) == []


async def test_a_daemon_on_postgresql_gives_xxh3_for_every_chunk(
    daemon_factory, postgres_url, tmp_path, rng
):
    """The PostgreSQL catalogue answers the optional field too, end to end."""
    d = daemon_factory("--catalog", postgres_url)
    s, data = await upload_fixed(d, tmp_path, rng, 3 * MiB + 1)
    async with CasdClient(d.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (got.chunks_fetched, got.verified, got.chunk_check) == (4, "chunks", "xxh3-128")


async def test_an_empty_file_is_checked_whole_and_warns_of_nothing(
    proxy, daemon, tmp_path, rng, caplog
):
    """A manifest of no chunks is checked against the digest asked for (that costs nothing),
    so a server cannot pass off an empty file as another; reuse files are not even read."""
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    other = tmp_path / "other.bin"
    rng.write(other, MiB)
    async with CasdClient(daemon.url) as client:
        e = await client.upload(empty, chunking="fastcdc")
        o = await client.upload(other, chunking="fixed", chunk_size=256 * KiB)
    async with fast(proxy.url) as client:
        got = await client.download(e.digest, tmp_path / "e.bin", reuse=[other])
    assert (tmp_path / "e.bin").read_bytes() == b""
    assert (got.chunks_total, got.verified) == (0, "file")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []

    def claim_empty(manifest: dict) -> dict:
        return {**manifest, "size": 0, "count": 0, "chunks": []}

    proxy.edit_manifest = claim_empty
    async with fast(proxy.url) as client:
        with pytest.raises(CasdIntegrityError, match="the manifest does not describe"):
            await client.download(o.digest, tmp_path / "o.bin")
    assert not (tmp_path / "o.bin").exists()
    assert proxy.ranges() == []


async def test_fetched_chunks_are_verified_on_several_threads_at_once(
    proxy, daemon, tmp_path, rng, monkeypatch
):
    """Two streams' chunks are checked at the same time on two threads (a download is not
    bound by one hashing core): each check waits for the other at a barrier, which a single
    verifying thread would never pass."""
    s, data = await upload_fixed(daemon, tmp_path, rng, 2 * MiB)
    proxy.edit_manifest = each_chunk(lambda c: c.pop("xxh3"))  # MD5, the costly check
    barrier = threading.Barrier(2, timeout=20)
    threads: set[str] = set()
    real = delta.ManifestChunk.matches_pieces

    def meet(self, pieces, algo):
        barrier.wait()
        threads.add(threading.current_thread().name)
        return real(self, pieces, algo)

    monkeypatch.setattr(delta.ManifestChunk, "matches_pieces", meet)
    async with fast(proxy.url) as client:
        got = await client.download(s.digest, tmp_path / "out.bin", concurrency=2)
    assert (tmp_path / "out.bin").read_bytes() == data
    assert (got.chunks_fetched, got.chunk_check) == (2, "md5")
    assert len(threads) == 2
