"""casd.js and protocol v1.1 (streamed uploads) in headless Chromium against a real daemon.

A daemon run with --stream-uploads gets the chunks while the page still hashes; one without
it gets the v1 handshake, from the same call. Select with `pytest -m browser`.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import urllib.request

import pytest
from test_browser import open_with_input

pytestmark = pytest.mark.browser

MiB = 1024 * 1024

UPLOAD = """
async ({algo, chunking, chunkSize}) => {
  const { upload } = await import("/static/casd.js");
  const file = document.querySelector("#api-input").files[0];
  const phases = [];
  let sentWhileHashing = 0;
  const summary = await upload(file, {
    server: location.origin, chunkSize, chunking, algo, concurrency: 2,
    onProgress: (p) => {
      if (phases.at(-1) !== p.phase) phases.push(p.phase);
      if (p.phase === "hashing") sentWhileHashing = Math.max(sentWhileHashing, p.bytes_sent);
    },
  });
  return { summary, phases, sentWhileHashing };
}
"""


@pytest.fixture
def page(browser):
    context = browser.new_context()
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.requests = []
    pg.on("request", lambda r: pg.requests.append((r.method, r.url)))
    yield pg
    context.close()
    assert not pg.errors, pg.errors


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def manifest_keys(daemon) -> list[str]:
    con = sqlite3.connect(daemon.data_dir / "catalog.sqlite")
    try:
        return [r[0] for r in con.execute("SELECT chunks_key FROM manifests ORDER BY id")]
    finally:
        con.close()


@pytest.mark.parametrize(
    "algo,chunking,chunk_size",
    [("md5", "fixed", MiB), ("sha256", "fixed", MiB), ("md5", "fastcdc", 64 * 1024)],
)
def test_page_streams_to_a_server_that_offers_it(
    daemon_factory, page, tmp_path, algo, chunking, chunk_size
):
    d = daemon_factory("--stream-uploads")
    path = tmp_path / "s.bin"
    data = random.Random(f"stream-{algo}-{chunking}").randbytes(6 * MiB + 17)
    path.write_bytes(data)
    open_with_input(page, d.url, path)
    got = page.evaluate(UPLOAD, {"algo": algo, "chunking": chunking, "chunkSize": chunk_size})
    s = got["summary"]
    assert "handshake" not in got["phases"]
    assert got["phases"][0] == "hashing" and got["phases"][-2:] == ["merging", "done"]
    assert s["digest"] == hashlib.new(algo, data).hexdigest()
    assert s["chunks_sent"] == s["chunks_total"] > 1 and s["bytes_sent"] == len(data)
    assert fetch(s["url"]) == data
    assert any(m == "POST" and u.endswith("/v1/uploads") for m, u in page.requests)
    assert not any(u.endswith("/v1/handshake") for _m, u in page.requests)
    assert [k.startswith("stream:") for k in manifest_keys(d)] == [True]

    # The same file again: every chunk is on the server, none is sent.
    again = page.evaluate(UPLOAD, {"algo": algo, "chunking": chunking, "chunkSize": chunk_size})
    assert again["summary"]["chunks_sent"] == 0
    assert again["summary"]["chunks_skipped"] == s["chunks_total"]
    assert again["summary"]["url"] == s["url"]


def test_page_uses_v1_with_a_server_that_does_not_offer_streaming(daemon_factory, page, tmp_path):
    daemon = daemon_factory("--no-stream-uploads")
    path = tmp_path / "v1.bin"
    data = random.Random("v1").randbytes(3 * MiB + 5)
    path.write_bytes(data)
    open_with_input(page, daemon.url, path)
    got = page.evaluate(UPLOAD, {"algo": "md5", "chunking": "fixed", "chunkSize": MiB})
    assert got["phases"] == ["hashing", "handshake", "uploading", "merging", "done"]
    assert fetch(got["summary"]["url"]) == data
    assert not any(m == "POST" and u.endswith("/v1/uploads") for m, u in page.requests)
    assert [k.startswith("stream:") for k in manifest_keys(daemon)] == [False]


def test_page_stream_of_an_empty_file(daemon_factory, page, tmp_path):
    d = daemon_factory("--stream-uploads")
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    open_with_input(page, d.url, path)
    got = page.evaluate(UPLOAD, {"algo": "md5", "chunking": "fixed", "chunkSize": MiB})
    assert got["summary"]["digest"] == hashlib.md5(b"").hexdigest()
    assert got["summary"]["url"].endswith(".txt")
    assert fetch(got["summary"]["url"]) == b""


ABORT_MIDWAY = """
async () => {
  const { upload } = await import("/static/casd.js");
  const file = document.querySelector("#api-input").files[0];
  const stop = new AbortController();
  let sent = 0;
  try {
    await upload(file, {
      server: location.origin, chunkSize: 1024 * 1024, concurrency: 1, signal: stop.signal,
      onProgress: (p) => {
        sent = p.chunks_sent;
        if (p.chunks_sent >= 3) stop.abort();
      },
    });
    return { aborted: false, sent };
  } catch (err) {
    return { aborted: err.name === "AbortError", sent };
  }
}
"""


def test_page_stream_cancelled_midway_then_again_sends_only_the_rest(
    daemon_factory, page, tmp_path
):
    d = daemon_factory("--stream-uploads")
    path = tmp_path / "r.bin"
    data = random.Random("resume").randbytes(12 * MiB)
    path.write_bytes(data)
    open_with_input(page, d.url, path)
    first = page.evaluate(ABORT_MIDWAY)
    assert first["aborted"] and first["sent"] >= 3
    # The abandoned upload was given back (it no longer counts against the budget).
    page.wait_for_timeout(200)
    assert any(m == "DELETE" and "/v1/uploads/" in u for m, u in page.requests)
    got = page.evaluate(UPLOAD, {"algo": "md5", "chunking": "fixed", "chunkSize": MiB})
    s = got["summary"]
    assert s["chunks_total"] == 12
    assert s["chunks_skipped"] >= first["sent"] and s["chunks_sent"] + s["chunks_skipped"] == 12
    assert fetch(s["url"]) == data


def test_page_falls_back_to_v1_when_opening_a_stream_answers_404(daemon_factory, page, tmp_path):
    d = daemon_factory("--stream-uploads")
    path = tmp_path / "f.bin"
    data = random.Random("gone").randbytes(2 * MiB + 3)
    path.write_bytes(data)
    # As a server restarted without --stream-uploads after the page asked what it offers.
    page.route(
        "**/v1/uploads",
        lambda route: route.fulfill(
            status=404,
            content_type="application/json",
            body='{"error": "not_found", "message": "no such endpoint: /v1/uploads"}',
        ),
    )
    open_with_input(page, d.url, path)
    got = page.evaluate(UPLOAD, {"algo": "md5", "chunking": "fixed", "chunkSize": MiB})
    assert got["phases"] == ["hashing", "handshake", "uploading", "merging", "done"]
    assert fetch(got["summary"]["url"]) == data


def test_page_streams_in_tenant_mode_and_a_second_tenant_sends_every_chunk(
    daemon_factory, page, tmp_path
):
    from casd.tenants import Role, add_token

    tokens = tmp_path / "tokens"
    alice, _ = add_token(tokens, "alice", Role.UPLOAD, None)
    bob, _ = add_token(tokens, "bob", Role.UPLOAD, None)
    d = daemon_factory("--tokens", str(tokens))
    path = tmp_path / "t.bin"
    data = random.Random("tenants").randbytes(3 * MiB + 9)
    path.write_bytes(data)
    open_with_input(page, d.url, path)
    with_token = UPLOAD.replace("concurrency: 2,", "concurrency: 2, token,").replace(
        "({algo, chunking, chunkSize})", "({algo, chunking, chunkSize, token})"
    )
    args = {"algo": "md5", "chunking": "fixed", "chunkSize": MiB}
    first = page.evaluate(with_token, {**args, "token": alice})
    second = page.evaluate(with_token, {**args, "token": bob})
    for got in (first, second):
        assert "handshake" not in got["phases"]
        assert got["summary"]["chunks_sent"] == got["summary"]["chunks_total"] == 4
    assert not any(u.endswith("/v1/handshake") for _m, u in page.requests)
