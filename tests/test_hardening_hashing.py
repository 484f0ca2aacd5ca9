"""Issue 15, items 1 and 2: what one request can make the daemon hash, hold and parse.

Each attack is driven as an outside client would: a manifest repeating one stored chunk
thousands of times (hash amplification), and handshake bodies shaped to blow up a JSON
parser. The daemon must refuse what is over its limits, keep answering others while it does
what is within them, and hold memory in proportion to what a valid request needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from casd.service import Service
from casd.web import create_app
from helpers import prepare, rand, snapshot, upload

MiB = 1024 * 1024


async def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, (await resp.read())[:500]
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and len(body["message"]) > 10
    return body


def repeated(chunk_md5: str, chunk_size: int, times: int, file_md5: str = "0" * 32) -> dict:
    """A handshake listing one chunk `times` times: a small body, a big file."""
    return {
        "md5": file_md5,
        "size": chunk_size * times,
        "chunks": [{"md5": chunk_md5, "size": chunk_size}] * times,
    }


def proc_field(pid: int, name: str, table: str = "status") -> int:
    for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise KeyError(name)


# ---- (a) a file over --max-file-size ----------------------------------------------------


async def test_repeated_chunk_manifest_over_max_file_size_is_413(daemon_factory):
    d = daemon_factory("--max-file-size", "1MiB")
    p = prepare(rand(64 * 1024), 64 * 1024)
    async with aiohttp.ClientSession() as s:
        await upload(s, d.url, p)
        before = snapshot(d.data_dir)
        # 17 x 64 KiB = 1.06 MiB, one byte over would do; the body is a few hundred bytes.
        hs = repeated(p.order[0], 64 * 1024, 17)
        async with s.post(f"{d.url}/v1/handshake", json=hs) as r:
            body = await assert_error(r, 413, "too_large")
        assert str(1 * MiB) in body["message"]
        assert snapshot(d.data_dir) == before
        # At the limit it is accepted (every chunk is there already: nothing missing).
        async with s.post(f"{d.url}/v1/handshake", json=repeated(p.order[0], 64 * 1024, 16)) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["missing"] == []


async def test_max_file_size_flag_is_validated(daemon_factory):
    with pytest.raises(RuntimeError, match="max-file-size"):
        daemon_factory("--max-file-size", "0")


# ---- (b) a huge merge does not starve anyone -------------------------------------------


# Slow: a huge merge; test_api's test_slow_hashing_does_not_block_other_requests stays in the
# fast loop.
@pytest.mark.slow
async def test_huge_merge_leaves_healthz_and_other_uploads_alone(daemon_factory):
    """With one I/O thread and one hash thread, a merge that hashes 2 GiB (one stored 1 MiB
    chunk, 2048 times) runs while /healthz answers and another client uploads and merges."""
    d = daemon_factory("--io-workers", "1", "--hash-workers", "1")
    pid = d.proc.pid
    base = rand(MiB)
    stored = prepare(base, MiB)
    times = 2048
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await upload(s, d.url, stored)
        # The claimed digest is wrong: the daemon learns that only after hashing it all.
        async with s.post(f"{d.url}/v1/handshake", json=repeated(stored.order[0], MiB, times)) as r:
            assert r.status == 200, await r.text()
            hs = await r.json()
        assert hs["missing"] == []

        async def merge():
            async with s.post(f"{d.url}/v1/uploads/{hs['upload_id']}/merge") as r:
                return r.status, await r.json()

        read_before = proc_field(pid, "rchar", "io")
        merging = asyncio.create_task(merge())
        # The merge is under way once the daemon has read 64 MiB more (page-cache reads count).
        deadline = time.monotonic() + 60
        while proc_field(pid, "rchar", "io") - read_before < 64 * MiB:
            assert not merging.done(), merging.result()
            assert time.monotonic() < deadline, "the merge never started hashing"
            await asyncio.sleep(0.01)

        answered_during_merge = 0
        for i in range(3):
            t = time.monotonic()
            async with s.get(f"{d.url}/healthz") as r:
                assert r.status == 200
            health_s = time.monotonic() - t
            health_overlapped = not merging.done()
            t = time.monotonic()
            other = prepare(rand(5000, seed=i), 1000)
            done = await upload(s, d.url, other)
            upload_s = time.monotonic() - t
            assert done["status"] == "complete"
            assert health_s < 2.0, f"/healthz took {health_s:.2f} s during the merge"
            assert upload_s < 5.0, f"a 5 KB upload took {upload_s:.2f} s during the merge"
            if health_overlapped and not merging.done():
                answered_during_merge += 1
        # Proves the overlap: the answers above came while the big merge was still hashing.
        assert answered_during_merge >= 1, "the merge finished before anything was measured"
        status, body = await merging
        assert status == 422 and body["error"] == "file_digest_mismatch", body
        async with s.get(f"{d.url}/v1/files/{'0' * 32}") as r:
            assert r.status == 404


# ---- (c) handshake bodies built to blow up the parser ----------------------------------


async def test_empty_lists_handshake_is_400_with_bounded_memory(daemon_factory):
    """64 MiB of {"chunks":[[],[],...]}: json.loads built 22 million lists (1.7 GB)."""
    d = daemon_factory("--max-handshake-size", "64MiB")
    pid = d.proc.pid
    n = (64 * MiB - 80) // 3
    body = b'{"md5":"' + b"0" * 32 + b'","size":0,"chunks":[' + b"[]," * n + b"[]]}"
    assert len(body) <= 64 * MiB
    before = snapshot(d.data_dir)
    async with aiohttp.ClientSession() as s:
        t = time.monotonic()
        async with s.post(
            f"{d.url}/v1/handshake", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            msg = await assert_error(r, 400, "bad_request")
        took = time.monotonic() - t
        assert "chunks[0]" in msg["message"]
        async with s.get(f"{d.url}/healthz") as r:
            assert r.status == 200
    hwm_mb = proc_field(pid, "VmHWM") / 1024
    # The body itself (64 MiB, held once or twice while read) plus the interpreter; the
    # old parser peaked at 1,700 MB on this body.
    assert hwm_mb < 500, f"peak RSS {hwm_mb:.0f} MB"
    assert took < 30, f"{took:.1f} s to refuse it"
    assert snapshot(d.data_dir) == before


async def test_handshake_over_default_limit_is_413(daemon_factory):
    d = daemon_factory()
    body = b'{"chunks":[' + b"[]," * (25 * MiB // 3) + b"[]]}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{d.url}/v1/handshake", data=body, headers={"Content-Type": "application/json"}
        ) as r,
    ):
        await assert_error(r, 413, "too_large")


async def test_streamed_handshake_over_limit_is_413(aiohttp_client, settings):
    """No Content-Length (chunked): the limit holds while the body is read."""
    settings = dataclasses.replace(settings, max_handshake_bytes=64 * 1024)
    client = await aiohttp_client(create_app(settings))
    before = snapshot(settings.data_dir)

    async def body():
        yield b'{"chunks":['
        for _ in range(100):
            yield b"[]," * 1000

    r = await client.post(
        "/v1/handshake", data=body(), headers={"Content-Type": "application/json"}
    )
    await assert_error(r, 413, "too_large")
    assert snapshot(settings.data_dir) == before
    p = prepare(rand(1000), 100)
    r = await client.post("/v1/handshake", json=p.handshake)
    assert r.status == 200


# Slow: a 200,000-chunk handshake; the 413 over the limit stays in the fast loop.
@pytest.mark.slow
async def test_valid_200k_chunk_sha256_handshake_fits_the_default_limit(aiohttp_client, settings):
    """The default limit is sized from this case: the largest chunks, the longest digests."""
    chunks = [
        {"sha256": hashlib.sha256(i.to_bytes(4, "big")).hexdigest(), "size": 64 * MiB}
        for i in range(200_000)
    ]
    hs = {"algo": "sha256", "sha256": "a" * 64, "size": 200_000 * 64 * MiB, "chunks": chunks}
    body = json.dumps(hs).encode()
    settings = dataclasses.replace(settings, max_file_size=200_000 * 64 * MiB)
    client = await aiohttp_client(create_app(settings))
    r = await client.post("/v1/handshake", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200, (await r.read())[:300]
    assert len((await r.json())["missing"]) == 200_000


# ---- (d) nesting and surrogates --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"chunks":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        # Nested inside a field the parser would otherwise skip.
        b'{"x":'
        + b"[" * 200_000
        + b"]" * 200_000
        + b',"md5":"'
        + b"0" * 32
        + b'","size":0,"chunks":[]}',
        b'{"x":'
        + b'{"a":' * 100_000
        + b"1"
        + b"}" * 100_000
        + b',"md5":"'
        + b"0" * 32
        + b'","size":0,"chunks":[]}',
    ],
    ids=["top", "chunks", "unknown-list", "unknown-object"],
)
async def test_deeply_nested_json_is_400(aiohttp_client, settings, body):
    client = await aiohttp_client(create_app(settings))
    r = await client.post("/v1/handshake", data=body, headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "bad_request")
    async with client.get("/healthz") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "name",
    [b'"\\ud800"', b'"a\\udfffb.bin"', b'"\xed\xa0\x80.bin"'],
    ids=["escaped-high", "escaped-low", "raw-utf8-surrogate"],
)
async def test_lone_surrogate_in_name_is_400(aiohttp_client, settings, name):
    client = await aiohttp_client(create_app(settings))
    before = snapshot(settings.data_dir)
    p = prepare(rand(1000), 1000)
    hs = json.dumps({**p.handshake, "name": "NAME"}).encode().replace(b'"NAME"', name)
    r = await client.post("/v1/handshake", data=hs, headers={"Content-Type": "application/json"})
    await assert_error(r, 400, "bad_request")
    assert snapshot(settings.data_dir) == before
    # A proper astral character (a surrogate pair) is a name like any other.
    hs = json.dumps({**p.handshake, "name": "\U0001f600.bin"}).encode()
    r = await client.post("/v1/handshake", data=hs, headers={"Content-Type": "application/json"})
    assert r.status == 200, await r.text()


# ---- (e) one hash-ahead per upload -----------------------------------------------------


async def test_one_hash_ahead_per_upload_however_many_puts(aiohttp_client, settings, monkeypatch):
    """The first chunk's hash-ahead is held inside its hashing turn while 31 more chunks
    arrive: none of them may start a second one; once released, merge is right."""
    release = threading.Event()
    first_turn = threading.Event()
    real_slice = Service._hash_slice

    async def held_slice(self, state, page, i):
        first_turn.set()
        assert await asyncio.to_thread(release.wait, 60), "never released"
        return await real_slice(self, state, page, i)

    running = 0
    most = 0
    started = 0
    real_ahead = Service._hash_ahead

    async def counted_ahead(self, upload, state):
        nonlocal running, most, started
        started += 1
        running += 1
        most = max(most, running)
        try:
            await real_ahead(self, upload, state)
        finally:
            running -= 1

    monkeypatch.setattr(Service, "_hash_slice", held_slice)
    monkeypatch.setattr(Service, "_hash_ahead", counted_ahead)
    client = await aiohttp_client(create_app(settings))
    p = prepare(rand(32 * 1000), 1000)
    r = await client.post("/v1/handshake", json=p.handshake)
    hs = await r.json()
    uid = hs["upload_id"]
    # The second chunk first: a chunk that arrives in order is hashed as it streams in, so
    # the hash-ahead that the first chunk then starts reads the second one back.
    second, first, *rest = p.order[1], p.order[0], *p.order[2:]
    for digest in (second, first):
        r = await client.put(f"/v1/uploads/{uid}/chunks/{digest}", data=p.chunks[digest])
        assert r.status == 201
    try:
        assert await asyncio.to_thread(first_turn.wait, 30)
        held = started
        for digest in rest:
            r = await client.put(
                f"/v1/uploads/{uid}/chunks/{digest}",
                data=p.chunks[digest],
                headers={"Prefer": "return=minimal"},
            )
            assert r.status == 201
        assert (started, most) == (held, 1)
    finally:
        release.set()
    r = await client.post(f"/v1/uploads/{uid}/merge")
    assert r.status == 200, await r.text()
    assert (await r.json())["md5"] == p.digest
    assert most == 1


# ---- the sliced, paged hash is the file's hash ------------------------------------------


@pytest.mark.parametrize("order", ["in-order", "reversed", "interleaved"])
async def test_sliced_paged_hash_matches_in_any_arrival_order(
    aiohttp_client, settings, monkeypatch, order
):
    """Turns end mid-chunk and pages end mid-manifest (tiny sizes stand in for 4 MiB turns
    and 512-entry pages), while hash-ahead stops at each gap: merge must still be exact."""
    monkeypatch.setattr("casd.service.HASH_SLICE", 1000)
    monkeypatch.setattr("casd.service.MANIFEST_PAGE", 7)
    client = await aiohttp_client(create_app(settings))
    p = prepare(rand(40 * 2500 + 123), 2500)
    r = await client.post("/v1/handshake", json=p.handshake)
    hs = await r.json()
    missing = hs["missing"]
    if order == "reversed":
        missing = missing[::-1]
    elif order == "interleaved":
        missing = missing[::2] + missing[1::2]
    for digest in missing:
        r = await client.put(
            f"/v1/uploads/{hs['upload_id']}/chunks/{digest}", data=p.chunks[digest]
        )
        assert r.status == 201
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    assert r.status == 200, await r.text()
    assert (await r.json())["md5"] == p.digest
    r = await client.get(f"/v1/files/{p.digest}")
    assert await r.read() == p.data


async def test_wrong_claim_over_many_pages_is_422(aiohttp_client, settings, monkeypatch):
    monkeypatch.setattr("casd.service.HASH_SLICE", 1000)
    monkeypatch.setattr("casd.service.MANIFEST_PAGE", 7)
    client = await aiohttp_client(create_app(settings))
    p = prepare(rand(30 * 2500), 2500)
    await upload(client.session, str(client.make_url("")).rstrip("/"), p)
    hs = {**p.handshake, "md5": hashlib.md5(p.data + b"x").hexdigest()}
    r = await client.post("/v1/handshake", json=hs)
    hs = await r.json()
    assert hs["missing"] == []
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    await assert_error(r, 422, "file_digest_mismatch")


# ---- big handshakes are parsed two at a time --------------------------------------------


async def test_big_handshakes_are_parsed_two_at_a_time(aiohttp_client, settings, monkeypatch):
    """Four big handshakes arrive together; parsing is held inside the parser. Two may be in
    it at once, never more, and a small handshake is not queued behind them."""
    import casd.web

    release = threading.Event()
    lock = threading.Lock()
    inside = 0
    most = 0
    real_parse = casd.web.parse_manifest

    def held_parse(body):
        nonlocal inside, most
        if len(body) <= casd.web.THREAD_PARSE_BYTES:
            return real_parse(body)
        with lock:
            inside += 1
            most = max(most, inside)
        try:
            assert release.wait(60), "never released"
            return real_parse(body)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(casd.web, "parse_manifest", held_parse)
    client = await aiohttp_client(create_app(settings))
    bigs = []
    for i in range(4):
        chunks = [
            {"md5": hashlib.md5(b"%d-%d" % (i, j)).hexdigest(), "size": 1} for j in range(6000)
        ]
        body = json.dumps({"md5": "0" * 32, "size": 6000, "chunks": chunks}).encode()
        assert len(body) > casd.web.THREAD_PARSE_BYTES
        bigs.append(body)

    async def post(body):
        r = await client.post(
            "/v1/handshake", data=body, headers={"Content-Type": "application/json"}
        )
        return r.status, await r.json()

    tasks = [asyncio.create_task(post(b)) for b in bigs]
    try:
        deadline = time.monotonic() + 30
        while inside < 2:
            assert time.monotonic() < deadline, "the big handshakes never reached the parser"
            await asyncio.sleep(0.01)
        # Small handshakes go straight through (parsed on the loop, not counted above).
        small = prepare(rand(100), 50)
        r = await client.post("/v1/handshake", json=small.handshake)
        assert r.status == 200
        # The other two bodies have long arrived; they must still wait for a turn.
        await asyncio.sleep(0.5)
        assert (inside, most) == (2, 2)
    finally:
        release.set()
    results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200] * 4
    assert {len(body["missing"]) for _, body in results} == {6000}
    assert most == 2
