"""casd.js on a page of a second origin, against a real `casd serve`: it uploads and
downloads when `--cors-origin` allows that origin, and fails with a clear CasdError when
it does not. Select with `pytest -m browser`."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading

import pytest
from aiohttp import web

pytestmark = pytest.mark.browser

MiB = 1024 * 1024
BLANK_PAGE = "<!doctype html><meta charset=utf-8><title>another origin</title>"


class OtherOrigin:
    """A blank page on 127.0.0.1, another port: the second origin the page lives on."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _start(self) -> None:
        async def blank(request: web.Request) -> web.Response:
            return web.Response(text=BLANK_PAGE, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", blank)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def start(self) -> OtherOrigin:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def other_origin():
    s = OtherOrigin().start()
    yield s
    s.stop()


@pytest.fixture
def page(browser, other_origin):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(other_origin.url + "/")
    yield pg
    context.close()
    assert not errors, errors


# Builds the file in the page (deterministic bytes), uploads it with casd.js imported from
# casd's origin, then downloads it back (a whole GET and a Range GET reading the exposed
# Content-Range), or reports the CasdError.
UPLOAD_JS = """
async ({casd, size, seed}) => {
  const { upload, CasdError } = await import(casd + "/static/casd.js");
  const bytes = new Uint8Array(size);
  let x = seed;
  for (let i = 0; i < size; i++) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; bytes[i] = x >>> 24; }
  try {
    const s = await upload(new File([bytes], "cross.bin"), {
      server: casd, chunkSize: 1024 * 1024, retries: 0,
    });
    const whole = new Uint8Array(await (await fetch(s.url)).arrayBuffer());
    const part = await fetch(s.url, { headers: { Range: "bytes=10-19" } });
    const same = whole.length === bytes.length && whole.every((b, i) => b === bytes[i]);
    return {
      ok: true, digest: s.digest, url: s.url, chunks_sent: s.chunks_sent, same,
      status: part.status, range: part.headers.get("Content-Range"),
      etag: part.headers.get("ETag"),
    };
  } catch (err) {
    return {
      ok: false, casd: err instanceof CasdError, status: err.status, error: err.error,
      message: err.message,
    };
  }
}
"""


def expected(size: int, seed: int) -> bytes:
    out = bytearray(size)
    x = seed
    for i in range(size):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = x >> 24
    return bytes(out)


def test_allowed_origin_uploads_and_downloads_with_casd_js(daemon_factory, other_origin, page):
    d = daemon_factory("--cors-origin", other_origin.url)
    size, seed = 2 * MiB + 12345, random.Random("cors").randrange(1 << 30)
    got = page.evaluate(UPLOAD_JS, {"casd": d.url, "size": size, "seed": seed})
    assert got["ok"], got
    data = expected(size, seed)
    digest = hashlib.md5(data).hexdigest()
    assert got["digest"] == digest and got["same"] and got["chunks_sent"] == 3
    assert got["url"].startswith(d.url + "/v1/files/")
    assert got["status"] == 206 and got["range"] == f"bytes 10-19/{size}"
    assert got["etag"] == f'"{digest}"'


def test_origin_not_allowed_fails_with_a_clear_error_and_stores_nothing(
    daemon_factory, other_origin, page
):
    d = daemon_factory("--cors-origin", "http://somewhere.else.example")
    got = page.evaluate(UPLOAD_JS, {"casd": d.url, "size": 300_000, "seed": 7})
    assert not got["ok"] and got["casd"], got
    assert got["status"] == 0 and got["error"] == "network_error"
    assert f"--cors-origin {other_origin.url}" in got["message"]
    assert not [p for p in (d.data_dir / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_upload_page_works_under_its_content_security_policy(daemon, browser, tmp_path, algo):
    """The page's CSP blocks nothing the page needs: workers, WebCrypto, its own requests."""
    # Imported here: collecting the tests must work without playwright.
    from playwright.sync_api import expect

    context = browser.new_context()
    pg = context.new_page()
    violations: list[str] = []
    pg.on("console", lambda m: violations.append(m.text) if m.text.startswith("CSP ") else None)
    pg.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) =>"
        " console.error('CSP ' + e.violatedDirective + ' ' + e.blockedURI));"
    )
    try:
        response = pg.goto(f"{daemon.url}/?algo={algo}&chunk_size=1048576")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        data = random.Random(algo).randbytes(3 * MiB + 5)
        path = tmp_path / "page.bin"
        path.write_bytes(data)
        pg.get_by_test_id("file-input").set_input_files(path)
        row = pg.get_by_test_id("upload").first
        expect(row.get_by_test_id("status")).to_have_text("done", timeout=60_000)
        link = row.get_by_test_id("link").get_attribute("href")
        digest = hashlib.new(algo, data).hexdigest()
        assert digest in link
    finally:
        context.close()
    assert violations == []
