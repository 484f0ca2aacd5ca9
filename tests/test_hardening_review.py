"""Issue 15 reviewed as an attacker: inputs the per-item tests did not send, driven at the
real `casd serve` over raw sockets, each answered in the JSON error shape with no traceback."""

from __future__ import annotations

import json
import socket

import pytest


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request on its own connection; (status, lowercased headers, body) of the
    final answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1") + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head_bytes, _, rest = out.partition(b"\r\n\r\n")
    while head_bytes.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue)
        head_bytes, _, rest = rest.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def get(port: int, target: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *extra, "Connection: close"]
    return raw_request(port, "\r\n".join(lines) + "\r\n\r\n")


def assert_json_error(answer, status: int, code: str) -> None:
    got, headers, body = answer
    assert got == status, body[:300]
    assert headers["content-type"].startswith("application/json"), headers
    assert json.loads(body)["error"] == code


@pytest.mark.parametrize("target", [
    "/static/casd.js%00",
    "/static/" + "a" * 300,
    "/static/" + "a/" * 3000,
], ids=["nul-byte", "name-too-long", "path-too-deep"])
def test_static_names_no_file_can_have_are_404_not_500(daemon, target):
    assert_json_error(get(daemon.port, target), 404, "not_found")
    status, _, _ = get(daemon.port, "/static/casd.js")
    assert status == 200
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("target", ["/healthz", "/v1/files/" + "0" * 32, "/no/such/route"])
def test_an_unknown_expect_is_417_in_the_json_shape(daemon, target):
    assert_json_error(get(daemon.port, target, "Expect: nonsense"), 417, "expectation_failed")
    status, _, body = get(daemon.port, "/healthz", "Expect: 100-continue")
    assert status == 200, body
    assert "Traceback" not in daemon.log()
