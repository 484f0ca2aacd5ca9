"""Cross-site and policy hardening, driven as an outside client would: CSRF by content type
and Origin, DNS rebinding by Host, CORS, the page's security headers, the --algos policy,
and control characters in client-supplied names reaching an admin's terminal."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from casd.web import create_app
from helpers import (
    app_client,
    blob_files,
    casd_run,
    casd_serve_run,
    prepare,
    rand,
    snapshot,
    upload,
)

CHUNK = 64 * 1024
EVIL = "http://evil.example"
APP = "http://app.example:8443"


async def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, (await resp.read())[:500]
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code and body["message"], body
    return body


async def stored_and_pending(client):
    """One complete file and one pending upload (with one chunk still missing)."""
    done = prepare(rand(3 * CHUNK), CHUNK, ext=".bin")
    await upload(client.session, str(client.make_url("")).rstrip("/"), done)
    pending = prepare(rand(2 * CHUNK), CHUNK)
    r = await client.post("/v1/handshake", json=pending.handshake)
    assert r.status == 200
    return done, pending, (await r.json())["upload_id"]


# ---- CSRF: the handshake's content type ---------------------------------------------


@pytest.mark.parametrize(
    "ctype",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
    ],
)
async def test_handshake_without_json_content_type_is_415_and_records_nothing(
    client, settings, ctype
):
    p = prepare(rand(2 * CHUNK), CHUNK)
    before = snapshot(settings.data_dir)
    headers = {} if ctype is None else {"Content-Type": ctype}
    # skip_auto_headers: with no type given, aiohttp would otherwise add its own.
    r = await client.post(
        "/v1/handshake",
        data=json.dumps(p.handshake).encode(),
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    body = await assert_error(r, 415, "unsupported_media_type")
    assert "application/json" in body["message"]
    assert snapshot(settings.data_dir) == before


async def test_handshake_with_json_content_type_and_charset_is_accepted(client):
    p = prepare(rand(2 * CHUNK), CHUNK)
    r = await client.post(
        "/v1/handshake",
        data=json.dumps(p.handshake).encode(),
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert r.status == 200 and (await r.json())["status"] == "pending"


# ---- CSRF: a foreign Origin on mutating requests ----------------------------------------


async def test_foreign_origin_mutations_are_403_and_change_nothing(client, settings):
    done, pending, uid = await stored_and_pending(client)
    before = snapshot(settings.data_dir)
    foreign = {"Origin": EVIL}
    new = prepare(rand(CHUNK), CHUNK)
    d = pending.order[0]
    attempts = [
        client.post("/v1/handshake", json=new.handshake, headers=foreign),
        client.put(f"/v1/uploads/{uid}/chunks/{d}", data=pending.chunks[d], headers=foreign),
        client.post(f"/v1/uploads/{uid}/merge", headers=foreign),
        client.delete(f"/v1/uploads/{uid}", headers=foreign),
        client.delete(f"/v1/files/{done.digest}", headers=foreign),
        client.post("/v1/handshake", json=new.handshake, headers={"Origin": "null"}),
    ]
    for attempt in attempts:
        body = await assert_error(await attempt, 403, "forbidden")
        assert "--cors-origin" in body["message"]
    assert snapshot(settings.data_dir) == before
    r = await client.get(f"/v1/files/{done.digest}.bin")
    assert r.status == 200 and await r.read() == done.data
    r = await client.get(f"/v1/uploads/{uid}")
    assert r.status == 200 and (await r.json())["missing"] == pending.order


async def test_foreign_origin_may_not_read_answers_but_own_origin_and_no_origin_mutate(client):
    done, pending, uid = await stored_and_pending(client)
    # A cross-site GET is answered (as any link would be) but without CORS headers, so the
    # foreign page's script cannot read it.
    r = await client.get(f"/v1/files/{done.digest}.bin", headers={"Origin": EVIL})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    own = str(client.make_url("")).rstrip("/")
    d = pending.order[0]
    r = await client.put(
        f"/v1/uploads/{uid}/chunks/{d}", data=pending.chunks[d], headers={"Origin": own}
    )
    assert r.status == 201
    d = pending.order[1]
    r = await client.put(f"/v1/uploads/{uid}/chunks/{d}", data=pending.chunks[d])
    assert r.status == 201
    r = await client.post(f"/v1/uploads/{uid}/merge", headers={"Origin": own})
    assert r.status == 200 and (await r.json())["status"] == "complete"


# ---- DNS rebinding: the Host header -----------------------------------------------------


def test_rebinding_host_is_421_on_get_and_delete_of_the_real_daemon(daemon):
    p = prepare(rand(2 * CHUNK), CHUNK, ext=".bin")

    async def go():
        async with aiohttp.ClientSession() as s:
            await upload(s, daemon.url, p)
            before = snapshot(daemon.data_dir)
            url = f"{daemon.url}/v1/files/{p.digest}"
            for host in (f"evil.example:{daemon.port}", "evil.example", "127.0.0.1.evil.example"):
                for method in ("GET", "DELETE", "HEAD"):
                    async with s.request(
                        method, url + (".bin" if method != "DELETE" else ""), headers={"Host": host}
                    ) as r:
                        assert r.status == 421, (host, method, r.status)
                        if method != "HEAD":
                            body = await r.json()
                            assert body["error"] == "misdirected_request"
                            assert "--allowed-host" in body["message"]
            async with s.get(f"{daemon.url}/", headers={"Host": "evil.example"}) as r:
                assert r.status == 421
            assert snapshot(daemon.data_dir) == before
            for host in (
                f"127.0.0.1:{daemon.port}",
                f"localhost:{daemon.port}",
                "LOCALHOST",
                f"[::1]:{daemon.port}",
                "127.0.0.1",
            ):
                async with s.get(url + ".bin", headers={"Host": host}) as r:
                    assert r.status == 200, (host, r.status)
                    assert await r.read() == p.data

    asyncio.run(go())


def test_allowed_host_flag_adds_a_name_to_the_real_daemon(daemon_factory):
    d = daemon_factory("--allowed-host", "casd.lan", "--allowed-host", "files.example")

    async def go():
        async with aiohttp.ClientSession() as s:
            for host, status in (
                ("casd.lan:1234", 200),
                ("files.example", 200),
                (f"localhost:{d.port}", 200),
                ("evil.example", 421),
            ):
                async with s.get(f"{d.url}/healthz", headers={"Host": host}) as r:
                    assert r.status == status, host

    asyncio.run(go())


@pytest.mark.parametrize(
    "listen, given, host, status",
    [
        ("0.0.0.0", (), "anything.example", 200),  # a wildcard address answers any name...
        ("::", (), "anything.example", 200),
        ("0.0.0.0", ("casd.lan",), "anything.example", 421),  # ...unless names are given
        ("0.0.0.0", ("casd.lan",), "casd.lan:8080", 200),
        ("10.1.2.3", (), "10.1.2.3:8080", 200),  # a specific address answers its own name
        ("10.1.2.3", (), "localhost", 421),
        ("10.1.2.3", ("casd.lan",), "casd.lan", 200),
        ("::1", (), "[::1]:8080", 200),
        ("::1", (), "localhost", 200),
        ("127.0.0.1", ("*",), "anything.example", 200),
    ],
)
async def test_host_allowlist_follows_the_listening_address(
    aiohttp_client, settings, listen, given, host, status
):
    # The test server itself listens on 127.0.0.1; the policy reads the configured address.
    client = await app_client(aiohttp_client, settings, host=listen, allowed_hosts=given)
    r = await client.get("/healthz", headers={"Host": host})
    assert r.status == status


# ---- CORS -------------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin_lists_what_casd_js_needs(aiohttp_client, settings):
    client = await app_client(aiohttp_client, settings, cors_origins=(APP,), token="t0k")
    r = await client.options(
        "/v1/uploads/" + "0" * 32 + "/chunks/" + "0" * 32,
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization,content-type,prefer",
        },
    )
    assert r.status == 204  # a preflight carries no token, and needs none
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in r.headers.getall("Vary")
    methods = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST", "PUT", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "range", "prefer", "x-request-id"} <= allowed
    assert int(r.headers["Access-Control-Max-Age"]) > 0

    r = await client.options(
        "/v1/handshake", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
    )
    body = await assert_error(r, 403, "forbidden")
    assert "--cors-origin" in body["message"]
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_allowed_origin_uploads_downloads_and_reads_errors(aiohttp_client, settings):
    client = await app_client(aiohttp_client, settings, cors_origins=(APP,))
    cors = {"Origin": APP}
    p = prepare(rand(3 * CHUNK), CHUNK, ext=".bin")
    r = await client.post("/v1/handshake", json=p.handshake, headers=cors)
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == APP
    uid = (await r.json())["upload_id"]
    for d in p.order:
        r = await client.put(f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d], headers=cors)
        assert r.status == 201
    r = await client.post(f"/v1/uploads/{uid}/merge", headers=cors)
    assert r.status == 200
    r = await client.get(f"/v1/files/{p.digest}.bin", headers={**cors, "Range": "bytes=5-9"})
    assert r.status == 206 and await r.read() == p.data[5:10]
    assert r.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in r.headers.getall("Vary")
    exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"ETag", "Content-Range", "Content-Length", "Accept-Ranges"} <= exposed
    # Without Origin the answer differs, so it says so to caches too.
    r = await client.get(f"/v1/files/{p.digest}.bin")
    assert "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers.getall("Vary")
    # Errors carry the headers too, so a page can read {error, message}.
    r = await client.post(f"/v1/uploads/{'0' * 32}/merge", headers=cors)
    await assert_error(r, 404, "not_found")
    assert r.headers["Access-Control-Allow-Origin"] == APP
    # Another origin is still refused.
    r = await client.delete(f"/v1/files/{p.digest}", headers={"Origin": EVIL})
    await assert_error(r, 403, "forbidden")
    assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_star_allows_any_origin(aiohttp_client, settings):
    client = await app_client(aiohttp_client, settings, cors_origins=("*",))
    p = prepare(rand(CHUNK), CHUNK)
    r = await client.post("/v1/handshake", json=p.handshake, headers={"Origin": EVIL})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == EVIL


def test_unauthorized_answer_is_readable_cross_origin_from_the_real_daemon(daemon_factory):
    d = daemon_factory("--cors-origin", APP, "--token", "s3cret")

    async def go():
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{d.url}/v1/handshake", json=prepare(b"x", 1).handshake, headers={"Origin": APP}
            ) as r,
        ):
            assert r.status == 401
            assert r.headers["Access-Control-Allow-Origin"] == APP
            assert (await r.json())["error"] == "unauthorized"

    asyncio.run(go())


# ---- the upload page's headers ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/static/casd.js", "/static/hash-worker.js"])
async def test_page_and_its_scripts_send_security_headers(client, path):
    r = await client.get(path)
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "worker-src 'self' blob:" in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"


async def test_static_scripts_are_importable_from_any_origin_but_the_page_is_not(client):
    r = await client.get("/static/casd.js", headers={"Origin": EVIL})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await client.get("/", headers={"Origin": EVIL})
    assert "Access-Control-Allow-Origin" not in r.headers


# ---- --algos ------------------------------------------------------------------------------


def test_algos_sha256_refuses_md5_uploads_and_accepts_sha256(daemon_factory):
    d = daemon_factory("--algos", "sha256")
    md5 = prepare(rand(2 * CHUNK), CHUNK)
    sha = prepare(rand(2 * CHUNK), CHUNK, algo="sha256", ext=".bin")

    async def go():
        async with aiohttp.ClientSession() as s:
            before = snapshot(d.data_dir)
            async with s.post(f"{d.url}/v1/handshake", json=md5.handshake) as r:
                body = await assert_error(r, 400, "bad_request")
            assert "md5" in body["message"] and "--algos" in body["message"]
            assert body["allowed_algos"] == ["sha256"]
            async with s.put(
                f"{d.url}/v1/uploads/{'0' * 32}/chunks/{md5.order[0]}",
                data=md5.chunks[md5.order[0]],
            ) as r:
                body = await assert_error(r, 400, "bad_request")
            assert "--algos" in body["message"]
            assert snapshot(d.data_dir) == before
            done = await upload(s, d.url, sha)
            assert done["status"] == "complete" and done["sha256"] == sha.digest
            async with s.get(f"{d.url}/v1/files/{sha.digest}.bin") as r:
                assert await r.read() == sha.data

    asyncio.run(go())


def test_default_algos_accept_md5(daemon):
    async def go():
        async with aiohttp.ClientSession() as s:
            done = await upload(s, daemon.url, prepare(rand(CHUNK), CHUNK))
            assert done["status"] == "complete"

    asyncio.run(go())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--algos", "md4"], "--algos"),
        (["--algos", ","], "--algos"),
        (["--cors-origin", "http://app.example/path"], "--cors-origin"),
        (["--cors-origin", "app.example"], "--cors-origin"),
        (["--allowed-host", "evil/x"], "--allowed-host"),
    ],
)
def test_serve_refuses_bad_policy_flags(tmp_path, argv, words):
    proc = casd_serve_run(*argv, data=tmp_path / "d")
    assert proc.returncode == 2 and words in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- control characters in admin output ---------------------------------------------------

NASTY = "\x1b[2J\x1b]0;owned\x07\x1b[31mred\u202egnp.exe\x9b\x7f\nsecond line\\"


def cli(data: Path, *argv: str) -> subprocess.CompletedProcess:
    return casd_run(*argv, "--data", str(data))


def assert_no_controls(text: str) -> None:
    for ch in ("\x1b", "\x07", "\u202e", "\x9b", "\x7f"):
        assert ch not in text, repr(text)


def test_ls_and_fsck_escape_control_characters_in_names(daemon):
    p = prepare(rand(2 * CHUNK), CHUNK, ext=".bin", name=NASTY)

    async def go():
        async with aiohttp.ClientSession() as s:
            await upload(s, daemon.url, p)

    asyncio.run(go())
    daemon.stop()

    out = cli(daemon.data_dir, "ls")
    assert out.returncode == 0
    assert_no_controls(out.stdout)
    assert len(out.stdout.splitlines()) == 1  # the newline in the name is escaped too
    assert (
        "\\x1b[2J\\x1b]0;owned\\x07\\x1b[31mred\\u202egnp.exe\\x9b\\x7f\\x0asecond line\\\\"
        in out.stdout
    )
    listed = json.loads(cli(daemon.data_dir, "ls", "--json").stdout)
    assert listed[0]["name"] == NASTY  # JSON stays exact

    blob = next(b for b in blob_files(daemon.data_dir) if b.name == p.order[1])
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x01
    blob.write_bytes(bytes(data))
    out = cli(daemon.data_dir, "fsck")
    assert out.returncode == 1
    assert_no_controls(out.stdout)
    assert "\\x1b[2J" in out.stdout and "corrupt" in out.stdout
    report = json.loads(cli(daemon.data_dir, "fsck", "--json").stdout)
    assert NASTY in report["issues"][0]["files"][0]


def test_cross_site_form_and_foreign_origin_delete_on_the_real_daemon(daemon):
    """What a hostile page in the operator's browser can send without a preflight."""
    p = prepare(rand(2 * CHUNK), CHUNK, ext=".bin")
    other = prepare(rand(CHUNK), CHUNK)

    async def go():
        async with aiohttp.ClientSession() as s:
            await upload(s, daemon.url, p)
            before = snapshot(daemon.data_dir)
            # <form enctype="text/plain"> / fetch(..., {mode: "no-cors"}) with a JSON body.
            async with s.post(
                f"{daemon.url}/v1/handshake",
                data=json.dumps(other.handshake),
                headers={"Content-Type": "text/plain", "Origin": EVIL},
            ) as r:
                await assert_error(r, 403, "forbidden")
            # The same without an Origin header (older browsers, plugins): the type stops it.
            async with s.post(
                f"{daemon.url}/v1/handshake",
                data=json.dumps(other.handshake),
                headers={"Content-Type": "text/plain"},
            ) as r:
                await assert_error(r, 415, "unsupported_media_type")
            async with s.delete(f"{daemon.url}/v1/files/{p.digest}", headers={"Origin": EVIL}) as r:
                await assert_error(r, 403, "forbidden")
            async with s.options(
                f"{daemon.url}/v1/handshake",
                headers={
                    "Origin": EVIL,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            ) as r:
                await assert_error(r, 403, "forbidden")
                assert "Access-Control-Allow-Origin" not in r.headers
            assert snapshot(daemon.data_dir) == before
            async with s.get(f"{daemon.url}/v1/files/{p.digest}.bin") as r:
                assert r.status == 200 and await r.read() == p.data
            async with s.get(f"{daemon.url}/healthz") as r:
                assert r.status == 200

    asyncio.run(go())


# ---- the per-client pending budget, by address ------------------------------------------


async def test_an_ipv6_client_gets_one_budget_per_64_block(aiohttp_client, settings):
    """Without tokens a client is its address; an IPv6 client owns a whole /64 and could
    rotate through it, so every address in one /64 shares one pending-chunk budget."""
    settings = dataclasses.replace(
        settings, max_pending_chunks=1000, max_pending_chunks_per_client=300
    )
    app = create_app(settings)

    @web.middleware
    async def from_address(request, handler):
        # The test client connects from 127.0.0.1; this stands in for other peers.
        return await handler(request.clone(remote=request.headers["X-Test-Peer"]))

    app.middlewares.insert(0, from_address)
    client = await aiohttp_client(app)
    seed = iter(range(100, 200))

    async def handshake(peer: str) -> int:
        p = prepare(rand(200 * 4, seed=next(seed)), 4)
        r = await client.post("/v1/handshake", json=p.handshake, headers={"X-Test-Peer": peer})
        return r.status

    assert await handshake("2001:db8:1:2::1") == 200
    assert await handshake("2001:db8:1:2:ffff:ffff:ffff:ffff") == 429  # same /64
    assert await handshake("2001:db8:1:3::1") == 200  # the next /64 is another client
    assert await handshake("10.0.0.1") == 200
    assert await handshake("10.0.0.2") == 200  # IPv4: one address, one client
    assert await handshake("::ffff:10.0.0.1") == 429  # 10.0.0.1 seen through IPv6
