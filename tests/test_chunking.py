"""casd.chunking: fixed and FastCDC 2020 cut points, checked against REAPI's test vectors."""

from __future__ import annotations

import hashlib
import io
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from casd.chunking import Chunking, chunk_spans, iter_chunks

DATA = Path(__file__).parent / "data"
IMAGE = DATA / "SekienAkashita.jpg"
VECTORS = DATA / "fastcdc2020_test_vectors.txt"
KiB, MiB = 1024, 1024 * 1024


def reapi_vectors() -> dict[int, list[tuple[int, int, str, int]]]:
    """seed -> [(offset, length, sha256, gear hash)] from REAPI's vector file."""
    out: dict[int, list] = {}
    seed = None
    for line in VECTORS.read_text().splitlines():
        if line.startswith("# Seed:"):
            seed = int(line.split(":")[1])
            out[seed] = []
        elif line and not line.startswith("#"):
            offset, length, sha, fingerprint = line.split()
            out[seed].append((int(offset), int(length), sha, int(fingerprint)))
    return out


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_the_vector_input_is_the_one_reapi_names():
    assert hashlib.sha256(IMAGE.read_bytes()).hexdigest() == (
        "d9e749d9367fc908876749d6502eb212fee88c9a94892fb07da5ef3ba8bc39ed"
    )


@pytest.mark.parametrize("seed", [0, 666])
def test_fastcdc_matches_reapi_vectors(seed):
    # The vector file says MaxSize 65535 where REAPI's text says avg * 4 = 65536; no chunk
    # of this input reaches either, so the cuts are the same.
    expected = reapi_vectors()[seed]
    assert len(expected) == 6
    got = [
        (offset, len(data), hashlib.sha256(data).hexdigest())
        for offset, data in iter_chunks(IMAGE, Chunking.fastcdc(16 * KiB, seed=seed))
    ]
    assert got == [(o, n, sha) for o, n, sha, _ in expected]
    assert list(chunk_spans(IMAGE, Chunking.fastcdc(16 * KiB, seed=seed))) == [
        (o, n) for o, n, _, _ in expected
    ]


def test_parameters_follow_reapi_and_key_names_them():
    c = Chunking.fastcdc(512 * KiB)
    assert (c.min_size, c.avg_size, c.max_size) == (128 * KiB, 512 * KiB, 2 * MiB)
    assert Chunking.fastcdc().avg_size == MiB  # casd's default (docs/chunking.md says why)
    f = Chunking.fixed(5 * MiB)
    assert (f.min_size, f.max_size) == (5 * MiB, 5 * MiB)
    keys = {
        c.key,
        f.key,
        Chunking.fastcdc(256 * KiB).key,
        Chunking.fastcdc(512 * KiB, 7).key,
        Chunking.fixed(512 * KiB).key,
    }
    assert len(keys) == 5
    assert Chunking.fastcdc(512 * KiB).key == c.key
    assert Chunking.parse("fastcdc") == Chunking.fastcdc(MiB)
    assert Chunking.parse("fastcdc", 512 * KiB) == c
    assert Chunking.parse("fixed", 1 * MiB) == Chunking.fixed(1 * MiB)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Chunking.fastcdc(1000),
        lambda: Chunking.fastcdc(512),
        lambda: Chunking.fastcdc(8 * MiB),
        lambda: Chunking.fastcdc(64 * KiB, seed=-1),
        lambda: Chunking.fastcdc(64 * KiB, seed=2**32),
        lambda: Chunking.fixed(0),
        lambda: Chunking.parse("rabin"),
        lambda: Chunking("fixed", 1024, seed=3),
    ],
)
def test_bad_parameters_are_refused(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "chunking",
    [Chunking.fastcdc(16 * KiB), Chunking.fastcdc(64 * KiB, seed=666), Chunking.fixed(100_000)],
    ids=lambda c: c.key,
)
@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 100_000, 3 * MiB + 17])
def test_spans_tile_the_input_and_respect_bounds(tmp_path, chunking, size):
    data = random_bytes(size, size)
    path = tmp_path / "f"
    path.write_bytes(data)
    spans = list(chunk_spans(path, chunking))
    assert sum(n for _, n in spans) == size
    pos = 0
    for offset, n in spans:
        assert offset == pos and n > 0
        pos += n
    for _, n in spans[:-1]:
        assert chunking.min_size <= n <= chunking.max_size
    if spans:
        assert spans[-1][1] <= chunking.max_size
    # A file object read from its current position, a non-seekable stream and the bytes
    # handed out all agree with the path.
    with open(path, "rb") as f:
        assert list(chunk_spans(f, chunking)) == spans
    assert list(chunk_spans(NoSeek(data), chunking)) == spans
    assert b"".join(bytes(d) for _, d in iter_chunks(path, chunking)) == data
    prefixed = io.BytesIO(b"x" * 10 + data)
    prefixed.seek(10)
    assert list(chunk_spans(prefixed, chunking)) == spans


