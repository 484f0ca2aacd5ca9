"""B1..B7: casd measured through a real `casd serve` subprocess and the real client.

Each function returns plain numbers (a dict); bench/report.py turns them into table rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench import procs
from bench.limits import MiB, get_throughput, mb_s
from bench.log import log
from casd.client import CasdClient


@dataclass(frozen=True)
class Sizes:
    file_bytes: int
    chunk_size: int
    concurrency: int
    manifest_chunks: int
    small_files: int
    small_file_bytes: int
    hash_bytes: int
    get_repeats: int
    prep_chunks_per_file: int = 100
    prep_parallel_files: int = 16


FULL = Sizes(
    file_bytes=1 << 30,
    chunk_size=5 * MiB,
    concurrency=4,
    manifest_chunks=200_000,
    small_files=200,
    small_file_bytes=64 * 1024,
    hash_bytes=1 << 30,
    get_repeats=2,
)
QUICK = Sizes(
    file_bytes=64 * MiB,
    chunk_size=5 * MiB,
    concurrency=4,
    manifest_chunks=5_000,
    small_files=50,
    small_file_bytes=64 * 1024,
    hash_bytes=128 * MiB,
    get_repeats=1,
)


def write_random_file(path: Path, size: int, piece: int = 16 * MiB) -> None:
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            n = min(piece, left)
            f.write(os.urandom(n))
            left -= n


# --- B1..B4, B7 (one daemon, one 1 GiB file) -------------------------------------------------


async def upload(url: str, path: Path, sizes: Sizes, cache_dir: Path, **options):
    """One upload through a fresh CasdClient (its own session, as one CLI run would have)."""
    async with CasdClient(url, cache_dir=cache_dir) as client:
        return await client.upload(
            path, chunk_size=sizes.chunk_size, concurrency=sizes.concurrency, **options
        )


async def b1_fresh_upload(
    daemon: procs.Server, path: Path, sizes: Sizes, cache_dir: Path, algo: str = "md5"
) -> dict:
    """Fresh upload; peak RSS (VmHWM reset first) and sampled VmRSS while it runs."""
    pid = daemon.pid
    hwm_reset = procs.reset_hwm(pid)
    rss_before = procs.rss_mb(pid)
    cpu_d, cpu_c = procs.cpu_seconds(pid), procs.own_cpu_seconds()
    with procs.CpuWatch(pid) as watch, procs.RssSampler(pid) as sampler:
        t = time.perf_counter()
        s = await upload(daemon.url, path, sizes, cache_dir, algo=algo)
        wall = time.perf_counter() - t
    expected_chunks = -(-sizes.file_bytes // sizes.chunk_size)
    assert s.chunks_sent == expected_chunks and not s.instant, s
    return {
        "wall_s": wall,
        "summary_s": s.seconds,
        "hash_s": s.hash_seconds,
        "transfer_s": s.transfer_seconds,
        "merge_s": s.merge_seconds,
        "bytes": s.size,
        "bytes_sent": s.bytes_sent,
        "url": s.url,
        "digest": s.digest,
        "daemon_cpu_s": procs.cpu_seconds(pid) - cpu_d,
        "client_cpu_s": procs.own_cpu_seconds() - cpu_c,
        "rss_before_mb": rss_before,
        "peak_rss_mb": procs.hwm_mb(pid) if hwm_reset else max(sampler.max, rss_before),
        "peak_rss_source": "VmHWM" if hwm_reset else "sampled VmRSS",
        "sampled_rss_max_mb": sampler.max,
        "sampled_rss_mean_mb": sampler.mean,
        "rss_samples": len(sampler.samples),
        "others_cores": watch.others_cores,
    }


async def b2_reupload(daemon: procs.Server, path: Path, sizes: Sizes, cache_dir: Path) -> dict:
    """Re-upload of a stored file: cache bypassed (hashes again), then with the cache warm."""
    with procs.CpuWatch(daemon.pid) as watch:
        t = time.perf_counter()
        bypass = await upload(daemon.url, path, sizes, cache_dir, use_cache=False)
        bypass_wall = time.perf_counter() - t
    assert bypass.instant and bypass.bytes_sent == 0 and not bypass.cached, bypass
    warm = None
    warm_wall = 0.0
    # B1 filled the cache; a run right after the file was written may not have (a file
    # changed within one timestamp tick is never cached), so one run warms it if needed.
    for _ in range(2):
        t = time.perf_counter()
        warm = await upload(daemon.url, path, sizes, cache_dir, use_cache=True)
        warm_wall = time.perf_counter() - t
        if warm.cached:
            break
    assert warm is not None and warm.instant, warm
    return {
        "bypass_wall_s": bypass_wall,
        "bypass_summary_s": bypass.seconds,
        "bypass_hash_s": bypass.hash_seconds,
        "bypass_transfer_s": bypass.transfer_seconds,
        "warm_wall_s": warm_wall,
        "warm_summary_s": warm.seconds,
        "warm_hash_s": warm.hash_seconds,
        "warm_cached": warm.cached,
        "others_cores": watch.others_cores,
    }


def _copy_with_overwrite(src: Path, dest: Path, offset: int, data: bytes) -> None:
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _copy_with_prefix(src: Path, dest: Path, prefix: bytes) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(prefix)
        shutil.copyfileobj(fin, fout, 16 * MiB)


async def b3_edits(
    daemon: procs.Server, path: Path, sizes: Sizes, cache_dir: Path, work: Path
) -> dict:
    """Bytes sent after overwriting a chunk-sized region, and after inserting 1 KiB in front."""
    region = sizes.chunk_size
    # Deliberately not on a chunk boundary: the region straddles two fixed-size chunks,
    # as an edit in the middle of a real file usually does.
    offset = (sizes.file_bytes // 2 // sizes.chunk_size) * sizes.chunk_size + sizes.chunk_size // 2
    overwritten = work / "b3-overwritten.bin"
    _copy_with_overwrite(path, overwritten, offset, os.urandom(region))
    inserted = work / "b3-inserted.bin"
    _copy_with_prefix(path, inserted, os.urandom(1024))
    with procs.CpuWatch(daemon.pid) as watch:
        s1 = await upload(daemon.url, overwritten, sizes, cache_dir, use_cache=False)
        s2 = await upload(daemon.url, inserted, sizes, cache_dir, use_cache=False)
    overwritten.unlink()
    inserted.unlink()
    return {
        "overwrite_changed": region,
        "overwrite_offset": offset,
        "overwrite_sent": s1.bytes_sent,
        "overwrite_chunks_sent": s1.chunks_sent,
        "overwrite_chunks_total": s1.chunks_total,
        "overwrite_s": s1.seconds,
        "insert_changed": 1024,
        "insert_size": s2.size,
        "insert_sent": s2.bytes_sent,
        "insert_chunks_sent": s2.chunks_sent,
        "insert_chunks_total": s2.chunks_total,
        "insert_s": s2.seconds,
        "others_cores": watch.others_cores,
    }


async def b4_download(
    daemon: procs.Server,
    file_url: str,
    plain: procs.Server,
    sizes: Sizes,
    cache_dir: Path,
    work: Path,
) -> dict:
    """Plain GET of the stored file (body dropped), alternating with the FileResponse limit.

    Alternating the two keeps a burst of load from others on the machine from landing on
    one side only; the best of each is kept.
    """
    best = plain_best = 0.0
    with procs.CpuWatch(daemon.pid, plain.pid) as watch:
        for _ in range(sizes.get_repeats):
            rate, n = await get_throughput(plain.url + "/file")
            plain_best = max(plain_best, rate)
            rate, n = await get_throughput(file_url)
            best = max(best, rate)
            assert n == sizes.file_bytes, n
    dest = work / "b4-download.bin"
    async with CasdClient(daemon.url, cache_dir=cache_dir) as client:
        s = await client.download(file_url, dest)
    dest.unlink()
    return {
        "get_mb_s": best,
        "plain_get_mb_s": plain_best,
        "others_cores": watch.others_cores,
        "client_mb_s": mb_s(s.size, s.seconds),
        "client_s": s.seconds,
    }


# --- the cost of one more chunk ------------------------------------------------------------------


async def chunk_cost(
    path: Path, work: Path, root: Path | None, sizes: tuple[int, int] = (5 << 20, 256 << 10)
) -> dict:
    """What one more chunk costs the daemon beyond its bytes: the same file uploaded in big
    and in small fixed chunks, each on a fresh `casd serve`; the difference in the daemon's
    CPU (all threads, and its event loop) and context switches, per extra chunk. Also what
    one thread hand-off (`run_in_executor` of a function doing nothing) costs here."""
    runs = []
    for chunk_size in sizes:
        data, cache = work / f"cc-data-{chunk_size}", work / f"cc-cache-{chunk_size}"
        with procs.casd_daemon(data, work / f"cc-{chunk_size}.log", root=root) as d:
            cpu, loop = procs.cpu_seconds(d.pid), procs.loop_cpu_seconds(d.pid)
            switches = procs.context_switches(d.pid)
            async with CasdClient(d.url, cache_dir=cache) as client:
                s = await client.upload(path, chunk_size=chunk_size, concurrency=4, use_cache=False)
            assert s.chunks_sent == s.chunks_total and not s.instant, s
            runs.append(
                (
                    s.chunks_sent,
                    procs.cpu_seconds(d.pid) - cpu,
                    procs.loop_cpu_seconds(d.pid) - loop,
                    procs.context_switches(d.pid) - switches,
                )
            )
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    (n_big, cpu_big, loop_big, sw_big), (n_small, cpu_small, loop_small, sw_small) = runs
    extra = n_small - n_big
    return {
        "chunks": (n_big, n_small),
        "daemon_cpu_s": (cpu_big, cpu_small),
        "per_chunk_ms": (cpu_small - cpu_big) / extra * 1000,
        "loop_per_chunk_ms": (loop_small - loop_big) / extra * 1000,
        "switches_per_chunk": (sw_small - sw_big) / extra,
        "hop_cpu_us": await hop_cpu_us(),
    }


async def hop_cpu_us(n: int = 5000) -> float:
    """CPU microseconds (this process, all threads) of one awaited thread hand-off."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2) as pool:
        start = procs.own_cpu_seconds()
        for _ in range(n):
            await loop.run_in_executor(pool, int)
        return (procs.own_cpu_seconds() - start) / n * 1e6


