"""casd.js cuts by content exactly where the Python client does, in headless Chromium against a
real `casd serve`: the same chunk lists from both clients, uploads of an edited file that
send only the chunks around the edit, and the upload page's chunking setting."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import pytest
from test_browser import open_with_input

from casd.chunking import Chunking
from casd.client import CasdClient, hash_file

pytestmark = pytest.mark.browser

KiB = 1024
MiB = 1024 * KiB
TIMEOUT_MS = 60_000


@pytest.fixture
def daemon(daemon_factory):
    """A daemon that offers only v1: these tests follow the page's handshake flow
    (tests/test_browser_stream.py covers v1.1, the default, in the page)."""
    return daemon_factory("--no-stream-uploads")


@pytest.fixture
def page(browser):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.handshakes = []
    pg.chunk_puts = 0

    def on_request(r):
        if r.method == "POST" and r.url.endswith("/v1/handshake"):
            pg.handshakes.append(json.loads(r.post_data))
        elif r.method == "PUT" and "/chunks/" in r.url:
            pg.chunk_puts += 1

    pg.on("request", on_request)
    yield pg
    context.close()
    assert not errors, errors


def make_file(path: Path, size: int, seed: str) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


HASH_JS = """
async ({chunking, chunkSize, algo, workers}) => {
  const m = await import("/static/casd.js");
  const file = document.querySelector("#f").files[0];
  const h = await m.hashFile(file, {chunking, chunkSize, algo, workers});
  return {digest: h.digest, chunks: h.chunks.map((c) => [c.offset, c.size, c.digest])};
}
"""

UPLOAD_JS = """
async (options) => {
  const m = await import("/static/casd.js");
  return await m.upload(document.querySelector("#f").files[0], options);
}
"""


def python_upload(server: str, path: Path, **options):
    """casd.client's upload, in its own thread: Playwright's sync API owns this one's loop."""
    out = {}

    async def run() -> None:
        async with CasdClient(server) as client:
            out["summary"] = await client.upload(path, use_cache=False, **options)

    worker = threading.Thread(target=asyncio.run, args=(run(),))
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    return out["summary"]


@pytest.mark.parametrize(
    "algo,avg,workers", [("md5", 64 * KiB, 1), ("md5", 512 * KiB, 2), ("sha256", 16 * KiB, 2)]
)
def test_hash_file_in_workers_cuts_and_hashes_like_python(
    daemon, page, tmp_path, algo, avg, workers
):
    # Slices of 8 MiB: 21 MiB + 5 makes cuts fall inside slices and chunks span slices.
    path = tmp_path / "f.bin"
    make_file(path, 21 * MiB + 5, f"cdc-{avg}")
    open_with_input(page, daemon.url, path, "f")
    got = page.evaluate(
        HASH_JS, {"chunking": "fastcdc", "chunkSize": avg, "algo": algo, "workers": workers}
    )
    want = hash_file(path, chunking=Chunking.fastcdc(avg), algo=algo)
    assert got["digest"] == want.digest
    assert got["chunks"] == [[c.offset, c.size, c.digest] for c in want.chunks]


def test_js_and_python_fastcdc_uploads_send_the_same_chunk_lists(daemon, page, tmp_path):
    path = tmp_path / "same.bin"
    make_file(path, 6 * MiB + 3, "same")
    open_with_input(page, daemon.url, path, "f")
    js = page.evaluate(UPLOAD_JS, {"chunking": "fastcdc", "chunkSize": 128 * KiB})
    assert not js["instant"] and js["chunks_sent"] == js["chunks_total"] > 20
    (hs,) = page.handshakes
    want = hash_file(path, chunking=Chunking.fastcdc(128 * KiB))
    assert hs["chunks"] == [{"md5": c.digest, "size": c.size} for c in want.chunks]
    again = python_upload(daemon.url, path, chunking="fastcdc", chunk_size=128 * KiB)
    assert again.instant and again.chunks_sent == 0

    # The other way round, on an edited copy: the browser sends only the chunks Python's
    # upload of the original did not have.
    edited = tmp_path / "edited.bin"
    data = path.read_bytes()
    edited.write_bytes(data[:100] + random.Random("ins").randbytes(KiB) + data[100:])
    open_with_input(page, daemon.url, edited, "f")
    js = page.evaluate(UPLOAD_JS, {"chunking": "fastcdc", "chunkSize": 128 * KiB})
    assert (
        1 <= js["chunks_sent"] <= 3
        and js["chunks_skipped"] == js["chunks_total"] - js["chunks_sent"]
    )


def test_bad_chunking_options_are_refused_before_any_request(daemon, page, tmp_path):
    path = tmp_path / "f.bin"
    make_file(path, 10, "bad")
    open_with_input(page, daemon.url, path, "f")
    errors = page.evaluate("""async () => {
      const m = await import("/static/casd.js");
      const f = document.querySelector("#f").files[0];
      const out = [];
      for (const o of [{chunking: "fastcdc", chunkSize: 1000}, {chunking: "rabin"}]) {
        try { await m.upload(f, o); out.push("accepted"); } catch (e) { out.push(e.message); }
      }
      return out;
    }""")
    assert "power of two" in errors[0] and "fixed" in errors[1] and "fastcdc" in errors[1]
    assert page.handshakes == []


def test_page_chunking_setting_sends_only_chunks_around_an_insertion(daemon, page, tmp_path):
    first = tmp_path / "v1.bin"
    data = make_file(first, 12 * MiB, "page-cdc")
    second = tmp_path / "v2.bin"
    second.write_bytes(random.Random("front").randbytes(KiB) + data)
    page.goto(daemon.url + "/?chunking=fastcdc")
    assert page.get_by_test_id("chunking").input_value() == "fastcdc"
    assert page.get_by_test_id("chunk-size").input_value() == "1"
    rows = page.get_by_test_id("upload")
    for n, path in enumerate((first, second)):
        page.get_by_test_id("file-input").set_input_files(path)
        from playwright.sync_api import expect

        expect(rows).to_have_count(n + 1)
        expect(rows.nth(n).get_by_test_id("status")).to_have_text("done", timeout=TIMEOUT_MS)
    summary = json.loads(rows.nth(1).get_attribute("data-summary"))
    assert summary["chunks_total"] > 6 and 1 <= summary["chunks_sent"] <= 3
    sizes = {c["size"] for c in page.handshakes[1]["chunks"]}
    assert len(sizes) > 2  # content-defined: not one fixed size
