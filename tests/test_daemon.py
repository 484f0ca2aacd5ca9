"""The real daemon, started the way a user starts it: `casd serve` as a subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

import casd
from helpers import blob_files, prepare, rand, temp_files, upload

MiB = 1024 * 1024


@pytest.fixture
def daemon(daemon_factory):
    """Here `python -m casd serve` itself, not forked from conftest's launcher: start-up,
    SIGTERM and kill -9 of the process a user starts."""
    return daemon_factory(fork=False)


async def download(session, base: str, url: str) -> bytes:
    async with session.get(base + url) as r:
        assert r.status == 200
        return await r.read()


async def handshake(session, base: str, hs: dict) -> dict:
    async with session.post(f"{base}/v1/handshake", json=hs) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def assert_store_consistent(data_dir) -> None:
    """Every live chunk row has its blob, and every blob's bytes hash to its name."""
    con = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        rows = con.execute("SELECT digest, algo, size FROM chunks WHERE state = 0").fetchall()
    finally:
        con.close()
    for digest, algo, size in rows:
        path = data_dir / "blobs" / algo / digest[:2] / digest[2:4] / digest
        assert path.is_file(), f"row {digest} has no blob"
        assert path.stat().st_size == size
    for path in blob_files(data_dir):
        algo = path.parts[-4]
        assert hashlib.new(algo, path.read_bytes()).hexdigest() == path.name


async def test_round_trip_and_instant_upload(daemon):
    p = prepare(rand(3 * MiB + 17), MiB, ext=".bin", name="three.bin")
    async with aiohttp.ClientSession() as s:
        done = await upload(s, daemon.url, p)
        assert done["status"] == "complete"
        assert await download(s, daemon.url, done["url"]) == p.data
        again = await handshake(s, daemon.url, p.handshake)
        assert again == done
        async with s.get(daemon.url + done["url"], headers={"Range": "bytes=1048570-1048580"}) as r:
            assert r.status == 206
            assert await r.read() == p.data[1048570:1048581]
        async with s.get(f"{daemon.url}/healthz") as r:
            assert await r.json() == {"status": "ok"}


async def test_cross_file_dedup_sends_only_new_chunks(daemon):
    base = rand(6 * MiB)
    a = prepare(base, MiB)
    edited = bytearray(base)
    edited[2 * MiB + 5] ^= 0xFF  # one chunk changes
    b = prepare(bytes(edited) + rand(MiB), MiB)
    async with aiohttp.ClientSession() as s:
        await upload(s, daemon.url, a)
        hs = await handshake(s, daemon.url, b.handshake)
        assert hs["missing"] == [b.order[2], b.order[6]]
        done = await upload(s, daemon.url, b)
        assert await download(s, daemon.url, done["url"]) == b.data
    assert len(blob_files(daemon.data_dir)) == 8


async def test_resume_after_kill_9_mid_upload(daemon):
    p = prepare(rand(8 * MiB), MiB)
    async with aiohttp.ClientSession() as s:
        hs = await handshake(s, daemon.url, p.handshake)
        for d in p.order[:5]:
            async with s.put(
                f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
            ) as r:
                assert r.status == 201
    daemon.restart()  # kill -9, then start on the same port
    async with aiohttp.ClientSession() as s:
        again = await handshake(s, daemon.url, p.handshake)
        assert again["upload_id"] == hs["upload_id"]
        assert again["missing"] == p.order[5:]
        done = await upload(s, daemon.url, p)
        assert await download(s, daemon.url, done["url"]) == p.data
    assert_store_consistent(daemon.data_dir)


