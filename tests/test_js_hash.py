"""The browser's own MD5 and SHA-256 (casd/static) against hashlib, run in headless Chromium.

These need no daemon: a tiny aiohttp server on 127.0.0.1 serves casd/static and the test
data. Throughput: `pytest tests/test_js_hash.py -k throughput -s` prints MB/s (marked slow;
no timed assertion; the figures go into docs/browser.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

import casd

pytestmark = pytest.mark.browser

STATIC_DIR = Path(casd.__file__).parent / "static"
MiB = 1024 * 1024
BLANK_PAGE = "<!doctype html><meta charset=utf-8><title>casd js tests</title><input type=file id=f>"


class StaticServer:
    """casd/static under /static/, a blank page at /, and registered byte strings at /data/."""

    def __init__(self, cors: bool = False) -> None:
        self.cors = cors
        self.data: dict[str, bytes] = {}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def put(self, name: str, data: bytes) -> str:
        self.data[name] = data
        return f"/data/{name}"

    async def _start(self) -> None:
        @web.middleware
        async def allow_any_origin(request: web.Request, handler):
            response = await handler(request)
            response.headers["Access-Control-Allow-Origin"] = "*"
            return response

        app = web.Application(middlewares=[allow_any_origin] if self.cors else [])

        async def blank(request: web.Request) -> web.Response:
            return web.Response(text=BLANK_PAGE, content_type="text/html")

        async def data(request: web.Request) -> web.Response:
            return web.Response(body=self.data[request.match_info["name"]])

        app.router.add_get("/", blank)
        app.router.add_get("/data/{name}", data)
        app.router.add_static("/static/", STATIC_DIR)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> StaticServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = StaticServer().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def other_origin():
    """A second server, on another port (another origin), that allows cross-origin reads."""
    s = StaticServer(cors=True).start()
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server.url + "/")
    yield pg
    context.close()
    assert not errors, errors


def reference(algo: str, data: bytes) -> str:
    return hashlib.new(algo, data).hexdigest()


# Sizes around every padding edge (55/56/63/64/65 and their next block), a chunk boundary
# (5 MiB, +-1) and a few MiB.
SIZES = [
    0,
    1,
    2,
    3,
    55,
    56,
    57,
    63,
    64,
    65,
    119,
    120,
    127,
    128,
    129,
    1000,
    4095,
    4096,
    4097,
    65535,
    65536,
    65537,
    65536 * 3 + 5,
    5 * MiB - 1,
    5 * MiB,
    5 * MiB + 1,
    3 * MiB + 4321,
]

HASH_SIZES_JS = """
async ({module, cls, items}) => {
  const mod = await import(module);
  const H = mod[cls];
  // Odd slice lengths, so that feeds start at every alignment and straddle block edges.
  const pattern = [1, 3, 7, 13, 63, 64, 65, 127, 1000, 4093, 65537, 1048573];
  const out = {};
  for (const {name, url} of items) {
    const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
    const whole = new H().update(bytes.buffer).hex();
    const split = new H();
    for (let pos = 0, k = 0; pos < bytes.length; k++) {
      const n = Math.min(pattern[k % pattern.length], bytes.length - pos);
      split.update(bytes.subarray(pos, pos + n));  // views at odd byte offsets
      pos += n;
    }
    // The same bytes inside a bigger buffer at offset 1: an unaligned view fed at once.
    const shifted = new Uint8Array(bytes.length + 1);
    shifted.set(bytes, 1);
    const unaligned = new H().update(shifted.subarray(1)).hex();
    out[name] = [whole, split.hex(), unaligned];
  }
  return out;
}
"""


@pytest.mark.parametrize(
    "algo, module, cls",
    [("md5", "/static/md5.js", "Md5"), ("sha256", "/static/sha256.js", "Sha256")],
)
def test_js_hash_matches_hashlib_on_many_sizes_and_splits(page, server, algo, module, cls):
    rng = random.Random(f"sizes-{algo}")
    items, expected = [], {}
    for size in SIZES + [rng.randrange(1, 2 * MiB) for _ in range(8)]:
        data = rng.randbytes(size)
        name = f"{algo}-{size}"
        items.append({"name": name, "url": server.put(name, data)})
        expected[name] = reference(algo, data)
    got = page.evaluate(HASH_SIZES_JS, {"module": module, "cls": cls, "items": items})
    wrong = {
        name: (digests, expected[name])
        for name, digests in got.items()
        if digests != [expected[name]] * 3
    }
    assert len(got) == len(items)
    assert not wrong


@pytest.mark.parametrize(
    "algo, module, cls",
    [("md5", "/static/md5.js", "Md5"), ("sha256", "/static/sha256.js", "Sha256")],
)
def test_js_hash_counts_lengths_beyond_2_to_the_32_bits(page, server, algo, module, cls):
    # 520 MiB is over 2**32 bits: the high word of the length field is non-zero.
    block = random.Random("long").randbytes(MiB)
    repeats = 520
    expected = hashlib.new(algo)
    for _ in range(repeats):
        expected.update(block)
    got = page.evaluate(
        """async ({module, cls, url, repeats}) => {
          const H = (await import(module))[cls];
          const block = await (await fetch(url)).arrayBuffer();
          const h = new H();
          for (let i = 0; i < repeats; i++) h.update(block);
          return h.hex();
        }""",
        {"module": module, "cls": cls, "url": server.put("long-block", block), "repeats": repeats},
    )
    assert got == expected.hexdigest()


HASH_FILE_JS = """
async ({url, name, chunkSize, algo, workers}) => {
  const { hashFile } = await import("/static/casd.js");
  const bytes = await (await fetch(url)).arrayBuffer();
  const file = new File([bytes], name);
  const seen = [];
  const r = await hashFile(file, {chunkSize, algo, workers, onProgress: (b) => seen.push(b)});
  return {
    digest: r.digest, size: r.size,
    chunks: r.chunks.map((c) => [c.offset, c.size, c.digest]),
    progress: seen,
  };
}
"""


@pytest.mark.parametrize("algo", ["md5", "sha256"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    "size, chunk_size",
    [
        (0, 5 * MiB),
        (1, 5 * MiB),
        (3 * (MiB + 3) + 12345, MiB + 3),  # odd chunk size: chunks start unaligned to 64
        (2 * 9 * MiB + 5, 9 * MiB),  # chunks larger than the worker's 8 MiB read slice
        (4 * MiB, MiB),  # exact multiple: no short last chunk
    ],
)
def test_hash_file_in_workers_gives_hashlib_digests(page, server, algo, workers, size, chunk_size):
    data = random.Random(f"file-{size}").randbytes(size)
    url = server.put(f"file-{size}", data)
    got = page.evaluate(
        HASH_FILE_JS,
        {"url": url, "name": "x.bin", "chunkSize": chunk_size, "algo": algo, "workers": workers},
    )
    expected_chunks = [
        [off, len(data[off : off + chunk_size]), reference(algo, data[off : off + chunk_size])]
        for off in range(0, size, chunk_size)
    ]
    assert got["digest"] == reference(algo, data)
    assert got["size"] == size
    assert got["chunks"] == expected_chunks
    if size:
        assert got["progress"][-1] == size
        assert got["progress"] == sorted(got["progress"])


def test_casd_js_imported_from_another_origin_still_starts_its_worker(page, other_origin):
    """Browsers refuse a worker script from another origin; casd.js falls back to a
    same-origin blob: module that imports it."""
    data = random.Random("cross").randbytes(3 * MiB + 1)
    url = other_origin.url + other_origin.put("cross", data)
    got = page.evaluate(
        """async ({module, url}) => {
          const { hashFile } = await import(module);
          const bytes = await (await fetch(url)).arrayBuffer();
          const r = await hashFile(new File([bytes], "x"), { chunkSize: 1024 * 1024 });
          return [r.digest, r.chunks.map((c) => c.digest)];
        }""",
        {"module": other_origin.url + "/static/casd.js", "url": url},
    )
    assert got == [
        hashlib.md5(data).hexdigest(),
        [hashlib.md5(data[o : o + MiB]).hexdigest() for o in range(0, len(data), MiB)],
    ]


def test_hashing_leaves_the_main_thread_free(page, server):
    """While 128 MiB hash in workers, the page's main thread stays free."""
    got = page.evaluate(
        """async () => {
          const { hashFile } = await import("/static/casd.js");
          const file = new File([new Uint8Array(128 * 1024 * 1024).fill(7)], "big.bin");
          // End the task that built the file before watching for long tasks.
          await new Promise((resolve) => setTimeout(resolve, 0));
          const long = [];
          const obs = new PerformanceObserver((l) => long.push(...l.getEntries().map((e) => e.duration)));
          obs.observe({ type: "longtask" });
          let ticks = 0;
          const timer = setInterval(() => ticks++, 10);
          const t0 = performance.now();
          const r = await hashFile(file, { chunkSize: 5 * 1024 * 1024 });
          const ms = performance.now() - t0;
          clearInterval(timer);
          await new Promise((resolve) => setTimeout(resolve, 50));
          obs.disconnect();
          return { digest: r.digest, long, ticks, ms };
        }"""
    )
    assert got["digest"] == hashlib.md5(bytes([7]) * (128 * MiB)).hexdigest()
    # Hashing on the main thread would fill the whole duration with long tasks (over 50 ms)
    # and starve the 10 ms timer. Bounds are loose: a busy CI machine can preempt the page.
    assert sum(got["long"]) < got["ms"] / 2, got
    assert got["ticks"] >= got["ms"] / 10 / 4, got


