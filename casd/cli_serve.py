"""`casd serve`: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import signal
import urllib.parse
from pathlib import Path

from casd import logs
from casd.cli_common import (
    CliError,
    add_data_arg,
    catalog_url,
    data_dir,
    parse_size,
    store_settings,
)
from casd.config import DEFAULT_HOST, DEFAULT_PORT, Settings, masked
from casd.digest import Algo
from casd.errors import StoreUnavailable, Unavailable
from casd.tenants import TokenFileError, TokenTable

log = logging.getLogger("casd")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the upload daemon")
    add_data_arg(p)
    p.add_argument(
        "--host",
        default=os.environ.get("CASD_HOST", DEFAULT_HOST),
        help="address to listen on (default: $CASD_HOST, else 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("CASD_PORT", DEFAULT_PORT)),
        help="port (default: $CASD_PORT, else 8080; 0 picks a free one)",
    )
    d = Settings()
    p.add_argument(
        "--max-chunk-size",
        type=parse_size,
        default=d.max_chunk_size,
        help="largest chunk accepted (default 64MiB)",
    )
    p.add_argument(
        "--max-chunks",
        type=int,
        default=d.max_chunks,
        help="most chunks in one manifest (default 1000000)",
    )
    p.add_argument(
        "--max-handshake-size",
        type=parse_size,
        default=d.max_handshake_bytes,
        help="largest handshake body (default 24MiB)",
    )
    p.add_argument(
        "--max-file-size",
        type=parse_size,
        default=d.max_file_size,
        help="largest file a handshake may describe (default 64GiB)",
    )
    p.add_argument(
        "--max-pending-chunks",
        type=int,
        default=d.max_pending_chunks,
        help="chunk entries all pending uploads may hold (default 4000000)",
    )
    p.add_argument(
        "--max-pending-chunks-per-client",
        type=int,
        default=d.max_pending_chunks_per_client,
        help="chunk entries one client's pending uploads may hold (default 1000000)",
    )
    p.add_argument(
        "--reserve",
        type=parse_size,
        default=d.reserve_bytes,
        help="disk space set aside for deletes and gc when the disk fills (default 32MiB; 0: none)",
    )
    p.add_argument(
        "--upload-ttl",
        type=float,
        default=d.upload_ttl,
        help="seconds an unmerged upload lives after its last activity (default 86400)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("CASD_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on /v1 (default: $CASD_TOKEN)",
    )
    p.add_argument(
        "--admin-token",
        default=os.environ.get("CASD_ADMIN_TOKEN"),
        help="token for DELETE /v1/files and any /v1 call (default: $CASD_ADMIN_TOKEN)",
    )
    p.add_argument(
        "--tokens",
        type=Path,
        default=os.environ.get("CASD_TOKENS") or None,
        metavar="FILE",
        help="tenant mode: the token file of `casd token add` (default: $CASD_TOKENS;"
        " re-read when it changes, and on SIGHUP; see docs/tenants.md)",
    )
    p.add_argument(
        "--io-workers",
        type=int,
        default=d.io_workers,
        help="threads doing disk work at once (default 8)",
    )
    p.add_argument(
        "--hash-workers",
        type=int,
        default=d.hash_workers,
        help="threads hashing whole files for merge at once (default 2)",
    )
    p.add_argument(
        "--sync",
        choices=["FULL", "NORMAL"],
        default=d.sqlite_synchronous,
        help="SQLite synchronous level (default FULL: commits survive power loss)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        help="seconds in-flight requests get to finish on SIGTERM (default 10)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a Host name to answer besides the listening address's own (repeatable;"
        " '*' for any; default: $CASD_ALLOWED_HOSTS, comma-separated)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="a web origin (https://app.example, or '*') whose pages may call the"
        " API (repeatable; default: $CASD_CORS_ORIGINS, comma-separated; none)",
    )
    p.add_argument(
        "--algos",
        default=os.environ.get("CASD_ALGOS", ",".join(d.algos)),
        help="digest algorithms uploads may use, comma-separated (default"
        " md5,sha256; 'sha256' refuses MD5 where collisions matter)",
    )
    p.add_argument(
        "--stream-uploads",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("CASD_STREAM_UPLOADS", "1") not in ("0", "false", "no"),
        help="offer protocol v1.1 streamed uploads: clients send chunks while they hash the"
        " file (default: on; --no-stream-uploads or $CASD_STREAM_UPLOADS=0: a v1 server)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds a connection has to send a request's headers (default 60; 0: off)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="seconds a request body may pause between bytes (default 60; 0: off)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=float,
        default=d.keepalive_timeout,
        help="seconds an idle connection stays open (default 75; 0: close after each answer)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections at most; more are answered 503 (default 1000, or"
        " fewer when the open-file limit cannot carry that many)",
    )
    p.add_argument(
        "--read-connections",
        type=int,
        default=d.read_connections,
        help="catalogue connections for quick reads (default 2)",
    )
    p.add_argument(
        "--bulk-read-connections",
        type=int,
        default=d.bulk_read_connections,
        help="catalogue connections for long reads such as huge manifests (default 2)",
    )
    _add_ops_args(p)
    p.set_defaults(func=run)


def _add_ops_args(p: argparse.ArgumentParser) -> None:
    """Metrics, logs and webhooks (docs/operating.md)."""
    p.add_argument(
        "--metrics-token",
        default=os.environ.get("CASD_METRICS_TOKEN"),
        help="token GET /metrics needs (default: $CASD_METRICS_TOKEN; unset: /metrics"
        " needs --token or --admin-token when they are set, else it is open)",
    )
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None,
        help="log lines on stderr (default: text on a terminal, else json)",
    )
    p.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default="info",
        help="least severe level logged (default info: one access line per request)",
    )
    d = Settings()
    p.add_argument(
        "--hook-url",
        action="append",
        default=None,
        metavar="URL",
        help="POST file.completed and file.deleted events here (repeatable)",
    )
    p.add_argument(
        "--hook-secret",
        default=os.environ.get("CASD_HOOK_SECRET"),
        help="sign events with HMAC-SHA256 in X-Casd-Signature (default: $CASD_HOOK_SECRET)",
    )
    p.add_argument(
        "--hook-pre-handshake",
        default=None,
        metavar="URL",
        help="ask this URL before accepting each handshake; non-2xx refuses it",
    )
    p.add_argument(
        "--hook-timeout",
        type=float,
        default=d.hook_timeout,
        metavar="SECONDS",
        help=f"seconds a hook receiver gets to answer (default {d.hook_timeout:g})",
    )
    p.add_argument(
        "--hook-queue-max",
        type=int,
        default=d.hook_queue_max,
        metavar="N",
        help="events kept for delivery; beyond, the oldest are dropped"
        f" (default {d.hook_queue_max})",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="check flags, config file and environment; print the settings; exit"
        " (0, or 2 with the error)",
    )


_ORIGIN = re.compile(r"https?://[^\s/?#@]+\Z", re.IGNORECASE)
_HOST_NAME = re.compile(r"(\*|\[[0-9a-f:.]+\]|[^\s/?#@\[\]]+)\Z", re.IGNORECASE)


def _listed(given: list[str] | None, env: str) -> list[str]:
    """A repeatable flag's values, else the comma-separated environment variable."""
    if given is None:
        given = os.environ.get(env, "").split(",")
    return [v.strip() for v in given if v.strip()]


