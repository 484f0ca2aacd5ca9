"""`python -m bench.engines [--size 1GiB]`: the blob-store engines side by side.

In one run, on one machine: a fresh upload (the real client) and a plain GET of one file
against `casd serve` on the local folder and on S3 (moto's standalone server on 127.0.0.1),
with the daemon's peak RSS during each; then what the emulated store costs by itself: plain
aiobotocore PUTs and ranged GETs of the same chunks, same concurrency, no casd in between.
moto is in-process Python, so its figure is the ceiling of the S3 rows, not a real store's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import casd_runs, procs
from bench.casd_runs import Sizes
from bench.limits import MiB, get_throughput, mb_s
from bench.log import log

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "casd-bench",
    "AWS_SECRET_ACCESS_KEY": "casd-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto did not start; see {log_path}") from None
            time.sleep(0.1)


def new_bucket(endpoint: str) -> str:
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint)
    name = f"casd-bench-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


async def engine_run(name: str, big: Path, sizes: Sizes, work: Path, *extra: str) -> dict:
    data = work / f"data-{name}"
    with procs.casd_daemon(data, work / f"daemon-{name}.log", *extra) as daemon:
        log(f"{name}: fresh upload of {sizes.file_bytes >> 20} MiB")
        b1 = await casd_runs.b1_fresh_upload(daemon, big, sizes, work / f"cache-{name}")
        log(f"{name}: download")
        procs.reset_hwm(daemon.pid)
        rate, n = await get_throughput(b1["url"])
        assert n == sizes.file_bytes, n
        get_rss = procs.hwm_mb(daemon.pid)
    shutil.rmtree(data, ignore_errors=True)
    return {
        "upload_s": b1["summary_s"],
        "upload_mb_s": mb_s(sizes.file_bytes, b1["summary_s"]),
        "upload_peak_rss_mb": b1["peak_rss_mb"],
        "get_mb_s": rate,
        "get_peak_rss_mb": get_rss,
    }


async def raw_store(big: Path, sizes: Sizes, endpoint: str, bucket: str) -> dict:
    """aiobotocore alone: the chunks PUT with Content-MD5 and read back by ranged GETs."""
    from aiobotocore.session import get_session

    from casd.blobstore.s3 import client_config

    size = big.stat().st_size
    offsets = list(range(0, size, sizes.chunk_size))
    fd = os.open(big, os.O_RDONLY)
    loop = asyncio.get_running_loop()
    try:
        async with get_session().create_client(
            "s3", endpoint_url=endpoint, config=client_config()
        ) as s3:
            queue = iter(offsets)

            async def putter() -> None:
                for off in queue:
                    piece = await loop.run_in_executor(
                        None, os.pread, fd, min(sizes.chunk_size, size - off), off
                    )
                    md5 = base64.b64encode(hashlib.md5(piece).digest()).decode()
                    await s3.put_object(Bucket=bucket, Key=f"raw/{off}", Body=piece, ContentMD5=md5)

            t = time.perf_counter()
            await asyncio.gather(*(putter() for _ in range(sizes.concurrency)))
            put_s = time.perf_counter() - t
            t = time.perf_counter()
            got = 0
            for off in offsets:  # one stream at a time, as a casd download reads its chunks
                resp = await s3.get_object(Bucket=bucket, Key=f"raw/{off}")
                async with resp["Body"] as body:
                    while piece := await body.read(1 << 20):
                        got += len(piece)
            get_s = time.perf_counter() - t
            assert got == size, got
    finally:
        os.close(fd)
    return {"put_mb_s": mb_s(size, put_s), "get_mb_s": mb_s(size, get_s)}


def render(sizes: Sizes, local: dict, s3: dict, raw: dict) -> str:
    rows = [
        (
            "fresh upload MB/s (client, 4 streams)",
            local["upload_mb_s"],
            s3["upload_mb_s"],
            raw["put_mb_s"],
        ),
        ("download MB/s (one GET)", local["get_mb_s"], s3["get_mb_s"], raw["get_mb_s"]),
        ("daemon peak RSS MB, upload", local["upload_peak_rss_mb"], s3["upload_peak_rss_mb"], None),
        ("daemon peak RSS MB, download", local["get_peak_rss_mb"], s3["get_peak_rss_mb"], None),
    ]
    out = [
        (
            f"blob-store engines, {sizes.file_bytes >> 20} MiB file in {sizes.chunk_size >> 20}"
            " MiB chunks (S3: moto on 127.0.0.1, SQLite catalogue)"
        ),
        "",
        "| figure | local | S3 (moto) | S3 / local | moto alone (aiobotocore) | S3 / moto alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, a, b, c in rows:
        ratio = f"{b / a:.2f}" if a else "-"
        alone = f"{c:.0f}" if c is not None else "-"
        vs = f"{b / c:.2f}" if c else "-"
        out.append(f"| {name} | {a:.0f} | {b:.0f} | {ratio} | {alone} | {vs} |")
    return "\n".join(out)


async def measure(sizes: Sizes, work: Path) -> str:
    big = work / "big.bin"
    log(f"writing a {sizes.file_bytes >> 20} MiB random file")
    casd_runs.write_random_file(big, sizes.file_bytes)
    os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})
    moto, endpoint = start_moto(work / "moto.log")
    try:
        local = await engine_run("local", big, sizes, work)
        bucket = new_bucket(endpoint)
        s3 = await engine_run(
            "s3", big, sizes, work, "--blobs", f"s3://{bucket}/casd", "--s3-endpoint", endpoint
        )
        log("moto alone: aiobotocore PUT and GET of the same chunks")
        raw = await raw_store(big, sizes, endpoint, new_bucket(endpoint))
    finally:
        moto.kill()
        moto.wait()
    return render(sizes, local, s3, raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temp dir")
    args = p.parse_args(argv)
    sizes = Sizes(
        file_bytes=args.size_mib * MiB,
        chunk_size=5 * MiB,
        concurrency=4,
        manifest_chunks=0,
        small_files=0,
        small_file_bytes=0,
        hash_bytes=0,
        get_repeats=1,
    )
    work = Path(tempfile.mkdtemp(prefix="casd-bench-engines-", dir=args.tmp))
    try:
        print(asyncio.run(measure(sizes, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
