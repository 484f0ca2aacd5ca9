"""GET/HEAD /v1/files/{digest}/chunks: a file's manifest, streamed in pages."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tracemalloc

import aiohttp
import pytest
import xxhash

from casd import web as casd_web
from casd.chunking import Chunking, iter_chunks
from casd.digest import Digest
from casd.web import SERVICE, create_app
from helpers import Prepared, prepare, rand, upload

KiB = 1024


def prepare_cdc(data: bytes, chunking: Chunking, algo: str = "md5") -> Prepared:
    """A handshake cut by `chunking` (chunks of varying sizes), as a CDC client sends it."""
    h = hashlib.new(algo, data)
    chunks, order, entries = {}, [], []
    for _offset, view in iter_chunks(io.BytesIO(data), chunking):
        piece = bytes(view)
        d = hashlib.new(algo, piece).hexdigest()
        chunks[d] = piece
        order.append(d)
        entries.append({algo: d, "size": len(piece)})
    hs: dict = {algo: h.hexdigest(), "size": len(data), "chunks": entries, "algo": algo}
    return Prepared(hs, chunks, order, h.hexdigest(), data)


def expected_manifest(p: Prepared, algo: str = "md5") -> dict:
    """The manifest the server must answer, xxh3-128 of each chunk's bytes included."""
    offset, chunks = 0, []
    for c in p.handshake["chunks"]:
        xxh3 = xxhash.xxh3_128_hexdigest(p.data[offset : offset + c["size"]])
        chunks.append({"digest": c[algo], "size": c["size"], "offset": offset, "xxh3": xxh3})
        offset += c["size"]
    return {
        "algo": algo,
        algo: p.digest,
        "size": len(p.data),
        "count": len(chunks),
        "chunks": chunks,
    }


async def get_json(client, path: str, status: int = 200, **kw) -> dict:
    r = await client.get(path, **kw)
    body = await r.json()
    assert r.status == status, body
    return body


async def test_manifest_lists_the_uploaded_chunks_with_offsets(client):
    p = prepare_cdc(rand(300 * KiB, 1), Chunking.fastcdc(4 * KiB))
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    r = await client.get(f"/v1/files/{p.digest}/chunks")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.headers["X-Chunk-Count"] == str(len(p.order))
    body = await r.json()
    assert body == expected_manifest(p)
    sizes = {c["size"] for c in body["chunks"]}
    assert len(sizes) > 1  # content-defined: the sizes vary
    # The offsets tile the file, and each span hashes to its digest.
    pos = 0
    for c in body["chunks"]:
        assert c["offset"] == pos
        assert hashlib.md5(p.data[pos : pos + c["size"]]).hexdigest() == c["digest"]
        pos += c["size"]
    assert pos == len(p.data)
    # The file's URL with its extension works too.
    assert await get_json(client, f"/v1/files/{p.digest.upper()}.bin/chunks") == body


async def test_sha256_manifest_and_repeated_chunks(client):
    block = rand(10 * KiB, 2)
    p = prepare(block * 3 + rand(5 * KiB, 3), chunk_size=10 * KiB, algo="sha256")
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    body = await get_json(client, f"/v1/files/{p.digest}/chunks")
    assert body == expected_manifest(p, "sha256")
    assert [c["digest"] for c in body["chunks"][:3]] == [p.order[0]] * 3
    # The MD5 of the same bytes names no file: algorithms never stand in for each other.
    md5 = hashlib.md5(p.data).hexdigest()
    err = await get_json(client, f"/v1/files/{md5}/chunks", 404)
    assert err["error"] == "not_found" and md5 in err["message"]


async def test_empty_file_has_an_empty_manifest(client):
    p = prepare(b"")
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    body = await get_json(client, f"/v1/files/{p.digest}/chunks")
    assert body == {"algo": "md5", "md5": p.digest, "size": 0, "count": 0, "chunks": []}


async def test_head_gives_the_count_and_no_body(client):
    p = prepare(rand(100 * KiB, 4), chunk_size=16 * KiB)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    r = await client.head(f"/v1/files/{p.digest}/chunks")
    assert r.status == 200
    assert r.headers["X-Chunk-Count"] == "7"
    assert await r.read() == b""
    r = await client.head(f"/v1/files/{'0' * 32}/chunks")
    assert r.status == 404


@pytest.mark.parametrize(
    "path, status, code",
    [
        (f"/v1/files/{'a' * 32}/chunks", 404, "not_found"),  # never uploaded
        (f"/v1/files/{'a' * 64}/chunks", 404, "not_found"),
        ("/v1/files/xyz/chunks", 400, "bad_request"),
        (f"/v1/files/{'a' * 31}/chunks", 400, "bad_request"),
        (f"/v1/files/{'a' * 32}.b!n/chunks", 400, "bad_request"),
    ],
)
async def test_bad_or_unknown_digest(client, path, status, code):
    body = await get_json(client, path, status)
    assert body["error"] == code and body["message"]