async def test_acknowledged_chunks_survive_kill_9_under_load(daemon):
    """kill -9 while chunk bodies are in flight: every 201 survives, nothing half-written is a blob."""
    p = prepare(rand(40 * 256 * 1024), 256 * 1024)
    acked: list[str] = []
    enough = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        hs = await handshake(s, daemon.url, p.handshake)
        queue = list(p.order)

        async def worker():
            while queue and not enough.is_set():
                d = queue.pop()
                try:
                    async with s.put(
                        f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
                    ) as r:
                        if r.status == 201:
                            acked.append(d)
                            if len(acked) >= 12:
                                enough.set()
                except aiohttp.ClientError:
                    return

        workers = [asyncio.create_task(worker()) for _ in range(6)]
        await asyncio.wait_for(enough.wait(), 60)
        daemon.kill()  # other bodies are mid-flight right now
        await asyncio.gather(*workers)
    daemon.start()
    assert_store_consistent(daemon.data_dir)
    async with aiohttp.ClientSession() as s:
        again = await handshake(s, daemon.url, p.handshake)
        assert again["upload_id"] == hs["upload_id"]
        assert not set(acked) & set(again["missing"])
        done = await upload(s, daemon.url, p)
        assert await download(s, daemon.url, done["url"]) == p.data


async def test_concurrent_uploads_of_same_and_overlapping_files(daemon):
    common = rand(6 * MiB)
    files = [prepare(common, MiB) for _ in range(3)]  # the same file three times
    files += [prepare(common[: (2 + i) * MiB] + rand(MiB + i), MiB) for i in range(3)]
    async with aiohttp.ClientSession() as s:

        async def one(p):
            hs = await handshake(s, daemon.url, p.handshake)
            if hs["status"] == "complete":
                return hs
            await asyncio.gather(
                *(
                    s.put(f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d])
                    for d in hs["missing"]
                )
            )
            # Another client may still be sending a shared chunk: resume until merged.
            for _ in range(50):
                async with s.post(f"{daemon.url}/v1/uploads/{hs['upload_id']}/merge") as r:
                    body = await r.json()
                    if r.status == 200:
                        return body
                    assert r.status == 409 and body["error"] == "incomplete"
                for d in body["missing"]:
                    async with s.put(
                        f"{daemon.url}/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d]
                    ) as r2:
                        assert r2.status in (200, 201)
            raise AssertionError("never merged")

        results = await asyncio.gather(*(one(p) for p in files))
        for p, done in zip(files, results, strict=True):
            assert done["md5"] == p.digest
            assert await download(s, daemon.url, done["url"]) == p.data
    distinct = {d for p in files for d in p.order}
    assert len(blob_files(daemon.data_dir)) == len(distinct)
    assert_store_consistent(daemon.data_dir)


async def test_sigterm_mid_chunk_exits_cleanly_and_keeps_no_half_blob(daemon_factory):
    daemon = daemon_factory("--shutdown-timeout", "1", fork=False)
    p = prepare(rand(4 * MiB), 4 * MiB)
    async with aiohttp.ClientSession() as s:
        hs = await handshake(s, daemon.url, p.handshake)
    _reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    d = p.order[0]
    writer.write(
        f"PUT /v1/uploads/{hs['upload_id']}/chunks/{d} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {4 * MiB}\r\n\r\n".encode()
        + p.chunks[d][:MiB]
    )
    await writer.drain()
    for _ in range(500):
        if temp_files(daemon.data_dir):
            break
        await asyncio.sleep(0.01)
    assert temp_files(daemon.data_dir)
    code = await asyncio.to_thread(daemon.stop)
    writer.close()
    assert code == 0
    assert "shutting down" in daemon.log()
    assert temp_files(daemon.data_dir) == []
    assert blob_files(daemon.data_dir) == []


def test_serve_reads_its_settings_from_the_environment(tmp_path):
    data = tmp_path / "from-env"
    env = dict(
        os.environ, CASD_DATA=str(data), CASD_HOST="127.0.0.1", CASD_PORT="0", PYTHONUNBUFFERED="1"
    )
    # It runs from another folder, so the casd under test is put on the path explicitly: an
    # installed casd may be another checkout's.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(casd.__file__).resolve().parents[1]), env.get("PYTHONPATH")])
    )
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "casd", "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 30
        while "serving http://127.0.0.1:" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (data / "catalog.sqlite").is_file()
        assert str(data) in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_bad_flags_fail_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "casd", "serve", "--port", "70000", "--data", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "--port 70000" in r.stderr
