"""Where a file is cut into chunks: fixed-size, or FastCDC 2020 as REAPI specifies it.

A leaf module: it imports nothing of casd, so the client, the CLI and bench/ can use it
without the server. `chunk_spans(source, chunking)` yields `(offset, size)` of every chunk in
file order; `iter_chunks` also hands out each chunk's bytes, so a caller can hash them in the
same pass. Both stream: memory stays at a few times the largest chunk whatever the file size.

FastCDC 2020 follows REAPI's `FastCdc2020Params` (build/bazel/remote/execution/v2 in
bazelbuild/remote-apis): normalization level 2, min = avg / 4, max = avg * 4, the gear table
of the C reference (GEAR[i] = first 8 bytes, big-endian, of MD5 of 64 bytes of value i)
XORed with the seed (0 by default). The cut loop is `pyfastcdc`'s compiled port of the
reference Rust crate, not Python. `casd/static/fastcdc.js` cuts the same boundaries in the
browser.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

# REAPI's normalization level for FAST_CDC_2020 (pyfastcdc defaults to 1, like fastcdc-rs).
NORMALIZATION: Literal[2] = 2
# pyfastcdc accepts averages up to 4 MiB (max 16 MiB); REAPI advertises 1 KiB to 1 MiB.
# casd takes the union above 1 KiB: the server accepts any chunk size up to its limit.
MIN_AVG = 1024
MAX_AVG = 4 * 1024 * 1024
# 1 MiB: the largest average REAPI advertises; a fresh upload costs less than at 512 KiB
# (half the chunk requests), and no more than at 2 MiB in the same runs (docs/chunking.md).
DEFAULT_FASTCDC_AVG = 1024 * 1024
DEFAULT_FIXED_SIZE = 5 * 1024 * 1024
# Reads below this size cost more in system calls than they save in memory.
READ_BLOCK = 1024 * 1024

Kind = Literal["fixed", "fastcdc"]


@dataclass(frozen=True, slots=True)
class Chunking:
    """How a file is cut: `Chunking.fixed(size)` or `Chunking.fastcdc(avg, seed=0)`.

    `avg_size` is the chunk size for "fixed" and the FastCDC average otherwise; `min_size`
    and `max_size` are the bounds every chunk but the last respects. Construction checks
    the parameters (ValueError); `key` names them for a digest cache.
    """

    kind: Kind
    avg_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind == "fixed":
            if type(self.avg_size) is not int or self.avg_size < 1:
                raise ValueError(
                    f"a fixed chunk size must be a positive integer, got {self.avg_size!r}"
                )
            if self.seed != 0:
                raise ValueError("fixed-size chunking takes no seed")
        elif self.kind == "fastcdc":
            avg = self.avg_size
            if type(avg) is not int or not MIN_AVG <= avg <= MAX_AVG or avg & (avg - 1):
                raise ValueError(
                    f"a FastCDC average must be a power of two from {MIN_AVG} to {MAX_AVG}"
                    f" bytes, got {avg!r}"
                )
            if type(self.seed) is not int or not 0 <= self.seed < 2**32:
                raise ValueError(f"a FastCDC seed is a 32-bit unsigned integer, got {self.seed!r}")
        else:
            raise ValueError(f"chunking is 'fixed' or 'fastcdc', not {self.kind!r}")

    @classmethod
    def fixed(cls, size: int = DEFAULT_FIXED_SIZE) -> Chunking:
        return cls("fixed", size)

    @classmethod
    def fastcdc(cls, avg_size: int = DEFAULT_FASTCDC_AVG, seed: int = 0) -> Chunking:
        return cls("fastcdc", avg_size, seed)

    @classmethod
    def parse(cls, kind: str, size: int | None = None) -> Chunking:
        """From a CLI flag pair: kind "fixed"|"fastcdc", size None for the kind's default."""
        if kind == "fixed":
            return cls.fixed(DEFAULT_FIXED_SIZE if size is None else size)
        if kind == "fastcdc":
            return cls.fastcdc(DEFAULT_FASTCDC_AVG if size is None else size)
        raise ValueError(f"chunking is 'fixed' or 'fastcdc', not {kind!r}")

    @property
    def min_size(self) -> int:
        return self.avg_size if self.kind == "fixed" else self.avg_size // 4

    @property
    def max_size(self) -> int:
        return self.avg_size if self.kind == "fixed" else self.avg_size * 4

    @property
    def key(self) -> str:
        """A stable name of the cut rule and its parameters, e.g. "fastcdc2020:524288:0"."""
        if self.kind == "fixed":
            return f"fixed:{self.avg_size}"
        return f"fastcdc2020:{self.avg_size}:{self.seed}"


Source = str | os.PathLike | BinaryIO


def iter_chunks(source: Source, chunking: Chunking) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of each chunk in order; each view is valid only until the next step.

    `source` is a path (opened and closed here) or a binary file object read from its
    current position to its end (offsets count from that position). An empty input yields
    nothing.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb", buffering=READ_BLOCK) as f:
            yield from _iter_chunks(f, chunking)
    else:
        yield from _iter_chunks(source, chunking)


def _iter_chunks(f: BinaryIO, chunking: Chunking) -> Iterator[tuple[int, memoryview]]:
    if chunking.kind == "fixed":
        yield from _fixed_chunks(f, chunking.avg_size)
        return
    from pyfastcdc import FastCDC

    cdc = FastCDC(
        chunking.avg_size,
        min_size=chunking.min_size,
        max_size=chunking.max_size,
        normalized_chunking=NORMALIZATION,
        seed=chunking.seed,
    )
    # pyfastcdc keeps one buffer of 2 * max_size and refills it with readinto.
    for chunk in cdc.cut_stream(f):
        yield chunk.offset, chunk.data


def _fixed_chunks(f: BinaryIO, size: int) -> Iterator[tuple[int, memoryview]]:
    buf = bytearray(size)
    view = memoryview(buf)
    offset = 0
    while True:
        n = _read_full(f, view)
        if n == 0:
            return
        yield offset, view[:n]
        offset += n
        if n < size:
            return


def _read_full(f: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def chunk_spans(source: Source, chunking: Chunking) -> Iterator[tuple[int, int]]:
    """(offset, size) of each chunk in order; together they tile the input exactly."""
    if chunking.kind == "fixed" and _seekable(source):
        yield from _fixed_spans(_remaining_size(source), chunking.avg_size)
        return
    for offset, data in iter_chunks(source, chunking):
        yield offset, len(data)


def _fixed_spans(size: int, chunk: int) -> Iterator[tuple[int, int]]:
    for offset in range(0, size, chunk):
        yield offset, min(chunk, size - offset)


def _seekable(source: Source) -> bool:
    return isinstance(source, (str, os.PathLike)) or source.seekable()


def _remaining_size(source: Source) -> int:
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    here = source.tell()
    end = source.seek(0, io.SEEK_END)
    source.seek(here)
    return end - here
