"""The machine's own limits, measured in the same run as casd so ratios compare like with like."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

MiB = 1 << 20
HASH_BUFFER = 64 * MiB
READ_PIECE = 1 * MiB


@dataclass(frozen=True)
class Limits:
    md5_mb_s: float
    sha256_mb_s: float
    fsync_write_mb_s: float
    small_fsync_files_s: float
    put_mb_s: float
    fileresponse_mb_s: float


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def hash_throughput(name: str, total: int, repeats: int = 2) -> float:
    """Single-core hashlib throughput in MB/s: one hasher fed a 64 MiB buffer, best of runs."""
    buf = os.urandom(min(HASH_BUFFER, total))
    best = 0.0
    for _ in range(repeats):
        h = hashlib.new(name)
        done = 0
        t = time.perf_counter()
        while done < total:
            n = min(len(buf), total - done)
            h.update(memoryview(buf)[:n])
            done += n
        h.hexdigest()
        best = max(best, mb_s(total, time.perf_counter() - t))
    return best


def fsync_write_throughput(src: Path, dest_dir: Path, piece: int) -> float:
    """Write `src` sequentially as `piece`-sized files, each fsynced and closed (MB/s)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    fd_in = os.open(src, os.O_RDONLY)
    try:
        # Read the source first so only writing is timed.
        blocks = [os.pread(fd_in, min(piece, size - off), off) for off in range(0, size, piece)]
    finally:
        os.close(fd_in)
    t = time.perf_counter()
    for i, block in enumerate(blocks):
        fd = os.open(dest_dir / f"{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t
    for i in range(len(blocks)):
        os.unlink(dest_dir / f"{i:06d}")
    return mb_s(size, seconds)


def small_fsync_rate(dest_dir: Path, count: int, size: int) -> float:
    """Files/s for `count` files of `size` bytes, each written, fsynced, closed, one thread."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(dest_dir / f"s{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t
    for i in range(count):
        os.unlink(dest_dir / f"s{i:06d}")
    return count / seconds


async def put_throughput(url: str, src: Path, chunk_size: int, concurrency: int) -> float:
    """MB/s of plain aiohttp PUTs of `src`'s chunks (read from the page cache) to a discarder."""
    size = src.stat().st_size
    offsets = iter(range(0, size, chunk_size))
    fd = os.open(src, os.O_RDONLY)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as session:
            async def worker() -> None:
                for off in offsets:
                    data = await loop.run_in_executor(
                        None, os.pread, fd, min(chunk_size, size - off), off)
                    async with session.put(url + "/discard", data=data) as resp:
                        resp.raise_for_status()
                        await resp.read()

            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return mb_s(size, time.perf_counter() - t)
    finally:
        os.close(fd)


async def get_throughput(url: str, headers: dict[str, str] | None = None) -> tuple[float, int]:
    """(MB/s, bytes) of one aiohttp GET whose body is read and dropped."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        t = time.perf_counter()
        n = 0
        async with session.get(url, headers=headers or {}) as resp:
            resp.raise_for_status()
            async for data in resp.content.iter_any():
                n += len(data)
        return mb_s(n, time.perf_counter() - t), n


async def best_get_throughput(url: str, repeats: int) -> tuple[float, int]:
    best, n = 0.0, 0
    for _ in range(repeats):
        rate, n = await get_throughput(url)
        best = max(best, rate)
    return best, n
