"""The blob-store contract (casd/blobstore/__init__.py), run against every engine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import pytest

from casd.blobstore import BlobMissing, StoreUnavailable, blob_matches, open_blobstore
from casd.digest import Algo, Digest

ENGINES = ["local", "s3"]


@pytest.fixture(params=ENGINES)
async def store(request, tmp_path):
    if request.param == "local":
        s = open_blobstore(None, tmp_path / "data")
    else:
        server = request.getfixturevalue("s3_server")
        bucket = server.new_bucket()
        s = open_blobstore(f"s3://{bucket}/some/prefix", tmp_path / "data", server.endpoint)
    await s.start()
    yield s
    await s.close()


def digest_of(data: bytes, algo: Algo = Algo.MD5) -> Digest:
    return Digest(algo, hashlib.new(algo.value, data).hexdigest())


async def put(store, data: bytes, algo: Algo = Algo.MD5) -> Digest:
    """What the service does: a verified temp file, published, then discarded."""
    d = digest_of(data, algo)
    temp = await asyncio.to_thread(store.new_temp)
    try:
        temp.write(data)
        temp.finish()
        await store.publish(temp, d)
        await store.ensure_stored(temp, d)
    finally:
        temp.discard()
    return d


async def read(store, d: Digest, offset: int = 0, length: int | None = None) -> bytes:
    async with await store.open(d) as r:
        n = r.size - offset if length is None else length
        return b"".join([p async for p in r.stream(offset, n)])


@pytest.mark.parametrize("algo", list(Algo))
async def test_put_then_read_whole_and_ranges(store, rng, algo):
    data = rng.bytes(3 * (1 << 20) + 17)
    d = await put(store, data, algo)
    assert await read(store, d) == data
    assert await read(store, d, 5, 10) == data[5:15]
    assert await read(store, d, (1 << 20) - 3, (1 << 20) + 6) == data[(1 << 20) - 3 : (2 << 20) + 3]
    # A range running past the end ends early: the caller sees a short read.
    assert await read(store, d, len(data) - 4, 100) == data[-4:]
    info = await store.stat(d)
    assert info.size == len(data) and info.digest == d
    assert await blob_matches(store, d, len(data), __import__("xxhash").xxh3_128_hexdigest(data))
    assert not await blob_matches(store, d, len(data), "0" * 32)


async def test_feed_run_hands_slices_of_several_blobs_in_order(store, rng):
    # Another tag for b: with the same one, b would be a's first 1000 bytes.
    a, b = rng.bytes(3 * (1 << 20) + 5), rng.bytes(1000, "b")
    da, db = await put(store, a), await put(store, b)
    got: list[bytes] = []
    fed = await store.feed_run(
        Algo.MD5,
        [(da.hex, 7, len(a) - 7), (db.hex, 0, 10), (db.hex, 990, 100)],
        lambda piece: got.append(bytes(piece)),
    )
    # The last slice runs past the blob's end: it is short, and says so.
    assert fed == [len(a) - 7, 10, 10]
    assert b"".join(got) == a[7:] + b[:10] + b[990:]
    with pytest.raises(BlobMissing):
        await store.feed_run(Algo.MD5, [(digest_of(b"never stored").hex, 0, 1)], got.append)


async def test_missing_blob(store):
    d = digest_of(b"never stored")
    assert await store.stat(d) is None
    with pytest.raises(BlobMissing):
        await store.open(d)
    # Removing or quarantining what is not there is not an error.
    assert await store.delete(d) is False
    assert await store.quarantine(d) is None


async def test_list_with_sizes_and_delete(store, rng):
    blobs = {
        await put(store, rng.bytes(n, n), algo): n
        for n, algo in [(0, Algo.MD5), (10, Algo.MD5), (1000, Algo.SHA256)]
    }
    listed = {b.digest: b.size async for b in store.list() if b.digest is not None}
    assert listed == blobs
    gone = next(iter(blobs))
    assert await store.delete(gone) is True
    assert await store.stat(gone) is None
    assert await store.delete(gone) is False
    assert {b.digest async for b in store.list()} == set(blobs) - {gone}


async def test_quarantine_moves_the_blob_aside(store, rng):
    data = rng.bytes(1234)
    d = await put(store, data)
    where = await store.quarantine(d)
    assert where is not None
    assert await store.stat(d) is None
    # Set aside, not served and not listed as a blob (fsck and gc do not see it).
    assert d not in {b.digest async for b in store.list()}


async def test_ensure_stored_puts_back_what_gc_took(store, rng):
    """The digest-locked check before a row: a blob removed after publish is put back."""
    data = rng.bytes(5000)
    d = digest_of(data)
    temp = await asyncio.to_thread(store.new_temp)
    try:
        temp.write(data)
        temp.finish()
        await store.publish(temp, d)
        assert await store.delete(d)  # gc's retire, between publish and the row
        await store.ensure_stored(temp, d)
    finally:
        temp.discard()
    assert await read(store, d) == data


async def test_delete_if_older(store, rng):
    d = await put(store, rng.bytes(100))
    assert await store.delete_if_older(d, time.time() - 3600) is False
    assert await store.stat(d) is not None
    assert await store.delete_if_older(d, time.time() + 3600) is True
    assert await store.stat(d) is None
    assert await store.delete_if_older(d, time.time() + 3600) is False


async def test_concurrent_puts_of_one_digest(store, rng):
    data = rng.bytes(300_000)
    results = await asyncio.gather(*(put(store, data) for _ in range(8)))
    assert len(set(results)) == 1
    assert await read(store, results[0]) == data
    assert [b.digest async for b in store.list()] == [results[0]]


async def test_assemble_concatenates_into_a_local_file(store, rng, tmp_path):
    parts = [rng.bytes(n, n) for n in (70_000, 1, 1 << 20)]
    ds = [await put(store, p) for p in parts]
    dest = tmp_path / "out.bin"
    total = sum(map(len, parts))
    await store.assemble([(d, len(p)) for d, p in zip(ds, parts, strict=True)], dest, total)
    assert dest.read_bytes() == b"".join(parts)
    # A part whose size is not the manifest's leaves nothing behind.
    with pytest.raises(ValueError):
        await store.assemble([(ds[0], 5)], tmp_path / "bad.bin", 5)
    await store.delete(ds[1])
    with pytest.raises(BlobMissing):
        await store.assemble([(ds[1], 1)], tmp_path / "gone.bin", 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["out.bin"]


async def checking_front(s3_server, seen: list[dict]):
    """An HTTP front for moto that checks PUT bodies against their transit checksum the way
    S3 does (400 BadDigest); moto itself stores them unchecked. Records each PUT's headers."""
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT" and "x-amz-copy-source" not in request.headers:
            seen.append(dict(request.headers))
            for header, algo in (("Content-MD5", "md5"), ("x-amz-checksum-sha256", "sha256")):
                sent = request.headers.get(header)
                if (
                    sent is not None
                    and sent != base64.b64encode(hashlib.new(algo, body).digest()).decode()
                ):
                    return web.Response(
                        status=400,
                        content_type="application/xml",
                        text="<Error><Code>BadDigest</Code><Message>The checksum you"
                        " specified did not match what we received.</Message></Error>",
                    )
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with session.request(
            request.method, s3_server.endpoint + request.path_qs, headers=headers, data=body
        ) as r:
            return web.Response(
                status=r.status,
                body=await r.read(),
                headers={
                    k: v
                    for k, v in r.headers.items()
                    if k.lower() not in ("transfer-encoding", "server", "date")
                },
            )

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]

    async def stop():
        await runner.cleanup()
        await session.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.mark.parametrize("algo", list(Algo))