# --- B6 ----------------------------------------------------------------------------------------


async def b6_small_files(
    daemon: procs.Server, sizes: Sizes, cache_dir: Path, work: Path, more: tuple = ()
) -> dict:
    """N distinct small files uploaded at once, each by its own client (its own connection).

    `more`: other daemons serving the same data folder; the clients take the daemons in
    turn, and the CPU figures add up every daemon's (peak RSS is the first daemon's)."""
    folder = work / "b6"
    folder.mkdir()
    paths = []
    for i in range(sizes.small_files):
        p = folder / f"f{i:04d}.bin"
        p.write_bytes(os.urandom(sizes.small_file_bytes))
        paths.append(p)
    pid, pids = daemon.pid, [d.pid for d in (daemon, *more)]
    urls = [d.url for d in (daemon, *more)]
    hwm_reset = procs.reset_hwm(pid)
    cpu_d, cpu_c = sum(map(procs.cpu_seconds, pids)), procs.own_cpu_seconds()
    cpu_loop = sum(map(procs.loop_cpu_seconds, pids))

    async def one(i: int, p: Path) -> float:
        t = time.perf_counter()
        async with CasdClient(urls[i % len(urls)], cache_dir=cache_dir) as client:
            s = await client.upload(p, use_cache=False)
        assert s.chunks_sent == 1, s
        return time.perf_counter() - t

    with procs.CpuWatch(*pids) as watch, procs.RssSampler(pid) as sampler:
        t = time.perf_counter()
        latencies = sorted(await asyncio.gather(*(one(i, p) for i, p in enumerate(paths))))
        wall = time.perf_counter() - t
    shutil.rmtree(folder)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))]

    return {
        "files": len(paths),
        "wall_s": wall,
        "files_s": len(paths) / wall,
        "p50_s": pct(0.50),
        "p99_s": pct(0.99),
        "max_s": latencies[-1],
        "daemon_cpu_s": sum(map(procs.cpu_seconds, pids)) - cpu_d,
        "daemon_loop_cpu_s": sum(map(procs.loop_cpu_seconds, pids)) - cpu_loop,
        "daemons": len(pids),
        "client_cpu_s": procs.own_cpu_seconds() - cpu_c,
        "peak_rss_mb": procs.hwm_mb(pid) if hwm_reset else sampler.max,
        "sampled_rss_max_mb": sampler.max,
        "others_cores": watch.others_cores,
    }