def _security_settings(args: argparse.Namespace) -> dict:
    hosts = _listed(args.allowed_host, "CASD_ALLOWED_HOSTS")
    for h in hosts:
        if not _HOST_NAME.match(h):
            raise CliError(f"--allowed-host {h!r} is not a host name or address", 2)
    origins = [o.rstrip("/") for o in _listed(args.cors_origin, "CASD_CORS_ORIGINS")]
    for o in origins:
        if o != "*" and not _ORIGIN.match(o):
            raise CliError(
                f"--cors-origin {o!r} is not '*' or an origin such as"
                " https://app.example:8443 (scheme, host, optional port)",
                2,
            )
    algos = []
    for name in (a.strip().lower() for a in args.algos.split(",")):
        if name:
            try:
                algos.append(Algo.parse(name).value)
            except ValueError as exc:
                raise CliError(f"--algos: {exc}", 2) from None
    if not algos:
        raise CliError("--algos needs at least one of md5, sha256", 2)
    return {
        "allowed_hosts": tuple(hosts),
        "cors_origins": tuple(origins),
        "algos": tuple(dict.fromkeys(algos)),
    }


# Settings fields whose flag is not the field's name with dashes.
_FLAG_OF = {
    "max_handshake_bytes": "--max-handshake-size",
    "reserve_bytes": "--reserve",
    "sqlite_synchronous": "--sync",
    "allowed_hosts": "--allowed-host",
    "cors_origins": "--cors-origin",
    "hook_urls": "--hook-url",
}
_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))


