"""Protocol v1.1, streamed uploads (docs/PROTOCOL.md): the server's endpoints in process,
a hostile client, the Python client in both directions, resume, and one real daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web

from casd.chunking import Chunking
from casd.client import CasdClient, Progress, transfer
from casd.config import Settings
from casd.web import create_app
from helpers import app_client as make_client
from helpers import casd_run, prepare, rand, record_read_back, settle, snapshot

CHUNK = 64 * 1024


@pytest.fixture
def settings(settings):
    return dataclasses.replace(settings, stream_uploads=True)


async def open_stream(client, status: int = 201, **fields) -> dict:
    r = await client.post("/v1/uploads", json=fields)
    body = await r.json()
    assert r.status == status, body
    return body


async def add(client, upload_id: str, start: int, entries: list[dict], status: int = 200, **kw):
    r = await client.post(
        f"/v1/uploads/{upload_id}/chunks", json={"start": start, "chunks": entries, **kw}
    )
    body = await r.json()
    assert r.status == status, body
    return body


async def put(client, upload_id: str, digest: str, data: bytes, status: int | None = None):
    r = await client.put(f"/v1/uploads/{upload_id}/chunks/{digest}", data=data)
    body = await r.json()
    if status is not None:
        assert r.status == status, body
    return body


async def merge(client, upload_id: str, claim: dict | None, status: int = 200) -> dict:
    if claim is None:
        r = await client.post(f"/v1/uploads/{upload_id}/merge")
    else:
        r = await client.post(f"/v1/uploads/{upload_id}/merge", json=claim)
    body = await r.json()
    assert r.status == status, body
    return body


async def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, (await resp.read())[:500]
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and len(body["message"]) > 10
    return body


async def stream_all(client, p, batch: int = 2, algo: str = "md5") -> str:
    """Open, then for each batch of digests: list it and send what it says is missing."""
    opened = await open_stream(client, algo=algo, name="f.bin")
    uid = opened["upload_id"]
    entries = p.handshake["chunks"]
    for start in range(0, len(entries), batch):
        answer = await add(client, uid, start, entries[start : start + batch], algo=algo)
        assert answer["count"] == min(start + batch, len(entries))
        for d in answer["missing"]:
            await put(client, uid, d, p.chunks[d])
    return uid


async def download(client, url: str) -> bytes:
    r = await client.get(url)
    assert r.status == 200
    return await r.read()


def file_rows(settings) -> int:
    con = sqlite3.connect(settings.data_dir / "catalog.sqlite")
    try:
        return con.execute("SELECT count(*) FROM files").fetchone()[0]
    finally:
        con.close()


# ---- what the server offers ---------------------------------------------------------------


async def test_capabilities_offer_streaming_and_its_limits(client, settings):
    r = await client.get("/v1/capabilities")
    body = await r.json()
    assert r.status == 200
    assert body["stream_uploads"] is True and "1.1" in body["versions"]
    assert body["max_chunks"] == settings.max_chunks
    assert body["max_file_size"] == settings.max_file_size


async def test_streamed_uploads_are_offered_by_default(aiohttp_client, tmp_path):
    client = await aiohttp_client(create_app(Settings(data_dir=tmp_path / "d")))
    body = await (await client.get("/v1/capabilities")).json()
    assert body["stream_uploads"] is True and body["versions"] == ["1", "1.1"]


async def test_without_stream_uploads_the_server_answers_as_v1(aiohttp_client, tmp_path):
    settings = Settings(data_dir=tmp_path / "v1", stream_uploads=False)
    client = await aiohttp_client(create_app(settings))
    body = await (await client.get("/v1/capabilities")).json()
    assert body["stream_uploads"] is False and body["versions"] == ["1"]
    await assert_error(await client.post("/v1/uploads", json={}), 404, "not_found")
    await assert_error(
        await client.post("/v1/uploads/" + "a" * 32 + "/chunks", json={"start": 0, "chunks": []}),
        404,
        "not_found",
    )


async def test_a_pre_handshake_policy_hook_turns_streaming_off(aiohttp_client, settings):
    # The policy decides on the file's digest and size, which a streamed upload lacks.
    client = await make_client(
        aiohttp_client, settings, hook_pre_handshake="http://127.0.0.1:9/policy"
    )
    body = await (await client.get("/v1/capabilities")).json()
    assert body["stream_uploads"] is False
    await assert_error(await client.post("/v1/uploads", json={}), 404, "not_found")


async def test_oversized_batch_bodies_are_413(client):
    uid = (await open_stream(client))["upload_id"]
    entries = [{"md5": "a" * 32, "size": 1}] * 4097
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 0, "chunks": entries})
    await assert_error(r, 413, "too_large")
    r = await client.post(
        f"/v1/uploads/{uid}/chunks",
        data=b'{"start": 0, "chunks": [], "pad": "' + b"x" * (2 << 20) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    await assert_error(r, 413, "too_large")


# ---- the happy path -----------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["md5", "sha256"])
async def test_streamed_upload_round_trip(client, algo):
    p = prepare(rand(5 * CHUNK + 77), CHUNK, algo=algo)
    uid = await stream_all(client, p, algo=algo)
    done = await merge(client, uid, {"algo": algo, algo: p.digest, "size": len(p.data)})
    assert done["status"] == "complete" and done[algo] == p.digest
    assert await download(client, done["url"]) == p.data
    # A v1 handshake of the same file is now an instant upload.
    r = await client.post("/v1/handshake", json=p.handshake)
    assert (await r.json())["status"] == "complete"


async def test_streamed_upload_on_a_postgresql_catalogue(aiohttp_client, settings, postgres_url):
    client = await make_client(aiohttp_client, settings, catalog=postgres_url)
    p = prepare(rand(4 * CHUNK + 9), CHUNK)
    uid = await stream_all(client, p)
    wrong = hashlib.md5(b"not it").hexdigest()
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": wrong, "size": len(p.data)})
    await assert_error(r, 422, "file_digest_mismatch")
    uid = await stream_all(client, p)
    done = await merge(client, uid, {"md5": p.digest, "size": len(p.data)})
    assert await download(client, done["url"]) == p.data
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 5, "chunks": []})
    await assert_error(r, 404, "not_found")


async def test_batches_skip_stored_chunks_and_repeats(client):
    first = prepare(rand(3 * CHUNK), CHUNK)
    await merge(
        client,
        await stream_all(client, first),
        {"md5": first.digest, "size": len(first.data)},
    )
    # The second file repeats the first's chunks and one of its own twice.
    own = rand(CHUNK)
    data = first.data + own + own
    p = prepare(data, CHUNK)
    uid = (await open_stream(client))["upload_id"]
    answer = await add(client, uid, 0, p.handshake["chunks"])
    own_digest = hashlib.md5(own).hexdigest()
    assert answer["missing"] == [own_digest]
    assert answer == {"count": 5, "size": len(data), "missing": [own_digest]}
    await put(client, uid, own_digest, own, status=201)
    done = await merge(client, uid, {"md5": p.digest, "size": len(data)})
    assert await download(client, done["url"]) == data


async def test_empty_file_streams(client):
    uid = (await open_stream(client, ext=".txt"))["upload_id"]
    done = await merge(client, uid, {"md5": hashlib.md5(b"").hexdigest(), "size": 0})
    assert done["size"] == 0 and done["url"].endswith(".txt")


async def test_status_of_an_open_upload(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"])
    body = await (await client.get(f"/v1/uploads/{uid}")).json()
    assert body["status"] == "open" and body["size"] == 2 * CHUNK
    assert body["missing"] == p.order and "md5" not in body


async def test_v1_merge_without_body_still_works(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await (await client.post("/v1/handshake", json=p.handshake)).json()
    for d in hs["missing"]:
        await put(client, hs["upload_id"], d, p.chunks[d])
    assert (await merge(client, hs["upload_id"], None))["md5"] == p.digest


# ---- a hostile client ---------------------------------------------------------------------


async def test_wrong_digest_at_merge_is_422_and_registers_nothing(client, settings):
    p = prepare(rand(3 * CHUNK), CHUNK)
    uid = await stream_all(client, p)
    other = hashlib.md5(b"something else").hexdigest()
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": other, "size": len(p.data)})
    body = await assert_error(r, 422, "file_digest_mismatch")
    assert p.digest not in body["message"]
    assert file_rows(settings) == 0
    assert (await client.get(f"/v1/files/{other}")).status == 404
    # The upload is discarded: merging it again, even honestly, finds nothing.
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": p.digest, "size": len(p.data)})
    await assert_error(r, 404, "not_found")


async def test_wrong_size_at_merge_is_refused_and_changes_nothing(client, settings):
    p = prepare(rand(2 * CHUNK), CHUNK)
    uid = await stream_all(client, p)
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": p.digest, "size": 1})
    await assert_error(r, 400, "bad_request")
    assert file_rows(settings) == 0
    done = await merge(client, uid, {"md5": p.digest, "size": len(p.data)})
    assert done["md5"] == p.digest


async def test_merge_of_a_streamed_upload_needs_the_digest(client):
    p = prepare(rand(CHUNK), CHUNK)
    uid = await stream_all(client, p)
    await assert_error(await client.post(f"/v1/uploads/{uid}/merge"), 400, "bad_request")
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": "xyz", "size": 1})
    await assert_error(r, 400, "bad_request")


async def test_chunk_bytes_not_matching_their_digest_are_refused(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"])
    first = p.order[0]
    r = await client.put(f"/v1/uploads/{uid}/chunks/{first}", data=rand(CHUNK))
    await assert_error(r, 422, "digest_mismatch")
    r = await client.put(f"/v1/uploads/{uid}/chunks/{first}", data=b"short")
    await assert_error(r, 422, "size_mismatch")
    unlisted = hashlib.md5(b"unlisted").hexdigest()
    r = await client.put(f"/v1/uploads/{uid}/chunks/{unlisted}", data=b"unlisted")
    await assert_error(r, 409, "not_in_manifest")
    body = await (await client.get(f"/v1/uploads/{uid}")).json()
    assert body["missing"] == p.order


async def test_more_chunks_than_max_chunks(aiohttp_client, settings):
    client = await make_client(aiohttp_client, settings, max_chunks=3)
    p = prepare(rand(4 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"][:2])
    r = await client.post(
        f"/v1/uploads/{uid}/chunks", json={"start": 2, "chunks": p.handshake["chunks"][2:]}
    )
    await assert_error(r, 413, "too_large")
    # Nothing of the refused batch was kept: the list is still two chunks long.
    assert (await add(client, uid, 2, p.handshake["chunks"][2:3]))["count"] == 3


async def test_size_over_max_file_size(aiohttp_client, settings):
    client = await make_client(aiohttp_client, settings, max_file_size=3 * 1024)
    p = prepare(rand(4 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    r = await client.post(
        f"/v1/uploads/{uid}/chunks", json={"start": 0, "chunks": p.handshake["chunks"]}
    )
    await assert_error(r, 413, "too_large")


async def test_pending_budget_applies_to_batches(aiohttp_client, settings):
    client = await make_client(
        aiohttp_client, settings, max_pending_chunks=4, max_pending_chunks_per_client=3
    )
    p = prepare(rand(4 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"][:2])
    r = await client.post(
        f"/v1/uploads/{uid}/chunks", json={"start": 2, "chunks": p.handshake["chunks"][2:]}
    )
    body = await assert_error(r, 429, "too_many_pending")
    assert body["pending"] == 2 and body["limit"] == 3


async def test_opens_that_list_nothing_still_count_against_the_budget(aiohttp_client, settings):
    """An open streamed upload holds its rows before it lists a chunk: each counts one entry,
    so a client cannot open uploads without end."""
    client = await make_client(
        aiohttp_client, settings, max_pending_chunks=10, max_pending_chunks_per_client=3
    )
    for _ in range(3):
        await open_stream(client)
    before = snapshot(settings.data_dir)
    r = await client.post("/v1/uploads", json={})
    body = await assert_error(r, 429, "too_many_pending")
    assert body["pending"] == 3 and body["limit"] == 3
    assert snapshot(settings.data_dir) == before


async def test_algos_policy_refuses_md5_streams(aiohttp_client, settings):
    client = await make_client(aiohttp_client, settings, algos=("sha256",))
    r = await client.post("/v1/uploads", json={"algo": "md5"})
    body = await assert_error(r, 400, "bad_request")
    assert body["allowed_algos"] == ["sha256"]
    assert (await open_stream(client, algo="sha256"))["algo"] == "sha256"


async def test_batch_out_of_order_is_409_with_the_count(client):
    p = prepare(rand(3 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"][:2])
    r = await client.post(
        f"/v1/uploads/{uid}/chunks", json={"start": 1, "chunks": p.handshake["chunks"][2:]}
    )
    body = await assert_error(r, 409, "offset_mismatch")
    assert body["count"] == 2


async def test_batch_giving_a_digest_two_sizes_is_refused(client):
    p = prepare(rand(2 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    entries = p.handshake["chunks"]
    await add(client, uid, 0, entries)
    twisted = [{"md5": entries[0]["md5"], "size": 5}]
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 2, "chunks": twisted})
    await assert_error(r, 400, "bad_request")
    assert (await add(client, uid, 2, entries[:1]))["count"] == 3


async def test_a_bad_chunk_in_a_batch_is_named_by_its_place_in_the_file(aiohttp_client, settings):
    client = await make_client(aiohttp_client, settings, max_chunk_size=1024)
    p = prepare(rand(2 * 1024), 1024)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"])
    for entry, status, code in (
        ({"md5": "a" * 32, "size": 0}, 400, "bad_request"),
        ({"md5": "a" * 32, "size": 1025}, 413, "too_large"),
    ):
        r = await client.post(
            f"/v1/uploads/{uid}/chunks",
            json={"start": 2, "chunks": [{"md5": "b" * 32, "size": 1}, entry]},
        )
        body = await assert_error(r, status, code)
        assert "chunk 3 has size" in body["message"], body
    assert (await add(client, uid, 2, []))["count"] == 2  # nothing was listed


async def test_malformed_batches_are_400(client):
    uid = (await open_stream(client))["upload_id"]
    for body in (
        {"chunks": []},
        {"start": -1, "chunks": []},
        {"start": 0, "chunks": [{"md5": "nothex", "size": 3}]},
        {"start": 0, "chunks": [{"sha256": "a" * 64, "size": 3}]},
        {"start": 0, "chunks": [{"md5": "a" * 32, "size": 0}]},
        {"start": 0, "chunks": "x"},
        {"start": 0, "chunks": [], "algo": "crc"},
    ):
        r = await client.post(f"/v1/uploads/{uid}/chunks", json=body)
        await assert_error(r, 400, "bad_request")
    r = await client.post(
        f"/v1/uploads/{uid}/chunks", data=b"{", headers={"Content-Type": "application/json"}
    )
    await assert_error(r, 400, "bad_request")
    r = await client.post(f"/v1/uploads/{uid}/chunks", data=b"{}")
    await assert_error(r, 415, "unsupported_media_type")


async def test_unknown_upload_id(client):
    uid = "f" * 32
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 0, "chunks": []})
    await assert_error(r, 404, "not_found")
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": "a" * 32, "size": 0})
    await assert_error(r, 404, "not_found")


async def test_batches_after_merge_and_on_v1_uploads_are_404(client):
    p = prepare(rand(CHUNK), CHUNK)
    hs = await (await client.post("/v1/handshake", json=p.handshake)).json()
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/chunks", json={"start": 0, "chunks": []})
    await assert_error(r, 404, "not_found")
    uid = await stream_all(client, p)
    await merge(client, uid, {"md5": p.digest, "size": len(p.data)})
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 1, "chunks": []})
    await assert_error(r, 404, "not_found")


async def test_merge_twice_answers_the_same(client, settings):
    p = prepare(rand(2 * CHUNK), CHUNK)
    uid = await stream_all(client, p)
    claim = {"md5": p.digest, "size": len(p.data)}
    first = await merge(client, uid, claim)
    assert await merge(client, uid, claim) == first
    assert await merge(client, uid, None) == first
    r = await client.post(f"/v1/uploads/{uid}/merge", json={"md5": "a" * 32, "size": 5})
    await assert_error(r, 400, "bad_request")
    assert file_rows(settings) == 1


async def test_merge_with_chunks_missing_is_409_then_completes(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, p.handshake["chunks"])
    await put(client, uid, p.order[0], p.chunks[p.order[0]], status=201)
    claim = {"md5": p.digest, "size": len(p.data)}
    r = await client.post(f"/v1/uploads/{uid}/merge", json=claim)
    body = await assert_error(r, 409, "incomplete")
    assert body["missing"] == [p.order[1]]
    # Sealed now: no more digests, the missing chunk still welcome.
    r = await client.post(f"/v1/uploads/{uid}/chunks", json={"start": 2, "chunks": []})
    await assert_error(r, 404, "not_found")
    await put(client, uid, p.order[1], p.chunks[p.order[1]], status=201)
    assert (await merge(client, uid, claim))["md5"] == p.digest


async def test_abort_midway_leaves_nothing_registered(client, settings):
    p = prepare(rand(4 * CHUNK), CHUNK)
    uid = (await open_stream(client))["upload_id"]
    answer = await add(client, uid, 0, p.handshake["chunks"][:2])
    await put(client, uid, answer["missing"][0], p.chunks[answer["missing"][0]])
    r = await client.delete(f"/v1/uploads/{uid}")
    assert r.status == 204
    for method, path, kw in (
        ("POST", f"/v1/uploads/{uid}/chunks", {"json": {"start": 2, "chunks": []}}),
        ("POST", f"/v1/uploads/{uid}/merge", {"json": {"md5": p.digest, "size": len(p.data)}}),
        ("GET", f"/v1/uploads/{uid}", {}),
    ):
        await assert_error(await client.request(method, path, **kw), 404, "not_found")
    assert file_rows(settings) == 0


async def test_merge_racing_a_batch_is_decided_once(client, settings):
    """A batch and a merge of the same open upload sent together: the merge claims the
    three chunks listed so far. Either it seals first (the batch is refused, the three
    chunks are the file) or the batch lands first (the claim no longer adds up: refused,
    nothing sealed); never a file registered over a list other than the one hashed."""
    p = prepare(rand(4 * 1024), 1024)
    entries = p.handshake["chunks"]
    three = hashlib.md5(p.data[: 3 * 1024]).hexdigest()
    outcomes = set()
    for _ in range(20):
        uid = (await open_stream(client))["upload_id"]
        answer = await add(client, uid, 0, entries[:3])
        for d in answer["missing"]:
            await put(client, uid, d, p.chunks[d])
        batch = client.post(f"/v1/uploads/{uid}/chunks", json={"start": 3, "chunks": entries[3:]})
        merged = client.post(f"/v1/uploads/{uid}/merge", json={"md5": three, "size": 3 * 1024})
        rb, rm = await asyncio.gather(batch, merged)
        outcomes.add((rb.status, rm.status))
        if rm.status == 200:
            assert rb.status == 404
            assert (await rm.json())["md5"] == three
        else:
            assert (rb.status, rm.status) == (200, 400), await rm.text()
            body = await (await client.get(f"/v1/uploads/{uid}")).json()
            assert body["status"] == "open" and body["size"] == 4 * 1024
            await client.delete(f"/v1/uploads/{uid}")
    assert outcomes <= {(404, 200), (200, 400)}


# ---- the Python client ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own digest cache folder, never the user's."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "casd"


async def serve(aiohttp_server, settings, gone: str | None = None) -> str:
    """An in-process server; `gone` is a path it answers 404 (with any method), as a server
    from before v1.1 does for /v1/capabilities."""
    app = create_app(settings)
    if gone is not None:

        @web.middleware
        async def older(request, handler):
            if request.path == gone:
                return web.json_response({"error": "not_found", "message": "no such"}, status=404)
            return await handler(request)

        app.middlewares.append(older)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def manifest_keys(settings) -> list[str]:
    """How each upload was made: 'stream:...' for v1.1, an xxh3 key for v1."""
    con = sqlite3.connect(settings.data_dir / "catalog.sqlite")
    try:
        return [r[0] for r in con.execute("SELECT chunks_key FROM manifests ORDER BY id")]
    finally:
        con.close()


@pytest.mark.parametrize("algo", ["md5", "sha256"])
async def test_client_streams_chunks_while_it_hashes(
    aiohttp_server, settings, tmp_path, monkeypatch, algo
):
    # A queue of two chunks: hashing cannot run ahead, so chunks must go out before it ends.
    monkeypatch.setattr(transfer, "STREAM_BUFFER", 2 * CHUNK)
    url = await serve(aiohttp_server, settings)
    src = tmp_path / "f.bin"
    data = rand(12 * CHUNK + 5)
    src.write_bytes(data)
    reports: list[Progress] = []
    async with CasdClient(url) as c:
        s = await c.upload(src, chunk_size=CHUNK, algo=algo, on_progress=reports.append)
        await c.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert s.digest == hashlib.new(algo, data).hexdigest()
    assert (s.chunks_sent, s.bytes_sent, s.chunks_total) == (13, len(data), 13)
    phases = [p.phase for i, p in enumerate(reports) if i == 0 or reports[i - 1].phase != p.phase]
    assert phases == ["hashing", "uploading", "merging", "done"]
    # Chunks were acknowledged while the file was still being read.
    assert max(p.chunks_done for p in reports if p.phase == "hashing") > 0
    assert all(p.bytes_done <= p.bytes_total for p in reports)
    assert manifest_keys(settings)[0].startswith("stream:")


@pytest.mark.parametrize("chunking", ["fixed", "fastcdc"])
async def test_client_streams_edge_sizes_byte_exact(aiohttp_server, settings, tmp_path, chunking):
    url = await serve(aiohttp_server, settings)
    async with CasdClient(url) as c:
        for size in (0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 1):
            src = tmp_path / f"f{size}.bin"
            data = rand(size)
            src.write_bytes(data)
            s = await c.upload(src, chunk_size=CHUNK, chunking=chunking, use_cache=False)
            assert s.digest == hashlib.md5(data).hexdigest() and s.size == size
            await c.download(s.url, tmp_path / f"out{size}")
            assert (tmp_path / f"out{size}").read_bytes() == data
    # Files that must be one chunk (or none) go in one request (PUT /v1/files/...).
    least = Chunking.parse(chunking, CHUNK).min_size
    sizes = (0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 1)
    streamed = [k.startswith("stream:") for k in manifest_keys(settings)]
    assert streamed == [size > least for size in sizes]


@pytest.mark.parametrize("how", ["stream_uploads off", "v1 server", "open refused"])
async def test_client_falls_back_to_v1(aiohttp_server, settings, tmp_path, how):
    if how == "stream_uploads off":
        settings = dataclasses.replace(settings, stream_uploads=False)
    gone = {"v1 server": "/v1/capabilities", "open refused": "/v1/uploads"}.get(how)
    url = await serve(aiohttp_server, settings, gone)
    src = tmp_path / "f.bin"
    data = rand(3 * CHUNK)
    src.write_bytes(data)
    reports: list[Progress] = []
    async with CasdClient(url) as c:
        s = await c.upload(src, chunk_size=CHUNK, on_progress=reports.append)
        await c.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert "handshake" in [p.phase for p in reports]
    assert not manifest_keys(settings)[0].startswith("stream:")


async def test_client_stream_skips_chunks_the_server_holds(aiohttp_server, settings, tmp_path):
    url = await serve(aiohttp_server, settings)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    shared = rand(4 * CHUNK)
    a.write_bytes(shared)
    b.write_bytes(shared + rand(CHUNK) + shared[:CHUNK])
    async with CasdClient(url) as c:
        await c.upload(a, chunk_size=CHUNK, use_cache=False)
        s = await c.upload(b, chunk_size=CHUNK, use_cache=False)
        await c.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b.read_bytes()
    assert (s.chunks_sent, s.bytes_sent, s.chunks_skipped) == (1, CHUNK, 5)


async def test_interrupted_stream_resumes_sending_only_the_rest(
    aiohttp_server, settings, tmp_path, monkeypatch
):
    monkeypatch.setattr(transfer, "STREAM_BUFFER", 2 * CHUNK)
    url = await serve(aiohttp_server, settings)
    src = tmp_path / "f.bin"
    data = rand(10 * CHUNK)
    src.write_bytes(data)

    class Interrupted(Exception):
        pass

    def stop_after_three(p: Progress) -> None:
        if p.phase in ("hashing", "uploading") and p.chunks_done >= 3:
            raise Interrupted

    async with CasdClient(url) as c:
        with pytest.raises(Interrupted):
            await c.upload(src, chunk_size=CHUNK, concurrency=1, on_progress=stop_after_three)
        # The interrupted upload was aborted: it holds no pending budget.
        r = await c._sess().get(f"{url}/v1/capabilities")
        assert r.status == 200
        s = await c.upload(src, chunk_size=CHUNK, concurrency=1)
        await c.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert (s.chunks_sent, s.chunks_skipped) == (7, 3)
    con = sqlite3.connect(settings.data_dir / "catalog.sqlite")
    try:
        states = [r[0] for r in con.execute("SELECT state FROM uploads")]
    finally:
        con.close()
    assert states == ["merged"]


async def test_digest_cache_after_a_stream_makes_the_next_upload_instant(
    aiohttp_server, settings, tmp_path
):
    url = await serve(aiohttp_server, settings)
    src = tmp_path / "f.bin"
    src.write_bytes(rand(3 * CHUNK))
    settle(src)
    async with CasdClient(url) as c:
        first = await c.upload(src, chunk_size=CHUNK)
        again = await c.upload(src, chunk_size=CHUNK)
    assert not first.cached and first.chunks_sent == 3
    assert again.cached and again.instant and again.digest == first.digest


def test_casd_upload_streams_to_a_real_daemon(daemon_factory, tmp_path):
    d = daemon_factory("--stream-uploads")
    src = tmp_path / "movie.bin"
    data = rand(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("CASD_TOKEN", None)
    run = casd_run("upload", str(src), "--server", d.url, "--chunk-size", "1M", env=env)
    assert run.returncode == 0, run.stderr
    url = run.stdout.splitlines()[0]
    assert url.startswith(d.url + "/v1/files/")
    out = tmp_path / "out.bin"
    run = casd_run("download", url, "-o", str(out), env=env)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == data
    keys = [
        r[0]
        for r in sqlite3.connect(d.data_dir / "catalog.sqlite").execute(
            "SELECT chunks_key FROM manifests"
        )
    ]
    assert len(keys) == 1 and keys[0].startswith("stream:")


async def test_a_stored_file_streamed_again_merges_at_once_and_says_instant(client, monkeypatch):
    """The answer a v1 handshake gives on the same claim: the file is stored, so merge hashes
    nothing again; a retried merge answers the same; a new file is never instant."""

    p = prepare(rand(3 * CHUNK + 5), CHUNK)
    first = await merge(client, await stream_all(client, p), {"md5": p.digest, "size": len(p.data)})
    assert "instant" not in first
    uid = await stream_all(client, p)  # every chunk is stored: nothing is sent
    hashed = record_read_back(monkeypatch)
    claim = {"md5": p.digest, "size": len(p.data)}
    again = await merge(client, uid, claim)
    assert again == {**first, "instant": True}
    assert hashed == []
    assert await merge(client, uid, claim) == again
    r = await client.post(f"/v1/uploads/{uid}/merge", json={**claim, "size": len(p.data) + 1})
    await assert_error(r, 404, "not_found")
    assert await download(client, again["url"]) == p.data


async def test_a_merge_sealing_the_list_while_hash_ahead_hashes_it_still_hashes_the_rest(
    client, monkeypatch
):
    """Hash-ahead read the list when it held two entries and is hashing them; meanwhile a
    third is listed and sent, and merge seals the list. Hash-ahead must not take the end of
    the page it read for the end of the file."""
    from casd.blobstore.local import LocalBlobStore
    from casd.web import SERVICE

    service = client.server.app[SERVICE]
    gate, held = asyncio.Event(), asyncio.Event()
    real_feed = LocalBlobStore.feed_run

    async def feed_run(self, algo, run, sink, executor=None):
        if asyncio.current_task() in service._background and not gate.is_set():
            held.set()
            await gate.wait()
        return await real_feed(self, algo, run, sink, executor)

    monkeypatch.setattr(LocalBlobStore, "feed_run", feed_run)
    p = prepare(rand(3 * CHUNK), CHUNK)
    entries = p.handshake["chunks"]
    uid = (await open_stream(client))["upload_id"]
    await add(client, uid, 0, entries[:2])
    await put(client, uid, p.order[1], p.chunks[p.order[1]], status=201)
    await put(client, uid, p.order[0], p.chunks[p.order[0]], status=201)  # in order: fed
    await asyncio.wait_for(held.wait(), 10)  # hash-ahead is hashing chunk 1, list read
    await add(client, uid, 2, entries[2:])
    await put(client, uid, p.order[2], p.chunks[p.order[2]], status=201)
    merging = asyncio.create_task(
        client.post(f"/v1/uploads/{uid}/merge", json={"md5": p.digest, "size": len(p.data)})
    )
    for _ in range(10_000):  # until the merge has sealed the list and waits for the hash
        state = service._file_hashes.get(uid)
        if state is not None and state.merging:
            break
        await asyncio.sleep(0.001)
    else:
        raise AssertionError("the merge never started hashing")
    gate.set()
    r = await merging
    assert r.status == 200, await r.text()
    assert await download(client, (await r.json())["url"]) == p.data