# --- B5 ----------------------------------------------------------------------------------------


def _md5_of_index(i: int) -> str:
    return hashlib.md5(struct.pack(">Q", i)).hexdigest()


def _prep_files(folder: Path, count: int, per_file: int) -> list[Path]:
    """Files whose 8-byte chunks are the big-endian integers 0..count-1: all distinct."""
    folder.mkdir(parents=True)
    paths = []
    for start in range(0, count, per_file):
        p = folder / f"p{start:08d}.bin"
        stop = min(count, start + per_file)
        p.write_bytes(b"".join(struct.pack(">Q", i) for i in range(start, stop)))
        paths.append(p)
    return paths


async def _prep_upload(url: str, paths: list[Path], sizes: Sizes, cache_dir: Path) -> None:
    sem = asyncio.Semaphore(sizes.prep_parallel_files)
    async with CasdClient(url, cache_dir=cache_dir) as client:

        async def one(p: Path) -> None:
            async with sem:
                s = await client.upload(p, chunk_size=8, concurrency=4, use_cache=False)
            assert s.chunks_sent == s.chunks_total, s

        await asyncio.gather(*(one(p) for p in paths))


BIG_FILES = ("--max-file-size", "4TiB")


def _random_manifest(n: int, chunk_size: int) -> bytes:
    chunks = [{"md5": os.urandom(16).hex(), "size": chunk_size} for _ in range(n)]
    return json.dumps(
        {
            "md5": os.urandom(16).hex(),
            "size": n * chunk_size,
            "ext": ".bin",
            "name": f"synthetic-{n}.bin",
            "chunks": chunks,
        }
    ).encode()