def _flags_named(message: str) -> str:
    """A Settings error with its field names written as the flags that set them."""
    return re.sub(
        r"\b[a-z][a-z_]*\b",
        lambda m: _FLAG_OF.get(m[0], "--" + m[0].replace("_", "-")) if m[0] in _FIELDS else m[0],
        message,
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The daemon's Settings from parsed flags; CliError (exit 2) for a value out of range."""
    try:
        return _settings(args)
    except ValueError as exc:
        raise CliError(_flags_named(str(exc)), 2) from None


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        data_dir=data_dir(args).resolve(),
        **store_settings(args),
        host=args.host,
        port=args.port,
        max_chunk_size=args.max_chunk_size,
        max_chunks=args.max_chunks,
        max_handshake_bytes=args.max_handshake_size,
        max_file_size=args.max_file_size,
        upload_ttl=args.upload_ttl,
        max_pending_chunks=args.max_pending_chunks,
        max_pending_chunks_per_client=args.max_pending_chunks_per_client,
        reserve_bytes=args.reserve,
        token=args.token or None,
        admin_token=args.admin_token or None,
        tokens=Path(args.tokens).resolve() if args.tokens else None,
        io_workers=args.io_workers,
        hash_workers=args.hash_workers,
        sqlite_synchronous=args.sync,
        shutdown_timeout=args.shutdown_timeout,
        **_security_settings(args),
        metrics_token=args.metrics_token or None,
        hook_urls=tuple(_hook_url("--hook-url", u) for u in args.hook_url or ()),
        hook_secret=args.hook_secret or None,
        hook_pre_handshake=_hook_url("--hook-pre-handshake", args.hook_pre_handshake)
        if args.hook_pre_handshake
        else None,
        hook_timeout=args.hook_timeout,
        hook_queue_max=args.hook_queue_max,
        stream_uploads=args.stream_uploads,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout,
        max_connections=_fit_connections(args.max_connections),
        read_connections=args.read_connections,
        bulk_read_connections=args.bulk_read_connections,
        catalog=catalog_url(args),
    )


def _hook_url(flag: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"{flag} {url!r} is not an http:// or https:// URL", 2)
    return url


def effective(settings: Settings, args: argparse.Namespace) -> str:
    """The settings a daemon would run with, one `key = value` a line; secrets masked."""
    lines = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value and ("token" in field.name or "secret" in field.name):
            value = "(set)"
        elif field.name == "catalog" and value:
            value = masked(value)
        lines.append(f"{field.name} = {value if not isinstance(value, tuple) else list(value)}")
    lines.append(f"log_format = {args.log_format or logs.default_format()}")
    lines.append(f"log_level = {args.log_level}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.tokens is not None:
        try:
            TokenTable.read(settings.tokens)  # --check-config catches a broken file too
        except TokenFileError as exc:
            raise CliError(str(exc), 2) from None
    if args.check_config:
        print(effective(settings, args))
        return 0
    logs.setup(args.log_format, args.log_level)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create data folder {settings.data_dir}: {exc.strerror}") from None
    # The standard event loop, not uvloop: uvloop has no loop.sendfile, so downloads would
    # copy every byte through Python instead of going zero-copy (bench/RESULTS.md, L5 and B4).
    return asyncio.run(serve(settings))


async def serve(settings: Settings) -> int:
    # The server side (aiohttp.web, the app, metrics) is imported by the command that runs
    # it: every other command starts a third faster without it (`python -X importtime`).
    from aiohttp import web

    from casd.server import AcceptFailureLog, CasdAppRunner
    from casd.web import TOKENS, create_app

    loop = asyncio.get_running_loop()
    AcceptFailureLog(loop).install()
    try:
        app = create_app(settings)
    except TokenFileError as exc:
        raise CliError(str(exc), 2) from None
    # access_log=None: casd.observe writes the one access line per request.
    runner = CasdAppRunner(
        app,
        shutdown_timeout=settings.shutdown_timeout,
        handle_signals=False,
        access_log=None,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
    )
    try:
        await runner.setup()
    except StoreUnavailable as exc:
        raise CliError(f"cannot open the blob store: {exc}") from None
    except Exception as exc:
        if isinstance(exc, Unavailable):  # says which database, its password masked
            raise CliError(exc.message) from None
        raise CliError(f"cannot open the catalogue in {settings.data_dir}: {exc}") from None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if TOKENS in app:
        loop.add_signal_handler(signal.SIGHUP, app[TOKENS].reload)
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise CliError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
            ) from None
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "serving http://%s:%d (data: %s%s)",
            shown,
            port,
            settings.data_dir,
            f", blobs: {settings.blobs}" if settings.blobs else "",
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()
    return 0


def _fit_connections(wanted: int | None) -> int:
    """--max-connections as given (warning when the open-file limit cannot carry it), else the
    default lowered to what that limit can carry. Raises the soft limit to the hard one."""
    from casd.server import connection_ceiling, raise_fd_limit

    fd_limit = raise_fd_limit()
    ceiling = connection_ceiling(fd_limit)
    if wanted is None:
        return min(Settings().max_connections, ceiling)
    if wanted > ceiling:
        log.warning(
            "--max-connections %d is more than %d open files can carry (about %d);"
            " connections beyond that will fail to be accepted",
            wanted,
            fd_limit,
            ceiling,
        )
    return wanted
