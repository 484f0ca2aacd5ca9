"""Issue 15, items 5, 6 and 11 (parser errors): connection timeouts and limits, accept
failures, aiohttp's own parser errors in the JSON shape, and catalogue read lanes.

Each attack is driven against a real `casd serve` over 127.0.0.1, as an outside client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from casd.catalog.sqlite import BULK_ENTRIES, SqliteCatalog
from casd.digest import Algo, Digest
from casd.models import ChunkRef, Manifest
from conftest import Daemon
from helpers import prepare, rand, temp_files


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def healthz(d: Daemon, timeout: float = 10.0) -> tuple[int, float]:
    """(status, seconds) of one GET /healthz on a fresh connection."""
    t = time.monotonic()
    with urllib.request.urlopen(f"{d.url}/healthz", timeout=timeout) as r:
        r.read()
        return r.status, time.monotonic() - t


def connect(d: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=10)


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection; fails on `timeout`."""
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data
    raise AssertionError(f"the server kept the connection open past {timeout}s: {out[:200]!r}")


def split_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def json_error(raw: bytes) -> tuple[int, dict]:
    status, headers, body = split_answer(raw)
    assert headers["content-type"].startswith("application/json"), raw[:300]
    doc = json.loads(body)
    assert set(doc) >= {"error", "message"} and doc["message"], doc
    return status, doc


def wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def request(
    d: Daemon, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def handshake(d: Daemon, hs: dict) -> dict:
    status, body = request(
        d,
        "POST",
        "/v1/handshake",
        json.dumps(hs).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, body
    return json.loads(body)


# ---- header timeout ---------------------------------------------------------------------


def test_half_sent_headers_are_cut_off_after_header_timeout(daemon_factory):
    d = daemon_factory("--header-timeout", "2")
    pid = d.proc.pid
    start_fds = fd_count(pid)
    socks = []
    try:
        for _ in range(300):
            s = connect(d)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
        # The daemon holds them (until the first ones time out), and still answers others.
        wait_for(lambda: fd_count(pid) >= start_fds + 100, 10, "the daemon accepting them")
        assert healthz(d)[0] == 200
        answers = [read_until_closed(s, 15) for s in socks]
    finally:
        for s in socks:
            s.close()
    for raw in answers:
        status, doc = json_error(raw)
        assert (status, doc["error"]) == (408, "request_timeout")
    wait_for(lambda: fd_count(pid) <= start_fds + 5, 10, "the daemon's descriptors coming back")
    assert healthz(d)[0] == 200
    assert "Traceback" not in d.log()


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(daemon_factory):
    d = daemon_factory("--header-timeout", "1", "--keepalive-timeout", "60")
    with connect(d) as s:
        t = time.monotonic()
        assert read_until_closed(s, 10) == b""  # nothing was asked, so nothing is answered
        assert time.monotonic() - t < 8


# ---- connection limit -------------------------------------------------------------------


def test_connections_past_the_limit_are_refused_and_healthz_recovers(daemon_factory):
    d = daemon_factory("--max-connections", "5", "--header-timeout", "60")
    pid = d.proc.pid
    start_fds = fd_count(pid)
    held = [connect(d) for _ in range(5)]
    try:
        wait_for(lambda: fd_count(pid) >= start_fds + 5, 10, "the daemon accepting five")
        with connect(d) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            t = time.monotonic()
            status, doc = json_error(read_until_closed(extra, 10))
            assert time.monotonic() - t < 5
        assert (status, doc["error"]) == (503, "unavailable")
        assert "5 connections" in doc["message"]
    finally:
        for s in held:
            s.close()

    def healthy():
        try:
            return healthz(d, timeout=5)[0] == 200
        except OSError:
            return False

    wait_for(healthy, 10, "/healthz answering once the others closed", step=0.2)
    assert "refusing connections" in d.log()
    assert "Traceback" not in d.log()


# ---- body timeout -----------------------------------------------------------------------


def test_a_stalled_chunk_body_leaves_no_temp_file_and_the_upload_completes(daemon_factory):
    d = daemon_factory("--body-timeout", "1")
    p = prepare(rand(3 * 65536, seed=15), chunk_size=65536)
    hs = handshake(d, p.handshake)
    uid, first = hs["upload_id"], hs["missing"][0]
    chunk = p.chunks[first]
    with connect(d) as s:
        s.sendall(
            f"PUT /v1/uploads/{uid}/chunks/{first} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(chunk)}\r\n\r\n".encode()
            + chunk[: len(chunk) // 2]
        )
        # The chunk is being received: its temp file exists until the body stalls too long.
        wait_for(lambda: temp_files(d.data_dir), 10, "a temp file for the chunk")
        status, doc = json_error(read_until_closed(s, 15))
    assert (status, doc["error"]) == (408, "request_timeout")
    assert temp_files(d.data_dir) == []
    assert healthz(d)[0] == 200
    for digest in hs["missing"]:
        status, body = request(d, "PUT", f"/v1/uploads/{uid}/chunks/{digest}", p.chunks[digest])
        assert status == 201, body
    status, body = request(d, "POST", f"/v1/uploads/{uid}/merge")
    assert status == 200, body
    status, body = request(d, "GET", f"/v1/files/{p.digest}")
    assert (status, body) == (200, p.data)


def test_a_stalled_handshake_body_is_answered_408(daemon_factory):
    d = daemon_factory("--body-timeout", "1")
    with connect(d) as s:
        s.sendall(
            b"POST /v1/handshake HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"md5": '
        )
        status, doc = json_error(read_until_closed(s, 15))
    assert (status, doc["error"]) == (408, "request_timeout")
    assert healthz(d)[0] == 200


# ---- keep-alive timeout -----------------------------------------------------------------


def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(daemon_factory):
    d = daemon_factory("--keepalive-timeout", "1", "--header-timeout", "60")
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        for _ in range(2):  # kept alive between answers...
            c.request("GET", "/healthz")
            r = c.getresponse()
            assert r.status == 200 and not r.will_close
            r.read()
        t = time.monotonic()
        assert read_until_closed(c.sock, 10) == b""  # ...and closed once idle too long
        assert time.monotonic() - t < 8
    finally:
        c.close()


# ---- accept failures --------------------------------------------------------------------


def test_running_out_of_descriptors_logs_the_accept_failure_once(tmp_path):
    data, log_path = tmp_path / "data", tmp_path / "daemon.log"
    limit = 96

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "casd",
                "serve",
                "--data",
                str(data),
                "--port",
                "0",
                "--max-connections",
                "1000",
                "--header-timeout",
                "60",
            ],
            # A limit for the child alone; nothing else runs between fork and exec here.
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=low_limit,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    socks: list[socket.socket] = []
    try:
        line = wait_for(
            lambda: next((ln for ln in log_path.read_text().splitlines() if "serving" in ln), None),
            30,
            "the daemon starting",
        )
        d = Daemon(data, log_path)
        d.url = line.split("serving ")[1].split()[0]
        d.port = int(d.url.rsplit(":", 1)[1])
        assert "connections beyond that will fail" in log_path.read_text()
        for _ in range(limit + 40):
            socks.append(connect(d))
        # The kernel completes connections the daemon cannot accept; give it a few retries.
        wait_for(
            lambda: "cannot accept connections" in log_path.read_text(),
            15,
            "the accept failure being logged",
        )
        time.sleep(3)  # asyncio retries accept() every second: let several attempts fail
        for s in socks:
            s.close()
        socks.clear()

        def healthy():
            try:
                return healthz(d, timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(healthy, 20, "/healthz answering again", step=0.3)
        text = log_path.read_text()
        assert text.count("cannot accept connections") == 1
        assert "Too many open files" in text
        assert "Traceback" not in text
        assert len(text) < 20_000
    finally:
        for s in socks:
            s.close()
        proc.kill()
        proc.wait()


# ---- aiohttp's own parser errors --------------------------------------------------------

MALFORMED = [
    ("bad request line", b"GE T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (
        "header line over the limit",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
    (
        "request line over the limit",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        431,
        "headers_too_large",
    ),
    (
        "bad Content-Length",
        b"POST /v1/handshake HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12x\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "two Content-Lengths",
        (
            b"POST /v1/handshake HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        ),
        400,
        "bad_request",
    ),
    (
        "malformed header",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "bad chunk size",
        (
            b"POST /v1/handshake HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n"
        ),
        400,
        "bad_request",
    ),
]


def test_malformed_requests_answer_the_json_error_shape(daemon):
    for what, raw, want_status, want_code in MALFORMED:
        with connect(daemon) as s:
            s.sendall(raw)
            status, doc = json_error(read_until_closed(s, 10))
        assert (status, doc["error"]) == (want_status, want_code), what
    assert healthz(daemon)[0] == 200
    assert "Traceback" not in daemon.log()


def test_broken_chunked_framing_mid_body_answers_json_and_keeps_nothing(daemon):
    p = prepare(rand(65536, seed=11), chunk_size=65536)
    hs = handshake(daemon, p.handshake)
    digest = hs["missing"][0]
    with connect(daemon) as s:
        s.sendall(
            f"PUT /v1/uploads/{hs['upload_id']}/chunks/{digest} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n".encode()
            + p.data[:4096]
            + b"\r\n"
        )
        wait_for(lambda: temp_files(daemon.data_dir), 10, "the chunk being received")
        s.sendall(b"not a chunk size\r\n")
        status, doc = json_error(read_until_closed(s, 10))
    assert (status, doc["error"]) == (400, "bad_request")
    assert temp_files(daemon.data_dir) == []
    assert "Traceback" not in daemon.log()
    assert healthz(daemon)[0] == 200


# ---- catalogue read lanes ---------------------------------------------------------------

HUGE = 200_000


# Slow: a real huge upload; test_reads_of_huge_manifests_have_their_own_lane stays in the fast
# loop.
@pytest.mark.slow
def test_polling_a_huge_upload_does_not_queue_other_clients(daemon_factory):
    d = daemon_factory()
    # A 200,000-chunk manifest, none of it stored: every status answer lists all of it.
    entries = [
        {"md5": hashlib.md5(i.to_bytes(4, "big")).hexdigest(), "size": 1} for i in range(HUGE)
    ]
    big = handshake(d, {"md5": "0" * 32, "size": HUGE, "chunks": entries})
    assert len(big["missing"]) == HUGE

    def small_handshake(i: int) -> float:
        data = i.to_bytes(8, "big") * 8
        t = time.monotonic()
        assert handshake(d, prepare(data, chunk_size=16).handshake)["status"] == "pending"
        return time.monotonic() - t

    def sample(n: int = 15) -> tuple[float, float]:
        health = statistics.median(healthz(d)[1] for _ in range(n))
        shakes = statistics.median(small_handshake(i + n * 1000 * sample.round) for i in range(n))
        sample.round += 1
        return health, shakes

    sample.round = 1
    idle_health, idle_shake = sample()

    stop = threading.Event()
    polls = [0] * 4

    def poll(k: int) -> None:
        while not stop.is_set():
            status, _ = request(d, "GET", f"/v1/uploads/{big['upload_id']}")
            assert status == 200
            polls[k] += 1

    pollers = [threading.Thread(target=poll, args=(k,), daemon=True) for k in range(4)]
    for t in pollers:
        t.start()
    try:
        wait_for(lambda: all(polls), 60, "every poller getting an answer")
        busy_health, busy_shake = sample()
    finally:
        stop.set()
        for t in pollers:
            t.join(60)
    # Generous: the pollers share two cores with this test, but a cheap request must never
    # wait for their reads (about a quarter second each) to finish.
    # (With one shared reader they waited about 1 s and 1.6 s on a quiet machine.)
    assert busy_health < max(20 * idle_health, 0.4), (idle_health, busy_health, polls)
    assert busy_shake < max(20 * idle_shake, 0.6), (idle_shake, busy_shake, polls)


async def test_reads_of_huge_manifests_have_their_own_lane(tmp_path):
    """While every bulk reader is held, quick reads and small manifests still answer, and a
    huge manifest's list waits for a bulk reader rather than taking a quick one."""

    def manifest(n: int, salt: int) -> Manifest:
        chunks = tuple(
            ChunkRef(hashlib.md5(f"{salt}-{i}".encode()).hexdigest(), 1) for i in range(n)
        )
        return Manifest(Digest(Algo("md5"), f"{salt:032x}"), n, chunks, "", "")

    cat = await SqliteCatalog.open(tmp_path / "catalog.sqlite", "NORMAL", readers=1, bulk_readers=1)
    gate = threading.Event()
    try:
        big, big_missing = await cat.begin_upload(
            manifest(BULK_ENTRIES + 1, 1), "k1", 0, 1e12, "a" * 32
        )
        small, small_missing = await cat.begin_upload(manifest(3, 2), "k2", 0, 1e12, "b" * 32)
        held = asyncio.create_task(cat.read(lambda con: gate.wait(30), bulk=True))
        huge = asyncio.create_task(cat.missing(big.manifest_id))
        await asyncio.wait_for(cat.ping(), 10)
        assert await asyncio.wait_for(cat.get_upload(big.id), 10) == big
        assert await asyncio.wait_for(cat.missing(small.manifest_id), 10) == small_missing
        assert not huge.done()  # its lane is held; the quick lane served everyone else
        gate.set()
        assert await asyncio.wait_for(huge, 30) == big_missing
        assert await held is True
    finally:
        gate.set()
        await cat.close()


def test_a_download_nobody_reads_is_cut_off_after_body_timeout(daemon_factory):
    d = daemon_factory("--body-timeout", "1")
    p = prepare(rand(8 << 20, seed=5), chunk_size=1 << 20)
    hs = handshake(d, p.handshake)
    for digest in hs["missing"]:
        assert (
            request(d, "PUT", f"/v1/uploads/{hs['upload_id']}/chunks/{digest}", p.chunks[digest])[0]
            == 201
        )
    assert request(d, "POST", f"/v1/uploads/{hs['upload_id']}/merge")[0] == 200
    blobs = str(d.data_dir / "blobs")

    def open_blobs() -> int:
        n = 0
        for fd in os.listdir(f"/proc/{d.proc.pid}/fd"):
            with contextlib.suppress(OSError):  # a descriptor closed meanwhile
                n += os.readlink(f"/proc/{d.proc.pid}/fd/{fd}").startswith(blobs)
        return n

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", d.port))
        s.sendall(f"GET /v1/files/{p.digest} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        # The daemon holds a blob open while it sends...
        wait_for(open_blobs, 10, "the download starting", step=0.01)
        # ...and lets it go once the client has taken nothing for a while.
        wait_for(lambda: open_blobs() == 0, 20, "the stalled download being cut off")
        got = len(read_until_closed(s, 30))
    finally:
        s.close()
    assert got < len(p.data)
    assert healthz(d)[0] == 200
    assert "Traceback" not in d.log()
