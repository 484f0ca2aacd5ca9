"""The browser's FastCDC (casd/static/fastcdc.js) cuts where casd.chunking (pyfastcdc) cuts.

Run in headless Chromium against a tiny static server, like tests/test_js_hash.py. Inputs:
REAPI's vector image (tests/data/README.md) and random data, fed whole and in slices of odd
sizes. Throughput: `pytest tests/test_js_chunking.py -k throughput -s -m slow` (prints only).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time

import pytest
from test_chunking import IMAGE, reapi_vectors
from test_js_hash import StaticServer

from casd.chunking import Chunking, chunk_spans

pytestmark = pytest.mark.browser

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def server():
    s = StaticServer().start()
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


def python_ends(data: bytes, chunking: Chunking) -> list[int]:
    return [o + n for o, n in chunk_spans(io.BytesIO(data), chunking)]


# For each job: the chunk ends of the bytes (or of each of their prefixes) fed whole, then
# fed in every slice pattern.
CUT_JS = """
async ({url, avgSize, seed, patterns, prefixes}) => {
  const { FastCdc } = await import("/static/fastcdc.js");
  const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
  // With the size told up front, every end update() returns must already be final and
  // finish() must have nothing left to add.
  const cut = (data, pattern, told) => {
    const cdc = new FastCdc(told ? { avgSize, seed, size: data.length } : { avgSize, seed });
    const ends = [];
    for (let pos = 0, k = 0; pos < data.length; k++) {
      const n = Math.min(pattern[k % pattern.length], data.length - pos);
      ends.push(...cdc.update(data.subarray(pos, pos + n)));
      pos += n;
    }
    const rest = cdc.finish();
    return told && rest.length ? ["finish() added", ...rest] : [...ends, ...rest];
  };
  const inputs = prefixes ? prefixes.map((n) => bytes.subarray(0, n)) : [bytes];
  return inputs.map((data) => [
    cut(data, [data.length || 1], false),
    ...patterns.map((p) => cut(data, p, false)),
    ...patterns.map((p) => cut(data, p, true)),
  ]);
}
"""

# Odd sizes, so that slices end at every parity and inside and between chunks.
PATTERNS = [[1, 2, 3, 5, 7, 4093], [65537, 1], [1048573, 999, 3], [8 * MiB]]


def js_cuts(page, server, data: bytes, chunking: Chunking, prefixes=None, patterns=PATTERNS):
    name = hashlib.md5(data).hexdigest()
    return page.evaluate(
        CUT_JS,
        {
            "url": server.put(name, data),
            "avgSize": chunking.avg_size,
            "seed": chunking.seed,
            "patterns": patterns,
            "prefixes": prefixes,
        },
    )


@pytest.mark.parametrize("seed", [0, 666])
def test_js_fastcdc_matches_reapi_vectors(page, server, seed):
    data = IMAGE.read_bytes()
    chunking = Chunking.fastcdc(16 * KiB, seed=seed)
    expected = [offset + length for offset, length, _, _ in reapi_vectors()[seed]]
    assert python_ends(data, chunking) == expected
    [runs] = js_cuts(page, server, data, chunking)
    assert runs == [expected] * (1 + 2 * len(PATTERNS))


@pytest.mark.parametrize("avg", [1 * KiB, 16 * KiB, 64 * KiB, 512 * KiB, 4 * MiB])
def test_js_fastcdc_matches_python_on_random_data(page, server, avg):
    chunking = Chunking.fastcdc(avg)
    size = max(3 * MiB, 12 * chunking.max_size) + 12345
    data = random.Random(f"cdc-{avg}").randbytes(size)
    expected = python_ends(data, chunking)
    assert len(expected) >= 3
    [runs] = js_cuts(page, server, data, chunking)
    assert runs == [expected] * (1 + 2 * len(PATTERNS))


def test_js_fastcdc_matches_python_at_the_end_of_input(page, server):
    """Inputs that end one byte after a cut: the reference leaves an odd-length tail's
    last byte untested, so that cut vanishes when its chunk has an even index. An
    incremental cutter cannot know a slice is the last one; this is where it goes wrong."""
    chunking = Chunking.fastcdc(1 * KiB)
    data = random.Random("prefixes").randbytes(200 * KiB)
    cuts = python_ends(data, chunking)[:-1]
    prefixes = sorted({0, 1, 2, 255, 256, 257} | {c + d for c in cuts for d in (0, 1, 2)})
    expected = [python_ends(data[:n], chunking) for n in prefixes]
    vanished = [c for c in cuts if c not in python_ends(data[: c + 1], chunking)]
    assert vanished, "no input here exercises the end-of-input rule"
    got = js_cuts(page, server, data, chunking, prefixes, patterns=[[1, 2, 3, 5, 7, 4093]])
    wrong = [n for n, runs, want in zip(prefixes, got, expected, strict=True) if runs != [want] * 3]
    assert not wrong


def test_js_fastcdc_refuses_bad_parameters(page, server):
    got = page.evaluate(
        """async () => {
          const { FastCdc } = await import("/static/fastcdc.js");
          const out = [];
          for (const opts of [{avgSize: 1000}, {avgSize: 512}, {avgSize: 8 * 1024 * 1024},
                              {seed: -1}, {seed: 2 ** 32}, {seed: 1.5}, {size: -1}]) {
            try { new FastCdc(opts); out.push("accepted"); } catch (e) { out.push(e.name); }
          }
          const told = new FastCdc({ avgSize: 1024, size: 10 });
          try { told.update(new Uint8Array(11)); out.push("accepted"); } catch (e) { out.push(e.name); }
          return out;
        }"""
    )
    assert got == ["RangeError"] * 7 + ["Error"]


@pytest.mark.slow
def test_chunking_throughput(page):
    """Prints MB/s of fastcdc.js and of the JS MD5 over 256 MiB of random bytes fed in
    8 MiB slices (as the worker feeds them), beside pyfastcdc and hashlib.md5 on 256 MiB of
    their own; asserts nothing. Best of three runs: the machine may be busy."""
    size = 256 * MiB
    got = page.evaluate(
        """async ({size}) => {
          const { FastCdc } = await import("/static/fastcdc.js");
          const { Md5 } = await import("/static/md5.js");
          const buf = new Uint8Array(size);
          for (let off = 0; off < size; off += 65536) crypto.getRandomValues(buf.subarray(off, off + 65536));
          const SLICE = 8 * 1024 * 1024;
          const best = (fn) => {
            fn();
            let ms = Infinity;
            for (let run = 0; run < 3; run++) {
              const t = performance.now();
              fn();
              ms = Math.min(ms, performance.now() - t);
            }
            return size / 1e6 / (ms / 1000);
          };
          const out = {};
          for (const avg of [64 * 1024, 512 * 1024, 4 * 1024 * 1024]) {
            out[`fastcdc.js ${avg >> 10} KiB`] = best(() => {
              const cdc = new FastCdc({ avgSize: avg });
              for (let off = 0; off < size; off += SLICE) cdc.update(buf.subarray(off, off + SLICE));
              cdc.finish();
            });
          }
          out["md5.js"] = best(() => {
            const h = new Md5();
            for (let off = 0; off < size; off += SLICE) h.update(buf.subarray(off, off + SLICE));
            h.hex();
          });
          return out;
        }""",
        {"size": size},
    )
    buf = os.urandom(size)

    def best(fn) -> float:
        seconds = min(_timed(fn) for _ in range(3))
        return size / 1e6 / seconds

    for avg in (64 * KiB, 512 * KiB, 4 * MiB):
        chunking = Chunking.fastcdc(avg)
        got[f"pyfastcdc {avg // KiB} KiB"] = best(
            lambda: sum(1 for _ in chunk_spans(io.BytesIO(buf), chunking))  # noqa: B023
        )
    got["hashlib md5"] = best(lambda: hashlib.md5(buf).hexdigest())
    got["hashlib sha256"] = best(lambda: hashlib.sha256(buf).hexdigest())
    print()
    for name, rate in got.items():
        print(f"{name:>22}: {rate:8.0f} MB/s")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
