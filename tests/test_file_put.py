"""Protocol v1.1, one-request uploads (docs/PROTOCOL.md): `PUT /v1/files/{digest}[.ext]`
stores a file of at most one chunk with the checks of a handshake, a chunk PUT and a merge.
In process for every rule and the hostile cases, the Python client against a server with and
without it, and one real daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import sqlite3

import pytest
from aiohttp import web
from test_ops_hooks import Receiver, metric, until

from casd.blobstore.local import TempBlob
from casd.client import CasdClient
from casd.tenants import Role, add_token
from casd.web import create_app
from helpers import blob_files, rand, record_durability, snapshot

KiB = 1024
CHUNK = 64 * KiB


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def answer(r) -> tuple[int, dict]:
    return r.status, json.loads(await r.read())


def complete(digest: str, size: int, ext: str = "", algo: str = "md5") -> dict:
    """What a merge answers for this file."""
    return {
        "status": "complete",
        "algo": algo,
        algo: digest,
        "size": size,
        "url": f"/v1/files/{digest}{ext}",
    }


async def test_one_put_stores_the_file_as_a_merge_would(client, settings):
    data = rand(CHUNK, seed=1)
    d = md5(data)
    status, body = await answer(await client.put(f"/v1/files/{d}.BIN?name=a.bin", data=data))
    assert (status, body) == (201, complete(d, CHUNK, ".bin"))
    r = await client.get(body["url"])
    assert r.status == 200 and await r.read() == data
    assert 'filename="a.bin"' in r.headers["Content-Disposition"]
    # A v1 handshake now finds it complete, and its manifest is one chunk.
    hs = {"md5": d, "size": CHUNK, "chunks": [{"md5": d, "size": CHUNK}]}
    status, body = await answer(await client.post("/v1/handshake", json=hs))
    assert (status, body["status"]) == (200, "complete")
    r = await client.get(f"/v1/files/{d}/chunks")
    assert (await r.json())["chunks"] == [
        {"digest": d, "size": CHUNK, "offset": 0, "xxh3": (await r.json())["chunks"][0]["xxh3"]}
    ]
    assert len(blob_files(settings.data_dir)) == 1


async def test_a_file_complete_already_answers_200_and_reads_no_body(client, settings):
    data = rand(1000, seed=2)
    d = md5(data)
    assert (await client.put(f"/v1/files/{d}", data=data)).status == 201
    before = snapshot(settings.data_dir)
    # The body is not even looked at: nothing can be stored from it.
    status, body = await answer(await client.put(f"/v1/files/{d}.txt", data=b"z" * 1000))
    assert (status, body) == (200, complete(d, 1000, ".txt"))
    assert snapshot(settings.data_dir) == before


async def test_a_chunk_stored_by_a_v1_upload_is_reused(client, settings):
    data = rand(CHUNK, seed=3)
    d = md5(data)
    # A two-chunk file that has `data` as its first chunk.
    tail = rand(10, seed=4)
    whole = data + tail
    hs = {
        "md5": md5(whole),
        "size": len(whole),
        "chunks": [{"md5": d, "size": CHUNK}, {"md5": md5(tail), "size": 10}],
    }
    up = await (await client.post("/v1/handshake", json=hs)).json()
    assert (await client.put(f"/v1/uploads/{up['upload_id']}/chunks/{d}", data=data)).status == 201
    status, body = await answer(await client.put(f"/v1/files/{d}", data=data))
    assert (status, body) == (201, complete(d, CHUNK))
    assert (await (await client.get(f"/v1/files/{d}")).read()) == data
    assert len(blob_files(settings.data_dir)) == 1


async def test_good_bytes_replace_a_stored_chunk_that_went_bad(client, settings):
    """The chunk is stored (by another file) but its blob rotted: a one-request PUT of it
    verifies the bytes, finds the blob wrong, and puts them in its place."""
    data, tail = rand(CHUNK, seed=5), rand(10, seed=6)
    whole = data + tail
    d = md5(data)
    hs = {
        "md5": md5(whole),
        "size": len(whole),
        "chunks": [{"md5": d, "size": CHUNK}, {"md5": md5(tail), "size": 10}],
    }
    up = await (await client.post("/v1/handshake", json=hs)).json()
    for digest, body in ((d, data), (md5(tail), tail)):
        r = await client.put(f"/v1/uploads/{up['upload_id']}/chunks/{digest}", data=body)
        assert r.status == 201
    assert (await client.post(f"/v1/uploads/{up['upload_id']}/merge")).status == 200
    (blob,) = [p for p in blob_files(settings.data_dir) if p.name == d]
    rotten = bytearray(data)
    rotten[5] ^= 1
    blob.write_bytes(bytes(rotten))
    status, body = await answer(await client.put(f"/v1/files/{d}", data=data))
    assert (status, body) == (201, complete(d, CHUNK))
    assert blob.read_bytes() == data
    assert (await (await client.get(f"/v1/files/{md5(whole)}")).read()) == whole


async def test_sha256_and_the_empty_file(client):
    data = rand(5000, seed=5)
    d = hashlib.sha256(data).hexdigest()
    status, body = await answer(await client.put(f"/v1/files/{d}.dat", data=data))
    assert (status, body) == (201, complete(d, 5000, ".dat", "sha256"))
    assert await (await client.get(body["url"])).read() == data
    empty = md5(b"")
    status, body = await answer(await client.put(f"/v1/files/{empty}", data=b""))
    assert (status, body) == (201, complete(empty, 0))
    r = await client.get(f"/v1/files/{empty}")
    assert r.status == 200 and await r.read() == b""


async def test_ext_comes_from_the_url_else_from_the_name(client):
    for i, (target, ext) in enumerate(
        [("{d}?name=photo.JPG", ".jpg"), ("{d}", ""), ("{d}.png?name=x.jpg", ".png")]
    ):
        data = rand(100, seed=10 + i)
        d = md5(data)
        status, body = await answer(await client.put("/v1/files/" + target.format(d=d), data=data))
        assert (status, body["url"]) == (201, f"/v1/files/{d}{ext}")


@pytest.mark.parametrize(
    "target,code",
    [
        ("{d}.toolongtobeanextension", "bad_request"),
        ("{d}.a.b", "bad_request"),
        ("{d}.b%20n", "bad_request"),
        ("nothex", "bad_request"),
        ("{d}?name=" + "n" * 256, "bad_request"),
        ("{d}?size=-1", "bad_request"),
        ("{d}?size=1e3", "bad_request"),
    ],
)
async def test_bad_input_is_400_and_changes_nothing(client, settings, target, code):
    data = rand(100, seed=20)
    before = snapshot(settings.data_dir)
    status, body = await answer(
        await client.put("/v1/files/" + target.format(d=md5(data)), data=data)
    )
    assert (status, body["error"]) == (400, code), body
    assert snapshot(settings.data_dir) == before


async def test_a_wrong_digest_is_422_and_stores_nothing(client, settings):
    data = rand(CHUNK, seed=21)
    other = md5(rand(CHUNK, seed=22))
    before = snapshot(settings.data_dir)
    status, body = await answer(await client.put(f"/v1/files/{other}", data=data))
    assert (status, body["error"]) == (422, "digest_mismatch")
    assert snapshot(settings.data_dir) == before
    assert blob_files(settings.data_dir) == []
    assert (await client.get(f"/v1/files/{other}")).status == 404
    # Nor does the empty body register anything under a digest it does not have.
    status, body = await answer(await client.put(f"/v1/files/{other}", data=b""))
    assert (status, body["error"]) == (422, "digest_mismatch")
    assert snapshot(settings.data_dir) == before


async def test_a_wrong_size_is_422_and_stores_nothing(client, settings):
    data = rand(1000, seed=23)
    d = md5(data)
    before = snapshot(settings.data_dir)
    # The size claimed and Content-Length disagree: refused before the body is read.
    status, body = await answer(await client.put(f"/v1/files/{d}?size=999", data=data))
    assert (status, body["error"]) == (422, "size_mismatch")

    async def chunked(payload: bytes):
        yield payload  # no Content-Length: the size comes from ?size=

    for claimed in (999, 1001):
        r = await client.put(f"/v1/files/{d}?size={claimed}", data=chunked(data))
        status, body = await answer(r)
        assert (status, body["error"]) == (422, "size_mismatch"), body
    assert snapshot(settings.data_dir) == before
    status, body = await answer(await client.put(f"/v1/files/{d}", data=chunked(data)))
    assert (status, body["error"]) == (400, "bad_request")  # no size at all
    r = await client.put(f"/v1/files/{d}?size=1000", data=chunked(data))
    assert r.status == 201


async def test_over_the_chunk_limit_is_413_before_the_body_is_read(aiohttp_client, settings):
    s = dataclasses.replace(settings, max_chunk_size=CHUNK)
    client = await aiohttp_client(create_app(s))
    never = asyncio.Event()

    async def endless():
        yield b"x" * KiB
        await never.wait()  # the rest never comes: only an early answer ends the request

    r = await asyncio.wait_for(
        client.put(
            f"/v1/files/{md5(b'x')}",
            data=endless(),
            headers={"Content-Length": str(CHUNK + 1)},
        ),
        60,
    )
    status, body = await answer(r)
    assert (status, body["error"]) == (413, "too_large")
    assert blob_files(settings.data_dir) == []
    # A chunked body that turns out too long is cut off at the limit, as a chunk PUT is.
    data = rand(CHUNK + 1, seed=24)

    async def chunked():
        yield data

    status, body = await answer(
        await client.put(f"/v1/files/{md5(data)}?size={CHUNK}", data=chunked())
    )
    assert status in (413, 422) and body["error"] in ("too_large", "size_mismatch")
    assert blob_files(settings.data_dir) == []


async def test_algo_policy_applies(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, algos=("sha256",))))
    data = rand(100, seed=25)
    status, body = await answer(await client.put(f"/v1/files/{md5(data)}", data=data))
    assert (status, body["allowed_algos"]) == (400, ["sha256"])


async def test_full_disk_is_507_and_keeps_nothing(client, settings, monkeypatch):
    data = rand(CHUNK, seed=26)
    before = snapshot(settings.data_dir)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = TempBlob.write
    monkeypatch.setattr(TempBlob, "write", write)
    status, body = await answer(await client.put(f"/v1/files/{md5(data)}", data=data))
    assert (status, body["error"]) == (507, "insufficient_storage")
    assert snapshot(settings.data_dir) == before
    assert blob_files(settings.data_dir) == []
    monkeypatch.setattr(TempBlob, "write", real)
    assert (await client.put(f"/v1/files/{md5(data)}", data=data)).status == 201


async def test_a_stalled_body_is_408_and_keeps_nothing(aiohttp_client, settings):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, body_timeout=0.2)))
    data = rand(CHUNK, seed=27)
    never = asyncio.Event()

    async def stalls():
        yield data[:1000]
        await never.wait()

    r = await asyncio.wait_for(
        client.put(f"/v1/files/{md5(data)}", data=stalls(), headers={"Content-Length": str(CHUNK)}),
        60,
    )
    status, body = await answer(r)
    assert (status, body["error"]) == (408, "request_timeout")
    assert blob_files(settings.data_dir) == []
    assert (await client.get(f"/v1/files/{md5(data)}")).status == 404


async def test_metrics_count_the_upload(client):
    data = rand(100, seed=28)
    assert (await client.put(f"/v1/files/{md5(data)}", data=data)).status == 201
    assert (await client.put(f"/v1/files/{md5(data)}", data=data)).status == 200
    assert await metric(client, 'casd_uploads_total{event="completed"}') == 1
    assert await metric(client, "casd_dedup_skipped_bytes_total") == 100
    put = 'casd_requests_total{method="PUT",route="/v1/files/{name}",status="201"}'
    assert await metric(client, put) == 1
    assert await metric(client, "casd_served_bytes_total") == 0
    assert await metric(client, 'casd_request_duration_seconds_count{operation="file_put"}') == 2


# --- webhooks ---------------------------------------------------------------------------------


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(answer=None) -> Receiver:
        r = Receiver(answer=answer)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


async def test_pre_handshake_hook_decides_as_for_a_handshake(aiohttp_client, settings, receivers):
    def policy(headers, body):
        return (200, b"{}") if json.loads(body)["size"] < 1000 else (403, b'{"message": "no"}')

    recv = receivers(answer=policy)
    client = await aiohttp_client(
        create_app(dataclasses.replace(settings, hook_pre_handshake=recv.url))
    )
    small, big = rand(500, seed=30), rand(5000, seed=31)
    r = await client.put(f"/v1/files/{md5(small)}.txt?name=s.txt", data=small)
    assert r.status == 201
    assert json.loads(recv.requests[0][1]) == {
        "algo": "md5",
        "md5": md5(small),
        "digest": md5(small),
        "size": 500,
        "name": "s.txt",
        "ext": ".txt",
        "chunks": 1,
    }
    before = snapshot(settings.data_dir)
    status, body = await answer(await client.put(f"/v1/files/{md5(big)}", data=big))
    assert (status, body) == (403, {"error": "forbidden", "message": "no"})
    assert snapshot(settings.data_dir) == before


async def test_completed_event_is_queued_with_the_file(aiohttp_client, settings, receivers):
    recv = receivers()
    client = await aiohttp_client(create_app(dataclasses.replace(settings, hook_urls=(recv.url,))))
    data = rand(100, seed=32)
    assert (await client.put(f"/v1/files/{md5(data)}.bin?name=e.bin", data=data)).status == 201
    assert (await client.put(f"/v1/files/{md5(data)}", data=data)).status == 200
    await until(lambda: len(recv.requests) >= 1)
    await asyncio.sleep(0.2)  # a second event, if one were (wrongly) queued, would come now
    events = recv.events()
    assert [(e["event"], e["data"]["digest"]) for e in events] == [("file.completed", md5(data))]
    assert events[0]["data"]["url"] == f"/v1/files/{md5(data)}.bin"
    assert events[0]["data"]["name"] == "e.bin"


# --- tenant mode ------------------------------------------------------------------------------


@dataclasses.dataclass
class Tenants:
    client: object
    settings: object
    tokens: dict[str, str]

    async def put(self, who: str, target: str, data: bytes) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return await answer(await self.client.put(target, data=data, headers=headers))

    async def get(self, who: str, target: str) -> int:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return (await self.client.get(target, headers=headers)).status


@pytest.fixture
async def t(aiohttp_client, settings, tmp_path) -> Tenants:
    path = tmp_path / "tokens"
    tokens = {}
    for name, role, quota in (
        ("alice", Role.UPLOAD, None),
        ("bob", Role.UPLOAD, None),
        ("reader", Role.READ, None),
        ("carol", Role.UPLOAD, 100 * KiB),
    ):
        tokens[name], _ = add_token(path, name, role, quota)
    s = dataclasses.replace(settings, tokens=path)
    return Tenants(await aiohttp_client(create_app(s)), s, tokens)


async def test_tenant_gets_the_same_answer_whoever_stored_the_file(t):
    data = rand(CHUNK, seed=40)
    d = md5(data)
    fresh = rand(CHUNK, seed=41)
    first = await t.put("alice", f"/v1/files/{d}.bin", data)
    assert first == (201, complete(d, CHUNK, ".bin"))
    assert await t.get("bob", f"/v1/files/{d}") == 404
    # Bob's PUT of a file alice stored answers as a file new to the store does.
    assert await t.put("bob", f"/v1/files/{d}.bin", data) == first
    assert await t.put("bob", f"/v1/files/{md5(fresh)}.bin", fresh) == (
        201,
        complete(md5(fresh), CHUNK, ".bin"),
    )
    assert await t.get("bob", f"/v1/files/{d}") == 200
    # Bob now owns it and proved its chunk: a handshake of his finds it complete.
    hs = {"md5": d, "size": CHUNK, "chunks": [{"md5": d, "size": CHUNK}]}
    r = await t.client.post(
        "/v1/handshake", json=hs, headers={"Authorization": f"Bearer {t.tokens['bob']}"}
    )
    assert (await r.json())["status"] == "complete"
    # A file it owns answers at once.
    assert await t.put("alice", f"/v1/files/{d}.bin", b"z" * CHUNK) == (
        200,
        complete(d, CHUNK, ".bin"),
    )


async def test_tenant_must_send_the_right_bytes_for_another_tenants_file(t):
    data = rand(CHUNK, seed=42)
    d = md5(data)
    assert (await t.put("alice", f"/v1/files/{d}", data))[0] == 201
    before = snapshot(t.settings.data_dir)
    wrong = rand(CHUNK, seed=43)
    status, body = await t.put("bob", f"/v1/files/{d}", wrong)
    # Exactly what a digest nobody stored answers.
    status2, body2 = await t.put("bob", f"/v1/files/{md5(rand(CHUNK, seed=44))}", wrong)
    assert (status, body["error"]) == (status2, body2["error"]) == (422, "digest_mismatch")
    assert snapshot(t.settings.data_dir) == before
    assert await t.get("bob", f"/v1/files/{d}") == 404


async def test_read_role_may_not_put(t):
    data = rand(100, seed=45)
    status, body = await t.put("reader", f"/v1/files/{md5(data)}", data)
    assert (status, body["error"]) == (403, "forbidden")


async def test_quota_is_checked_with_the_size_and_nothing_is_kept(t):
    a, b = rand(60 * KiB, seed=46), rand(60 * KiB, seed=47)
    assert (await t.put("carol", f"/v1/files/{md5(a)}", a))[0] == 201
    before = snapshot(t.settings.data_dir)
    status, body = await t.put("carol", f"/v1/files/{md5(b)}", b)
    assert (status, body["error"]) == (413, "quota_exceeded")
    assert (body["quota"], body["usage"]) == (100 * KiB, 60 * KiB)
    assert snapshot(t.settings.data_dir) == before
    assert await t.get("carol", f"/v1/files/{md5(b)}") == 404
    # A file it owns already costs nothing more.
    assert (await t.put("carol", f"/v1/files/{md5(a)}", a))[0] == 200


async def test_quota_race_lets_one_of_two_through(t):
    a, b = rand(60 * KiB, seed=48), rand(60 * KiB, seed=49)
    results = await asyncio.gather(
        t.put("carol", f"/v1/files/{md5(a)}", a), t.put("carol", f"/v1/files/{md5(b)}", b)
    )
    assert sorted(status for status, _ in results) == [201, 413]
    owned = [await t.get("carol", f"/v1/files/{md5(x)}") for x in (a, b)]
    assert sorted(owned) == [200, 404]


# --- the Python client ------------------------------------------------------------------------


class Counting:
    """Requests an in-process server saw, by (method, path prefix)."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def count(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.seen if m == method and p.startswith(prefix))


