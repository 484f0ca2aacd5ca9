"""Logs: one access line per request, request ids, text and JSON formats, no secrets."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import pytest

from casd.logs import JsonFormatter, RequestIdFilter
from casd.web import SERVICE, create_app
from helpers import prepare, rand


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_access_line_request_id_and_no_secrets(daemon_factory):
    d = daemon_factory("--log-format", "json", "--token", "tok-SECRET-1")
    status, headers, _ = get(
        f"{d.url}/v1/files/{'a' * 32}?token=query-SECRET-2&sig=x",
        {"Authorization": "Bearer tok-SECRET-1", "X-Request-ID": "trace-42.a"},
    )
    assert status == 404
    assert headers["X-Request-ID"] == "trace-42.a"
    # The serving line stays parseable in JSON too.
    lines = json_lines(d.log())
    assert any(x["msg"].startswith("serving http://127.0.0.1:") for x in lines)
    access = [x for x in lines if x.get("request_id") == "trace-42.a"]
    assert len(access) == 1, access
    a = access[0]
    assert a["logger"] == "casd.access"
    assert (a["method"], a["route"], a["status"]) == ("GET", "/v1/files/{name}", 404)
    assert a["digest"] == "a" * 32
    assert a["bytes_in"] == 0 and a["bytes_out"] > 0 and a["duration_ms"] >= 0
    assert "time" in a
    assert "SECRET" not in d.log()


def test_insane_request_id_is_replaced(daemon_factory):
    d = daemon_factory("--log-format", "json")
    for bad in ("x" * 200, "has space", 'quote"d'):
        status, headers, _ = get(f"{d.url}/healthz", {"X-Request-ID": bad})
        assert status == 200
        assert headers["X-Request-ID"] != bad
        assert 1 <= len(headers["X-Request-ID"]) <= 128
    ids = [x["request_id"] for x in json_lines(d.log()) if x.get("logger") == "casd.access"]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_text_format_one_line_per_request_with_upload_id(daemon_factory):
    d = daemon_factory("--log-format", "text")
    p = prepare(rand(1000, seed=5))
    req = urllib.request.Request(
        f"{d.url}/v1/handshake",
        data=json.dumps(p.handshake).encode(),
        headers={"Content-Type": "application/json", "X-Request-ID": "hs-1"},
    )
    with urllib.request.urlopen(req) as r:
        upload_id = json.loads(r.read())["upload_id"]
    log = d.log()
    assert "serving http://127.0.0.1:" in log
    mine = [line for line in log.splitlines() if "hs-1" in line]
    assert len(mine) == 1, mine
    line = mine[0]
    assert "casd.access: POST /v1/handshake 200" in line
    assert f"upload_id={upload_id}" in line and f"digest={p.digest}" in line
    # aiohttp's own access log is off: nothing else mentions the request.
    assert "aiohttp.access" not in log


async def test_request_id_on_every_line_of_the_request(aiohttp_client, settings):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        app = create_app(settings)
        client = await aiohttp_client(app)

        async def broken():
            raise OSError("disk gone")

        app[SERVICE].health = broken
        r = await client.get("/healthz", headers={"X-Request-ID": "h-7"})
        assert r.status == 503
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [x for x in json_lines(out.getvalue()) if x.get("request_id") == "h-7"]
    assert {x["logger"] for x in lines} == {"casd.web", "casd.access"}, lines
    warning = next(x for x in lines if x["logger"] == "casd.web")
    assert "disk gone" in warning["msg"] and warning["level"] == "warning"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--log-format", "xml"], "--log-format"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_log_flags_are_one_line(args, message, tmp_path):
    from helpers import casd_run

    r = casd_run("serve", "--data", str(tmp_path), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_malformed_request_is_one_line_not_a_traceback(daemon_factory):
    import socket
    import time

    d = daemon_factory("--log-format", "text")
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
        assert b" 400 " in s.recv(4096).split(b"\r\n", 1)[0]
    deadline = time.monotonic() + 10
    while "aiohttp.server" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    log = d.log()
    assert "Traceback" not in log
    line = next(x for x in log.splitlines() if "aiohttp.server" in x)
    assert "refused a malformed request" in line and "Invalid header value char" in line
