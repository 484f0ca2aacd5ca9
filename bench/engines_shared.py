"""The shared engines in `python -m bench`: S3 (moto) + PostgreSQL against the local ones.

In one run, on one machine: the fresh upload and the download of the bench's big file
(bench/engines.py's `engine_run`: the real client, then one plain GET) against `casd serve`
on the local folder + SQLite and on S3 + PostgreSQL, with the daemon's peak RSS; the B6
small-file row (N concurrent one-chunk uploads, each its own client) on PostgreSQL and on
SQLite, blobs local for both; and what the emulated store costs by itself (aiobotocore PUTs
and GETs of the same chunks against moto, no casd in between). moto is Python on the same
two cores: the S3 rows measure casd plus an emulator, a ceiling on what a real store costs.
PostgreSQL runs with fsync on, like SQLite's synchronous=FULL.

Without moto, aiobotocore, asyncpg or the PostgreSQL binaries the rows say why and the rest
of the bench runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from bench import casd_runs, procs
from bench.casd_runs import Sizes
from bench.log import log
from bench.report import Row, _size

# The throwaway cluster of the tests (one way to start PostgreSQL here): tests/ on the path.
TESTS = Path(__file__).resolve().parent.parent / "tests"


def _engine_postgres():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import engine_postgres

    return engine_postgres


def why_missing() -> str | None:
    """Why the shared engines cannot be measured here, or None when they can."""
    try:
        import aiobotocore  # noqa: F401 - only whether the S3 engine can run
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"moto[server] and aiobotocore are needed for the S3 rows ({exc})"
    return _engine_postgres().why_missing()


def durable_cluster():
    """The tests' cluster, started with fsync on (the tests run it with fsync off)."""
    return _engine_postgres().Cluster(durable=True)


async def b6_on(name: str, sizes: Sizes, work: Path, *extra: str) -> dict:
    data = work / f"data-b6-{name}"
    with procs.casd_daemon(data, work / f"daemon-b6-{name}.log", *extra) as daemon:
        log(f"B6 on {name}: {sizes.small_files} concurrent small uploads")
        out = await casd_runs.b6_small_files(daemon, sizes, work / f"cache-b6-{name}", work)
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(work / f"cache-b6-{name}", ignore_errors=True)
    return out


async def measure(sizes: Sizes, work: Path, big: Path) -> dict:
    """Every figure of the rows below, or {"missing": why}."""
    missing = why_missing()
    if missing is not None:
        log(f"shared engines skipped: {missing}")
        return {"missing": missing}
    from bench import engines

    os.environ.update({k: os.environ.get(k, v) for k, v in engines.CREDENTIALS.items()})
    cluster = durable_cluster()
    moto = None
    try:
        cluster.init()
        moto, endpoint = engines.start_moto(work / "moto.log")
        local = await engines.engine_run("local", big, sizes, work)
        bucket = engines.new_bucket(endpoint)
        shared = await engines.engine_run(
            "s3+postgresql",
            big,
            sizes,
            work,
            "--blobs",
            f"s3://{bucket}/casd",
            "--s3-endpoint",
            endpoint,
            "--catalog",
            cluster.database(),
        )
        log("moto alone: aiobotocore PUT and GET of the same chunks")
        raw = await engines.raw_store(big, sizes, endpoint, engines.new_bucket(endpoint))
        b6_sqlite = await b6_on("sqlite", sizes, work)
        b6_pg = await b6_on("postgresql", sizes, work, "--catalog", cluster.database())
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        cluster.destroy()
    return {
        "local": local,
        "shared": shared,
        "raw": raw,
        "b6_sqlite": b6_sqlite,
        "b6_postgresql": b6_pg,
    }


def rows(sizes: Sizes, r: dict) -> list[Row]:
    """E1-E4 of the table: each shared-engine figure as a ratio to the local one."""
    if "missing" in r:
        return [Row("E1", "shared engines (S3 + PostgreSQL)", "skipped", verdict=r["missing"])]
    size = _size(sizes.file_bytes)
    local, shared, raw = r["local"], r["shared"], r["raw"]
    emu = "moto (Python, same cores) is the store: a ceiling, not a real store's cost"
    out = [
        Row(
            "E1",
            f"fresh upload of the {size} file to S3 (moto) + PostgreSQL",
            f"{shared['upload_mb_s']:.0f} MB/s",
            f"local + SQLite {local['upload_mb_s']:.0f} MB/s",
            f"{shared['upload_mb_s'] / local['upload_mb_s']:.2f}",
            "informational",
            f"{emu}; moto alone takes PUTs at {raw['put_mb_s']:.0f} MB/s",
        ),
        Row(
            "E2",
            f"download of the {size} file (one GET), S3 (moto) + PostgreSQL",
            f"{shared['get_mb_s']:.0f} MB/s",
            f"local + SQLite {local['get_mb_s']:.0f} MB/s",
            f"{shared['get_mb_s'] / local['get_mb_s']:.2f}",
            "informational",
            f"moto alone serves GETs at {raw['get_mb_s']:.0f} MB/s",
        ),
        Row(
            "E3",
            "daemon peak RSS, S3 + PostgreSQL: upload / download",
            f"{shared['upload_peak_rss_mb']:.0f} / {shared['get_peak_rss_mb']:.0f} MB",
            f"local {local['upload_peak_rss_mb']:.0f} / {local['get_peak_rss_mb']:.0f} MB",
            f"{shared['upload_peak_rss_mb'] / local['upload_peak_rss_mb']:.2f} / "
            f"{shared['get_peak_rss_mb'] / local['get_peak_rss_mb']:.2f}",
            "bounded",
            "informational",
        ),
    ]
    pg, lite = r["b6_postgresql"], r["b6_sqlite"]
    out.append(
        Row(
            "E4",
            f"B6 on PostgreSQL: {pg['files']} concurrent uploads of distinct "
            f"{_size(sizes.small_file_bytes)} files (blobs local)",
            f"{pg['files_s']:.0f} files/s, p99 {pg['p99_s'] * 1000:.0f} ms",
            f"SQLite {lite['files_s']:.0f} files/s, p99 {lite['p99_s'] * 1000:.0f} ms",
            f"{pg['files_s'] / lite['files_s']:.2f}",
            "informational",
            "PostgreSQL with fsync on, on the same two cores",
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.engines_shared [--size-mib N] [--small-files N]`: these rows alone."""
    import argparse
    import asyncio
    import tempfile
    from dataclasses import replace

    from bench.casd_runs import FULL
    from bench.limits import MiB
    from bench.report import render

    p = argparse.ArgumentParser(
        prog="python -m bench.engines_shared", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--size-mib", type=int, default=FULL.file_bytes // MiB, help="file size (default 1024)"
    )
    p.add_argument(
        "--small-files",
        type=int,
        default=FULL.small_files,
        help="concurrent small uploads of the B6 row (default 200)",
    )
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temp dir")
    args = p.parse_args(argv)
    sizes = replace(FULL, file_bytes=args.size_mib * MiB, small_files=args.small_files)
    work = Path(tempfile.mkdtemp(prefix="casd-bench-shared-", dir=args.tmp))
    try:
        big = work / "big.bin"
        casd_runs.write_random_file(big, sizes.file_bytes)
        print(render(rows(sizes, asyncio.run(measure(sizes, work, big)))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