def _stored_manifest(stored: int) -> bytes:
    """The `stored` prepared 8-byte chunks plus one chunk the server has never seen."""
    chunks = [{"md5": _md5_of_index(i), "size": 8} for i in range(stored)]
    chunks.append({"md5": os.urandom(16).hex(), "size": 8})
    return json.dumps(
        {
            "md5": os.urandom(16).hex(),
            "size": 8 * len(chunks),
            "ext": ".bin",
            "name": "mostly-stored.bin",
            "chunks": chunks,
        }
    ).encode()


async def _handshake(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, dict]:
    """Latency of one handshake: request sent, answer received and parsed."""
    t = time.perf_counter()
    async with session.post(
        url + "/v1/handshake", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"handshake: HTTP {resp.status}: {raw[:300]!r}")
    answer = json.loads(raw)
    return time.perf_counter() - t, answer


def prep_folder(preferred: Path | None, fallback: Path) -> tuple[Path, bool]:
    """Where the B5 chunks are prepared: tmpfs when there is one with room, else the disk."""
    if preferred is not None and preferred.is_dir() and os.access(preferred, os.W_OK):
        st = os.statvfs(preferred)
        if st.f_bavail * st.f_frsize > 4 << 30:
            return preferred, True
    return fallback, False


async def profile_handshakes(daemon: procs.Server, sizes: Sizes) -> dict:
    """The B5 handshake with none stored, then the same manifest again (resume)."""
    body = _random_manifest(sizes.manifest_chunks, sizes.chunk_size)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        first, _ = await _handshake(session, daemon.url, body)
        again, _ = await _handshake(session, daemon.url, body)
    return {"none_s": first, "none_again_s": again}


async def b5_handshakes(
    sizes: Sizes, work: Path, cache_dir: Path, tmpfs: Path | None, log_dir: Path
) -> dict:
    """Handshake latency of an N-chunk manifest with none stored and with N-1 stored.

    Storing N-1 chunks through the protocol is one chunk PUT each; at casd's per-chunk
    durability cost (fsyncs) that alone takes many minutes on disk. So the chunks are
    uploaded through the real client to a daemon whose data folder is on tmpfs (fsync is
    free there), that daemon is stopped, its data folder is copied to the disk, and the
    measured daemon runs on the copy: the same catalogue and blobs an on-disk upload
    would have left, without waiting for the fsyncs.
    """
    n = sizes.manifest_chunks
    stored = n - 1
    base, on_tmpfs = prep_folder(tmpfs, work)
    prep_root = Path(os.path.join(base, f"casd-bench-b5-{os.getpid()}"))
    prep_data = prep_root / "data"
    try:
        paths = _prep_files(prep_root / "files", stored, sizes.prep_chunks_per_file)
        with procs.casd_daemon(prep_data, log_dir / "daemon-b5-prep.log") as prep:
            log(f"B5: uploading {stored:,} 8-byte chunks to {prep_data}")
            t = time.perf_counter()
            await _prep_upload(prep.url, paths, sizes, cache_dir)
            prep_s = time.perf_counter() - t
        data = work / "b5-data"
        log(f"B5: {prep_s:.1f} s; copying the data folder to {data}")
        t = time.perf_counter()
        shutil.copytree(prep_data, data, symlinks=True)
        copy_s = time.perf_counter() - t
        log(f"B5: copied in {copy_s:.1f} s")
    finally:
        shutil.rmtree(prep_root, ignore_errors=True)

    out: dict = {
        "n": n,
        "stored": stored,
        "prep_s": prep_s,
        "prep_chunks_s": stored / prep_s,
        "prep_on_tmpfs": on_tmpfs,
        "copy_s": copy_s,
    }
    out.update(await b5_measure(data, sizes, log_dir))
    shutil.rmtree(data, ignore_errors=True)
    return out


