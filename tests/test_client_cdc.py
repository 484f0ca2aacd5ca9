"""Content-defined chunking in the Python client: one-read cut and hash, the digest cache's
key, and what an insertion costs a re-upload against a real `casd serve`."""

from __future__ import annotations

import hashlib
import threading

import pytest

from casd.chunking import Chunking, chunk_spans
from casd.client import (
    CasdClient,
    DigestCache,
    hash_file,
)
from casd.client.hashing import file_digests
from casd.digest import Algo
from helpers import insertion_case, settle

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Every test gets its own digest cache folder, never the user's."""
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "casd"


@pytest.mark.parametrize("algo", ["md5", "sha256"])
@pytest.mark.parametrize("size", [0, 1, 4 * KiB - 1, 300 * KiB + 17, 3 * MiB + 5])
def test_fastcdc_hash_file_cuts_where_chunking_cuts_and_hashes_each_chunk(
    tmp_path, rng, algo, size
):
    path = tmp_path / "f"
    data = rng.write(path, size)
    rule = Chunking.fastcdc(16 * KiB)
    fd = hash_file(path, chunking=rule, algo=algo)
    expected = list(chunk_spans(path, rule))
    assert [(c.offset, c.size) for c in fd.chunks] == expected
    assert [c.digest for c in fd.chunks] == [
        hashlib.new(algo, data[o : o + n]).hexdigest() for o, n in expected
    ]
    assert fd.digest == hashlib.new(algo, data).hexdigest()
    assert fd.size == size and fd.chunking == rule and fd.chunk_size == 16 * KiB
    if size > 100 * KiB:
        assert len({n for _, n in expected[:-1]}) > 1  # content-defined, not fixed


def test_kind_string_and_size_select_the_rule(tmp_path, rng):
    path = tmp_path / "f"
    rng.write(path, 2 * MiB)
    by_string = hash_file(path, chunking="fastcdc", chunk_size=64 * KiB)
    assert by_string.chunking == Chunking.fastcdc(64 * KiB)
    assert [c.size for c in hash_file(path, chunk_size=MiB).chunks] == [MiB, MiB]
    with pytest.raises(ValueError, match="power of two"):
        hash_file(path, chunking="fastcdc", chunk_size=1000)


def test_stop_event_ends_fastcdc_hashing(tmp_path, rng):
    path = tmp_path / "f"
    rng.write(path, 4 * MiB)
    stop = threading.Event()
    stop.set()
    with pytest.raises(BaseException) as info:
        hash_file(path, chunking=Chunking.fastcdc(64 * KiB), stop=stop)
    assert info.type.__name__ == "CancelledError"


def test_digest_cache_keeps_fixed_and_fastcdc_and_averages_apart(tmp_path, rng, cache_home):
    path = tmp_path / "f"
    rng.write(path, 3 * MiB + 1)
    settle(path)
    cache = DigestCache(cache_home)
    fixed, hit = file_digests(path, chunking=Chunking.fixed(MiB), algo=Algo.MD5, cache=cache)
    assert not hit
    cdc, hit = file_digests(path, chunking=Chunking.fastcdc(MiB), algo=Algo.MD5, cache=cache)
    assert not hit  # same size number, another rule: never taken for the fixed entry
    assert [c.size for c in cdc.chunks] != [c.size for c in fixed.chunks]
    again, hit = file_digests(path, chunking=Chunking.fastcdc(MiB), algo=Algo.MD5, cache=cache)
    assert hit and again.chunks == cdc.chunks and again.chunking == Chunking.fastcdc(MiB)
    _, hit = file_digests(path, chunking=Chunking.fastcdc(512 * KiB), algo=Algo.MD5, cache=cache)
    assert not hit
    fixed_again, hit = file_digests(path, chunking=Chunking.fixed(MiB), algo=Algo.MD5, cache=cache)
    assert hit and fixed_again.chunks == fixed.chunks


async def test_insertion_at_the_front_resends_at_most_3_chunks_with_fastcdc(daemon, tmp_path, rng):
    """Bench B3 at small scale: 1 KiB inserted at the front of an 8 MiB file."""
    old = tmp_path / "old.bin"
    data, edited = insertion_case(8 * MiB, KiB)
    old.write_bytes(data)
    new = tmp_path / "new.bin"
    new.write_bytes(edited)
    async with CasdClient(daemon.url) as client:
        first = await client.upload(old, chunking="fastcdc", chunk_size=128 * KiB)
        assert first.chunks_total >= 32
        s = await client.upload(new, chunking="fastcdc", chunk_size=128 * KiB)
        assert s.chunks_sent <= 3 and s.bytes_sent <= 3 * 4 * 128 * KiB
        assert s.chunks_skipped == s.chunks_total - s.chunks_sent
        # The same edit with fixed chunks resends the whole file: what FastCDC is for.
        other = tmp_path / "other.bin"
        other_data = rng.write(other, 8 * MiB, 3)
        await client.upload(other, chunking="fixed", chunk_size=128 * KiB)
        other.write_bytes(rng.bytes(KiB, 4) + other_data)
        fixed = await client.upload(other, chunking="fixed", chunk_size=128 * KiB)
        assert fixed.chunks_sent == fixed.chunks_total
