"""Tenant mode (docs/tenants.md): one store, deduplicated across tenants, nothing leaked
between them. Most tests run in-process; one starts `casd serve` for SIGHUP and start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casd import cli
from casd.client import CasdClient, CasdHTTPError
from casd.maintenance import Maintenance
from casd.tenants import CHECK_EVERY, Role, TokenFile, TokenTable, add_token
from casd.web import TOKENS, create_app
from helpers import blob_files, casd_serve_run, prepare, rand, snapshot

CHUNK = 64 * 1024
KiB = 1024


@dataclasses.dataclass
class Tenants:
    """An in-process tenant-mode daemon and a token per name: alice, bob (upload), reader
    (read, tenant alice), ops (admin), carol (upload, 300 KiB quota)."""

    client: object
    settings: object
    tokens: dict[str, str]
    path: Path

    def h(self, who: str | None) -> dict:
        return {} if who is None else {"Authorization": f"Bearer {self.tokens[who]}"}

    async def call(self, who, method, path, **kw):
        r = await self.client.request(method, path, headers=self.h(who), **kw)
        body = await r.read()
        return r.status, (json.loads(body) if r.content_type == "application/json" else body)

    async def upload(self, who: str, p) -> dict:
        status, hs = await self.call(who, "POST", "/v1/handshake", json=p.handshake)
        assert status == 200, hs
        if hs["status"] == "complete":
            return hs
        for d in hs["missing"]:
            status, body = await self.call(
                who, "PUT", f"/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
            )
            assert status in (200, 201), body
        status, body = await self.call(who, "POST", f"/v1/uploads/{hs['upload_id']}/merge")
        assert status == 200, body
        return body


def write_tokens(path: Path) -> dict[str, str]:
    tokens = {}
    for name, tenant, role, quota in (
        ("alice", "alice", Role.UPLOAD, None),
        ("bob", "bob", Role.UPLOAD, None),
        ("reader", "alice", Role.READ, None),
        ("ops", "ops", Role.ADMIN, None),
        ("carol", "carol", Role.UPLOAD, 300 * KiB),
    ):
        tokens[name], _ = add_token(path, tenant, role, quota)
    return tokens


@pytest.fixture(params=["sqlite", "postgres"])
def engine_settings(request, settings):
    if request.param == "sqlite":
        return settings
    return dataclasses.replace(settings, catalog=request.getfixturevalue("postgres_url"))


async def _tenants(aiohttp_client, settings, tmp_path) -> Tenants:
    path = tmp_path / "tokens"
    tokens = write_tokens(path)
    s = dataclasses.replace(settings, tokens=path)
    return Tenants(await aiohttp_client(create_app(s)), s, tokens, path)


@pytest.fixture
async def t(aiohttp_client, settings, tmp_path) -> Tenants:
    return await _tenants(aiohttp_client, settings, tmp_path)


def stored_blobs(data_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in blob_files(data_dir)}


async def gc(settings) -> None:
    m = await Maintenance.open(settings)
    try:
        await m.gc(grace=0)
    finally:
        await m.close()


def without(body: dict, digest: str) -> dict:
    """An error body with the digest it names taken out, to compare two 404s."""
    return {k: v.replace(digest, "D") if isinstance(v, str) else v for k, v in body.items()}


# ---- the side channel of issue 10, on both catalogue engines ----------------------------


async def test_side_channel_is_closed_and_storage_still_shared(
    aiohttp_client, engine_settings, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    t = await _tenants(aiohttp_client, engine_settings, tmp_path)
    data_dir = engine_settings.data_dir
    p = prepare(rand(4 * CHUNK + 99), CHUNK, ext=".bin", name="alice.bin")
    done = await t.upload("alice", p)
    assert done["status"] == "complete"
    physical = stored_blobs(data_dir)
    assert len(physical) == 5

    # B learns nothing: pending, every chunk missing; its GET, HEAD and manifest of A's file
    # answer exactly what they answer for a digest nobody stored.
    status, hs = await t.call("bob", "POST", "/v1/handshake", json=p.handshake)
    assert status == 200 and hs["status"] == "pending"
    assert hs["missing"] == p.order
    never = prepare(rand(1000), CHUNK)
    for suffix in ("", ".bin", "/chunks"):
        got = await t.call("bob", "GET", f"/v1/files/{p.digest}{suffix}")
        absent = await t.call("bob", "GET", f"/v1/files/{never.digest}{suffix}")
        assert got[0] == absent[0] == 404
        assert without(got[1], p.digest) == without(absent[1], never.digest)
    r = await t.client.head(f"/v1/files/{p.digest}", headers=t.h("bob"))
    assert r.status == 404

    # B sends the same bytes: each chunk is news to B (201, stored), nothing new is stored.
    for d in hs["missing"]:
        status, body = await t.call(
            "bob", "PUT", f"/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
        )
        assert (status, body["stored"]) == (201, True)
    status, merged = await t.call("bob", "POST", f"/v1/uploads/{hs['upload_id']}/merge")
    assert status == 200 and merged["status"] == "complete"
    assert stored_blobs(data_dir) == physical
    status, again = await t.call("bob", "POST", "/v1/handshake", json=p.handshake)
    assert again["status"] == "complete"

    # A deletes: B still downloads, gc keeps the bytes.
    status, _ = await t.call("alice", "DELETE", f"/v1/files/{p.digest}")
    assert status == 204
    assert (await t.call("alice", "GET", done["url"]))[0] == 404
    await gc(engine_settings)
    assert stored_blobs(data_dir) == physical
    status, body = await t.call("bob", "GET", done["url"])
    assert (status, body) == (200, p.data)

    # B deletes: nobody owns the file, gc frees every byte.
    status, _ = await t.call("bob", "DELETE", f"/v1/files/{p.digest}")
    assert status == 204
    await gc(engine_settings)
    assert stored_blobs(data_dir) == {}

    for token in t.tokens.values():
        assert token not in caplog.text


async def test_another_tenants_file_answers_byte_for_byte_as_an_absent_one(t):
    # Every request naming a file by its digest: status, headers (all but the date and the
    # request id) and body, with the digest written over, as for a digest nobody stored.
    p = prepare(rand(2 * CHUNK + 3), CHUNK, ext=".bin")
    await t.upload("alice", p)
    never = prepare(rand(2 * CHUNK + 3), CHUNK)
    wrong = rand(CHUNK)

    async def answer(method, digest, suffix, headers=(), **kw):
        h = {**t.h("bob"), **dict(headers)}
        r = await t.client.request(method, f"/v1/files/{digest}{suffix}", headers=h, **kw)
        body = (await r.read()).replace(digest.encode(), b"D")
        headers = sorted(
            (k, v.replace(digest, "D"))
            for k, v in r.headers.items()
            if k not in ("Date", "X-Request-ID")
        )
        return r.status, headers, body

    for method, suffix, kw in (
        ("GET", "", {}),
        ("GET", ".bin", {}),
        ("HEAD", "", {}),
        ("HEAD", ".bin", {}),
        ("GET", "/chunks", {}),
        ("HEAD", "/chunks", {}),
        ("GET", "", {"headers": {"If-None-Match": '"*"'}}),
        ("GET", "", {"headers": {"Range": "bytes=0-9"}}),
        ("DELETE", "", {}),
        ("PUT", ".bin", {"data": wrong}),
    ):
        got = await answer(method, p.digest, suffix, **kw)
        absent = await answer(method, never.digest, suffix, **kw)
        assert got == absent, (method, suffix, kw)
        assert got[0] in (404, 422), got
    assert (await t.call("alice", "GET", f"/v1/files/{p.digest}")) == (200, p.data)


async def test_a_tenant_sees_its_own_name_and_a_chunk_it_proved_is_not_missing(t):
    shared = rand(CHUNK)
    pa = prepare(shared + rand(CHUNK), CHUNK, name="a.bin")
    pb = prepare(shared + rand(CHUNK), CHUNK, name="b.bin")
    await t.upload("alice", pa)
    _, hs = await t.call("bob", "POST", "/v1/handshake", json=pb.handshake)
    assert hs["missing"] == pb.order  # the shared chunk too: bob never sent it
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=pb.handshake)
    assert hs["missing"] == pb.order[1:]  # alice holds the shared chunk
    # The same bytes under bob's own name: the first uploader's name never shows.
    pa_bob = prepare(pa.data, CHUNK, name="mine.bin")
    await t.upload("bob", pa_bob)
    r = await t.client.get(f"/v1/files/{pa.digest}", headers=t.h("bob"))
    assert "mine.bin" in r.headers["Content-Disposition"]


async def test_a_download_may_be_cached_for_its_tenant_only(t, aiohttp_client, settings, tmp_path):
    # `public` would let a proxy or CDN in front of casd hand alice's answer to bob's
    # request for the same URL (or to one with no token at all).
    p = prepare(rand(CHUNK), CHUNK, ext=".bin")
    done = await t.upload("alice", p)
    etag = f'"{p.digest}"'
    for method, extra in (("GET", {}), ("HEAD", {}), ("GET", {"If-None-Match": etag})):
        r = await t.client.request(method, done["url"], headers={**t.h("alice"), **extra})
        assert r.status in (200, 304)
        cache = {d.strip() for d in r.headers["Cache-Control"].split(",")}
        assert "private" in cache and "public" not in cache, (method, extra, cache)
        assert "Authorization" in r.headers.getall("Vary", []), (method, extra)
    # Without tenants, a digest's bytes are the same for everyone: shared caches may keep them.
    alone = dataclasses.replace(settings, data_dir=tmp_path / "alone")
    plain = await aiohttp_client(create_app(alone))
    done = await Tenants(plain, alone, {}, t.path).upload(None, p)
    r = await plain.get(done["url"])
    assert r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert "Vary" not in r.headers


async def test_another_tenants_upload_id_is_not_found(t):
    p = prepare(rand(2 * CHUNK), CHUNK)
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=p.handshake)
    uid, d = hs["upload_id"], p.order[0]
    absent = "0" * 32
    for method, path, kw in (
        ("GET", "/v1/uploads/{}", {}),
        ("PUT", f"/v1/uploads/{{}}/chunks/{d}", {"data": p.chunks[d]}),
        ("POST", "/v1/uploads/{}/merge", {}),
        ("DELETE", "/v1/uploads/{}", {}),
    ):
        got = await t.call("bob", method, path.format(uid), **kw)
        ref = await t.call("bob", method, path.format(absent), **kw)
        assert got[0] == ref[0] == 404, (method, path, got)
        assert without(got[1], uid) == without(ref[1], absent)
    # Bob's handshake of the same manifest is an upload of its own, not alice's.
    _, mine = await t.call("bob", "POST", "/v1/handshake", json=p.handshake)
    assert mine["upload_id"] != uid
    status, still = await t.call("alice", "GET", f"/v1/uploads/{uid}")
    assert status == 200 and still["missing"] == p.order


async def test_an_upload_token_cannot_delete_another_tenants_file(t):
    # Bob's DELETE of alice's file is the DELETE of a digest nobody stored, and changes
    # nothing for her: her download, her handshake (complete) and the bytes stay.
    p = prepare(rand(2 * CHUNK + 7), CHUNK, name="a.bin")
    done = await t.upload("alice", p)
    physical = stored_blobs(t.settings.data_dir)
    never = prepare(rand(1000), CHUNK)
    got = await t.call("bob", "DELETE", f"/v1/files/{p.digest}")
    absent = await t.call("bob", "DELETE", f"/v1/files/{never.digest}")
    assert got[0] == absent[0] == 404
    assert without(got[1], p.digest) == without(absent[1], never.digest)
    await gc(t.settings)
    assert await t.call("alice", "GET", done["url"]) == (200, p.data)
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=p.handshake)
    assert hs["status"] == "complete"
    assert stored_blobs(t.settings.data_dir) == physical


async def test_a_tenant_lists_its_own_files_a_page_at_a_time(t, aiohttp_client, settings):
    mine = [prepare(rand(CHUNK + i), CHUNK, ext=".bin", name=f"a{i}.bin") for i in range(3)]
    for p in mine:
        await t.upload("alice", p)
    theirs = prepare(rand(100), CHUNK, name="b.bin")
    await t.upload("bob", theirs)
    await t.upload("bob", prepare(mine[0].data, CHUNK, ext=".dat", name="bob.dat"))
    # Alice's files under her names, in digest order; her read token lists them too.
    status, body = await t.call("alice", "GET", "/v1/files")
    assert status == 200 and body["next"] is None, body
    assert [f["md5"] for f in body["files"]] == sorted(p.digest for p in mine)
    by_digest = {p.digest: p for p in mine}
    for f in body["files"]:
        p = by_digest[f["md5"]]
        name = f"a{mine.index(p)}.bin"
        assert (f["algo"], f["size"], f["name"], f["ext"]) == ("md5", len(p.data), name, ".bin")
        assert f["url"] == f"/v1/files/{p.digest}.bin" and f["created"].endswith("Z")
    assert await t.call("reader", "GET", "/v1/files") == (200, body)
    # Bob sees his two, the shared one under his own name; nothing of alice's.
    status, bobs = await t.call("bob", "GET", "/v1/files")
    assert {(f["md5"], f["name"]) for f in bobs["files"]} == {
        (theirs.digest, "b.bin"),
        (mine[0].digest, "bob.dat"),
    }
    # A page at a time: `next` is the `after` of the next page.
    pages, after = [], ""
    while True:
        status, page = await t.call("alice", "GET", f"/v1/files?limit=2&after={after}")
        assert status == 200, page
        pages.append([f["md5"] for f in page["files"]])
        if page["next"] is None:
            break
        after = page["next"]
    assert pages == [sorted(by_digest)[:2], sorted(by_digest)[2:]]
    # An admin lists every file; a deleted file leaves its owner's list.
    status, every = await t.call("ops", "GET", "/v1/files")
    assert {f["md5"] for f in every["files"]} == {*by_digest, theirs.digest}
    assert (await t.call("alice", "DELETE", f"/v1/files/{mine[0].digest}"))[0] == 204
    _, body = await t.call("alice", "GET", "/v1/files")
    assert [f["md5"] for f in body["files"]] == sorted(d for d in by_digest if d != mine[0].digest)
    # No token, or a bad query.
    assert (await t.client.get("/v1/files")).status == 401
    for query in ("limit=0", "limit=1001", "limit=x", "after=XYZ"):
        status, body = await t.call("alice", "GET", f"/v1/files?{query}")
        assert (status, body["error"]) == (400, "bad_request"), query
    # The served API description has it in tenant mode only.
    _, doc = await t.call("alice", "GET", "/v1/openapi.json")
    assert "/v1/files" in doc["paths"]
    # Without tenants there is no such endpoint, exactly as before.
    plain = await aiohttp_client(create_app(settings))
    r = await plain.get("/v1/files")
    assert r.status == 404 and (await r.json())["message"] == "no such endpoint: /v1/files"
    assert "/v1/files" not in (await (await plain.get("/v1/openapi.json")).json())["paths"]
    _, doc = await t.call("alice", "GET", "/v1/openapi.json")  # and still there for tenants
    assert "/v1/files" in doc["paths"]


# ---- roles ------------------------------------------------------------------------------


async def test_each_role_on_each_endpoint(t):
    p = prepare(rand(2 * CHUNK), CHUNK, ext=".bin")
    await t.upload("alice", p)
    q = prepare(rand(CHUNK), CHUNK)
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=q.handshake)
    uid, d = hs["upload_id"], q.order[0]
    reads = [
        ("GET", f"/v1/files/{p.digest}.bin", {}),
        ("HEAD", f"/v1/files/{p.digest}", {}),
        ("GET", f"/v1/files/{p.digest}/chunks", {}),
        ("GET", "/v1/openapi.json", {}),
    ]
    writes = [
        ("POST", "/v1/handshake", {"json": q.handshake}),
        ("GET", f"/v1/uploads/{uid}", {}),
        ("PUT", f"/v1/uploads/{uid}/chunks/{d}", {"data": q.chunks[d]}),
        ("POST", f"/v1/uploads/{uid}/merge", {}),
        ("DELETE", f"/v1/uploads/{uid}", {}),
        ("DELETE", f"/v1/files/{p.digest}", {}),
    ]
    for method, path, kw in reads + writes:
        for who in (None, "nobody"):
            headers = {} if who is None else {"Authorization": "Bearer not-a-token"}
            r = await t.client.request(method, path, headers=headers, **kw)
            assert r.status == 401, (who, method, path)
            if method != "HEAD":
                assert (await r.json())["error"] == "unauthorized"
    for method, path, kw in reads:
        assert (await t.call("reader", method, path, **kw))[0] == 200, (method, path)
    for method, path, kw in writes:
        status, body = await t.call("reader", method, path, **kw)
        assert status == 403 and body["error"] == "forbidden", (method, path, body)
        assert "read token" in body["message"] and "upload role" in body["message"]
    expected = [200, 200, 201, 200, 404, 204]  # merge done: abort finds no pending upload
    for (method, path, kw), want in zip(writes, expected, strict=True):
        assert (await t.call("alice", method, path, **kw))[0] == want, (method, path)
    # Protocol v1.1's requests are uploads too.
    _, opened = await t.call("alice", "POST", "/v1/uploads", json={"algo": "md5", "size": CHUNK})
    one = rand(100)
    streamed = [
        ("GET", "/v1/capabilities", {}, 200),
        ("POST", "/v1/uploads", {"json": {"algo": "md5", "size": CHUNK}}, 201),
        (
            "POST",
            f"/v1/uploads/{opened['upload_id']}/chunks",
            {"json": {"start": 0, "chunks": [{"md5": q.order[0], "size": CHUNK}]}},
            200,
        ),
        ("PUT", f"/v1/files/{hashlib.md5(one).hexdigest()}", {"data": one}, 201),
    ]
    for method, path, kw, want in streamed:
        assert (await t.client.request(method, path, **kw)).status == 401, (method, path)
        status, body = await t.call("reader", method, path, **kw)
        assert status == 403 and "upload role" in body["message"], (method, path, body)
        assert (await t.call("alice", method, path, **kw))[0] == want, (method, path)
    # What is not /v1 needs no token, as without tenants; /metrics (every tenant's totals)
    # opens only to --metrics-token, which this daemon has not.
    assert (await t.client.get("/healthz")).status == 200
    assert (await t.client.get("/metrics", headers=t.h("ops"))).status == 401


async def test_admin_reads_and_deletes_every_tenants_files(t):
    p = prepare(rand(CHUNK + 5), CHUNK, name="x.bin")
    await t.upload("alice", p)
    await t.upload("bob", prepare(p.data, CHUNK))
    status, body = await t.call("ops", "GET", f"/v1/files/{p.digest}")
    assert (status, body) == (200, p.data)
    assert (await t.call("ops", "DELETE", f"/v1/files/{p.digest}"))[0] == 204
    for who in ("alice", "bob", "ops"):
        assert (await t.call(who, "GET", f"/v1/files/{p.digest}"))[0] == 404
    await gc(t.settings)
    assert stored_blobs(t.settings.data_dir) == {}


async def test_admin_sees_and_aborts_every_tenants_pending_upload(t):
    p = prepare(rand(2 * CHUNK), CHUNK)
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=p.handshake)
    uid = hs["upload_id"]
    await t.call(
        "alice", "PUT", f"/v1/uploads/{uid}/chunks/{p.order[0]}", data=p.chunks[p.order[0]]
    )
    # The status as its owner has it: what alice still has to send.
    status, seen = await t.call("ops", "GET", f"/v1/uploads/{uid}")
    assert status == 200 and seen["missing"] == [p.order[1]], seen
    assert seen == (await t.call("alice", "GET", f"/v1/uploads/{uid}"))[1] | {
        "expires_at": seen["expires_at"]
    }
    # An upload role reaches only its own; an admin may end anyone's.
    assert (await t.call("bob", "DELETE", f"/v1/uploads/{uid}"))[0] == 404
    assert (await t.call("ops", "DELETE", f"/v1/uploads/{uid}"))[0] == 204
    assert (await t.call("alice", "GET", f"/v1/uploads/{uid}"))[0] == 404


async def test_an_admin_upload_is_owned_by_its_own_tenant(t):
    p = prepare(rand(CHUNK), CHUNK)
    await t.upload("ops", p)
    assert (await t.call("alice", "GET", f"/v1/files/{p.digest}"))[0] == 404
    _, hs = await t.call("alice", "POST", "/v1/handshake", json=p.handshake)
    assert hs["status"] == "pending" and hs["missing"] == p.order


# ---- quotas -----------------------------------------------------------------------------


async def test_a_handshake_over_the_quota_is_refused_and_changes_nothing(t):
    await t.upload("carol", prepare(rand(200 * KiB), CHUNK))
    pending = prepare(rand(60 * KiB), CHUNK)
    status, _ = await t.call("carol", "POST", "/v1/handshake", json=pending.handshake)
    assert status == 200
    before = snapshot(t.settings.data_dir)
    status, body = await t.call(
        "carol", "POST", "/v1/handshake", json=prepare(rand(41 * KiB), CHUNK).handshake
    )
    assert status == 413 and body["error"] == "quota_exceeded"
    usage = 260 * KiB  # the file it owns and its pending upload
    assert (body["quota"], body["usage"]) == (300 * KiB, usage)
    assert str(300 * KiB) in body["message"] and str(usage) in body["message"]
    assert snapshot(t.settings.data_dir) == before
    # What fits still goes; resuming the pending upload is never refused.
    assert (await t.call("carol", "POST", "/v1/handshake", json=pending.handshake))[0] == 200
    small = prepare(rand(40 * KiB), CHUNK)
    assert (await t.call("carol", "POST", "/v1/handshake", json=small.handshake))[0] == 200


async def test_racing_handshakes_cannot_both_take_the_last_of_a_quota(t):
    # Each fits alone (200 KiB of 300), not both: sent together, exactly one is recorded.
    for _round in range(3):
        a, b = prepare(rand(200 * KiB), CHUNK), prepare(rand(200 * KiB), CHUNK)
        results = await asyncio.gather(
            t.call("carol", "POST", "/v1/handshake", json=a.handshake),
            t.call("carol", "POST", "/v1/handshake", json=b.handshake),
        )
        assert sorted(s for s, _ in results) == [200, 413], results
        won = next(body for s, body in results if s == 200)
        assert (await t.call("carol", "DELETE", f"/v1/uploads/{won['upload_id']}"))[0] == 204


# ---- the token file ---------------------------------------------------------------------


async def poll(fn, deadline: float = 10.0):
    """Call fn() until it returns something true, at most `deadline` seconds; its answer."""
    end = time.monotonic() + deadline
    while True:
        got = await fn()
        if got or time.monotonic() > end:
            return got
        await asyncio.sleep(0.05)


async def test_the_daemon_picks_up_an_edited_token_file(aiohttp_client, settings, tmp_path, caplog):
    path = tmp_path / "tokens"
    tokens = write_tokens(path)
    now = [0.0]
    app = create_app(dataclasses.replace(settings, tokens=path))
    app[TOKENS] = TokenFile(path, clock=lambda: now[0])  # the daemon's, on a clock we move
    client = await aiohttp_client(app)

    async def status(token: str) -> int:
        h = {"Authorization": f"Bearer {token}"}
        return (await client.get("/v1/openapi.json", headers=h)).status

    new, _ = add_token(path, "dave", Role.UPLOAD, None)
    now[0] += CHECK_EVERY / 2
    assert await status(new) == 401  # looked at most once a second
    now[0] += CHECK_EVERY / 2
    assert await status(new) == 200
    # A broken version keeps the tokens in force, and says so once in the log.
    with path.open("a") as f:
        f.write("sha256:nothex tenant=x role=read\n")
    now[0] += CHECK_EVERY
    assert await status(new) == 200
    assert caplog.text.count("token file not reloaded") == 1
    assert "line 7" in caplog.text  # names the bad line
    now[0] += CHECK_EVERY
    assert await status(tokens["alice"]) == 200
    assert caplog.text.count("token file not reloaded") == 1  # not again until it changes
    # Removing the token (and the bad line) takes it away.
    lines = [ln for ln in path.read_text().splitlines() if "dave" not in ln and "nothex" not in ln]
    path.write_text("\n".join(lines) + "\n")
    now[0] += CHECK_EVERY
    assert await status(new) == 401
    assert await status(tokens["alice"]) == 200


def test_the_token_table_parses_strictly():
    good = "# comment\n\nsha256:" + "a" * 64 + " tenant=t-1 role=upload quota=50GiB  # note\n"
    (entry,) = TokenTable.parse(good).entries
    assert (entry.tenant, entry.role, entry.quota) == ("t-1", Role.UPLOAD, 50 << 30)
    h = "sha256:" + "b" * 64
    for bad, says in (
        (f"{h} tenant=t role=owner", "role"),
        (f"{h} tenant=a/b role=read", "tenant"),
        (f"{h} role=read", "tenant= is missing"),
        (f"{h} tenant=t role=read quota=5GB", "quota"),
        (f"{h} tenant=t role=read colour=red", "unknown field"),
        ("sha256:" + "B" * 64 + " tenant=t role=read", "sha256:"),
        (f"{h} tenant=t role=read\n{h} tenant=u role=read", "same token hash as line 1"),
    ):
        with pytest.raises(ValueError, match=says) as exc:
            TokenTable.parse(bad, "f")
        assert "f line" in str(exc.value)
    token = "s3cret"
    from casd.tenants import token_hash

    table = TokenTable.parse(f"sha256:{token_hash(token)} tenant=t role=read")
    assert table.lookup(token).tenant == "t"
    assert table.lookup("s3cre") is None and table.lookup("") is None


def test_token_add_ls_rm_through_the_cli(tmp_path, capsys):
    path = tmp_path / "tokens"
    args = ["token", "add", "--tokens", str(path), "--tenant", "acme", "--role", "upload"]
    assert cli.main([*args, "--quota", "2GiB"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()  # only its hash is kept
    assert TokenTable.read(path).lookup(token).quota == 2 << 30
    assert cli.main([*args[:-1], "read"]) == 0
    capsys.readouterr()
    assert cli.main(["token", "ls", "--tokens", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tenant"], r["role"], r["quota"]) for r in rows] == [
        ("acme", "upload", 2 << 30),
        ("acme", "read", None),
    ]
    assert cli.main(["token", "ls", "--tokens", str(path)]) == 0
    assert token not in capsys.readouterr().out
    prefix = rows[0]["hash_prefix"]
    assert cli.main(["token", "rm", "--tokens", str(path), prefix]) == 0
    assert TokenTable.read(path).lookup(token) is None
    assert cli.main(["token", "rm", "--tokens", str(path), "--tenant", "acme"]) == 0
    assert TokenTable.read(path).entries == ()
    capsys.readouterr()
    assert cli.main(["token", "rm", "--tokens", str(path), "--tenant", "acme"]) == 1
    with pytest.raises(SystemExit):  # argparse refuses the role
        cli.main([*args[:-1], "root"])
    assert cli.main([*args[:4], "--tenant", "a/b", "--role", "read"]) == 2
    err = capsys.readouterr().err
    assert "tenant 'a/b'" in err and "Traceback" not in err


def test_two_token_adds_at_once_keep_both_tokens(tmp_path, monkeypatch):
    """The first `casd token add` is held between reading the file and writing it back
    while a second runs: the second must wait for it, not write a file without its line."""
    import threading

    from casd import tenants

    path = tmp_path / "tokens"
    add_token(path, "first", Role.READ, None)
    write = tenants.write_atomically
    reached, release = threading.Event(), threading.Event()

    def held_once(p, text):
        if not reached.is_set():
            reached.set()
            assert release.wait(30)
        write(p, text)

    monkeypatch.setattr(tenants, "write_atomically", held_once)
    got: dict[str, str] = {}

    def add(name: str) -> None:
        got[name], _ = add_token(path, name, Role.UPLOAD, None)

    one = threading.Thread(target=add, args=("one",))
    one.start()
    assert reached.wait(30)
    two = threading.Thread(target=add, args=("two",))
    two.start()
    two.join(1.0)  # unlocked, it finishes here (and the test fails); locked, it waits
    release.set()
    one.join(30)
    two.join(30)
    table = TokenTable.read(path)
    assert [e.tenant for e in table.entries] == ["first", "one", "two"]
    assert all(table.lookup(token) is not None for token in got.values())


# ---- admin commands ---------------------------------------------------------------------


async def test_stats_ls_rm_per_tenant(t, capsys):
    p = prepare(rand(3 * CHUNK), CHUNK, name="a.bin")
    await t.upload("alice", p)
    await t.upload("bob", prepare(p.data, CHUNK, name="b.bin"))
    data = ["--data", str(t.settings.data_dir)]
    capsys.readouterr()

    def run(*argv) -> tuple[int, str]:
        code = cli.main(list(argv) + data)
        return code, capsys.readouterr().out

    code, out = await asyncio.to_thread(run, "stats", "--json")
    s = json.loads(out)
    assert s["physical_bytes"] == len(p.data)
    assert (
        s["tenants"]["alice"]["logical_bytes"]
        == s["tenants"]["bob"]["logical_bytes"]
        == len(p.data)
    )
    assert s["tenant_logical_bytes"] == 2 * len(p.data)
    assert s["saved_bytes"] == len(p.data)
    code, out = await asyncio.to_thread(run, "stats")
    assert "tenant alice" in out and "saved by dedup" in out
    code, out = await asyncio.to_thread(run, "stats", "--tenant", "bob", "--json")
    assert json.loads(out)["files"] == 1
    code, out = await asyncio.to_thread(run, "ls", "--tenant", "bob", "--json")
    assert [f["name"] for f in json.loads(out)] == ["b.bin"]
    code, out = await asyncio.to_thread(run, "rm", p.digest, "--tenant", "alice")
    assert code == 0
    assert (await t.call("alice", "GET", f"/v1/files/{p.digest}"))[0] == 404
    assert (await t.call("bob", "GET", f"/v1/files/{p.digest}"))[0] == 200
    code, out = await asyncio.to_thread(run, "ls", "--tenant", "alice", "--json")
    assert json.loads(out) == []


# ---- clients ----------------------------------------------------------------------------


async def test_the_cli_prints_one_line_for_401_403_and_quota(t, tmp_path, capsys):
    big = tmp_path / "big.bin"
    big.write_bytes(rand(400 * KiB))
    base = str(t.client.make_url("/")).rstrip("/")

    def upload(token: str) -> tuple[int, str]:
        code = cli.main(["upload", "--server", base, f"--token={token}", "--no-cache", str(big)])
        return code, capsys.readouterr().err

    for token, says in (
        ("wrong", "unauthorized"),
        (t.tokens["reader"], "forbidden"),
        (t.tokens["carol"], "quota"),
    ):
        code, err = await asyncio.to_thread(upload, token)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1, err
        assert says in lines[0] and "Traceback" not in err
        assert token not in err
    # Downloads: a wrong token, and another tenant's file (as absent as any other).
    p = prepare(rand(CHUNK), CHUNK)
    await t.upload("alice", p)

    def download(token: str) -> tuple[int, str]:
        argv = ["download", "--server", base, f"--token={token}", "-o", str(tmp_path), p.digest]
        code = cli.main(argv)
        return code, capsys.readouterr().err

    for token, says in (("wrong", "unauthorized"), (t.tokens["bob"], "not_found")):
        code, err = await asyncio.to_thread(download, token)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1 and says in lines[0], err
    assert (await asyncio.to_thread(download, t.tokens["reader"]))[0] == 0


# ---- the real daemon: start-up refusals and SIGHUP --------------------------------------


def test_serve_refuses_a_bad_token_file_or_tokens_beside_token(tmp_path):
    env = dict(os.environ, CASD_TOKENS="")
    path = tmp_path / "tokens"
    path.write_text("# ok\nsha256:" + "a" * 64 + " tenant=x role=boss\n")
    r = casd_serve_run("--tokens", str(path), data=tmp_path / "d", env=env)
    assert r.returncode == 2 and "line 2" in r.stderr and "role" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = casd_serve_run("--tokens", str(path), "--check-config", data=tmp_path / "d", env=env)
    assert r.returncode == 2 and "line 2" in r.stderr
    write_tokens(path := tmp_path / "good")
    r = casd_serve_run("--tokens", str(path), "--token", "t", data=tmp_path / "d", env=env)
    assert r.returncode == 2 and "--tokens" in r.stderr and "--token" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


async def test_sighup_reloads_the_token_file_of_a_running_daemon(daemon_factory, tmp_path):
    import aiohttp

    path = tmp_path / "tokens"
    tokens = write_tokens(path)
    d = daemon_factory("--tokens", str(path))
    async with aiohttp.ClientSession() as s:

        async def status(token: str) -> int:
            h = {"Authorization": f"Bearer {token}"}
            async with s.get(f"{d.url}/v1/openapi.json", headers=h) as r:
                return r.status

        assert await status(tokens["alice"]) == 200
        code = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "casd",
                "token",
                "add",
                "--tokens",
                str(path),
                "--tenant",
                "erin",
                "--role",
                "read",
            ],
            capture_output=True,
            text=True,
        )
        erin = code.stdout.strip()
        # No request until the signal: only SIGHUP can make the daemon read the file.
        logged = d.log_path.read_text().count("token file")
        d.proc.send_signal(signal.SIGHUP)

        async def reloaded():
            return d.log_path.read_text().count("token file") > logged

        assert await poll(reloaded), d.log_path.read_text()[-2000:]
        assert await status(erin) == 200
        # Refused tokens are not logged either: one unknown, one whose role falls short.
        wrong = "wrong-" + erin[::-1]
        assert await status(wrong) == 401
        async with s.post(
            f"{d.url}/v1/handshake", json={}, headers={"Authorization": f"Bearer {erin}"}
        ) as r:
            assert r.status == 403
        log = d.log_path.read_text()
        assert "/v1/handshake" in log  # the access log is on, and names the request
        for secret in (erin, wrong, *tokens.values()):
            assert secret not in log


@pytest.mark.parametrize("token", [b"\xff\xfe\xfd", b"s3cret\x80"])
async def test_a_token_that_is_not_utf8_is_a_wrong_token_everywhere(
    daemon_factory, tmp_path, token
):
    # On /v1 (the token file) and on /metrics (its own token in tenant mode) alike: 401.
    path = tmp_path / "tokens"
    write_tokens(path)
    d = daemon_factory("--tokens", str(path), "--metrics-token", "s3cret")
    for method, target in (
        ("GET", "/v1/openapi.json"),
        ("POST", "/v1/handshake"),
        ("GET", "/metrics"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
            "Connection: close\r\n".encode()
            + b"Authorization: Bearer "
            + token
            + b"\r\n\r\n"
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert data.split(b" ", 2)[1] == b"401", (target, data[:300])
        assert b'"unauthorized"' in data
    assert "Traceback" not in d.log_path.read_text()


async def test_racing_quota_checks_on_postgresql_are_serialized(postgres_url):
    """Two daemons' handshakes for one tenant, each past its usage read before either has
    written: held at their first insert by a table lock, they must still take the quota
    once. The test waits (bounded) until both are blocked in the database, then lets go."""
    import asyncpg

    from casd.catalog import open_catalog
    from casd.digest import Algo, Digest
    from casd.models import ChunkRef, Manifest, Tenant

    def m(tag: str) -> Manifest:
        d = Digest(Algo("md5"), hashlib.md5(tag.encode()).hexdigest())
        return Manifest(d, 3, (ChunkRef(hashlib.md5(tag.encode() + b"c").hexdigest(), 3),))

    q = Tenant("q", quota=5)
    one, two = await open_catalog(postgres_url), await open_catalog(postgres_url)
    holder = await asyncpg.connect(postgres_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE manifests IN EXCLUSIVE MODE")
        races = [
            asyncio.ensure_future(c.begin_upload(m(tag), "k", 1.0, 1e12, tag * 32, tenant=q))
            for c, tag in ((one, "a"), (two, "b"))
        ]
        waiting = 0
        for _ in range(400):  # both blocked in the database, within 20 s
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            if waiting >= 2:
                break
            await asyncio.sleep(0.05)
        assert waiting >= 2
        await tx.rollback()
        results = await asyncio.gather(*races, return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded", "tuple"], results
    finally:
        await holder.close()
        await one.close()
        await two.close()


@pytest.mark.parametrize("kind", ["handshake", "batch"])
async def test_racing_quota_checks_on_sqlite_are_serialized(tmp_path, kind):
    """Two handshakes (or two v1.1 digest batches) for one tenant, both queued for the same write transaction of the
    SQLite catalogue before either runs (its writer held busy meanwhile): each fits the
    quota alone, and the one whose check runs second must see the first's upload."""
    import threading

    from casd.catalog import open_catalog
    from casd.digest import Algo, Digest
    from casd.models import ChunkRef, Manifest, StreamLimits, Tenant

    def m(tag: str) -> Manifest:
        d = Digest(Algo("md5"), hashlib.md5(tag.encode()).hexdigest())
        return Manifest(d, 3, (ChunkRef(hashlib.md5(tag.encode() + b"c").hexdigest(), 3),))

    q = Tenant("q", quota=5)
    cat = await open_catalog(tmp_path / "catalog.sqlite", synchronous="NORMAL")
    started, release = threading.Event(), threading.Event()

    def hold(con):
        started.set()
        release.wait(30)

    try:
        streams = {}
        if kind == "batch":  # opened for 3 bytes each; each batch's 3 bytes fit alone
            for tag in ("a", "b"):
                streams[tag] = await cat.begin_stream(
                    Algo.MD5, "", "", 1.0, 1e12, tag * 32, tenant=q, size=3
                )
        writer = cat.writer
        held = asyncio.ensure_future(writer.run(hold))  # type: ignore[attr-defined]
        assert await asyncio.to_thread(started.wait, 30)

        def start(tag: str):
            if kind == "batch":
                chunk = ChunkRef(hashlib.md5(tag.encode()).hexdigest(), 3)
                limits = StreamLimits(max_chunks=100, max_file_size=1000)
                return cat.append_stream(streams[tag].id, 0, [chunk], 1.0, 1e12, limits, tenant=q)
            return cat.begin_upload(m(tag), "k", 1.0, 1e12, tag * 32, tenant=q)

        races = [asyncio.ensure_future(start(tag)) for tag in ("a", "b")]
        for _ in range(400):  # both queued behind the held transaction, within 20 s
            if writer.depth >= 2:
                break
            await asyncio.sleep(0.05)
        assert writer.depth >= 2
        release.set()
        await held
        results = await asyncio.gather(*races, return_exceptions=True)
        assert [type(r).__name__ for r in results].count("QuotaExceeded") == 1, results
        assert sum(isinstance(r, Exception) for r in results) == 1, results
    finally:
        release.set()
        await cat.close()


