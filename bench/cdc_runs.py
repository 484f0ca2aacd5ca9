"""Content-defined chunking and chunked downloads, measured (rows B1c, B3c, B8, B9, C1).

Each function returns plain numbers (a dict); bench/report.py turns them into rows.
`python -m bench.cdc_runs [--quick]` runs only these, for a quick look at the trade-offs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import io
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import xxhash

from bench import procs
from bench.casd_runs import FULL, QUICK, Sizes, write_random_file
from bench.limits import MiB, mb_s
from bench.log import log
from casd.chunking import DEFAULT_FASTCDC_AVG, Chunking, chunk_spans, iter_chunks
from casd.client import CasdClient
from casd.protocol import format_bytes

KiB = 1024
# The rules a fresh upload is compared under: casd's fixed default and four FastCDC
# averages from REAPI's recommended 512 KiB up (1 MiB is casd's default; 4 MiB makes about
# as many chunks as fixed 5 MiB).
FRESH_RULES = (
    Chunking.fixed(5 * MiB),
    Chunking.fastcdc(512 * KiB),
    Chunking.fastcdc(MiB),
    Chunking.fastcdc(2 * MiB),
    Chunking.fastcdc(4 * MiB),
)


def rule_name(rule: Chunking) -> str:
    size = f"{rule.avg_size // MiB} MiB" if rule.avg_size >= MiB else f"{rule.avg_size // KiB} KiB"
    return f"fixed {size}" if rule.kind == "fixed" else f"fastcdc {size}"


async def _upload(url: str, path: Path, rule: Chunking, sizes: Sizes, cache: Path):
    async with CasdClient(url, cache_dir=cache) as client:
        return await client.upload(
            path, chunking=rule, concurrency=sizes.concurrency, use_cache=False
        )


async def fresh_uploads(work: Path, big: Path, sizes: Sizes, rounds: int) -> dict:
    """Fresh upload of the big file under each rule, each on a fresh daemon; best of rounds.

    Rounds go through the rules in turn, every other round in reverse, so a burst of load
    from others on the machine does not land on one rule only. Beside the best wall time,
    `cpu_s` is the median of the CPU seconds the upload cost (client and daemon, all
    threads): the steadier figure on a shared machine.
    """
    best: dict[str, dict] = {}
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    for n in range(rounds):
        for rule in FRESH_RULES if n % 2 == 0 else FRESH_RULES[::-1]:
            data = work / f"cdc-fresh-{n}"
            with procs.casd_daemon(data, work / "daemon-cdc-fresh.log") as daemon:
                before = procs.own_cpu_seconds() + procs.cpu_seconds(daemon.pid)
                with procs.CpuWatch(daemon.pid) as watch:
                    s = await _upload(daemon.url, big, rule, sizes, work / "cdc-cache")
                used = procs.own_cpu_seconds() + procs.cpu_seconds(daemon.pid) - before
            shutil.rmtree(data, ignore_errors=True)
            assert s.chunks_sent == s.chunks_total and not s.instant, s
            name = rule_name(rule)
            log(
                f"fresh upload, {name}: {s.seconds:.2f} s, {used:.2f} CPU s"
                f" ({s.chunks_total} chunks; others used {watch.others_cores:.2f} cores)"
            )
            cpu[name].append(used)
            if name not in best or s.seconds < best[name]["seconds"]:
                best[name] = {
                    "seconds": s.seconds,
                    "hash_s": s.hash_seconds,
                    "transfer_s": s.transfer_seconds,
                    "chunks": s.chunks_total,
                    "others_cores": watch.others_cores,
                }
    for name, f in best.items():
        f["cpu_s"] = statistics.median(cpu[name])
    return best


def _copy_with_overwrite(src: Path, dest: Path, offset: int, data: bytes) -> None:
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _copy_with_prefix(src: Path, dest: Path, prefix: bytes) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(prefix)
        shutil.copyfileobj(fin, fout, 16 * MiB)


def edit_counts(
    old: list[tuple[int, int]], new: list[tuple[int, int]], start: int, end: int
) -> tuple[int, int, int]:
    """(overlap, touched, after) for an overwrite of bytes [start, end) that kept the size.

    `old` and `new` are the (offset, size) spans of the file before and after. *Overlap*:
    the new chunks holding some of the new bytes. *Touched*: the new chunks whose bytes or
    boundaries the edit changed, the ones any client cutting this way must send: the
    overlapping ones, and those outside the region (old bytes) whose span is no span of the
    old file. *After*: the touched chunks wholly after the region.
    """
    spans = set(old)
    overlap = touched = after = 0
    for o, n in new:
        if o < end and o + n > start:
            overlap += 1
            touched += 1
        elif (o, n) not in spans:
            touched += 1
            after += o >= end
    return overlap, touched, after


async def edits_and_downloads(work: Path, big: Path, sizes: Sizes, rounds: int) -> dict:
    """B3c, B8, B9 against one daemon: FastCDC edits, verified and delta downloads."""
    rule = Chunking.fastcdc(DEFAULT_FASTCDC_AVG)
    cache = work / "cdc-cache"
    out: dict = {"avg": rule.avg_size}
    region = 5 * MiB
    offset = (sizes.file_bytes // 2 // region) * region + region // 2
    overwritten = work / "b3c-overwritten.bin"
    _copy_with_overwrite(big, overwritten, offset, os.urandom(region))
    inserted = work / "b3c-inserted.bin"
    _copy_with_prefix(big, inserted, os.urandom(KiB))
    data = work / "cdc-data"
    with procs.casd_daemon(data, work / "daemon-cdc.log") as daemon:
        with procs.CpuWatch(daemon.pid) as watch:
            base = await _upload(daemon.url, big, rule, sizes, cache)
            s1 = await _upload(daemon.url, overwritten, rule, sizes, cache)
            s2 = await _upload(daemon.url, inserted, rule, sizes, cache)
        out["b3c"] = {
            "chunks_total": base.chunks_total,
            "overwrite_changed": region,
            "overwrite_sent": s1.bytes_sent,
            "overwrite_chunks_sent": s1.chunks_sent,
            **dict(
                zip(
                    ("overwrite_overlap", "overwrite_touched", "overwrite_after"),
                    edit_counts(
                        list(chunk_spans(big, rule)),
                        list(chunk_spans(overwritten, rule)),
                        offset,
                        offset + region,
                    ),
                    strict=True,
                )
            ),
            "insert_sent": s2.bytes_sent,
            "insert_chunks_sent": s2.chunks_sent,
            "others_cores": watch.others_cores,
        }
        overwritten.unlink()
        log(f"B3c: overwrite sent {s1.chunks_sent} chunks, insert sent {s2.chunks_sent}")

        # B9: both edits at once, downloaded with the original as --reuse.
        edited = work / "b9-edited.bin"
        _copy_with_overwrite(inserted, edited, offset, os.urandom(region))
        inserted.unlink()
        s3 = await _upload(daemon.url, edited, rule, sizes, cache)
        dest = work / "b9-out.bin"
        async with CasdClient(daemon.url, cache_dir=cache) as client:
            t = time.perf_counter()
            d = await client.download(s3.digest, dest, reuse=[big], use_cache=False)
            b9_s = time.perf_counter() - t
        same = _same_file(dest, edited)
        dest.unlink()
        edited.unlink()
        out["b9"] = {
            "size": d.size,
            "bytes_fetched": d.bytes_fetched,
            "chunks_fetched": d.chunks_fetched,
            "chunks_total": d.chunks_total,
            "bytes_reused": d.bytes_reused,
            "seconds": b9_s,
            "byte_exact": same,
        }
        log(f"B9: fetched {d.bytes_fetched} bytes in {d.chunks_fetched} chunks, {b9_s:.2f} s")

        # B8: the big file as uploaded with fixed 5 MiB chunks (the B1 default), verified
        # download against a plain GET that writes and fsyncs the same bytes.
        fixed = await _upload(daemon.url, big, Chunking.fixed(5 * MiB), sizes, cache)
        assert fixed.instant or fixed.chunks_sent >= 0
        out["b8"] = await _b8(daemon, fixed.url, big, work, rounds)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _plain_get_to_disk(url: str, dest: Path) -> float:
    """Seconds for one GET streamed into a file, fsynced: the disk work of a download."""
    t = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers={"Accept-Encoding": "identity"}) as resp,
    ):
        resp.raise_for_status()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            async for data in resp.content.iter_chunked(MiB):
                await loop.run_in_executor(None, _write_all, fd, data)
            await loop.run_in_executor(None, os.fsync, fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t


async def _b8(daemon: procs.Server, url: str, big: Path, work: Path, rounds: int) -> dict:
    """Best of alternating plain GETs and client downloads of the same stored file."""
    size = big.stat().st_size
    plain_best = client_best = float("inf")
    dest = work / "b8-out.bin"
    with procs.CpuWatch(daemon.pid) as watch:
        for _ in range(max(1, rounds)):
            plain_best = min(plain_best, await _plain_get_to_disk(url, dest))
            dest.unlink()
            async with CasdClient(daemon.url) as client:
                t = time.perf_counter()
                s = await client.download(url, dest)
                client_best = min(client_best, time.perf_counter() - t)
            assert s.chunked and s.chunks_fetched == s.chunks_total, s
            dest.unlink()
    log(
        f"B8: plain GET to disk {mb_s(size, plain_best):.0f} MB/s, "
        f"client {mb_s(size, client_best):.0f} MB/s"
    )
    return {
        "plain_mb_s": mb_s(size, plain_best),
        "client_mb_s": mb_s(size, client_best),
        "others_cores": watch.others_cores,
    }


def chunking_throughput(nbytes: int) -> dict:
    """MB/s of the FastCDC cut (pyfastcdc, default average) and MD5 over the same buffer."""
    buf = os.urandom(nbytes)
    rule = Chunking.fastcdc(DEFAULT_FASTCDC_AVG)
    cut = md5 = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        n = sum(1 for _ in iter_chunks(io.BytesIO(buf), rule))
        cut = min(cut, time.perf_counter() - t)
        t = time.perf_counter()
        hashlib.md5(buf).hexdigest()
        md5 = min(md5, time.perf_counter() - t)
    return {
        "bytes": nbytes,
        "chunks": n,
        "fastcdc_mb_s": mb_s(nbytes, cut),
        "md5_mb_s": mb_s(nbytes, md5),
    }


def overwrite_study(seeds: int, file_bytes: int, region: int, avg: int) -> dict:
    """B3c offline, over many random files: the chunks FastCDC makes a client send after
    `region` bytes are overwritten at a random offset (casd.chunking alone, no daemon).

    For each seed: a random file, a random offset, random new bytes. "Sent" counts the new
    file's chunks whose digest (xxh3-128 here) no chunk of the old file has, which is what a
    server that holds the old file asks for; it is compared with `edit_counts`.
    """
    rule = Chunking.fastcdc(avg)
    runs = []
    for seed in range(seeds):
        r = random.Random(seed)
        old = bytearray(r.randbytes(file_bytes))
        start = r.randrange(file_bytes - region + 1)
        new = bytearray(old)
        new[start : start + region] = r.randbytes(region)
        old_spans = list(chunk_spans(io.BytesIO(old), rule))
        new_spans = list(chunk_spans(io.BytesIO(new), rule))
        held = {xxhash.xxh3_128_digest(memoryview(old)[o : o + n]) for o, n in old_spans}
        view = memoryview(new)
        sent = [(o, n) for o, n in new_spans if xxhash.xxh3_128_digest(view[o : o + n]) not in held]
        overlap, touched, after = edit_counts(old_spans, new_spans, start, start + region)
        overlap_bytes = sum(n for o, n in new_spans if o < start + region and o + n > start)
        runs.append(
            {
                "seed": seed,
                "sent": len(sent),
                "sent_bytes": sum(n for _, n in sent),
                "overlap": overlap,
                "overlap_bytes": overlap_bytes,
                "touched": touched,
                "after": after,
                "before": sum(1 for o, n in sent if o + n <= start),
            }
        )
    return {"seeds": seeds, "file_bytes": file_bytes, "region": region, "avg": avg, "runs": runs}


def study_summary(study: dict) -> str:
    """The distribution of overwrite_study's counts, as a few lines of text."""
    runs = study["runs"]
    n = len(runs)
    after = collections.Counter(r["after"] for r in runs)
    extra_mib = [(r["sent_bytes"] - r["overlap_bytes"]) / MiB for r in runs]
    sent_mib = [r["sent_bytes"] / MiB for r in runs]
    lines = [
        f"{n} seeds, {format_bytes(study['file_bytes'])} random file, "
        f"{format_bytes(study['region'])} overwritten at a random offset, FastCDC 2020 "
        f"average {format_bytes(study['avg'])}",
        "chunks touched after the region: "
        + ", ".join(f"{k}: {after[k]} ({after[k] / n:.0%})" for k in sorted(after)),
        f"mean chunks: sent {statistics.mean(r['sent'] for r in runs):.2f}, overlapping the "
        f"region {statistics.mean(r['overlap'] for r in runs):.2f}, touched "
        f"{statistics.mean(r['touched'] for r in runs):.2f}, after the region "
        f"{statistics.mean(r['after'] for r in runs):.2f}",
        f"sent == touched in {sum(r['sent'] == r['touched'] for r in runs)} of {n}; "
        f"sent <= overlapping in {sum(r['sent'] <= r['overlap'] for r in runs)} of {n}; "
        f"touched before the region in {sum(r['before'] > 0 for r in runs)} of {n}",
        f"MiB sent: mean {statistics.mean(sent_mib):.2f}, median "
        f"{statistics.median(sent_mib):.2f}, max {max(sent_mib):.2f}; beyond the overlapping "
        f"chunks: mean {statistics.mean(extra_mib):.2f}, 90th percentile "
        f"{statistics.quantiles(extra_mib, n=10, method='inclusive')[-1]:.2f}, max "
        f"{max(extra_mib):.2f}",
    ]
    return "\n".join(lines)


