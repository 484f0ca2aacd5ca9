"""Delta downloads: a file's chunk manifest, and the chunks local files already hold.

Blocking helpers, free of aiohttp, for `CasdClient.download` to run in worker threads: parse
the answer of GET /v1/files/{digest}/chunks, guess how the file was cut, index the chunks of
`reuse` files (through the digest cache), and copy or check one chunk with its digest
verified. Every chunk that lands in a download is checked against the manifest's digest,
whether it came from the network, a local file or an earlier try.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

from casd.chunking import MAX_AVG, MIN_AVG, Chunking
from casd.client.errors import CasdClientError
from casd.client.hashing import DigestCache, file_digests
from casd.digest import Algo, Digest

log = logging.getLogger("casd.client")

_XXH3 = re.compile(r"[0-9a-f]{32}")
# Pieces one pwritev may take (the kernel's UIO_MAXIOV on Linux).
_IOV_MAX = os.sysconf("SC_IOV_MAX")
# Bytes one write system call may carry. A write of a whole multi-MiB chunk makes the page
# cache take large folios (up to 2 MiB) for it, and on a virtual machine that hands free
# 2 MiB blocks back to its host (virtio-balloon free page reporting) each of those costs a
# host-side fault on first touch: measured writing 1 GiB into the page cache, 5 MiB writes
# spent 2 to 4 s of kernel time where 128-512 KiB writes spent 0.3 to 0.6 s, and two
# writer threads contending for the file's lock doubled the loss (bench/RESULTS.md, B8).
# 256 KiB costs a chunk of 5 MiB twenty system calls, nothing beside its bytes.
WRITE_SLICE = 256 * 1024


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    """One chunk of a stored file: where it lies in the file, its digest (lowercase hex) and,
    when the server gave it, the xxh3-128 of its bytes (32 lowercase hex)."""

    offset: int
    size: int
    digest: str
    xxh3: str | None = None

    def matches(self, data: bytes | memoryview, algo: Algo) -> bool:
        """Whether `data` are this chunk's bytes: by xxh3-128 when the manifest gave one (as
        good against corruption and about ten times cheaper than MD5), else by digest."""
        return self.matches_pieces((data,), algo)

    def matches_pieces(self, pieces: Iterable[bytes | memoryview], algo: Algo) -> bool:
        """`matches` for the bytes of `pieces` laid end to end, without joining them."""
        h = xxhash.xxh3_128() if self.xxh3 is not None else algo.new()
        for piece in pieces:
            h.update(piece)
        return h.hexdigest() == (self.xxh3 if self.xxh3 is not None else self.digest)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a local copy of a chunk lies: a file and an offset in it."""

    path: str
    offset: int


def parse_manifest(answer: dict, digest: Digest, url: str) -> list[ManifestChunk]:
    """The chunks of a /chunks answer, checked: same file, offsets that tile `size` exactly."""
    algo = digest.algo
    if answer.get("algo") != algo.value or answer.get(algo.value) != digest.hex:
        raise CasdClientError(f"{url}: the manifest is not that of {digest.hex}")
    size = answer.get("size")
    chunks = answer.get("chunks")
    if type(size) is not int or size < 0 or not isinstance(chunks, list):
        raise CasdClientError(f"{url}: the manifest lacks its size or chunks")
    out: list[ManifestChunk] = []
    pos = 0
    for i, c in enumerate(chunks):
        try:
            d = algo.parse_hex(c["digest"])
            n, off = c["size"], c["offset"]
            xxh3 = c.get("xxh3")
        except (TypeError, KeyError, ValueError, AttributeError):
            raise CasdClientError(f"{url}: chunk {i} of the manifest is malformed") from None
        if xxh3 is not None and not (isinstance(xxh3, str) and _XXH3.fullmatch(xxh3)):
            raise CasdClientError(f"{url}: chunk {i} of the manifest has a malformed xxh3")
        if type(n) is not int or type(off) is not int or off != pos or n < 1:
            raise CasdClientError(f"{url}: the manifest's chunks do not tile the file at {i}")
        out.append(ManifestChunk(off, n, d, xxh3))
        pos += n
    if pos != size:
        raise CasdClientError(f"{url}: the manifest's chunks add up to {pos}, not {size}")
    return out