def b5_prep_rows(
    data: Path, stored: int, log_dir: Path, root: Path | None = None, blobs: bool = False
) -> float:
    """A data folder holding the `stored` chunks of `_stored_manifest`, in seconds, without
    the minutes of PUTs `b5_handshakes` spends: the daemon (from `root`) creates and migrates
    its catalogue and stops, then the chunk rows its `publish_chunk` would have committed
    (digest, algo, size, xxh3 of the bytes, live) go in one transaction. A handshake reads
    those rows and no blob; with `blobs` each 8-byte blob is also written at its place in
    blobs/ (not fsynced), so the folder is a consistent store (`casd fsck` finds it clean),
    at the cost of minutes of file creation and removal on a busy disk."""
    import sqlite3

    import xxhash

    t = time.perf_counter()
    with procs.casd_daemon(data, log_dir / "daemon-b5-prep.log", root=root):
        pass
    now = time.time()
    con = sqlite3.connect(data / "catalog.sqlite")
    try:
        with con:
            con.executemany(
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES (?, 'md5', 8, ?, ?, 0)",
                (
                    (_md5_of_index(i), xxhash.xxh3_128_hexdigest(struct.pack(">Q", i)), now)
                    for i in range(stored)
                ),
            )
    finally:
        con.close()
    if not blobs:
        return time.perf_counter() - t
    made: set[str] = set()
    for i in range(stored):
        h = _md5_of_index(i)
        folder = data / "blobs" / "md5" / h[:2] / h[2:4]
        if folder.name not in made or not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder.name)
        (folder / h).write_bytes(struct.pack(">Q", i))
    return time.perf_counter() - t


async def b5_measure(
    data: Path,
    sizes: Sizes,
    log_dir: Path,
    root: Path | None = None,
    tag: str = "",
    profile: Path | None = None,
) -> dict:
    """B5's handshakes against a data folder holding the chunks of `_stored_manifest`: a
    daemon (from `root`, default this tree) on `data`, its latencies and peak RSS; with
    `profile`, py-spy's raw stacks of the daemon written there."""
    n = sizes.manifest_chunks
    stored = n - 1
    out: dict = {"n": n, "stored": stored}
    small_n = max(1, n // 10)
    bodies = {
        "small": _random_manifest(small_n, sizes.chunk_size),
        "none": _random_manifest(n, sizes.chunk_size),
        "stored": _stored_manifest(stored),
    }
    out["manifest_mb"] = len(bodies["none"]) / 1e6
    # The synthetic manifests describe files of up to 200,000 x 5 MiB (1 TB), over the
    # default --max-file-size; they are handshaken, never merged.
    with procs.casd_daemon(data, log_dir / f"daemon-b5{tag}.log", *BIG_FILES, root=root) as daemon:
        pid = daemon.pid
        out["rss_start_mb"] = procs.rss_mb(pid)
        hwm_reset = procs.reset_hwm(pid)
        timeout = aiohttp.ClientTimeout(total=600)
        with procs.CpuWatch(pid) as watch, procs.RssSampler(pid) as sampler:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                # Warm-up: the first request of a new daemon opens what it opens lazily.
                await _handshake(session, daemon.url, _random_manifest(1, 8))
                spy = None
                if profile is not None:
                    from bench.profile import Spy

                    spy = Spy(pid, profile)
                    await asyncio.sleep(1.0)  # let py-spy attach
                for key, body in bodies.items():
                    cpu = procs.cpu_seconds(pid)
                    latency, answer = await _handshake(session, daemon.url, body)
                    out[f"{key}_cpu_s"] = procs.cpu_seconds(pid) - cpu
                    again, answer2 = await _handshake(session, daemon.url, body)
                    missing = len(answer.get("missing", []))
                    assert answer2.get("upload_id") == answer.get("upload_id"), (answer, answer2)
                    out[f"{key}_s"] = latency
                    out[f"{key}_again_s"] = again
                    out[f"{key}_missing"] = missing
                if spy is not None:
                    spy.stop()
        out["peak_rss_mb"] = procs.hwm_mb(pid) if hwm_reset else sampler.max
        out["sampled_rss_max_mb"] = sampler.max
    out["others_cores"] = watch.others_cores
    assert out["none_missing"] == n and out["small_missing"] == small_n, out
    assert out["stored_missing"] == 1, out
    out["small_n"] = small_n
    out["us_per_chunk_small"] = out["small_s"] / small_n * 1e6
    out["us_per_chunk_none"] = out["none_s"] / n * 1e6
    return out
