"""Webhooks: delivery, signature, retry while the receiver is down, survival across kill -9,
the bounded queue, and the pre-handshake hook that may refuse a handshake."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from casd.web import SERVICE, create_app
from helpers import prepare, rand, upload

CHUNK = 64 * 1024


@pytest.fixture
def reserve_port():
    """Makes ports on 127.0.0.1 that refuse connections and that no other process can take
    (bound, not listening) until a `Receiver` listens on one: a port merely found free may
    be taken by another test's server before it is used."""
    made: list[socket.socket] = []

    def make() -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def port_of(s: socket.socket) -> int:
    return s.getsockname()[1]


class Receiver:
    """A webhook receiver on 127.0.0.1: records every POST; `answer` decides the reply."""

    def __init__(self, reserved: socket.socket | None = None, answer=None):
        self.requests: list[tuple[dict, bytes]] = []
        self.answer = answer or (lambda headers, body: (200, b"ok"))
        self.release = threading.Event()  # lets a hanging answer go at teardown
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers)
                receiver.requests.append((headers, body))
                status, reply = receiver.answer(headers, body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        if reserved is None:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        else:  # listen on the reserved port's own socket: no moment where it is free
            self.server = ThreadingHTTPServer(reserved.getsockname(), Handler, False)
            self.server.socket.close()
            self.server.socket = reserved
            self.server.server_activate()
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(body) for _h, body in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(reserved: socket.socket | None = None, answer=None) -> Receiver:
        r = Receiver(reserved, answer)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


async def until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


async def metric(client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def until_metric(client, name: str, at_least: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while await metric(client, name) < at_least:
        assert time.monotonic() < deadline, f"{name} stayed under {at_least}"
        await asyncio.sleep(0.05)


async def test_completed_and_deleted_events_are_signed_and_in_order(
    aiohttp_client, settings, receivers
):
    recv = receivers()
    s = dataclasses.replace(settings, hook_urls=(recv.url,), hook_secret="s3cret")
    client = await aiohttp_client(create_app(s))
    base = prepare(rand(2 * CHUNK, seed=10), CHUNK)
    await upload(client, "", base)
    # Shares its first chunk with `base`: one chunk skipped thanks to dedup.
    p = prepare(base.data[:CHUNK] + rand(CHUNK, seed=11), CHUNK, ext=".bin", name="r.bin")
    await upload(client, "", p)
    assert (await client.delete(f"/v1/files/{p.digest}")).status == 204
    await until(lambda: len(recv.requests) == 3)
    kinds = [(e["event"], e["data"]["digest"]) for e in recv.events()]
    assert kinds == [
        ("file.completed", base.digest),
        ("file.completed", p.digest),
        ("file.deleted", p.digest),
    ]
    data = recv.events()[1]["data"]
    assert data == {
        "algo": "md5",
        "md5": p.digest,
        "digest": p.digest,
        "size": 2 * CHUNK,
        "name": "r.bin",
        "ext": ".bin",
        "url": f"/v1/files/{p.digest}.bin",
        "bytes_skipped": CHUNK,
        "bytes_sent": CHUNK,
    }
    for headers, body in recv.requests:
        ts = headers["X-Casd-Timestamp"]
        assert abs(int(ts) - time.time()) < 300
        expected = hmac.new(b"s3cret", ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["X-Casd-Signature"] == f"sha256={expected}"
        assert headers["X-Casd-Event"] in ("file.completed", "file.deleted")
    await until_metric(client, 'casd_hook_events_total{outcome="delivered"}', 3)


async def test_retry_after_the_receiver_was_down_never_slowing_uploads(
    reserve_port, aiohttp_client, settings, receivers
):
    port = reserve_port()  # nothing listens here yet
    s = dataclasses.replace(settings, hook_urls=(f"http://127.0.0.1:{port_of(port)}/hook",))
    client = await aiohttp_client(create_app(s))
    files = [prepare(rand(CHUNK, seed=20 + i), CHUNK) for i in range(3)]
    for p in files:
        assert (await upload(client, "", p))["status"] == "complete"
    await until_metric(client, 'casd_hook_events_total{outcome="failed"}', 1)
    recv = receivers(port)
    await until(lambda: len(recv.requests) >= 3)
    assert [e["data"]["digest"] for e in recv.events()][:3] == [p.digest for p in files]


async def test_a_hanging_receiver_does_not_hold_uploads(aiohttp_client, settings, receivers):
    recv = None

    def hang(headers, body):
        recv.release.wait(30)
        return 200, b""

    recv = receivers(answer=hang)
    s = dataclasses.replace(settings, hook_urls=(recv.url,), hook_timeout=30.0)
    client = await aiohttp_client(create_app(s))
    await upload(client, "", prepare(rand(CHUNK, seed=30), CHUNK))
    await until(lambda: len(recv.requests) == 1)
    # The receiver holds the first event; more uploads complete meanwhile.
    for i in range(3):
        p = prepare(rand(CHUNK, seed=31 + i), CHUNK)
        assert (await upload(client, "", p))["status"] == "complete"
    assert len(recv.requests) == 1
    recv.release.set()
    await until(lambda: len(recv.requests) == 4)


async def test_full_queue_drops_the_oldest(
    reserve_port, aiohttp_client, settings, receivers, caplog
):
    port = reserve_port()
    s = dataclasses.replace(
        settings, hook_urls=(f"http://127.0.0.1:{port_of(port)}/hook",), hook_queue_max=2
    )
    client = await aiohttp_client(create_app(s))
    files = [prepare(rand(CHUNK, seed=40 + i), CHUNK) for i in range(3)]
    for p in files:
        await upload(client, "", p)
    assert await metric(client, 'casd_hook_events_total{outcome="dropped"}') == 1
    assert await metric(client, "casd_hook_queue_depth") == 2
    assert "webhook queue full" in caplog.text
    recv = receivers(port)
    await until(lambda: len(recv.requests) >= 2)
    assert [e["data"]["digest"] for e in recv.events()] == [files[1].digest, files[2].digest]


def _call(url: str, method: str, path: str, data=None, ctype="application/json"):
    req = urllib.request.Request(
        url + path, data=data, method=method, headers={"Content-Type": ctype}
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")


def _upload_sync(url: str, p) -> tuple[str, dict]:
    """(upload id, merge answer)."""
    hs = _call(url, "POST", "/v1/handshake", json.dumps(p.handshake).encode())
    for d in hs["missing"]:
        _call(
            url,
            "PUT",
            f"/v1/uploads/{hs['upload_id']}/chunks/{d}",
            p.chunks[d],
            "application/octet-stream",
        )
    return hs["upload_id"], _call(url, "POST", f"/v1/uploads/{hs['upload_id']}/merge")


def test_event_survives_kill_9(reserve_port, daemon_factory, receivers):
    port = reserve_port()
    d = daemon_factory("--hook-url", f"http://127.0.0.1:{port_of(port)}/hook")
    p = prepare(rand(CHUNK, seed=50), CHUNK)
    upload_id, merged = _upload_sync(d.url, p)
    assert merged["status"] == "complete"
    d.kill()  # right after the merge's answer; the receiver never was reachable
    recv = receivers(port)
    d.start()
    # A repeated merge answers the file again but is no second completion.
    assert _call(d.url, "POST", f"/v1/uploads/{upload_id}/merge")["status"] == "complete"
    q = prepare(rand(CHUNK, seed=51), CHUNK)
    assert _upload_sync(d.url, q)[1]["status"] == "complete"
    wait_until(lambda: len(recv.requests) >= 2)
    assert [(e["event"], e["data"]["digest"]) for e in recv.events()] == [
        ("file.completed", p.digest),
        ("file.completed", q.digest),
    ]


async def test_no_moment_has_the_change_committed_without_its_event(
    reserve_port, aiohttp_client, settings, receivers
):
    """What a kill -9 right after the catalogue's commit would leave: the file registered
    (or deleted) and its event queued, never one without the other."""
    port = reserve_port()  # down: nothing is delivered, so the queue shows what was committed
    s = dataclasses.replace(settings, hook_urls=(f"http://127.0.0.1:{port_of(port)}/hook",))
    client = await aiohttp_client(create_app(s))
    cat = client.server.app[SERVICE].catalog
    seen: list[tuple[str, bool, int]] = []

    def look_after(name: str):
        original = getattr(cat, name)

        async def committed(key, *args):
            result = await original(key, *args)
            digest = result.digest if name == "register_file" else key
            seen.append(
                (name, await cat.get_file(digest) is not None, await cat.count_hook_events())
            )
            return result

        setattr(cat, name, committed)

    look_after("register_file")
    look_after("delete_file")
    p = prepare(rand(CHUNK, seed=52), CHUNK)
    assert (await upload(client, "", p))["status"] == "complete"
    assert (await client.delete(f"/v1/files/{p.digest}")).status == 204
    assert seen == [("register_file", True, 1), ("delete_file", False, 2)]


async def test_pre_handshake_refuses_and_allows(aiohttp_client, settings, receivers):
    def policy(headers, body):
        summary = json.loads(body)
        if headers.get("Authorization") == "Bearer alice" and summary["size"] < 1000:
            return 200, b"{}"
        return 403, json.dumps({"message": "quota exceeded for this user " + "x" * 2000}).encode()

    recv = receivers(answer=policy)
    s = dataclasses.replace(settings, hook_pre_handshake=recv.url)
    client = await aiohttp_client(create_app(s))
    small = prepare(rand(500, seed=60), CHUNK, name="s.txt")
    r = await client.post(
        "/v1/handshake", json=small.handshake, headers={"Authorization": "Bearer alice"}
    )
    assert r.status == 200 and (await r.json())["status"] == "pending"
    headers, body = recv.requests[0]
    assert headers["Authorization"] == "Bearer alice"
    assert json.loads(body) == {
        "algo": "md5",
        "md5": small.digest,
        "digest": small.digest,
        "size": 500,
        "name": "s.txt",
        "ext": ".txt",
        "chunks": 1,
    }
    big = prepare(rand(5000, seed=61), CHUNK)
    r = await client.post(
        "/v1/handshake", json=big.handshake, headers={"Authorization": "Bearer alice"}
    )
    answer = await r.json()
    assert r.status == 403 and answer["error"] == "forbidden"
    assert answer["message"].startswith("quota exceeded for this user")
    assert len(answer["message"]) <= 500


async def test_pre_handshake_timeout_and_down_are_503(
    reserve_port, aiohttp_client, settings, receivers
):
    recv = None

    def slow(headers, body):
        recv.release.wait(30)
        return 200, b""

    recv = receivers(answer=slow)
    p = prepare(rand(100, seed=70), CHUNK)
    down = reserve_port()
    for url in (recv.url, f"http://127.0.0.1:{port_of(down)}/down"):
        s = dataclasses.replace(settings, hook_pre_handshake=url, hook_timeout=0.5)
        client = await aiohttp_client(create_app(s))
        r = await client.post("/v1/handshake", json=p.handshake)
        assert r.status == 503, await r.text()
        assert (await r.json())["error"] == "unavailable"
        await client.close()


def test_bad_hook_url_is_refused_at_start(tmp_path):
    from helpers import casd_run

    r = casd_run("serve", "--check-config", "--hook-url", "ftp://x/")
    assert r.returncode == 2 and "--hook-url" in r.stderr and "Traceback" not in r.stderr
