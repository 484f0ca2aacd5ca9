"""The upload page and casd.js in headless Chromium against a real `casd serve` process.

Assertions read the page's visible state (status badge, counters) and check it against what
the server says and stores. Select with `pytest -m browser`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

MiB = 1024 * 1024
CHUNK = 5 * MiB
UPLOAD_TIMEOUT_MS = 60_000
CHUNK_PUT = "**/v1/uploads/*/chunks/*"


@pytest.fixture
def daemon(daemon_factory):
    """A daemon that offers only v1: these tests follow the page's handshake flow
    (tests/test_browser_stream.py covers v1.1, the default, in the page)."""
    return daemon_factory("--no-stream-uploads")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.chunk_puts = []
    pg.chunk_put_headers = []

    def on_request(r):
        if r.method == "PUT":
            pg.chunk_puts.append(r.url)
            pg.chunk_put_headers.append(r.headers)

    pg.on("request", on_request)
    yield pg
    context.close()
    assert not pg.errors, pg.errors


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def make_file(path: Path, size: int, seed: str) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def handshake(server: str, data: bytes, chunk_size: int, ext: str = ".bin") -> dict:
    """The handshake the page sends for `data`, made from Python: what does the server lack?"""
    chunks = [data[o : o + chunk_size] for o in range(0, len(data), chunk_size)]
    body = {
        "md5": md5(data),
        "size": len(data),
        "ext": ext,
        "chunks": [{"md5": md5(c), "size": len(c)} for c in chunks],
    }
    req = urllib.request.Request(
        server + "/v1/handshake",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def blob_count(daemon) -> int:
    return sum(1 for p in (daemon.data_dir / "blobs").rglob("*") if p.is_file())


def pick(page, path: Path):
    """Picks a file in the page and returns the row it adds."""
    rows = page.get_by_test_id("upload")
    n = rows.count()
    page.get_by_test_id("file-input").set_input_files(path)
    expect(rows).to_have_count(n + 1)
    return rows.nth(n)


def wait_finished(row, status: str = "done"):
    expect(row.get_by_test_id("status")).to_have_text(status, timeout=UPLOAD_TIMEOUT_MS)
    return json.loads(row.get_attribute("data-summary"))


def open_with_input(page, url: str, path: Path, input_id: str = "api-input") -> None:
    """Open the upload page at `url` and add a file input (`#input_id`) holding `path`, for
    tests that call casd.js's API themselves rather than the page's own picker."""
    page.goto(url + "/")
    page.evaluate(
        """(id) => {
      const input = Object.assign(document.createElement("input"), {type: "file", id});
      document.body.append(input);
    }""",
        input_id,
    )
    page.set_input_files(f"#{input_id}", path)


def counters(row) -> dict:
    get = lambda tid: row.get_by_test_id(tid).inner_text()  # noqa: E731
    return {
        "sent": get("chunks-sent"),
        "total": get("chunks-total"),
        "skipped": get("chunks-skipped"),
        "bytes_skipped": get("bytes-skipped"),
    }


def test_page_uploads_a_file_and_the_same_file_again_is_instant(daemon, page, tmp_path):
    path = tmp_path / "holiday.bin"
    data = make_file(path, 20 * MiB, "page-1")
    page.goto(daemon.url + "/")

    row = pick(page, path)
    summary = wait_finished(row, "done")
    assert counters(row) == {"sent": "4", "total": "4", "skipped": "0", "bytes_skipped": "0 B"}
    link = row.get_by_test_id("link")
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    assert href == f"{daemon.url}/v1/files/{md5(data)}.bin" == summary["url"]
    assert fetch(href) == data
    assert summary["digest"] == md5(data) and summary["bytes_sent"] == len(data)
    assert len(page.chunk_puts) == 4
    # casd.js keeps its own count: every chunk answer may skip the `missing` list.
    assert [h.get("prefer") for h in page.chunk_put_headers] == ["return=minimal"] * 4

    again = pick(page, path)
    summary = wait_finished(again, "instant")
    assert counters(again) == {
        "sent": "0",
        "total": "4",
        "skipped": "4",
        "bytes_skipped": "20.0 MiB",
    }
    expect(again.get_by_test_id("link")).to_have_attribute("href", href)
    assert summary["instant"] is True and summary["bytes_skipped"] == len(data)
    assert len(page.chunk_puts) == 4  # no chunk went out the second time
    expect(page.get_by_test_id("totals")).to_have_text(
        "2 of 2 files done · 20.0 MiB sent · 20.0 MiB skipped thanks to dedup"
    )
    page.screenshot(path=tmp_path / "finished.png", full_page=True, animations="disabled")


def test_page_sends_only_the_changed_chunk_of_a_modified_copy(daemon, page, tmp_path):
    original = tmp_path / "a.bin"
    data = make_file(original, 20 * MiB, "page-2")
    changed = bytearray(data)
    changed[2 * CHUNK + 12345] ^= 0xFF  # one byte in the third chunk
    copy = tmp_path / "b.bin"
    copy.write_bytes(changed)
    page.goto(daemon.url + "/")

    wait_finished(pick(page, original))
    assert blob_count(daemon) == 4
    # The server agrees before the page starts: it lacks exactly the changed chunk.
    answer = handshake(daemon.url, bytes(changed), CHUNK)
    assert answer["status"] == "pending"
    assert answer["missing"] == [md5(changed[2 * CHUNK : 3 * CHUNK])]

    puts_before = len(page.chunk_puts)
    row = pick(page, copy)
    summary = wait_finished(row, "done")
    assert counters(row) == {"sent": "1", "total": "4", "skipped": "3", "bytes_skipped": "15.0 MiB"}
    assert page.chunk_puts[puts_before:] == [
        f"{daemon.url}/v1/uploads/{answer['upload_id']}/chunks/{answer['missing'][0]}"
    ]
    assert summary["chunks_sent"] == 1 and summary["bytes_sent"] == CHUNK
    assert blob_count(daemon) == 5
    assert fetch(summary["url"]) == bytes(changed)
    page.screenshot(path=tmp_path / "dedup.png", full_page=True, animations="disabled")


def hold_chunk_puts_after(page, let_through: int) -> list:
    """Let the first chunk PUTs reach the server; hold later ones (like a cut connection).

    Returns the list the held routes are appended to, as Playwright dispatches them.
    """
    held: list = []
    passed = 0

    def gate(route):
        nonlocal passed
        if passed < let_through:
            passed += 1
            route.continue_()
        else:
            held.append(route)

    page.route(CHUNK_PUT, gate)
    return held


def wait_held(page, held: list, count: int, seconds: float = 10) -> None:
    """Bounded wait until `count` requests are held (page.wait_for_timeout lets routes run)."""
    deadline = time.monotonic() + seconds
    while len(held) < count and time.monotonic() < deadline:
        page.wait_for_timeout(20)


def test_reload_mid_upload_then_picking_the_file_again_sends_only_the_rest(daemon, page, tmp_path):
    path = tmp_path / "big.bin"
    data = make_file(path, 20 * MiB, "page-3")
    let_through = 8
    held = hold_chunk_puts_after(page, let_through)
    page.goto(daemon.url + "/?chunk_size=1048576&concurrency=3")
    row = pick(page, path)
    expect(row.get_by_test_id("status")).to_have_text("uploading", timeout=UPLOAD_TIMEOUT_MS)
    expect(row.get_by_test_id("chunks-sent")).to_have_text(str(let_through))
    wait_held(page, held, 3)
    assert len(held) == 3, "the queue should hold `concurrency` requests in flight"
    assert len(handshake(daemon.url, data, MiB)["missing"]) == 20 - let_through

    page.reload()
    for route in held:  # never let the cut requests reach the server late
        route.abort()
    page.unroute(CHUNK_PUT)
    expect(page.get_by_test_id("upload")).to_have_count(0)

    puts_before = len(page.chunk_puts)
    row = pick(page, path)
    summary = wait_finished(row, "done")
    assert counters(row) == {
        "sent": str(20 - let_through),
        "total": "20",
        "skipped": str(let_through),
        "bytes_skipped": "8.0 MiB",
    }
    assert len(page.chunk_puts) - puts_before == 20 - let_through
    assert summary["instant"] is False
    assert fetch(summary["url"]) == data


def test_page_retries_chunks_answered_503_429_and_408(daemon, page, tmp_path):
    path = tmp_path / "flaky.bin"
    data = make_file(path, 3 * MiB, "page-4")
    # The statuses the Python client retries too; the 429 asks for a one-second wait.
    faults = [(503, {}), (429, {"Retry-After": "1"}), (408, {})]
    attempts: list[float] = []

    def flaky(route):
        attempts.append(time.monotonic())
        if len(attempts) <= len(faults):
            status, headers = faults[len(attempts) - 1]
            route.fulfill(
                status=status,
                content_type="application/json",
                headers=headers,
                body='{"error": "unavailable", "message": "try again"}',
            )
        else:
            route.continue_()

    page.route(CHUNK_PUT, flaky)
    page.goto(daemon.url + "/?chunk_size=1048576&concurrency=1")
    row = pick(page, path)
    summary = wait_finished(row, "done")
    assert len(attempts) == len(faults) + 3
    # Jitter alone retries within 0.5 s here; Retry-After made it wait the second asked for.
    assert attempts[2] - attempts[1] >= 0.9
    assert counters(row)["sent"] == "3"
    assert fetch(summary["url"]) == data


def test_page_shows_the_servers_refusal(daemon_factory, page, tmp_path):
    server = daemon_factory("--token", "s3cret")
    path = tmp_path / "x.bin"
    make_file(path, 1000, "page-5")
    page.goto(server.url + "/")
    row = pick(page, path)
    expect(row.get_by_test_id("status")).to_have_text("failed", timeout=UPLOAD_TIMEOUT_MS)
    expect(row.get_by_test_id("error")).to_contain_text("unauthorized: missing or wrong token")

    page.get_by_text("Settings").click()
    page.get_by_test_id("token").fill("s3cret")
    summary = wait_finished(pick(page, path))
    assert summary["size"] == 1000


def test_page_says_what_to_do_after_401_403_and_quota_in_tenant_mode(
    daemon_factory, page, tmp_path
):
    """Issue 10: in tenant mode the page names the refusal (`code: message`) and, under it,
    what would help: another token, the upload role, room in the quota."""
    from casd.tenants import Role, add_token

    tokens = tmp_path / "tokens"
    reader, _ = add_token(tokens, "acme", Role.READ, None)
    small, _ = add_token(tokens, "acme", Role.UPLOAD, 1000)
    server = daemon_factory("--tokens", str(tokens))
    path = tmp_path / "q.bin"
    make_file(path, 2000, "page-tenants")
    page.goto(server.url + "/")
    page.get_by_text("Settings").click()
    for token, code, says, hint in (
        ("not-a-token", "unauthorized", "missing or unknown token", "check the token"),
        (reader, "forbidden", "read token of tenant 'acme'", "upload role"),
        (small, "quota_exceeded", "quota of 1000 bytes", "quota is full"),
    ):
        page.get_by_test_id("token").fill(token)
        row = pick(page, path)
        expect(row.get_by_test_id("status")).to_have_text("failed", timeout=UPLOAD_TIMEOUT_MS)
        expect(row.get_by_test_id("error")).to_contain_text(f"{code}: ")
        expect(row.get_by_test_id("error")).to_contain_text(says)
        expect(row.get_by_test_id("detail")).to_contain_text(hint)
    assert blob_count(server) == 0


def test_cancel_stops_the_upload_and_picking_again_resumes(daemon, page, tmp_path):
    path = tmp_path / "c.bin"
    data = make_file(path, 6 * MiB, "page-6")
    held = hold_chunk_puts_after(page, 2)
    page.goto(daemon.url + "/?chunk_size=1048576&concurrency=1&algo=sha256")
    row = pick(page, path)
    expect(row.get_by_test_id("chunks-sent")).to_have_text("2", timeout=UPLOAD_TIMEOUT_MS)
    wait_held(page, held, 1)
    assert len(held) == 1
    row.get_by_test_id("cancel").click()
    expect(row.get_by_test_id("status")).to_have_text("cancelled")
    expect(row.get_by_test_id("link")).to_be_hidden()
    held[0].abort()  # unrouting would let the cancelled request through to the server
    page.unroute(CHUNK_PUT)

    summary = wait_finished(pick(page, path))
    assert (summary["chunks_sent"], summary["chunks_skipped"]) == (4, 2)
    assert summary["algo"] == "sha256"
    assert summary["url"] == f"{daemon.url}/v1/files/{hashlib.sha256(data).hexdigest()}.bin"
    assert fetch(summary["url"]) == data


COUNT_XHR = """
(() => {
  const send = XMLHttpRequest.prototype.send;
  window.__xhr = { now: 0, max: 0 };
  XMLHttpRequest.prototype.send = function (...args) {
    const st = window.__xhr;
    st.now += 1;
    st.max = Math.max(st.max, st.now);
    // readyState 4 comes before the load event that lets casd.js start its next request.
    this.addEventListener("readystatechange", () => { if (this.readyState === 4) st.now -= 1; });
    return send.apply(this, args);
  };
})();
"""

UPLOAD_API = """
async ({concurrency}) => {
  const { upload } = await import("/static/casd.js");
  const file = document.querySelector("#api-input").files[0];
  const phases = [];
  const summary = await upload(file, {
    server: location.origin, chunkSize: 1024 * 1024, concurrency,
    onProgress: (p) => { if (phases.at(-1) !== p.phase) phases.push(p.phase); },
  });
  return { summary, phases, maxInFlight: window.__xhr.max };
}
"""


PYTHON_SIDE = """
async () => {
  const m = await import("/static/casd.js");
  const refused = new m.CasdError(400, "bad_request", "no");
  return {
    concurrency: m.DEFAULT_CONCURRENCY, retries: m.DEFAULT_RETRIES,
    code: refused.code, error: refused.error,
    retryable: [400, 404, 408, 429, 500, 503, 507, 0].map(
      (s) => new m.CasdError(s, "x", "x").retryable),
  };
}
"""


def python_phases(server: str, path: Path) -> list[str]:
    """The progress phases of casd.client uploading `path`, in the order they began."""
    from casd.client import CasdClient

    seen: list[str] = []

    async def run() -> None:
        async with CasdClient(server) as client:
            await client.upload(
                path, chunk_size=MiB, use_cache=False, on_progress=lambda p: seen.append(p.phase)
            )

    # Playwright's sync API owns this thread's event loop; the client gets its own thread.
    worker = threading.Thread(target=asyncio.run, args=(run(),))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    return [str(p) for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p]


def test_upload_api_summary_matches_the_python_client_and_queue_is_bounded(daemon, page, tmp_path):
    from dataclasses import fields

    from casd.client import (
        DEFAULT_CONCURRENCY,
        DEFAULT_RETRIES,
        CasdHTTPError,
        UploadSummary,
    )

    path = tmp_path / "api.bin"
    data = make_file(path, 10 * MiB + 17, "api")
    page.add_init_script(COUNT_XHR)
    open_with_input(page, daemon.url, path)

    got = page.evaluate(UPLOAD_API, {"concurrency": 2})
    summary = got["summary"]
    python_fields = {f.name for f in fields(UploadSummary)} - {"path", "cached"}
    assert set(summary) == python_fields | {"name"}
    assert got["phases"] == ["hashing", "handshake", "uploading", "merging", "done"]
    other = tmp_path / "python.bin"
    make_file(other, 3 * MiB, "api-python")
    assert python_phases(daemon.url, other) == got["phases"]
    assert got["maxInFlight"] == 2
    assert {
        k: summary[k]
        for k in (
            "digest",
            "algo",
            "size",
            "chunks_total",
            "chunks_sent",
            "bytes_sent",
            "chunks_skipped",
            "bytes_skipped",
            "instant",
            "name",
        )
    } == {
        "digest": md5(data),
        "algo": "md5",
        "size": len(data),
        "chunks_total": 11,
        "chunks_sent": 11,
        "bytes_sent": len(data),
        "chunks_skipped": 0,
        "bytes_skipped": 0,
        "instant": False,
        "name": "api.bin",
    }
    assert summary["url"] == f"{daemon.url}/v1/files/{md5(data)}.bin"
    assert fetch(summary["url"]) == data

    again = page.evaluate(UPLOAD_API, {"concurrency": 2})
    assert again["phases"] == ["hashing", "handshake", "done"]
    assert python_phases(daemon.url, other) == again["phases"]

    # The two clients share their defaults and their rule for what is worth retrying.
    js = page.evaluate(PYTHON_SIDE)
    assert (js["concurrency"], js["retries"]) == (DEFAULT_CONCURRENCY, DEFAULT_RETRIES)
    assert js["code"] == js["error"] == "bad_request"
    statuses = [400, 404, 408, 429, 500, 503, 507]
    assert js["retryable"] == [CasdHTTPError("x", status=s).retryable for s in statuses] + [True]
    assert again["summary"]["instant"] is True
    assert again["summary"]["chunks_skipped"] == 11


def test_upload_survives_the_server_dropping_the_upload_midway(daemon, page, tmp_path):
    """A chunk PUT answered 404 (upload aborted or expired) leads to a fresh handshake."""
    path = tmp_path / "dropped.bin"
    data = make_file(path, 6 * MiB, "page-7")
    held = hold_chunk_puts_after(page, 2)
    page.goto(daemon.url + "/?chunk_size=1048576&concurrency=1")
    row = pick(page, path)
    expect(row.get_by_test_id("chunks-sent")).to_have_text("2", timeout=UPLOAD_TIMEOUT_MS)
    wait_held(page, held, 1)
    upload_id = handshake(daemon.url, data, MiB)["upload_id"]
    req = urllib.request.Request(f"{daemon.url}/v1/uploads/{upload_id}", method="DELETE")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204
    held[0].continue_()  # reaches the server after the abort: 404 not_found
    page.unroute(CHUNK_PUT)

    summary = wait_finished(row)
    assert counters(row) == {"sent": "6", "total": "6", "skipped": "0", "bytes_skipped": "0 B"}
    assert summary["bytes_sent"] == len(data)
    assert fetch(summary["url"]) == data


def test_files_dropped_on_the_page_are_uploaded(daemon, page):
    page.goto(daemon.url + "/")
    page.evaluate("""() => {
      const text = "dropped on casd\\n".repeat(100000);
      const dt = new DataTransfer();
      dt.items.add(new File([text], "dropped.txt", { type: "text/plain" }));
      dt.items.add(new File(["second"], "second.txt"));
      document.querySelector("#drop").dispatchEvent(
        new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""")
    rows = page.get_by_test_id("upload")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).get_by_test_id("name")).to_have_text("dropped.txt")
    first = wait_finished(rows.nth(0))
    second = wait_finished(rows.nth(1))
    assert fetch(first["url"]) == b"dropped on casd\n" * 100000
    assert first["url"].endswith(".txt")
    assert fetch(second["url"]) == b"second"