async def serve(aiohttp_server, settings, *, old: bool = False) -> tuple[str, Counting]:
    """An in-process server that counts requests; `old`: as a v1 server, which has no
    PUT on /v1/files/... (405) and no /v1/capabilities (404)."""
    app = create_app(settings)
    seen = Counting()

    @web.middleware
    async def count(request, handler):
        seen.seen.append((request.method, request.path))
        if old and request.method == "PUT" and request.path.startswith("/v1/files/"):
            return web.json_response(
                {"error": "method_not_allowed", "message": "no"},
                status=405,
                headers={"Allow": "GET,HEAD,DELETE"},
            )
        if old and request.path == "/v1/capabilities":
            return web.json_response({"error": "not_found", "message": "no"}, status=404)
        return await handler(request)

    app.middlewares.append(count)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


@pytest.mark.parametrize("stream_uploads", [False, True])
async def test_client_puts_a_one_chunk_file_in_one_request(
    aiohttp_server, settings, tmp_path, stream_uploads
):
    settings = dataclasses.replace(settings, stream_uploads=stream_uploads)
    url, seen = await serve(aiohttp_server, settings)
    src = tmp_path / "f.bin"
    data = rand(CHUNK, seed=50)
    src.write_bytes(data)
    async with CasdClient(url) as c:
        s = await c.upload(src, chunk_size=CHUNK, use_cache=False)
    assert (s.digest, s.chunks_sent, s.bytes_sent, s.instant) == (md5(data), 1, CHUNK, False)
    assert s.url == f"{url}/v1/files/{md5(data)}.bin"
    assert seen.seen == [("PUT", f"/v1/files/{md5(data)}.bin")]
    async with CasdClient(url) as c:
        again = await c.upload(src, chunk_size=CHUNK, use_cache=False)
        await c.download(again.url, tmp_path / "out")
    assert (again.chunks_sent, again.bytes_sent, again.instant) == (0, 0, True)
    assert (tmp_path / "out").read_bytes() == data


