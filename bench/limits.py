"""The machine's own limits, measured in the same run as casd so ratios compare like with like."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from bench.procs import own_cpu_seconds

MiB = 1 << 20
HASH_BUFFER = 64 * MiB
READ_PIECE = 1 * MiB


@dataclass(frozen=True)
class Limits:
    md5_mb_s: float
    sha256_mb_s: float
    fsync_write_mb_s: float
    fsync_write_parallel_mb_s: float
    small_fsync_files_s: float
    put_mb_s: float
    fileresponse_mb_s: float
    # FileResponse per event loop of the plain server: sendfile on asyncio, copies on uvloop.
    fileresponse_by_loop: dict[str, float]
    # CPU seconds per GiB (user + system): the plain server receiving L4's PUTs on asyncio's
    # loop, and L3's and L3b's fsynced writes: what any aiohttp daemon that stores what it
    # receives spends before it hashes a byte. (On a VM a lone fsync may spin: L3's CPU can
    # be several times L3b's.)
    put_server_cpu_s_per_gib: float = 0.0
    fsync_write_cpu_s_per_gib: float = 0.0
    fsync_write_parallel_cpu_s_per_gib: float = 0.0


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


def fsync_write_throughput(src: Path, dest_dir: Path, piece: int, writers: int = 1) -> float:
    """Write `src` as `piece`-sized files, each fsynced and closed, by `writers` threads (MB/s).

    One writer is the plain sequential limit; several show what the disk does at the queue
    depth casd's concurrent chunk uploads give it.
    """
    return fsync_write_costs(src, dest_dir, piece, writers)[0]


def fsync_write_costs(
    src: Path, dest_dir: Path, piece: int, writers: int = 1
) -> tuple[float, float]:
    """fsync_write_throughput's MB/s, and the CPU seconds (this process) per GiB written."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    fd_in = os.open(src, os.O_RDONLY)
    try:
        # Read the source first so only writing is timed.
        blocks = [os.pread(fd_in, min(piece, size - off), off) for off in range(0, size, piece)]
    finally:
        os.close(fd_in)

    def write(i: int) -> None:
        fd = os.open(dest_dir / f"{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(blocks[i])
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    t, cpu = time.perf_counter(), own_cpu_seconds()
    if writers == 1:
        for i in range(len(blocks)):
            write(i)
    else:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(len(blocks))))
    seconds, cpu = time.perf_counter() - t, own_cpu_seconds() - cpu
    for i in range(len(blocks)):
        os.unlink(dest_dir / f"{i:06d}")
    return mb_s(size, seconds), cpu * (1 << 30) / size


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
                        None, os.pread, fd, min(chunk_size, size - off), off
                    )
                    async with session.put(url + "/discard", data=data) as resp:
                        resp.raise_for_status()
                        await resp.read()

            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return mb_s(size, time.perf_counter() - t)
    finally:
        os.close(fd)


def raw_get(url: str) -> tuple[float, int]:
    """(MB/s, bytes) of one HTTP/1.1 GET read with recv_into into one reused buffer.

    A Python HTTP client reading the body piece by piece tops out near the servers' speed
    and then measures itself; this reader costs almost nothing, so it measures the server.
    """
    parts = urlsplit(url)
    t = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{url}: connection closed in the headers")
            head += data
        head, _, body = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise ConnectionError(f"{url}: {status.decode(errors='replace')}")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ConnectionError(f"{url}: no Content-Length")
        got = len(body)
        buf = memoryview(bytearray(4 * MiB))
        while got < length:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError(f"{url}: body ended at {got} of {length} bytes")
            got += n
    return mb_s(got, time.perf_counter() - t), got


async def get_throughput(url: str) -> tuple[float, int]:
    """(MB/s, bytes) of one GET whose body is read and dropped (see raw_get)."""
    return await asyncio.to_thread(raw_get, url)


async def best_get_throughput(url: str, repeats: int) -> tuple[float, int]:
    best, n = 0.0, 0
    for _ in range(repeats):
        rate, n = await get_throughput(url)
        best = max(best, rate)
    return best, n