def guess_chunkings(chunks: list[ManifestChunk]) -> list[Chunking]:
    """How the stored file was probably cut, the likeliest rule first.

    Equal sizes (all but a shorter last) mean fixed chunks of that size. Otherwise FastCDC,
    whose chunks average close to its parameter: of the averages whose bounds every chunk
    respects (min <= size <= max, the last only <= max), the one nearest the mean chunk
    size, then at most two more, nearest first. The bounds rule out a neighbour as soon as
    one chunk falls outside them, which in a file of a hundred chunks or more is almost
    always, so a `reuse` file that holds none of the chunks (an unrelated file) is read
    once, not once per guess. No average at all when no FastCDC rule could have cut these
    sizes (another client's chunks): reading a file for them would find nothing.
    """
    if not chunks:
        return []
    first = chunks[0].size
    if len(chunks) == 1 or (all(c.size == first for c in chunks[:-1]) and chunks[-1].size <= first):
        return [Chunking.fixed(first)]
    mean = sum(c.size for c in chunks) / len(chunks)
    smallest = min(c.size for c in chunks[:-1])
    largest = max(c.size for c in chunks)
    rules = [
        Chunking.fastcdc(1 << k) for k in range(MIN_AVG.bit_length() - 1, MAX_AVG.bit_length())
    ]
    fitting = [r for r in rules if r.min_size <= smallest and largest <= r.max_size]
    fitting.sort(key=lambda r: abs(math.log2(r.avg_size / mean)))
    return fitting[:3]


def reuse_index(
    paths: Iterable[str | os.PathLike],
    chunkings: list[Chunking],
    wanted: set[str],
    algo: Algo,
    cache: DigestCache | None,
) -> dict[str, Source]:
    """Where local files hold chunks of `wanted`, trying each cut rule until one matches.

    A rule that finds none of the wanted chunks in a file is taken as the wrong guess and
    the next is tried; a file that cannot be read is skipped (logged), never fatal.
    """
    found: dict[str, Source] = {}
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            log.warning("cannot reuse %s: %s", path, exc)
            continue
        if not stat.S_ISREG(mode):
            # A FIFO would block the open until some writer came, a device never ends.
            log.warning("cannot reuse %s: not a regular file", path)
            continue
        for rule in chunkings:
            try:
                fd, _ = file_digests(path, chunking=rule, algo=algo, cache=cache)
            except (OSError, CasdClientError) as exc:
                log.warning("cannot reuse %s: %s", path, exc)
                break
            hits = 0
            for c in fd.chunks:
                if c.digest in wanted and c.digest not in found:
                    found[c.digest] = Source(os.fspath(path), c.offset)
                    hits += 1
            if hits or len(found) == len(wanted):
                break
    return found


def plan_runs(chunks: list[ManifestChunk], streams: int, most: int) -> list[list[ManifestChunk]]:
    """`chunks` (in file order) grouped into runs of adjacent chunks to fetch together.

    A run never spans a gap (a chunk that is not in `chunks`), and holds at most `most`
    bytes and at most a `streams`-th of all the bytes, unless one chunk alone is larger.
    """
    share = -(-sum(c.size for c in chunks) // max(1, streams))
    limit = max(1, min(most, share))
    runs: list[list[ManifestChunk]] = []
    size = 0
    for c in chunks:
        last = runs[-1][-1] if runs else None
        if last is None or last.offset + last.size != c.offset or size + c.size > limit:
            runs.append([c])
            size = c.size
        else:
            runs[-1].append(c)
            size += c.size
    return runs


def read_verified(path: str, offset: int, chunk: ManifestChunk, algo: Algo) -> bytes | None:
    """The chunk's bytes from a local file at `offset` when they match it, else None."""
    size = chunk.size
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = _pread_full(fd, size, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != size:
        return None
    return data if chunk.matches(data, algo) else None


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    parts = []
    got = 0
    while got < size:
        data = os.pread(fd, size - got, offset + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write `data` at `offset`, at most WRITE_SLICE bytes a system call."""
    pwritev_all(fd, (data,), offset)


def pwritev_all(fd: int, pieces: Sequence[bytes | memoryview], offset: int) -> None:
    """Write `pieces` end to end at `offset`: each system call takes as many pieces as the
    kernel allows, up to WRITE_SLICE bytes (see there why not more)."""
    views = [memoryview(p).cast("B") for p in pieces if p]
    while views:
        batch: list[memoryview] = []
        room = WRITE_SLICE
        for v in views[:_IOV_MAX]:
            batch.append(v[:room])
            room -= len(batch[-1])
            if not room:
                break
        n = os.pwritev(fd, batch, offset)
        offset += n
        # Drop what was written: whole pieces, then the written head of a partial one.
        i = 0
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        views = views[i:]
        if n:
            views[0] = views[0][n:]
