"""Two `casd serve` daemons sharing one bucket (moto's S3 server) and one PostgreSQL database,
each with its own --data folder for temp files: together they answer as one server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

import helpers
from helpers import Prepared, casd_run, prepare

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


class Pair:
    """Two daemons on the shared engines, and the flags every admin command needs."""

    def __init__(self, a, b, args: tuple[str, ...], s3_server, bucket: str):
        self.a, self.b, self.args = a, b, args
        self.s3_server, self.bucket = s3_server, bucket

    def casd(self, *argv: str, data: Path | None = None) -> subprocess.CompletedProcess:
        """An admin command against the shared engines, from a data folder of its own."""
        return casd_run(
            *argv, *self.args, "--data", str(data or self.a.data_dir.parent / "admin"), timeout=120
        )

    def objects(self) -> dict[str, int]:
        """The chunk objects in the bucket (quarantine aside): key -> size."""
        return {
            k: v
            for k, v in self.s3_server.keys(self.bucket, "casd/").items()
            if "/quarantine/" not in k
        }


def engine_args(s3_server, bucket: str, postgres_url: str) -> tuple[str, ...]:
    return (
        "--blobs",
        f"s3://{bucket}/casd",
        "--s3-endpoint",
        s3_server.endpoint,
        "--catalog",
        postgres_url,
    )


@pytest.fixture
def pair(s3_server, s3_bucket, postgres_url, daemon_factory) -> Pair:
    args = engine_args(s3_server, s3_bucket, postgres_url)
    a = daemon_factory(*args)
    b = daemon_factory(*args)
    assert a.data_dir != b.data_dir
    return Pair(a, b, args, s3_server, s3_bucket)


def request(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and method == "POST":
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def handshake(base: str, p: Prepared) -> dict:
    status, _, body = request("POST", f"{base}/v1/handshake", json.dumps(p.handshake).encode())
    assert status == 200, body
    return json.loads(body)


def put(base: str, uid: str, p: Prepared, d: str) -> int:
    return request("PUT", f"{base}/v1/uploads/{uid}/chunks/{d}", p.chunks[d])[0]


def merge(base: str, uid: str) -> tuple[int, dict]:
    status, _, body = request("POST", f"{base}/v1/uploads/{uid}/merge", b"")
    return status, json.loads(body)


def assert_serves(base: str, p: Prepared) -> None:
    """The whole file, a range, HEAD, the ETag and a 304, exactly as one daemon answers."""
    url = f"{base}/v1/files/{p.digest}"
    size = len(p.data)
    status, headers, body = request("GET", url)
    assert status == 200 and body == p.data, (status, len(body))
    assert headers["ETag"] == f'"{p.digest}"'
    lo, hi = CHUNK - 3, 2 * CHUNK + 7  # across a chunk boundary
    status, headers, body = request("GET", url, headers={"Range": f"bytes={lo}-{hi}"})
    assert status == 206 and body == p.data[lo : hi + 1]
    assert headers["Content-Range"] == f"bytes {lo}-{hi}/{size}"
    status, _, body = request("GET", url, headers={"Range": "bytes=-5"})
    assert status == 206 and body == p.data[-5:]
    status, headers, body = request("HEAD", url)
    assert status == 200 and body == b"" and headers["Content-Length"] == str(size)
    status, _, body = request("GET", url, headers={"If-None-Match": f'"{p.digest}"'})
    assert status == 304 and body == b""


@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_chunks_spread_over_both_daemons_merge_on_either_and_both_serve(pair, rng, algo):
    p = prepare(rng.bytes(6 * CHUNK + 321), CHUNK, algo=algo)
    hs = handshake(pair.a.url, p)
    assert hs["status"] == "pending" and hs["missing"] == p.order
    # Half the chunks to each daemon; the merge on B, which never saw A's half and must read
    # those back from the bucket to check the whole-file digest.
    for i, d in enumerate(p.order):
        assert put((pair.a, pair.b)[i % 2].url, hs["upload_id"], p, d) == 201
    assert set(pair.objects()) == {f"casd/{algo}/{d}" for d in p.order}
    status, body = merge(pair.b.url, hs["upload_id"])
    assert status == 200 and body["status"] == "complete" and body[algo] == p.digest, body
    for d in (pair.a, pair.b):
        assert_serves(d.url, p)
    # The handshake on either daemon now finds the file complete: nothing to send.
    for d in (pair.a, pair.b):
        again = handshake(d.url, p)
        assert again["status"] == "complete" and "upload_id" not in again, again

    # A second file whose chunks all went to A, merged on B: B received none of them.
    q = prepare(rng.bytes(3 * CHUNK, "q"), CHUNK, algo=algo)
    hs = handshake(pair.b.url, q)
    for d in hs["missing"]:
        assert put(pair.a.url, hs["upload_id"], q, d) == 201
    status, body = merge(pair.b.url, hs["upload_id"])
    assert status == 200, body
    assert request("GET", f"{pair.a.url}/v1/files/{q.digest}")[2] == q.data


def test_merge_on_the_other_daemon_reads_the_store_and_catches_a_rotten_object(pair, rng):
    """The whole-file check on a daemon that saw none of the chunks reads them from the store
    (not from anything the first daemon kept): an object changed in the bucket fails it, and
    that daemon sets the object aside and asks for the chunk again."""
    p = prepare(rng.bytes(3 * CHUNK), CHUNK)
    hs = handshake(pair.a.url, p)
    for d in hs["missing"]:
        assert put(pair.a.url, hs["upload_id"], p, d) == 201
    rotten = bytearray(p.chunks[p.order[1]])
    rotten[11] ^= 1
    pair.s3_server.client.put_object(
        Bucket=pair.bucket, Key=f"casd/md5/{p.order[1]}", Body=bytes(rotten)
    )
    status, body = merge(pair.b.url, hs["upload_id"])
    assert status == 409 and body["missing"] == [p.order[1]], body
    assert request("GET", f"{pair.a.url}/v1/files/{p.digest}")[0] == 404
    assert put(pair.a.url, hs["upload_id"], p, p.order[1]) == 201
    status, body = merge(pair.b.url, hs["upload_id"])
    assert status == 200, body
    assert request("GET", f"{pair.a.url}/v1/files/{p.digest}")[2] == p.data


def test_a_delete_on_one_daemon_is_seen_by_the_other(pair, rng):
    p = prepare(rng.bytes(2 * CHUNK + 1), CHUNK)
    hs = handshake(pair.a.url, p)
    for d in hs["missing"]:
        assert put(pair.a.url, hs["upload_id"], p, d) == 201
    assert merge(pair.a.url, hs["upload_id"])[0] == 200
    url_b = f"{pair.b.url}/v1/files/{p.digest}"
    assert request("GET", url_b)[2] == p.data  # B has served it (and may have cached it)
    assert request("DELETE", f"{pair.a.url}/v1/files/{p.digest}")[0] == 204
    status, _, body = request("GET", url_b)
    assert status == 404 and json.loads(body)["error"] == "not_found", body
    assert request("HEAD", url_b)[0] == 404
    # An upload started on A and dropped on B is gone for both.
    hs = handshake(pair.a.url, p)
    assert request("DELETE", f"{pair.b.url}/v1/uploads/{hs['upload_id']}")[0] == 204
    assert put(pair.a.url, hs["upload_id"], p, p.order[0]) == 404


async def test_seed_style_uploads_against_either_daemon(pair, rng):
    """What curl or the seed front end does (handshake, PUTs, merge) against A, against B,
    and against both at once for the same file; every daemon serves every file."""
    files = [prepare(rng.bytes(2 * CHUNK + i, i), CHUNK) for i in range(3)]
    async with aiohttp.ClientSession() as s:
        first = await helpers.upload(s, pair.a.url, files[0])
        assert first["md5"] == files[0].digest
        await helpers.upload(s, pair.b.url, files[1])
        # The same file through both daemons at once: both end with it complete.
        answers = await asyncio.gather(
            helpers.upload(s, pair.a.url, files[2]),
            helpers.upload(s, pair.b.url, files[2]),
            return_exceptions=True,
        )
        done = [a for a in answers if isinstance(a, dict)]
        assert done and all(a["md5"] == files[2].digest for a in done), answers
        for f in files:
            for d in (pair.a, pair.b):
                async with s.get(f"{d.url}/v1/files/{f.digest}") as r:
                    assert r.status == 200 and await r.read() == f.data
        # Instant on the other daemon: a repeat handshake sends nothing.
        async with s.post(f"{pair.b.url}/v1/handshake", json=files[0].handshake) as r:
            assert (await r.json())["status"] == "complete"
    r = pair.casd("ls", "--json")
    assert r.returncode == 0, r.stderr
    assert {f["digest"] for f in json.loads(r.stdout)} == {f.digest for f in files}


def test_kill_9_of_a_daemon_mid_chunk_then_the_upload_resumes(pair, rng):
    p = prepare(rng.bytes(6 * CHUNK), CHUNK)
    hs = handshake(pair.a.url, p)
    uid = hs["upload_id"]
    for d in p.order[:3]:
        assert put(pair.a.url, uid, p, d) == 201
    # Half of the fourth chunk's body is on the wire when A dies.
    d4 = p.order[3]
    body = p.chunks[d4]
    sock = socket.create_connection(("127.0.0.1", pair.a.port), timeout=10)
    try:
        sock.sendall(
            f"PUT /v1/uploads/{uid}/chunks/{d4} HTTP/1.1\r\nHost: 127.0.0.1:{pair.a.port}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        pair.a.restart()  # kill -9, then start again on the same port
    finally:
        sock.close()
    # B knows what A acknowledged before it died, and nothing of the cut chunk.
    again = handshake(pair.b.url, p)
    assert again["upload_id"] == uid and again["missing"] == p.order[3:], again
    for d in again["missing"]:
        assert put(pair.a.url, uid, p, d) == 201
    status, answer = merge(pair.a.url, uid)
    assert status == 200, answer
    for d in (pair.a, pair.b):
        assert request("GET", f"{d.url}/v1/files/{p.digest}")[2] == p.data
    deep = pair.casd("fsck", "--deep", "--json")
    report = json.loads(deep.stdout)
    assert deep.returncode == 0 and report["issues"] == [], deep.stdout + deep.stderr
    assert len(pair.objects()) == len(p.order)


@pytest.mark.browser
def test_the_upload_page_of_one_daemon_and_the_other_serves_the_file(pair, browser, tmp_path):
    from test_browser import make_file, md5, pick, wait_finished

    path = tmp_path / "shared.bin"
    data = make_file(path, 12 * MiB, "shared-engines")
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(pair.a.url + "/")
        summary = wait_finished(pick(page, path), "done")
        assert summary["digest"] == md5(data)
        # B's page finds the file already there.
        page.goto(pair.b.url + "/")
        assert wait_finished(pick(page, path), "instant")["instant"] is True
    finally:
        context.close()
    assert not errors, errors
    assert request("GET", f"{pair.b.url}/v1/files/{md5(data)}.bin")[2] == data
    assert_serves(pair.b.url, prepare(data, 5 * MiB))
