"""In-process tests of every endpoint of PROTOCOL.md, one per behaviour and failure mode."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import re
import time

import pytest
from yarl import URL

from casd.blobstore import TempBlob
from casd.web import create_app
from helpers import blob_files, prepare, rand, snapshot, temp_files, upload

CHUNK = 64 * 1024


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def client(aiohttp_client, settings, clock):
    """conftest's `client`, on this module's fake clock."""
    return await aiohttp_client(create_app(settings, clock=clock))


def make_client(aiohttp_client, settings, clock, **changes):
    return aiohttp_client(create_app(dataclasses.replace(settings, **changes), clock=clock))


async def handshake(client, hs: dict, status: int = 200) -> dict:
    r = await client.post("/v1/handshake", json=hs)
    body = await r.json()
    assert r.status == status, body
    return body


async def put(client, upload_id: str, digest: str, data: bytes, status: int | None = None):
    r = await client.put(f"/v1/uploads/{upload_id}/chunks/{digest}", data=data)
    body = await r.json()
    if status is not None:
        assert r.status == status, body
    return r.status, body


def raw(client, method: str, path: str, **kw):
    """A request whose path goes out exactly as written (no dot-segment normalising)."""
    url = URL(str(client.make_url("/")).rstrip("/") + path, encoded=True)
    return client.session.request(method, url, **kw)


async def assert_error(resp, status: int, code: str) -> dict:
    """Every error: the status, JSON, {"error", "message"} with a readable message."""
    assert resp.status == status, (await resp.read())[:500]
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and len(body["message"]) > 10
    return body


# ---- the happy path ---------------------------------------------------------------------


async def test_round_trip_lists_missing_in_order_and_downloads_exact_bytes(client):
    p = prepare(rand(5 * CHUNK + 123), CHUNK, ext=".bin", name="data.bin")
    hs = await handshake(client, p.handshake)
    assert hs["status"] == "pending"
    assert hs["missing"] == p.order
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", hs["expires_at"])
    left = list(p.order)
    for d in reversed(p.order):  # any order works
        _status, body = await put(client, hs["upload_id"], d, p.chunks[d], 201)
        left.remove(d)
        assert body == {"stored": True, "missing": left}
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    done = await r.json()
    assert r.status == 200
    assert done == {
        "status": "complete",
        "algo": "md5",
        "md5": p.digest,
        "size": len(p.data),
        "url": f"/v1/files/{p.digest}.bin",
    }
    r = await client.get(done["url"])
    assert r.status == 200
    assert await r.read() == p.data
    assert r.headers["ETag"] == f'"{p.digest}"'
    assert r.headers["Content-Length"] == str(len(p.data))


async def test_known_file_is_instant_with_this_handshakes_ext(client):
    p = prepare(rand(3 * CHUNK), CHUNK, ext=".mp4")
    await upload(client, "", p)
    again = dict(p.handshake, ext=".MOV")
    hs = await handshake(client, again)
    assert hs == {
        "status": "complete",
        "algo": "md5",
        "md5": p.digest,
        "size": len(p.data),
        "url": f"/v1/files/{p.digest}.mov",
    }


async def test_repeated_digest_is_listed_and_sent_once(client):
    block = rand(CHUNK)
    p = prepare(block * 3 + rand(10), CHUNK)
    hs = await handshake(client, p.handshake)
    assert hs["missing"] == list(dict.fromkeys(p.order))
    assert len(hs["missing"]) == 2
    for d in hs["missing"]:
        await put(client, hs["upload_id"], d, p.chunks[d], 201)
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200
    assert await (await client.get((await r.json())["url"])).read() == p.data


async def test_second_file_sharing_chunks_is_asked_only_for_new_ones(client):
    shared = rand(4 * CHUNK)
    a = prepare(shared + rand(CHUNK), CHUNK)
    await upload(client, "", a)
    b = prepare(shared + rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, b.handshake)
    assert hs["missing"] == b.order[4:]


async def test_empty_file(client):
    p = prepare(b"", CHUNK, ext=".txt")
    hs = await handshake(client, p.handshake)
    assert hs["missing"] == []
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200
    r = await client.get(f"/v1/files/{p.digest}.txt")
    assert r.status == 200 and await r.read() == b""
    assert (await handshake(client, p.handshake))["status"] == "complete"


async def test_same_manifest_resumes_the_same_upload(client):
    p = prepare(rand(3 * CHUNK), CHUNK)
    first = await handshake(client, p.handshake)
    await put(client, first["upload_id"], p.order[0], p.chunks[p.order[0]], 201)
    again = await handshake(client, p.handshake)
    assert again["upload_id"] == first["upload_id"]
    assert again["missing"] == p.order[1:]
    status = await (await client.get(f"/v1/uploads/{first['upload_id']}")).json()
    assert status["status"] == "pending"
    assert status["md5"] == p.digest and status["size"] == len(p.data)
    assert status["missing"] == p.order[1:]


async def test_concurrent_identical_handshakes_make_one_upload(client):
    p = prepare(rand(8 * CHUNK), CHUNK)
    answers = await asyncio.gather(*(handshake(client, p.handshake) for _ in range(20)))
    assert len({a["upload_id"] for a in answers}) == 1


async def test_chunk_already_held_answers_200_and_drops_the_body(client, settings):
    shared = rand(CHUNK)
    a = prepare(shared + rand(CHUNK), CHUNK)
    b = prepare(shared + rand(CHUNK), CHUNK)
    ha = await handshake(client, a.handshake)
    hb = await handshake(client, b.handshake)
    assert hb["missing"] == b.order  # nothing stored yet
    await put(client, ha["upload_id"], a.order[0], shared, 201)
    _status, body = await put(client, hb["upload_id"], b.order[0], shared, 200)
    assert body == {"stored": False, "missing": [b.order[1]]}
    _status, body = await put(client, ha["upload_id"], a.order[0], shared, 200)
    assert body["stored"] is False
    assert len(blob_files(settings.data_dir)) == 1


async def test_concurrent_uploads_of_one_chunk_store_it_once(client, settings):
    """Every body is mid-flight before any finishes: a real race on the same digest."""
    p = prepare(rand(CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    d = p.order[0]
    n = 8
    started = 0
    all_started = asyncio.Event()

    async def body():
        nonlocal started
        yield p.chunks[d][:100]
        started += 1
        if started == n:
            all_started.set()
        await asyncio.wait_for(all_started.wait(), 10)
        yield p.chunks[d][100:]

    async def one():
        r = await client.put(
            f"/v1/uploads/{hs['upload_id']}/chunks/{d}",
            data=body(),
            headers={"Content-Length": str(CHUNK)},
        )
        return r.status, await r.json()

    results = await asyncio.gather(*(one() for _ in range(n)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) >= 1 and set(statuses) <= {200, 201}
    assert all(b["missing"] == [] for _, b in results)
    assert len(blob_files(settings.data_dir)) == 1
    assert temp_files(settings.data_dir) == []
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200


async def test_sha256_end_to_end_and_namespaces_are_separate(client):
    data = rand(3 * CHUNK)
    m = prepare(data, CHUNK)
    await upload(client, "", m)
    s = prepare(data, CHUNK, algo="sha256", ext=".dat")
    hs = await handshake(client, s.handshake)
    assert hs["algo"] == "sha256" and hs["sha256"] == s.digest
    assert hs["missing"] == s.order  # the md5 upload supplied nothing for sha256
    done = await upload(client, "", s)
    assert done["url"] == f"/v1/files/{s.digest}.dat"
    assert done["sha256"] == s.digest and "md5" not in done
    assert await (await client.get(done["url"])).read() == data
    assert (await handshake(client, s.handshake))["status"] == "complete"


async def test_uppercase_digests_are_accepted_and_answered_lowercase(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = dict(
        p.handshake,
        md5=p.digest.upper(),
        chunks=[{"md5": c["md5"].upper(), "size": c["size"]} for c in p.handshake["chunks"]],
    )
    ans = await handshake(client, hs)
    assert ans["md5"] == p.digest and ans["missing"] == p.order
    await put(client, ans["upload_id"], p.order[0].upper(), p.chunks[p.order[0]], 201)


async def test_expiry_moves_forward_with_activity(client, clock):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    clock.now += 3600
    await put(client, hs["upload_id"], p.order[0], p.chunks[p.order[0]], 201)
    status = await (await client.get(f"/v1/uploads/{hs['upload_id']}")).json()
    assert status["expires_at"] > hs["expires_at"]


async def test_abort_then_upload_is_gone(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    r = await client.delete(f"/v1/uploads/{hs['upload_id']}")
    assert r.status == 204
    await assert_error(await client.get(f"/v1/uploads/{hs['upload_id']}"), 404, "not_found")
    assert (await handshake(client, p.handshake))["upload_id"] != hs["upload_id"]


async def test_merge_again_answers_the_same(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    for d in p.order:
        await put(client, hs["upload_id"], d, p.chunks[d], 201)
    first = await (await client.post(f"/v1/uploads/{hs['upload_id']}/merge")).json()
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200 and await r.json() == first


async def test_interleaved_uploads_verify_right_when_prefix_hashes_are_evicted(client, monkeypatch):
    import casd.service

    monkeypatch.setattr(casd.service, "MAX_FILE_HASHES", 1)
    files = [prepare(rand(5 * CHUNK + 1 + i), CHUNK) for i in range(3)]
    started = [await handshake(client, p.handshake) for p in files]
    for i in (2, 0, 4, 1, 3, 5):  # out of order, and the uploads take turns
        for p, hs in zip(files, started, strict=True):
            await put(client, hs["upload_id"], p.order[i], p.chunks[p.order[i]], 201)
    for p, hs in zip(files, started, strict=True):
        r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
        assert r.status == 200, await r.text()
        assert await (await client.get(f"/v1/files/{p.digest}")).read() == p.data


async def test_concurrent_merges_register_one_file(client):
    p = prepare(rand(4 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    for d in p.order:
        await put(client, hs["upload_id"], d, p.chunks[d], 201)
    rs = await asyncio.gather(
        *(client.post(f"/v1/uploads/{hs['upload_id']}/merge") for _ in range(5))
    )
    bodies = [await r.json() for r in rs]
    assert [r.status for r in rs] == [200] * 5
    assert all(b == bodies[0] for b in bodies)


async def test_delete_file(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    done = await upload(client, "", p)
    r = await client.delete(f"/v1/files/{p.digest}")
    assert r.status == 204
    await assert_error(await client.get(done["url"]), 404, "not_found")
    await assert_error(await client.delete(f"/v1/files/{p.digest}"), 404, "not_found")
    hs = await handshake(client, p.handshake)
    assert hs["status"] == "pending" and hs["missing"] == []  # chunks wait for gc


async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}


# ---- downloads --------------------------------------------------------------------------


@pytest.fixture
async def stored(client):
    p = prepare(rand(3 * CHUNK + 7), CHUNK, ext=".txt", name='résumé "final".txt')
    done = await upload(client, "", p)
    return p, done["url"]


@pytest.mark.parametrize(
    "header,start,end",
    [
        ("bytes=0-0", 0, 0),
        ("bytes=10-99", 10, 99),
        ("bytes=65530-65545", 65530, 65545),
        ("bytes=100-", 100, None),
        ("bytes=-50", None, None),
        ("bytes=5-999999999", 5, None),
    ],
)
async def test_range_requests(client, stored, header, start, end):
    p, url = stored
    size = len(p.data)
    r = await client.get(url, headers={"Range": header})
    assert r.status == 206
    if start is None:
        start, end = size - 50, size - 1
    end = size - 1 if end is None else end
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
    assert await r.read() == p.data[start : end + 1]


async def test_unsatisfiable_range_is_416(client, stored):
    p, url = stored
    r = await client.get(url, headers={"Range": f"bytes={len(p.data)}-"})
    await assert_error(r, 416, "range_not_satisfiable")
    assert r.headers["Content-Range"] == f"bytes */{len(p.data)}"


async def test_head_etag_and_headers(client, stored):
    p, url = stored
    r = await client.head(url)
    assert r.status == 200
    assert r.headers["Content-Length"] == str(len(p.data))
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    cd = r.headers["Content-Disposition"]
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.txt" in cd
    assert cd.startswith('attachment; filename="r_sum_ _final_.txt";') or cd.startswith(
        'inline; filename="r_sum_ _final_.txt";'
    )
    assert await r.read() == b""
    r = await client.get(url, headers={"If-None-Match": r.headers["ETag"]})
    assert r.status == 304 and await r.read() == b""


async def test_content_type_from_url_ext_then_stored_ext(client, stored):
    p, _ = stored
    r = await client.get(f"/v1/files/{p.digest}.png")
    assert r.headers["Content-Type"] == "image/png"
    r = await client.get(f"/v1/files/{p.digest}")
    assert r.headers["Content-Type"].startswith("text/plain")


async def test_unknown_file_is_404(client):
    await assert_error(await client.get("/v1/files/" + "0" * 32 + ".bin"), 404, "not_found")


# ---- refusals: one test per failure mode, each changes nothing -------------------------


@pytest.fixture
async def pending(client):
    p = prepare(rand(3 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    return p, hs["upload_id"]


async def test_digest_mismatch_stores_nothing(client, pending, settings):
    p, uid = pending
    before = snapshot(settings.data_dir)
    wrong = bytearray(p.chunks[p.order[0]])
    wrong[100] ^= 1
    r = await client.put(f"/v1/uploads/{uid}/chunks/{p.order[0]}", data=bytes(wrong))
    await assert_error(r, 422, "digest_mismatch")
    assert snapshot(settings.data_dir) == before


async def test_size_mismatch_stores_nothing(client, pending, settings):
    p, uid = pending
    before = snapshot(settings.data_dir)
    r = await client.put(f"/v1/uploads/{uid}/chunks/{p.order[0]}", data=p.chunks[p.order[0]][:-1])
    await assert_error(r, 422, "size_mismatch")

    async def longer():  # no Content-Length: caught while streaming
        yield p.chunks[p.order[0]]
        yield b"extra"

    r = await client.put(f"/v1/uploads/{uid}/chunks/{p.order[0]}", data=longer())
    await assert_error(r, 422, "size_mismatch")
    assert snapshot(settings.data_dir) == before


async def test_chunk_not_in_manifest(client, pending, settings):
    _p, uid = pending
    before = snapshot(settings.data_dir)
    other = rand(100)
    r = await client.put(f"/v1/uploads/{uid}/chunks/{hashlib.md5(other).hexdigest()}", data=other)
    await assert_error(r, 409, "not_in_manifest")
    assert snapshot(settings.data_dir) == before


async def test_incomplete_merge_lists_missing(client, pending, settings):
    p, uid = pending
    await put(client, uid, p.order[1], p.chunks[p.order[1]], 201)
    before = snapshot(settings.data_dir)
    body = await assert_error(await client.post(f"/v1/uploads/{uid}/merge"), 409, "incomplete")
    assert body["missing"] == [p.order[0], p.order[2]]
    assert snapshot(settings.data_dir) == before


async def test_lying_file_digest_registers_nothing_ever(client):
    real = prepare(rand(2 * CHUNK), CHUNK)
    claimed = hashlib.md5(b"something else entirely").hexdigest()
    lie = dict(real.handshake, md5=claimed)
    hs = await handshake(client, lie)
    for d in real.order:
        await put(client, hs["upload_id"], d, real.chunks[d], 201)
    body = await assert_error(
        await client.post(f"/v1/uploads/{hs['upload_id']}/merge"), 422, "file_digest_mismatch"
    )
    assert claimed in body["message"]
    await assert_error(await client.get(f"/v1/uploads/{hs['upload_id']}"), 404, "not_found")
    await assert_error(await client.post(f"/v1/uploads/{hs['upload_id']}/merge"), 404, "not_found")
    await assert_error(await client.get(f"/v1/files/{claimed}"), 404, "not_found")
    again = await handshake(client, lie)
    assert again["status"] == "pending"
    r = await client.post(f"/v1/uploads/{again['upload_id']}/merge")
    await assert_error(r, 422, "file_digest_mismatch")
    assert (await handshake(client, lie))["status"] == "pending"


@pytest.mark.parametrize("ext", ["mp4", ".", ".a/b", "./..", ".x" * 9, ".tar.gz", ".m p4", 5, ".é"])
async def test_bad_ext_is_400(client, settings, ext):
    p = prepare(rand(CHUNK), CHUNK)
    before = snapshot(settings.data_dir)
    r = await client.post("/v1/handshake", json=dict(p.handshake, ext=ext))
    await assert_error(r, 400, "bad_request")
    assert snapshot(settings.data_dir) == before


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/..%2F..%2Fcatalog.sqlite",
        "/v1/files/%2e%2e",
        "/v1/files/" + "a" * 32 + ".%2e%2e%2fcatalog",
        "/v1/files/" + "g" * 32,
        "/v1/files/" + "a" * 31,
    ],
)
async def test_traversal_in_file_paths_is_400(client, path):
    await assert_error(await raw(client, "GET", path), 400, "bad_request")


async def test_traversal_in_chunk_digest_is_400(client, pending, settings):
    p, uid = pending
    before = snapshot(settings.data_dir)
    for bad in ["..%2F..%2Fcatalog.sqlite", "%2e%2e", "x" * 32, p.order[0] + "00"]:
        r = await raw(client, "PUT", f"/v1/uploads/{uid}/chunks/{bad}", data=b"x")
        await assert_error(r, 400, "bad_request")
    r = await raw(client, "PUT", f"/v1/uploads/..%2F..%2Fx/chunks/{p.order[0]}", data=b"x")
    await assert_error(r, 404, "not_found")
    assert snapshot(settings.data_dir) == before


@pytest.mark.parametrize(
    "change",
    [
        {"size": 1},  # sizes do not add up
        {"size": -1},
        {"size": "12"},
        {"size": True},
        {"md5": "xyz"},
        {"md5": None},
        {"algo": "sha1"},
        {"chunks": "nope"},
        {"chunks": [{"md5": "0" * 32}]},
        {"chunks": [{"md5": "0" * 32, "size": 0}]},
        {"chunks": [{"md5": "0" * 32, "size": 5}, {"md5": "0" * 32, "size": 6}], "size": 11},
        {"chunks": [{"sha256": "0" * 64, "size": 5}], "size": 5},
        {"name": "x" * 256},
        {"name": 7},
    ],
)
async def test_bad_handshake_fields_are_400(client, settings, change):
    p = prepare(rand(CHUNK), CHUNK)
    before = snapshot(settings.data_dir)
    r = await client.post("/v1/handshake", json={**p.handshake, **change})
    await assert_error(r, 400, "bad_request")
    assert snapshot(settings.data_dir) == before


@pytest.mark.parametrize("body", [b"{not json", b"[]", b"", b"\xff\xfe", b'"md5"'])
async def test_malformed_json_is_400(client, body):
    r = await client.post("/v1/handshake", data=body, headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "bad_request")


async def test_missing_required_fields_are_400(client):
    for drop in ("md5", "size", "chunks"):
        hs = prepare(rand(10), CHUNK).handshake
        del hs[drop]
        await assert_error(await client.post("/v1/handshake", json=hs), 400, "bad_request")


async def test_over_limit_chunk(aiohttp_client, settings, clock):
    client = await make_client(aiohttp_client, settings, clock, max_chunk_size=1000)
    big = prepare(rand(2000), 2000)
    r = await client.post("/v1/handshake", json=big.handshake)
    await assert_error(r, 413, "too_large")
    ok = prepare(rand(1000), 1000)
    hs = await handshake(client, ok.handshake)
    before = snapshot(settings.data_dir)
    r = await client.put(f"/v1/uploads/{hs['upload_id']}/chunks/{ok.order[0]}", data=rand(5000))
    await assert_error(r, 413, "too_large")

    async def streamed():  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield rand(1000)

    r = await client.put(f"/v1/uploads/{hs['upload_id']}/chunks/{ok.order[0]}", data=streamed())
    assert r.status in (413, 422)
    await assert_error(r, r.status, "too_large" if r.status == 413 else "size_mismatch")
    assert snapshot(settings.data_dir) == before


async def test_too_many_chunks_and_too_large_handshake(aiohttp_client, settings, clock):
    client = await make_client(
        aiohttp_client, settings, clock, max_chunks=3, max_handshake_bytes=4096
    )
    p = prepare(rand(4 * 100), 100)
    await assert_error(await client.post("/v1/handshake", json=p.handshake), 413, "too_large")
    p = prepare(rand(60 * 10), 10)
    r = await client.post(
        "/v1/handshake", data=json.dumps(p.handshake), headers={"Content-Type": "application/json"}
    )
    await assert_error(r, 413, "too_large")


async def test_unknown_upload_is_404_everywhere(client):
    uid = "0" * 32
    d = hashlib.md5(b"x").hexdigest()
    await assert_error(await client.get(f"/v1/uploads/{uid}"), 404, "not_found")
    await assert_error(
        await client.put(f"/v1/uploads/{uid}/chunks/{d}", data=b"x"), 404, "not_found"
    )
    await assert_error(await client.post(f"/v1/uploads/{uid}/merge"), 404, "not_found")
    await assert_error(await client.delete(f"/v1/uploads/{uid}"), 404, "not_found")
    await assert_error(await client.get("/v1/uploads/not-an-id"), 404, "not_found")


async def test_expired_upload_is_404_and_handshake_starts_over(client, clock, settings):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    await put(client, hs["upload_id"], p.order[0], p.chunks[p.order[0]], 201)
    clock.now += settings.upload_ttl + 1
    uid = hs["upload_id"]
    await assert_error(await client.get(f"/v1/uploads/{uid}"), 404, "not_found")
    r = await client.put(f"/v1/uploads/{uid}/chunks/{p.order[1]}", data=p.chunks[p.order[1]])
    await assert_error(r, 404, "not_found")
    await assert_error(await client.post(f"/v1/uploads/{uid}/merge"), 404, "not_found")
    fresh = await handshake(client, p.handshake)
    assert fresh["upload_id"] != uid
    assert fresh["missing"] == p.order[1:]


async def test_unknown_route_and_method_are_json(client):
    await assert_error(await client.get("/v1/nope"), 404, "not_found")
    r = await client.put("/healthz")
    await assert_error(r, 405, "method_not_allowed")


async def test_full_disk_answers_507_and_keeps_nothing(client, pending, settings, monkeypatch):
    p, uid = pending
    before = snapshot(settings.data_dir)
    real_write = TempBlob.write

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TempBlob, "write", write)
    r = await client.put(f"/v1/uploads/{uid}/chunks/{p.order[0]}", data=p.chunks[p.order[0]])
    await assert_error(r, 507, "insufficient_storage")
    assert snapshot(settings.data_dir) == before
    monkeypatch.setattr(TempBlob, "write", real_write)
    await put(client, uid, p.order[0], p.chunks[p.order[0]], 201)


async def test_client_disconnect_mid_chunk_leaves_nothing(aiohttp_server, settings, clock):
    server = await aiohttp_server(create_app(settings, clock=clock))
    p = prepare(rand(4 * CHUNK), 4 * CHUNK)
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.post(server.make_url("/v1/handshake"), json=p.handshake) as r,
    ):
        uid = (await r.json())["upload_id"]
    before = snapshot(settings.data_dir)
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    d = p.order[0]
    writer.write(
        f"PUT /v1/uploads/{uid}/chunks/{d} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {4 * CHUNK}\r\n\r\n".encode()
        + p.chunks[d][: 2 * CHUNK]
    )
    await writer.drain()
    # Wait until the server has a temp file open for this body, then hang up mid-body.
    for _ in range(500):
        if temp_files(settings.data_dir):
            break
        await asyncio.sleep(0.01)
    assert temp_files(settings.data_dir), "the server never started receiving"
    writer.close()
    for _ in range(500):
        if not temp_files(settings.data_dir):
            break
        await asyncio.sleep(0.01)
    assert snapshot(settings.data_dir) == before


async def test_token_auth(aiohttp_client, settings, clock):
    client = await make_client(aiohttp_client, settings, clock, token="s3cret", admin_token="adm")
    p = prepare(rand(100), CHUNK)
    await assert_error(await client.post("/v1/handshake", json=p.handshake), 401, "unauthorized")
    r = await client.post(
        "/v1/handshake", json=p.handshake, headers={"Authorization": "Bearer wrong"}
    )
    await assert_error(r, 401, "unauthorized")
    auth = {"Authorization": "Bearer s3cret"}
    hs = await (await client.post("/v1/handshake", json=p.handshake, headers=auth)).json()
    r = await client.put(
        f"/v1/uploads/{hs['upload_id']}/chunks/{p.order[0]}",
        data=p.chunks[p.order[0]],
        headers=auth,
    )
    assert r.status == 201
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge", headers=auth)
    assert r.status == 200
    r = await client.delete(f"/v1/files/{p.digest}", headers=auth)
    await assert_error(r, 401, "unauthorized")
    r = await client.delete(f"/v1/files/{p.digest}", headers={"Authorization": "Bearer adm"})
    assert r.status == 204
    assert (await client.get("/healthz")).status == 200


async def test_slow_hashing_does_not_block_other_requests(client, monkeypatch):
    """While a worker thread hashes a chunk, the event loop keeps answering."""
    import casd.digest

    p = prepare(rand(2 * CHUNK), 2 * CHUNK)
    hs = await handshake(client, p.handshake)
    gate = __import__("threading").Event()
    inside = __import__("threading").Event()
    real = casd.digest.ChunkHasher.update

    def update(self, data):
        inside.set()
        gate.wait(10)
        return real(self, data)

    monkeypatch.setattr(casd.digest.ChunkHasher, "update", update)
    d = p.order[0]
    put_task = asyncio.ensure_future(
        client.put(f"/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d])
    )
    for _ in range(2000):
        if inside.is_set():
            break
        await asyncio.sleep(0.005)
    assert inside.is_set()
    t0 = time.monotonic()
    r = await client.get("/healthz")
    assert r.status == 200
    assert not put_task.done()
    gate.set()
    r = await put_task
    assert r.status == 201
    assert time.monotonic() - t0 < 10


async def test_download_with_a_vanished_blob_is_cut_not_hung(client, settings):
    """Headers are out when the blob turns out missing: the body must end short, at once."""
    import aiohttp

    p = prepare(rand(3 * CHUNK), CHUNK)
    done = await upload(client, "", p)
    victim = next(b for b in blob_files(settings.data_dir) if b.name == p.order[1])
    victim.unlink()
    r = await client.get(done["url"])
    assert r.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(r.read(), 10)


async def test_late_chunk_does_not_revive_an_expired_upload(client, clock, settings):
    p = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    d = p.order[0]

    async def body():
        yield p.chunks[d][:10]
        clock.now += settings.upload_ttl + 1  # the upload expires while the body streams
        yield p.chunks[d][10:]

    r = await client.put(
        f"/v1/uploads/{hs['upload_id']}/chunks/{d}",
        data=body(),
        headers={"Content-Length": str(CHUNK)},
    )
    assert r.status in (201, 404)
    await assert_error(await client.get(f"/v1/uploads/{hs['upload_id']}"), 404, "not_found")


async def test_a_temp_file_being_received_is_marked_busy(client, pending, settings):
    """gc and fsck (other processes) tell a chunk in flight from a leftover by its flock."""
    from casd.blobstore import open_blobstore

    p, uid = pending
    d = p.order[0]
    release = asyncio.Event()

    async def body():
        yield p.chunks[d][:100]
        await asyncio.wait_for(release.wait(), 10)
        yield p.chunks[d][100:]

    task = asyncio.ensure_future(
        client.put(
            f"/v1/uploads/{uid}/chunks/{d}", data=body(), headers={"Content-Length": str(CHUNK)}
        )
    )
    store = open_blobstore(None, settings.data_dir)
    # The temp file is created, then locked: a scan may fall between the two (gc and fsck
    # leave a temp younger than their grace period alone anyway), so wait for the lock.
    for _ in range(500):
        temps = list(store.temp_files())
        if temps and temps[0].busy:
            break
        await asyncio.sleep(0.01)
    assert [t.busy for t in temps] == [True]
    leftover = settings.tmp_dir / "blob-leftover.part"
    leftover.write_bytes(b"x")
    assert {t.path.name: t.busy for t in store.temp_files()}[leftover.name] is False
    release.set()
    assert (await task).status == 201


async def test_prefer_return_minimal_skips_the_missing_list(client):
    p = prepare(rand(3 * CHUNK), CHUNK)
    hs = await handshake(client, p.handshake)
    for d in p.order:
        r = await client.put(
            f"/v1/uploads/{hs['upload_id']}/chunks/{d}",
            data=p.chunks[d],
            headers={"Prefer": "return=minimal"},
        )
        assert r.status == 201
        assert await r.json() == {"stored": True}
        assert r.headers["Preference-Applied"] == "return=minimal"
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200
    assert await (await client.get(f"/v1/files/{p.digest}")).read() == p.data


@pytest.mark.parametrize("mode", ["collected_before_commit", "no_hard_links"])
async def test_chunk_is_stored_when_its_link_is_lost_before_the_commit(
    client, pending, settings, monkeypatch, mode
):
    """The row is written under the write lock only once the blob file is really there."""
    from casd.blobstore import LocalBlobStore

    p, uid = pending
    real_place = LocalBlobStore.place

    def place(self, temp, digest):
        if mode == "no_hard_links":
            return False
        placed = real_place(self, temp, digest)
        self.path(digest).unlink()  # what a gc finishing its retirement of this digest does
        return placed

    monkeypatch.setattr(LocalBlobStore, "place", place)
    d = p.order[0]
    await put(client, uid, d, p.chunks[d], 201)
    blob = next(b for b in blob_files(settings.data_dir) if b.name == d)
    assert blob.read_bytes() == p.chunks[d]
    assert temp_files(settings.data_dir) == []