def test_the_upload_page_says_what_to_do_after_401_403_and_quota():
    """casd.js carries the server's code and message (shown as `code: message`); the line
    under it says what would help. Checked with node on the page's own module."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("node is needed for this check in CI")
        pytest.skip("node is not installed")
    hints = Path(__file__).parent.parent / "casd" / "static" / "hints.js"
    script = (
        f"import {{ failureHint }} from {json.dumps(hints.as_uri())};"
        " for (const c of ['unauthorized', 'forbidden', 'quota_exceeded', 'network_error'])"
        " console.log(c + '=' + failureHint(c));"
    )
    out = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    said = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert "token" in said["unauthorized"]
    assert "upload role" in said["forbidden"]
    assert "quota" in said["quota_exceeded"] and "delete" in said["quota_exceeded"]
    assert "retry" in said["network_error"]


async def test_webhook_events_name_the_tenant(aiohttp_client, settings, tmp_path):
    # Nothing listens on the receiver's port: events stay queued in the catalogue, readable.
    s = dataclasses.replace(settings, hook_urls=("http://127.0.0.1:9/hook",))
    t = await _tenants(aiohttp_client, s, tmp_path)
    p = prepare(rand(CHUNK), CHUNK)
    await t.upload("alice", p)
    await t.upload("bob", prepare(p.data, CHUNK))
    assert (await t.call("alice", "DELETE", f"/v1/files/{p.digest}"))[0] == 204
    assert (await t.call("ops", "DELETE", f"/v1/files/{p.digest}"))[0] == 204
    con = sqlite3.connect(s.data_dir / "catalog.sqlite")
    try:
        rows = [json.loads(r[0]) for r in con.execute("SELECT body FROM hook_events ORDER BY id")]
    finally:
        con.close()
    assert [(e["event"], e["data"].get("tenant")) for e in rows] == [
        ("file.completed", "alice"),
        ("file.completed", "bob"),
        ("file.deleted", "alice"),
        ("file.deleted", None),
    ]


async def test_a_tenant_at_its_quota_can_still_heal_a_file_it_owns(t):
    p = prepare(rand(200 * KiB), CHUNK)
    await t.upload("carol", p)
    bad = p.order[1]
    (blob,) = [b for b in blob_files(t.settings.data_dir) if b.name == bad]
    rotten = bytearray(blob.read_bytes())
    rotten[0] ^= 1  # changed whatever the bytes were ("rot" written over them could match)
    blob.write_bytes(rotten)
    m = await Maintenance.open(t.settings)
    try:
        await m.fsck(deep=True, repair=True)
    finally:
        await m.close()
    # 200 KiB owned, 300 KiB quota: a new 200 KiB file would not fit, healing this one does.
    status, hs = await t.call("carol", "POST", "/v1/handshake", json=p.handshake)
    assert status == 200 and hs["missing"] == [bad], hs
    status, _ = await t.call(
        "carol", "PUT", f"/v1/uploads/{hs['upload_id']}/chunks/{bad}", data=p.chunks[bad]
    )
    assert (await t.call("carol", "POST", f"/v1/uploads/{hs['upload_id']}/merge"))[0] == 200
    assert await t.call("carol", "GET", f"/v1/files/{p.digest}") == (200, p.data)


# ---- protocol v1.1 (streamed uploads) in tenant mode ------------------------------------


@pytest.fixture
async def st(aiohttp_client, engine_settings, tmp_path) -> Tenants:
    """Tenant mode offering streamed uploads, on each engine."""
    return await _tenants(
        aiohttp_client, dataclasses.replace(engine_settings, stream_uploads=True), tmp_path
    )


async def stream_open(t: Tenants, who: str, size: int | None) -> tuple[int, dict]:
    body: dict = {"algo": "md5"} if size is None else {"algo": "md5", "size": size}
    return await t.call(who, "POST", "/v1/uploads", json=body)


async def stream_batch(t: Tenants, who: str, upload_id: str, p, start: int = 0):
    chunks = [{"md5": d, "size": len(p.chunks[d])} for d in p.order]
    return await t.call(
        who, "POST", f"/v1/uploads/{upload_id}/chunks", json={"start": start, "chunks": chunks}
    )


async def test_a_streamed_batch_lists_every_chunk_this_tenant_has_not_proved(st):
    status, body = await st.call("bob", "GET", "/v1/capabilities")
    assert status == 200 and body["stream_uploads"] is True and "1.1" in body["versions"]
    p = prepare(rand(3 * CHUNK + 5), CHUNK)
    await st.upload("alice", p)
    # Bob's v1.1 upload of alice's file learns nothing: every chunk is missing, as in v1.
    status, opened = await stream_open(st, "bob", len(p.data))
    assert status == 201, opened
    uid = opened["upload_id"]
    status, body = await stream_batch(st, "bob", uid, p)
    assert status == 200 and body["missing"] == p.order, body
    # Another tenant's upload id is one that never existed.
    assert (await stream_batch(st, "alice", uid, p, start=len(p.order)))[0] == 404
    # Claiming alice's file at merge is no shortcut for him (it is for her, instant).
    claim = {"md5": p.digest, "size": len(p.data)}
    status, body = await st.call("bob", "POST", f"/v1/uploads/{uid}/merge", json=claim)
    assert status == 409 and body["missing"] == p.order, body
    for d in p.order:
        status, body = await st.call(
            "bob", "PUT", f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d]
        )
        assert (status, body["stored"]) == (201, True), body
    status, body = await st.call("bob", "POST", f"/v1/uploads/{uid}/merge", json=claim)
    assert status == 200 and body["status"] == "complete" and "instant" not in body, body
    assert (await st.call("bob", "GET", f"/v1/files/{p.digest}")) == (200, p.data)
    # Alice proved every chunk: her own streamed upload of the file sends nothing.
    status, opened = await stream_open(st, "alice", len(p.data))
    status, body = await stream_batch(st, "alice", opened["upload_id"], p)
    assert status == 200 and body["missing"] == [], body


async def test_a_streamed_batch_tells_no_size_clash_about_another_tenants_chunk(st):
    # Issue 10's rule for handshakes: a size clash is told only about chunks this tenant
    # proved. Bob lists alice's chunk with a wrong size, and a digest nobody stored: the
    # two answers are alike, and what he lists stays his (missing, PUT fails verification).
    p = prepare(rand(2 * CHUNK), CHUNK)
    await st.upload("alice", p)
    stored, nobody = p.order[0], hashlib.md5(b"never stored").hexdigest()
    answers = []
    for d in (stored, nobody):
        status, opened = await stream_open(st, "bob", CHUNK - 1)
        uid = opened["upload_id"]
        status, body = await st.call(
            "bob",
            "POST",
            f"/v1/uploads/{uid}/chunks",
            json={"start": 0, "chunks": [{"md5": d, "size": CHUNK - 1}]},
        )
        assert status == 200 and body["missing"] == [d], body
        answers.append(body)
        status, body = await st.call(
            "bob", "PUT", f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[stored][:-1]
        )
        assert status == 422 and body["error"] == "digest_mismatch", body
    assert answers[0] == {**answers[1], "missing": [stored]}
    # The chunk is still stored and alive for alice (nothing was committed as set aside).
    assert (await st.call("alice", "GET", f"/v1/files/{p.digest}")) == (200, p.data)
    status, opened = await stream_open(st, "alice", len(p.data))
    status, body = await stream_batch(st, "alice", opened["upload_id"], p)
    assert status == 200 and body["missing"] == [], body
    # Alice, who proved it, is told of her own clash.
    status, opened = await stream_open(st, "alice", CHUNK - 1)
    status, body = await st.call(
        "alice",
        "POST",
        f"/v1/uploads/{opened['upload_id']}/chunks",
        json={"start": 0, "chunks": [{"md5": stored, "size": CHUNK - 1}]},
    )
    assert status == 400 and stored in body["message"], body


async def test_a_streamed_open_in_tenant_mode_needs_the_size(st):
    # 404, as where v1.1 is not offered: a client that does not send it falls back to v1.
    status, body = await stream_open(st, "alice", None)
    assert status == 404 and "size" in body["message"], body


async def test_a_streamed_open_over_the_quota_is_refused_and_changes_nothing(st):
    await st.upload("carol", prepare(rand(200 * KiB), CHUNK))
    before = snapshot(st.settings.data_dir)
    status, body = await stream_open(st, "carol", 101 * KiB)
    assert status == 413 and body["error"] == "quota_exceeded", body
    assert (body["quota"], body["usage"]) == (300 * KiB, 200 * KiB)
    assert snapshot(st.settings.data_dir) == before
    # What fits opens; what it declared counts against the quota before it lists a chunk.
    p = prepare(rand(100 * KiB), CHUNK)
    status, opened = await stream_open(st, "carol", len(p.data))
    assert status == 201, opened
    before = snapshot(st.settings.data_dir)
    status, body = await stream_open(st, "carol", 1)
    assert status == 413 and body["error"] == "quota_exceeded", body
    assert (body["quota"], body["usage"]) == (300 * KiB, 300 * KiB)
    assert "this 1-byte file" in body["message"], body
    status, body = await st.call(
        "carol", "POST", "/v1/handshake", json=prepare(rand(KiB), CHUNK).handshake
    )
    assert status == 413 and body["error"] == "quota_exceeded", body
    assert f"this {KiB}-byte file" in body["message"], body
    small = rand(KiB)
    status, body = await st.call(
        "carol", "PUT", f"/v1/files/{hashlib.md5(small).hexdigest()}.bin", data=small
    )
    assert status == 413 and body["error"] == "quota_exceeded", body
    assert snapshot(st.settings.data_dir) == before
    # It may list no more than it declared, and merges only for that size.
    uid = opened["upload_id"]
    big = prepare(rand(100 * KiB + 1), CHUNK)
    status, body = await stream_batch(st, "carol", uid, big)
    assert status == 413 and body["error"] == "too_large", body
    assert snapshot(st.settings.data_dir) == before
    assert (await stream_batch(st, "carol", uid, p))[0] == 200
    for d in p.order:
        await st.call("carol", "PUT", f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d])
    claim = {"md5": p.digest, "size": len(p.data)}
    status, body = await st.call("carol", "POST", f"/v1/uploads/{uid}/merge", json=claim)
    assert status == 200, body
    # Merged: 300 KiB owned, nothing reserved any more; an abort would have freed it too.
    status, body = await stream_open(st, "carol", 1)
    assert (status, body["usage"]) == (413, 300 * KiB), body


async def test_racing_streamed_opens_cannot_both_take_the_last_of_a_quota(st):
    for _round in range(3):
        results = await asyncio.gather(
            stream_open(st, "carol", 200 * KiB),
            stream_open(st, "carol", 200 * KiB),
            st.call("carol", "POST", "/v1/handshake", json=prepare(rand(200 * KiB)).handshake),
        )
        statuses = sorted(s for s, _ in results)
        assert statuses[0] in (200, 201) and statuses[1:] == [413, 413], results
        won = next(body for s, body in results if s in (200, 201))
        assert (await st.call("carol", "DELETE", f"/v1/uploads/{won['upload_id']}"))[0] == 204


async def test_a_streamed_merge_must_claim_the_declared_size(st):
    p = prepare(rand(2 * CHUNK), CHUNK)
    status, opened = await stream_open(st, "alice", len(p.data))
    uid = opened["upload_id"]
    assert (await stream_batch(st, "alice", uid, p))[0] == 200
    for d in p.order:
        await st.call("alice", "PUT", f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d])
    status, body = await st.call(
        "alice", "POST", f"/v1/uploads/{uid}/merge", json={"md5": p.digest, "size": CHUNK}
    )
    assert status == 400 and str(len(p.data)) in body["message"], body
    claim = {"md5": p.digest, "size": len(p.data)}
    assert (await st.call("alice", "POST", f"/v1/uploads/{uid}/merge", json=claim))[0] == 200


async def test_the_python_client_streams_in_tenant_mode_and_proves_every_chunk(
    aiohttp_server, settings, tmp_path
):
    s = dataclasses.replace(settings, tokens=tmp_path / "tokens", stream_uploads=True)
    tokens = write_tokens(s.tokens)
    server = await aiohttp_server(create_app(s))
    url = str(server.make_url("")).rstrip("/")
    src = tmp_path / "f.bin"
    src.write_bytes(rand(5 * CHUNK + 3))
    seen: list[str] = []
    async with CasdClient(url, token=tokens["alice"], cache_dir=tmp_path / "c") as alice:
        a = await alice.upload(src, chunk_size=CHUNK, use_cache=False)
    async with CasdClient(url, token=tokens["bob"], cache_dir=tmp_path / "c") as bob:
        b = await bob.upload(
            src, chunk_size=CHUNK, use_cache=False, on_progress=lambda p: seen.append(p.phase)
        )
    # Both streamed (no handshake phase), and bob had to send every chunk alice stored.
    assert "handshake" not in seen
    assert (a.chunks_sent, b.chunks_sent) == (6, 6)
    assert (a.digest, a.url) == (b.digest, b.url)
    # Carol's quota (300 KiB) refuses a bigger file at open, before any chunk is sent.
    big = tmp_path / "big.bin"
    big.write_bytes(rand(301 * KiB))
    async with CasdClient(url, token=tokens["carol"], cache_dir=tmp_path / "c") as carol:
        with pytest.raises(CasdHTTPError) as info:
            await carol.upload(big, chunk_size=CHUNK, use_cache=False)
    assert (info.value.status, info.value.code) == (413, "quota_exceeded")


async def test_tenant_mode_on_postgresql_offers_and_enforces_streamed_uploads(
    aiohttp_client, settings, tmp_path, postgres_url
):
    s = dataclasses.replace(settings, catalog=postgres_url, stream_uploads=True)
    t = await _tenants(aiohttp_client, s, tmp_path)
    status, body = await t.call("alice", "GET", "/v1/capabilities")
    assert status == 200 and body["stream_uploads"] is True and "1.1" in body["versions"]
    # The quota at open, and the tenant's own proofs in a batch's missing list.
    status, body = await stream_open(t, "carol", 301 * KiB)
    assert (status, body["error"]) == (413, "quota_exceeded"), body
    p = prepare(rand(2 * CHUNK + 1), CHUNK)
    await t.upload("alice", p)
    status, opened = await stream_open(t, "bob", len(p.data))
    assert status == 201, opened
    status, body = await stream_batch(t, "bob", opened["upload_id"], p)
    assert status == 200 and body["missing"] == p.order, body
    status, opened = await stream_open(t, "alice", len(p.data))
    status, body = await stream_batch(t, "alice", opened["upload_id"], p)
    assert status == 200 and body["missing"] == [], body