async def test_manifest_of_a_deleted_file_is_gone(client):
    p = prepare(rand(50 * KiB, 5), chunk_size=16 * KiB)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    assert (await client.delete(f"/v1/files/{p.digest}")).status == 204
    assert (await get_json(client, f"/v1/files/{p.digest}/chunks", 404))["error"] == "not_found"


async def test_same_auth_as_the_file(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, token="s3cret")))
    auth = {"Authorization": "Bearer s3cret"}
    p = prepare(rand(20 * KiB, 6), chunk_size=8 * KiB)
    session = aiohttp.ClientSession(headers=auth)
    try:
        await upload(session, str(client.make_url("")).rstrip("/"), p)
    finally:
        await session.close()
    path = f"/v1/files/{p.digest}/chunks"
    assert (await get_json(client, path, 401))["error"] == "unauthorized"
    assert (await client.head(path)).status == 401
    assert (await get_json(client, path, headers=auth))["count"] == 3


async def test_a_chunk_without_a_recorded_xxh3_is_listed_without_one(client, monkeypatch):
    """`xxh3` is optional: where the catalogue has none, the entry simply lacks the field."""
    p = prepare(rand(20 * KiB, 3), chunk_size=8 * KiB)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    service = client.server.app[SERVICE]
    real_page = service.catalog.file_chunks_page

    async def second_unknown(*args):
        rows = await real_page(*args)
        return [(d, n, None if i == 1 else x) for i, (d, n, x) in enumerate(rows)]

    monkeypatch.setattr(service.catalog, "file_chunks_page", second_unknown)
    body = await get_json(client, f"/v1/files/{p.digest}/chunks")
    want = expected_manifest(p)
    del want["chunks"][1]["xxh3"]
    assert body == want


async def test_a_file_deleted_midway_cuts_the_manifest_short(client, monkeypatch):
    """Pages are separate reads; if the rows vanish between them, the body is left
    unfinished (no closing bracket, no final chunk), never a shorter list that parses."""
    monkeypatch.setattr(casd_web, "MANIFEST_PAGE", 2)
    p = prepare(rand(60 * KiB, 7), chunk_size=8 * KiB)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    service = client.server.app[SERVICE]
    real_page = service.catalog.file_chunks_page
    calls = 0

    async def page_then_delete(*args):
        nonlocal calls
        calls += 1
        rows = await real_page(*args)
        if calls == 1:
            await service.delete_file(Digest.parse_any(p.digest))
        return rows

    monkeypatch.setattr(service.catalog, "file_chunks_page", page_then_delete)
    r = await client.get(f"/v1/files/{p.digest}/chunks")
    assert r.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()


# Slow: 100,000 chunks; test_manifest_lists_the_uploaded_chunks_with_offsets stays in the fast
# loop.
@pytest.mark.slow
async def test_a_100000_chunk_manifest_streams_in_bounded_memory(client, monkeypatch):
    monkeypatch.setattr(casd_web, "MANIFEST_PAGE", 1000)
    # 1-byte chunks over 8 distinct values: 100,000 manifest rows, 8 blobs.
    n = 100_000
    data = bytes(i % 8 for i in range(n))
    p = prepare(data, chunk_size=1)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    tracemalloc.start()
    try:
        r = await client.get(f"/v1/files/{p.digest}/chunks")
        assert r.status == 200
        assert "Content-Length" not in r.headers  # streamed, not built whole first
        received = 0
        tail = b""
        digest_of = hashlib.sha256()
        async for piece in r.content.iter_chunked(64 * KiB):
            received += len(piece)
            digest_of.update(piece)
            tail = (tail + piece)[-64:]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tail.endswith(b"]}")
    # The whole body is ~7 MB of JSON and the rows as Python objects several times that;
    # a page of 1000 rows at a time stays far below either.
    assert received > 5_000_000
    assert peak < received / 4, (peak, received)
    # And it is the right manifest.
    body = json.loads(await (await client.get(f"/v1/files/{p.digest}/chunks")).read())
    assert body["count"] == n and len(body["chunks"]) == n
    assert body["chunks"][-1] == {
        "digest": hashlib.md5(bytes([(n - 1) % 8])).hexdigest(),
        "size": 1,
        "offset": n - 1,
        "xxh3": xxhash.xxh3_128_hexdigest(bytes([(n - 1) % 8])),
    }


async def test_real_daemon_serves_the_manifest(daemon):
    p = prepare_cdc(rand(2 * 1024 * KiB, 8), Chunking.fastcdc(16 * KiB), algo="sha256")
    async with aiohttp.ClientSession() as s:
        await upload(s, daemon.url, p)
        async with s.get(f"{daemon.url}/v1/files/{p.digest}/chunks") as r:
            assert r.status == 200
            assert await r.json() == expected_manifest(p, "sha256")
        async with s.get(f"{daemon.url}/v1/files/{'0' * 64}/chunks") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "not_found"