async def test_client_handshakes_with_an_older_server_and_remembers(
    aiohttp_server, settings, tmp_path
):
    url, seen = await serve(aiohttp_server, settings, old=True)
    async with CasdClient(url) as c:
        for i in range(3):
            src = tmp_path / f"f{i}.bin"
            src.write_bytes(rand(1000, seed=51 + i))
            s = await c.upload(src, use_cache=False)
            assert s.chunks_sent == 1
            await c.download(s.url, tmp_path / f"out{i}")
            assert (tmp_path / f"out{i}").read_bytes() == src.read_bytes()
    # One PUT learnt that the server lacks it; every file then went by the handshake.
    assert seen.count("PUT", "/v1/files/") == 1
    assert seen.count("POST", "/v1/handshake") == 3


async def test_client_sends_many_chunk_files_by_handshake(aiohttp_server, settings, tmp_path):
    url, seen = await serve(aiohttp_server, settings)
    src = tmp_path / "f.bin"
    data = rand(3 * CHUNK + 1, seed=55)
    src.write_bytes(data)
    async with CasdClient(url) as c:
        s = await c.upload(src, chunk_size=CHUNK, use_cache=False)
        await c.download(s.url, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    # The server offers v1.1 streamed uploads by default: the file goes that way.
    assert seen.count("PUT", "/v1/files/") == 0 and ("POST", "/v1/uploads") in seen.seen


# --- a real daemon ----------------------------------------------------------------------------


async def test_real_daemon_one_request_per_small_file(daemon, tmp_path):
    files = []
    for i in range(5):
        p = tmp_path / f"f{i}.txt"
        p.write_bytes(rand(CHUNK, seed=60 + i))
        files.append(p)

    async def one(p):
        async with CasdClient(daemon.url) as c:
            return await c.upload(p, use_cache=False)

    summaries = await asyncio.gather(*(one(p) for p in files))
    async with CasdClient(daemon.url) as c:
        for p, s in zip(files, summaries, strict=True):
            assert s.chunks_sent == 1 and s.digest == md5(p.read_bytes())
            await c.download(s.url, tmp_path / (p.name + ".out"))
            assert (tmp_path / (p.name + ".out")).read_bytes() == p.read_bytes()
    log = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    uploads = [
        (e.get("method"), e.get("route"), e.get("status"))
        for e in log
        if e.get("method") in ("PUT", "POST")
    ]
    assert uploads == [("PUT", "/v1/files/{name}", 201)] * 5
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite")
    try:
        assert con.execute("SELECT count(*) FROM files").fetchone()[0] == 5
        assert con.execute("SELECT count(*) FROM uploads").fetchone()[0] == 0
    finally:
        con.close()


async def test_postgres_engine_stores_files_and_tenant_rules_hold(
    aiohttp_client, settings, postgres_url, tmp_path
):
    path = tmp_path / "tokens"
    alice, _ = add_token(path, "alice", Role.UPLOAD, None)
    carol, _ = add_token(path, "carol", Role.UPLOAD, 100 * KiB)
    s = dataclasses.replace(settings, catalog=postgres_url, tokens=path)
    client = await aiohttp_client(create_app(s))

    async def put(token: str, data: bytes, digest: str | None = None) -> tuple[int, dict]:
        r = await client.put(
            f"/v1/files/{digest or md5(data)}.bin",
            data=data,
            headers={"Authorization": f"Bearer {token}"},
        )
        return await answer(r)

    a, b = rand(60 * KiB, seed=70), rand(60 * KiB, seed=71)
    assert await put(alice, a) == (201, complete(md5(a), 60 * KiB, ".bin"))
    assert await put(carol, a) == (201, complete(md5(a), 60 * KiB, ".bin"))
    assert await put(carol, a) == (200, complete(md5(a), 60 * KiB, ".bin"))
    status, body = await put(carol, b)
    assert (status, body["error"]) == (413, "quota_exceeded")
    status, body = await put(alice, b, md5(a + b"x"))
    assert (status, body["error"]) == (422, "digest_mismatch")
    r = await client.get(f"/v1/files/{md5(a)}", headers={"Authorization": f"Bearer {carol}"})
    assert await r.read() == a


# --- durability -------------------------------------------------------------------------------


@pytest.mark.parametrize("quota", [False, True], ids=["placed ahead", "placed under quota"])
async def test_the_blob_is_durable_before_the_commit_that_publishes_the_file(
    aiohttp_client, settings, monkeypatch, tmp_path, quota
):
    """The temp file, the blob's folder and both fan-out folders above it are fsynced before
    the one transaction that records chunk and file commits (docs/design.md)."""
    events = record_durability(monkeypatch)
    headers = {}
    if quota:
        path = tmp_path / "tokens"
        token, _ = add_token(path, "carol", Role.UPLOAD, 1 << 20)
        settings = dataclasses.replace(settings, tokens=path)
        headers = {"Authorization": f"Bearer {token}"}
    client = await aiohttp_client(create_app(settings))
    data = rand(1000, seed=80)
    d = md5(data)
    events.clear()
    r = await client.put(f"/v1/files/{d}", data=data, headers=headers)
    assert r.status == 201, await r.text()
    commit = next(i for i, e in enumerate(events) if e == ("commit", "_store_file"))
    before = events[:commit]
    leaf = settings.data_dir / "blobs" / "md5" / d[:2] / d[2:4]
    assert [e[0] for e in before].count("file") == 1
    for folder in (leaf, leaf.parent, leaf.parent.parent):
        assert ("folder", str(folder)) in before, (folder, events)
    assert (leaf / d).read_bytes() == data
