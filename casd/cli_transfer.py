"""`casd upload` and `casd download`: the client library behind a command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from casd.chunking import DEFAULT_FASTCDC_AVG
from casd.cli_common import CliError, parse_size
from casd.client import (
    DEFAULT_CHUNKING,
    DEFAULT_CONCURRENCY,
    DEFAULT_RETRIES,
    DEFAULT_SERVER,
    DEFAULT_VERIFY,
    VERIFY_MODES,
    CasdClient,
    CasdClientError,
    Chunking,
    FileRef,
    Phase,
    Progress,
)
from casd.protocol import format_bytes


def register(sub) -> None:
    up = sub.add_parser(
        "upload",
        help="upload files, sending only the chunks the server lacks",
        description="Upload files to a casd server. Only chunks the server does not hold yet "
        "are sent; running the same upload again after a failure resumes it.",
    )
    up.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    _add_server_args(up)
    up.add_argument(
        "--chunking",
        choices=("fixed", "fastcdc"),
        default=DEFAULT_CHUNKING,
        help="where chunks are cut: fixed sizes, or by content (FastCDC 2020, "
        "so an insertion resends only the chunks around it); default "
        f"{DEFAULT_CHUNKING}",
    )
    up.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="the fixed chunk size (default 5MiB) or the FastCDC average, a power "
        f"of two from 1KiB to 4MiB (default {DEFAULT_FASTCDC_AVG // 1024 // 1024}MiB);"
        " e.g. 1M, 65536",
    )
    up.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"chunk uploads in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    up.add_argument(
        "--algo", choices=("md5", "sha256"), default="md5", help="digest algorithm (default md5)"
    )
    up.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per file instead of the summary lines",
    )
    up.add_argument(
        "--no-cache",
        action="store_true",
        help="hash the files even when the digest cache knows them unchanged",
    )
    up.set_defaults(func=run_upload)

    down = sub.add_parser(
        "download",
        help="download a stored file by digest or URL, verifying its digest",
        description="Download a file from a casd server. An interrupted download resumes "
        "where it stopped; the file appears at its path only once its digest "
        "is verified.",
    )
    down.add_argument(
        "ref", metavar="DIGEST|URL", help="the file's digest (md5 or sha256) or its URL"
    )
    down.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        default=None,
        help="where to write it (a folder or a file name; default ./DIGEST.ext)",
    )
    down.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="PATH",
        help="a local file (e.g. an older version) whose chunks need not be "
        "fetched: they are copied, verified; repeat for several",
    )
    down.add_argument(
        "--chunking",
        choices=("fixed", "fastcdc"),
        default=None,
        help="how the stored file was cut, to find its chunks in --reuse files "
        "(default: guessed from the file's chunk sizes)",
    )
    down.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="the chunk size or FastCDC average that goes with --chunking",
    )
    down.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"chunk requests in flight at once (default {DEFAULT_CONCURRENCY})",
    )
    down.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default=DEFAULT_VERIFY,
        help="chunks: check each chunk against the server's manifest (default); full: "
        "also hash the whole file and compare it with DIGEST (one more pass over the file)",
    )
    _add_server_args(down)
    down.add_argument("--json", action="store_true", help="print the result as one JSON object")
    down.set_defaults(func=run_download)


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help=f"casd server (default: $CASD_SERVER, else {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--token",
        default=None,
        metavar="T",
        help="bearer token, when the server requires one (default: $CASD_TOKEN)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="retries of a failed request: connection errors, timeouts, 408, "
        f"429 and 5xx (default {DEFAULT_RETRIES})",
    )


def _client(args: argparse.Namespace) -> CasdClient:
    server = args.server or os.environ.get("CASD_SERVER") or DEFAULT_SERVER
    token = args.token or os.environ.get("CASD_TOKEN") or None
    try:
        return CasdClient(server, token=token, retries=args.retries)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None


# The phases that move bytes get a bar; the others (handshake, merging, done) close it.
_BAR_PHASES = (Phase.HASHING, Phase.UPLOADING, Phase.DOWNLOADING)


class _Bars:
    """tqdm bars on stderr, only when stderr is a terminal: hashing, then upload/download."""

    def __init__(self, label: str):
        self.enabled = sys.stderr.isatty()
        self.label = label
        self.phase: str | None = None
        self.bar: Any = None  # a tqdm bar, imported only on a terminal

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        if p.phase != self.phase:
            self.close()
            if p.phase not in _BAR_PHASES:
                return
            from tqdm import tqdm  # only paid for on a terminal

            self.phase = p.phase
            self.bar = tqdm(
                total=p.bytes_total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"{p.phase} {self.label}",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
        self.bar.update(p.bytes_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.phase = None


def run_upload(args: argparse.Namespace) -> int:
    """Upload each FILE; a file that fails is reported on stderr and the others still go."""
    if args.chunk_size is not None and args.chunk_size < 1:
        raise CliError("--chunk-size must be at least 1 byte", exit_code=2)
    try:
        args.chunking = Chunking.parse(args.chunking, args.chunk_size)
    except ValueError as exc:
        raise CliError(f"--chunk-size: {exc}", exit_code=2) from None
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1", exit_code=2)
    client = _client(args)
    try:
        return asyncio.run(_upload_all(client, args))
    except Exception as exc:  # the user gets one line, never a traceback
        raise CliError(f"unexpected error: {exc.__class__.__name__}: {exc}") from None


async def _upload_all(client: CasdClient, args: argparse.Namespace) -> int:
    failed = 0
    async with client:
        for name in args.files:
            bars = _Bars(Path(name).name)
            try:
                s = await client.upload(
                    name,
                    chunking=args.chunking,
                    concurrency=args.concurrency,
                    algo=args.algo,
                    on_progress=bars,
                    use_cache=not args.no_cache,
                )
            except (CasdClientError, OSError, ValueError) as exc:
                bars.close()
                failed += 1
                print(f"casd upload: {name}: {_reason(exc, name)}", file=sys.stderr, flush=True)
                continue
            bars.close()
            if args.json:
                print(json.dumps(s.to_json()), flush=True)
                continue
            if s.instant:
                what = "instant, already on the server: nothing sent"
            else:
                what = (
                    f"sent {s.chunks_sent} of {s.chunks_total} chunks "
                    f"({format_bytes(s.bytes_sent)}), skipped {s.chunks_skipped} "
                    f"({format_bytes(s.bytes_skipped)}) already on the server"
                )
            print(s.url)
            print(
                f"  {name}: {format_bytes(s.size)}, {s.algo} {s.digest}: {what} "
                f"in {s.seconds:.2f}s",
                flush=True,
            )
    return 1 if failed else 0


def run_download(args: argparse.Namespace) -> int:
    """Download one file by digest or URL."""
    client = _client(args)
    try:
        ref = FileRef.parse(args.ref)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1", exit_code=2)
    if args.chunk_size is not None and args.chunking is None:
        raise CliError("--chunk-size needs --chunking", exit_code=2)
    try:
        args.chunking = (
            None if args.chunking is None else Chunking.parse(args.chunking, args.chunk_size)
        )
    except ValueError as exc:
        raise CliError(f"--chunk-size: {exc}", exit_code=2) from None
    for path in args.reuse:
        if not os.path.isfile(path):
            raise CliError(f"--reuse {path}: not a readable file", exit_code=2)
    try:
        return asyncio.run(_download(client, ref, args))
    except CliError:
        raise
    except Exception as exc:  # the user gets one line, never a traceback
        raise CliError(f"unexpected error: {exc.__class__.__name__}: {exc}") from None


async def _download(client: CasdClient, ref: FileRef, args: argparse.Namespace) -> int:
    bars = _Bars(ref.digest.hex[:12])
    try:
        async with client:
            s = await client.download(
                ref,
                args.output,
                reuse=args.reuse,
                chunking=args.chunking,
                concurrency=args.concurrency,
                on_progress=bars,
                verify=args.verify,
            )
    except (CasdClientError, OSError) as exc:
        raise CliError(_reason(exc)) from None
    finally:
        bars.close()
    if args.json:
        print(json.dumps(s.to_json()), flush=True)
    else:
        if s.chunked and not s.chunks_total:
            how = f"{s.algo} verified"  # an empty file: no chunk to fetch or check
        elif s.chunked:
            whole = f", and {s.algo} of the whole file" if s.verified == "file" else ""
            how = (
                f"verified chunk by chunk ({s.chunk_check}){whole}: fetched {s.chunks_fetched} of "
                f"{s.chunks_total} chunks ({format_bytes(s.bytes_fetched)}), reused "
                f"{s.chunks_reused} ({format_bytes(s.bytes_reused)})"
            )
            if s.resumed_from:
                how += f", {format_bytes(s.resumed_from)} of them from an earlier try"
        else:
            resumed = f", resumed at byte {s.resumed_from}" if s.resumed_from else ""
            how = f"{s.algo} verified{resumed}"
        print(f"{s.path}: {format_bytes(s.size)}, {how}, in {s.seconds:.2f}s", flush=True)
    return 0


def _reason(exc: BaseException, name: str | None = None) -> str:
    """One line saying what went wrong, without repeating the file name the caller prints."""
    if isinstance(exc, OSError) and exc.strerror:
        named = exc.filename is not None and str(exc.filename) != name
        return exc.strerror + (f": {exc.filename}" if named else "")
    return str(exc) or exc.__class__.__name__