@pytest.mark.slow
def test_hashing_throughput(page, server, tmp_path):
    """Prints MB/s: each JS hasher over 256 MiB generated in the page, then hashFile() (whole
    file and chunk digests, in workers) over a 256 MiB file on disk, beside hashlib."""
    size = 256 * MiB
    block = random.Random("throughput").randbytes(MiB)
    path = tmp_path / "gen.bin"
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    page.set_input_files("#f", path)
    results = page.evaluate(
        """async ({url, size}) => {
          const { Md5 } = await import("/static/md5.js");
          const { Sha256 } = await import("/static/sha256.js");
          const { hashFile } = await import("/static/casd.js");
          const block = new Uint8Array(await (await fetch(url)).arrayBuffer());
          let buf = new Uint8Array(size);
          for (let off = 0; off < size; off += block.length) buf.set(block, off);
          const out = {};
          // Fed 8 MiB slices, as the worker feeds them (V8 optimizes update() once it has
          // been called often; one 256 MiB call runs slower). Best of three runs: the
          // machine may be busy with other work.
          const SLICE = 8 * 1024 * 1024;
          const feed = (H) => {
            const h = new H();
            for (let off = 0; off < size; off += SLICE) h.update(buf.subarray(off, off + SLICE));
            return h.hex();
          };
          for (const [name, H] of [["md5", Md5], ["sha256", Sha256]]) {
            feed(H);  // warm up the JIT
            out[name] = { raw_ms: Infinity };
            for (let run = 0; run < 3; run++) {
              const t = performance.now();
              out[name].hex = feed(H);
              out[name].raw_ms = Math.min(out[name].raw_ms, performance.now() - t);
            }
          }
          buf = null;
          const file = document.querySelector("#f").files[0];
          for (const algo of ["md5", "sha256"]) {
            for (const workers of [1, 2]) {
              out[algo][`file_ms_${workers}`] = Infinity;
              for (let run = 0; run < 3; run++) {
                const t = performance.now();
                const r = await hashFile(file, { algo, workers, chunkSize: 5 * 1024 * 1024 });
                const ms = performance.now() - t;
                out[algo][`file_ms_${workers}`] = Math.min(out[algo][`file_ms_${workers}`], ms);
                out[algo][`file_hex_${workers}`] = r.digest;
              }
            }
          }
          out.cores = navigator.hardwareConcurrency;
          return out;
        }""",
        {"url": server.put("throughput-block", block), "size": size},
    )
    data = path.read_bytes()
    mb = size / 1e6
    lines = [
        f"hashing {size // MiB} MiB in Chromium ({results['cores']} cores, load average"
        f" {os.getloadavg()[0]:.1f}), MB/s, best of 3:",
        f"{'algo':8}{'JS hasher':>11}{'hashFile, 1 worker':>20}{'hashFile, 2 workers':>21}{'hashlib':>9}",
    ]
    for algo in ("md5", "sha256"):
        r = results[algo]
        t = time.perf_counter()
        expected = reference(algo, data)
        native = mb / (time.perf_counter() - t)
        assert r["hex"] == r["file_hex_1"] == r["file_hex_2"] == expected
        lines.append(
            f"{algo:8}{mb / r['raw_ms'] * 1000:11.0f}{mb / r['file_ms_1'] * 1000:20.0f}"
            f"{mb / r['file_ms_2'] * 1000:21.0f}{native:9.0f}"
        )
    print("\n" + "\n".join(lines))


@pytest.mark.slow
def test_hash_file_of_more_than_4_gib(page, tmp_path):
    """A 4 GiB + 3 MiB + 5 bytes file (sparse: zeros) hashes in the page like hashlib's."""
    size = 4 * 1024 * MiB + 3 * MiB + 5
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(size)
    page.set_input_files("#f", path)
    got = page.evaluate(
        """async () => {
          const { hashFile } = await import("/static/casd.js");
          const file = document.querySelector("#f").files[0];
          const r = await hashFile(file, { chunkSize: 64 * 1024 * 1024 });
          return { size: file.size, digest: r.digest, n: r.chunks.length, last: r.chunks.at(-1) };
        }"""
    )
    expected = hashlib.md5()
    zeros = bytes(64 * MiB)
    for _ in range(64):
        expected.update(zeros)
    last = bytes(3 * MiB + 5)
    expected.update(last)
    assert got["size"] == size
    assert got["n"] == 65
    assert got["last"]["offset"] == 64 * 64 * MiB and got["last"]["size"] == len(last)
    assert got["last"]["digest"] == hashlib.md5(last).hexdigest()
    assert got["digest"] == expected.hexdigest()