async def b8_alone(work: Path, big: Path, sizes: Sizes, rounds: int) -> dict:
    """B8 by itself: the big file uploaded in fixed 5 MiB chunks, then downloaded both ways."""
    data = work / "cdc-b8-data"
    with procs.casd_daemon(data, work / "daemon-cdc-b8.log") as daemon:
        up = await _upload(daemon.url, big, Chunking.fixed(5 * MiB), sizes, work / "cdc-cache")
        out = await _b8(daemon, up.url, big, work, rounds)
    shutil.rmtree(data, ignore_errors=True)
    return out


async def measure(work: Path, big: Path, sizes: Sizes, rounds: int) -> dict:
    log("C1: chunking throughput")
    out = {"c1": chunking_throughput(min(sizes.hash_bytes, 256 * MiB))}
    log("B1c: fresh uploads, fixed vs FastCDC")
    out["b1c"] = await fresh_uploads(work, big, sizes, rounds)
    log("B3c, B8, B9: FastCDC edits, verified and delta downloads")
    out.update(await edits_and_downloads(work, big, sizes, rounds))
    return out


def main(argv: list[str] | None = None) -> int:
    from bench import report

    p = argparse.ArgumentParser(prog="python -m bench.cdc_runs", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a 64 MiB file instead of 1 GiB")
    p.add_argument("--rounds", type=int, default=2, help="best of this many (default 2)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temp dir")
    p.add_argument(
        "--b8", action="store_true", help="only B8 (verified download against a plain GET)"
    )
    p.add_argument(
        "--b1c", action="store_true", help="only B1c (fresh uploads, fixed against FastCDC)"
    )
    p.add_argument(
        "--overwrite-study",
        type=int,
        metavar="SEEDS",
        default=0,
        help="only the offline B3c study: this many random 64 MiB files, 5 MiB overwritten",
    )
    args = p.parse_args(argv)
    if args.overwrite_study:
        for avg in (DEFAULT_FASTCDC_AVG, 512 * KiB):
            study = overwrite_study(args.overwrite_study, 64 * MiB, 5 * MiB, avg)
            print(study_summary(study), end="\n\n", flush=True)
        return 0
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="casd-bench-cdc-", dir=args.tmp))
    try:
        big = work / "big.bin"
        write_random_file(big, sizes.file_bytes)
        if args.b8:
            b8 = asyncio.run(b8_alone(work, big, sizes, args.rounds))
        elif args.b1c:
            results = {"b1c": asyncio.run(fresh_uploads(work, big, sizes, args.rounds))}
        else:
            results = asyncio.run(measure(work, big, sizes, args.rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.b8:
        ratio = b8["client_mb_s"] / b8["plain_mb_s"]
        print(
            f"B8: verified client download {b8['client_mb_s']:.0f} MB/s, plain GET to disk +"
            f" fsync {b8['plain_mb_s']:.0f} MB/s, ratio {ratio:.2f} (target >= 0.8);"
            f" others used {b8['others_cores']:.2f} cores"
        )
        return 0
    rows = report.b1c_rows(sizes, results) if args.b1c else report.cdc_rows(sizes, results)
    print(report.render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