class NoSeek(io.RawIOBase):
    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:
        return self._f.readinto(b)


def test_fastcdc_finds_chunks_between_the_bounds():
    # Not a single-cut-per-max file: on random data most cuts are content-defined.
    chunking = Chunking.fastcdc(64 * KiB)
    spans = list(chunk_spans(io.BytesIO(random_bytes(8 * MiB, 1)), chunking))
    sizes = [n for _, n in spans[:-1]]
    assert sum(1 for n in sizes if n < chunking.max_size) > 0.9 * len(sizes)
    assert 32 * KiB < sum(sizes) / len(sizes) < 128 * KiB


def test_an_insertion_at_the_front_changes_only_the_first_chunks():
    chunking = Chunking.fastcdc(512 * KiB)
    data = random_bytes(16 * MiB, 2)
    edited = random_bytes(KiB, 3) + data

    def digests(blob: bytes) -> list[str]:
        return [hashlib.md5(d).hexdigest() for _, d in iter_chunks(io.BytesIO(blob), chunking)]

    before, after = digests(data), digests(edited)
    assert len(before) >= 16
    changed = [d for d in after if d not in set(before)]
    assert len(changed) <= 3
    # Fixed chunks, by contrast, all move.
    fixed = Chunking.fixed(512 * KiB)
    fixed_before = {hashlib.md5(d).hexdigest() for _, d in iter_chunks(io.BytesIO(data), fixed)}
    fixed_after = [hashlib.md5(d).hexdigest() for _, d in iter_chunks(io.BytesIO(edited), fixed)]
    assert not fixed_before.intersection(fixed_after)


@pytest.mark.parametrize("chunking", [Chunking.fastcdc(512 * KiB), Chunking.fixed(5 * MiB)])
def test_chunking_streams_in_bounded_memory(tmp_path, chunking):
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.writelines(random_bytes(MiB, 100 + i) for i in range(48))
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_chunks(path, chunking))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n >= 9
    # A few times the largest chunk plus the read buffer, whatever the file size (48 MiB).
    assert peak < 4 * chunking.max_size + 4 * MiB, peak


@pytest.mark.slow
def test_chunking_throughput_against_hashing(tmp_path):
    """Prints MB/s of FastCDC and of MD5/SHA-256 over the same 256 MiB file (in the page
    cache after the first pass), then of a client's one pass (cut, chunk and file MD5) with
    fixed and FastCDC chunks; asserts nothing."""
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.writelines(random_bytes(MiB, i) for i in range(256))
    size = path.stat().st_size
    rows = []
    for name, chunking in [
        ("fastcdc 64 KiB", Chunking.fastcdc(64 * KiB)),
        ("fastcdc 512 KiB", Chunking.fastcdc(512 * KiB)),
        ("fastcdc 4 MiB", Chunking.fastcdc(4 * MiB)),
    ]:
        t = time.perf_counter()
        for _ in chunk_spans(path, chunking):
            pass
        rows.append((name, size / (time.perf_counter() - t) / 1e6))
    for algo in ("md5", "sha256"):
        t = time.perf_counter()
        h = hashlib.new(algo)
        for _, data in iter_chunks(path, Chunking.fixed(8 * MiB)):
            h.update(data)
        rows.append((algo, size / (time.perf_counter() - t) / 1e6))
    # What a client does in one read of the file: cut, hash each chunk, hash the file.
    for name, chunking in [
        ("fixed 5 MiB + md5", Chunking.fixed(5 * MiB)),
        ("fastcdc 512K + md5", Chunking.fastcdc(512 * KiB)),
    ]:
        t = time.perf_counter()
        whole = hashlib.md5()
        for _, data in iter_chunks(path, chunking):
            whole.update(data)
            hashlib.md5(data).digest()
        rows.append((name, size / (time.perf_counter() - t) / 1e6))
    print()
    for name, rate in rows:
        print(f"{name:>20}: {rate:8.0f} MB/s")
