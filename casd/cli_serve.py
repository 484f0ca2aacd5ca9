"""`casd serve`: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from aiohttp import web

from casd.cli_common import CliError, add_data_arg, data_dir, parse_size
from casd.config import DEFAULT_HOST, DEFAULT_PORT, Settings
from casd.web import create_app

log = logging.getLogger("casd")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the upload daemon")
    add_data_arg(p)
    p.add_argument("--host", default=os.environ.get("CASD_HOST", DEFAULT_HOST),
                   help="address to listen on (default: $CASD_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("CASD_PORT", DEFAULT_PORT)),
                   help="port (default: $CASD_PORT, else 8080; 0 picks a free one)")
    d = Settings()
    p.add_argument("--max-chunk-size", type=parse_size, default=d.max_chunk_size,
                   help="largest chunk accepted (default 64MiB)")
    p.add_argument("--max-chunks", type=int, default=d.max_chunks,
                   help="most chunks in one manifest (default 1000000)")
    p.add_argument("--max-handshake-size", type=parse_size, default=d.max_handshake_bytes,
                   help="largest handshake body (default 128MiB)")
    p.add_argument("--max-pending-chunks", type=int, default=d.max_pending_chunks,
                   help="chunk entries all pending uploads may hold (default 4000000)")
    p.add_argument("--max-pending-chunks-per-client", type=int,
                   default=d.max_pending_chunks_per_client,
                   help="chunk entries one client's pending uploads may hold (default 1000000)")
    p.add_argument("--reserve", type=parse_size, default=d.reserve_bytes,
                   help="disk space set aside for deletes and gc when the disk fills"
                   " (default 32MiB; 0: none)")
    p.add_argument("--upload-ttl", type=float, default=d.upload_ttl,
                   help="seconds an unmerged upload lives after its last activity (default 86400)")
    p.add_argument("--token", default=os.environ.get("CASD_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on /v1 (default: $CASD_TOKEN)")
    p.add_argument("--admin-token", default=os.environ.get("CASD_ADMIN_TOKEN"),
                   help="token for DELETE /v1/files and any /v1 call (default: $CASD_ADMIN_TOKEN)")
    p.add_argument("--io-workers", type=int, default=d.io_workers,
                   help="threads doing disk work at once (default 8)")
    p.add_argument("--sync", choices=["FULL", "NORMAL"], default=d.sqlite_synchronous,
                   help="SQLite synchronous level (default FULL: commits survive power loss)")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests get to finish on SIGTERM (default 10)")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is not a port number", 2)
    for flag in ("max_chunk_size", "max_chunks", "max_handshake_size", "io_workers",
                 "max_pending_chunks", "max_pending_chunks_per_client"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1", 2)
    if args.max_pending_chunks_per_client > args.max_pending_chunks:
        raise CliError("--max-pending-chunks-per-client cannot exceed --max-pending-chunks", 2)
    if args.upload_ttl <= 0:
        raise CliError("--upload-ttl must be positive", 2)
    return Settings(
        data_dir=data_dir(args).resolve(),
        host=args.host,
        port=args.port,
        max_chunk_size=args.max_chunk_size,
        max_chunks=args.max_chunks,
        max_handshake_bytes=args.max_handshake_size,
        upload_ttl=args.upload_ttl,
        max_pending_chunks=args.max_pending_chunks,
        max_pending_chunks_per_client=args.max_pending_chunks_per_client,
        reserve_bytes=args.reserve,
        token=args.token or None,
        admin_token=args.admin_token or None,
        io_workers=args.io_workers,
        sqlite_synchronous=args.sync,
        shutdown_timeout=args.shutdown_timeout,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data folder {settings.data_dir}: {exc.strerror}") from None
    # The standard event loop, not uvloop: uvloop has no loop.sendfile, so downloads would
    # copy every byte through Python instead of going zero-copy (bench/RESULTS.md, L5 and B4).
    return asyncio.run(serve(settings))


async def serve(settings: Settings) -> int:
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, handle_signals=False)
    try:
        await runner.setup()
    except Exception as exc:
        raise CliError(f"cannot open the catalogue in {settings.data_dir}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise CliError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("serving http://%s:%d (data: %s)", shown, port, settings.data_dir)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
    return 0