async def test_s3_refuses_a_body_damaged_in_transit(s3_server, tmp_path, rng, algo):
    """Every chunk goes out with its digest as the transit checksum, so a store that checks
    it refuses a damaged body: nothing is stored under the digest, the publish fails."""
    seen: list[dict] = []
    endpoint, stop = await checking_front(s3_server, seen)
    store = open_blobstore(f"s3://{s3_server.new_bucket()}", tmp_path, endpoint)
    await store.start()
    try:
        data = rng.bytes(4096)
        d = digest_of(data, algo)
        header = "Content-MD5" if algo is Algo.MD5 else "x-amz-checksum-sha256"
        damaged = tmp_path / "damaged"
        damaged.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(StoreUnavailable, match=r"refused.*BadDigest"):
            await store._put(damaged, d)
        assert seen[-1][header] == base64.b64encode(bytes.fromhex(d.hex)).decode()
        assert await store.stat(d) is None
        # The same digest with its own bytes goes through: the refusal was the checksum's.
        await put(store, data, algo)
        assert header in seen[-1]
        assert await read(store, d) == data
    finally:
        await store.close()
        await stop()


async def test_s3_unreachable_is_store_unavailable(s3_server, tmp_path, monkeypatch):
    import socket

    # One attempt: the back-off between retries is what test_s3_attempts_... covers.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as held:  # bound, not listening: refuses, and no one else takes it
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        store = open_blobstore("s3://casd-nowhere", tmp_path, url)
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await store.start()


async def test_s3_attempts_are_what_aws_max_attempts_says(s3_server, tmp_path, monkeypatch):
    """AWS_MAX_ATTEMPTS, read as every AWS SDK reads it, replaces casd's retry budget: a store
    that hangs up on every request is tried that many times, then StoreUnavailable."""

    async def connections_made(attempts: str) -> int:
        accepted = 0

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", attempts)
        store = open_blobstore("s3://casd-nowhere", tmp_path, f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(StoreUnavailable, match="did not answer"):
                await store.start()
        finally:
            server.close()
            await server.wait_closed()
        return accepted

    # The HTTP layer may open more than one connection per attempt (aiohttp reconnects once
    # on a connection closed before the answer): compare attempts, not connections.
    once = await connections_made("1")
    assert once >= 1
    assert await connections_made("3") == 3 * once
