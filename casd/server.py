"""Connection plumbing under the app: timeouts, a connection limit, JSON for parser errors.

aiohttp's own server has a keep-alive timeout but no header timeout and no connection limit,
and answers what its HTTP parser refuses (a bad request line, an oversized header, broken
chunked framing) in plain text. `CasdServer` is aiohttp's `Server` with a protocol factory
that builds `CasdRequestHandler`s, which add those. Nothing here knows the routes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import time
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import (
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from casd import protocol

log = logging.getLogger("casd.server")

# File descriptors one connection may hold at once: its socket, plus a temp file (chunk PUT)
# or a blob (download). The rest of the daemon (catalogue connections, the listening socket,
# logs) fits in the reserve.
FDS_PER_CONNECTION = 2
FD_RESERVE = 64

_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


def raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for use outside a request."""
    body = error_body(code, message)
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def parser_error(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """(status, code, message) for what aiohttp's HTTP parser refused."""
    if isinstance(exc, LineTooLong):
        return (
            431,
            protocol.HEADERS_TOO_LARGE,
            "the request line or a header line is over the limit",
        )
    if isinstance(exc, BadStatusLine):
        return 400, protocol.BAD_REQUEST, "the request line is not 'METHOD /path HTTP/1.x'"
    if isinstance(exc, InvalidHeader):
        return 400, protocol.BAD_REQUEST, f"a header is malformed: {_detail(exc)}"
    if isinstance(exc, PayloadEncodingError):
        return 400, protocol.BAD_REQUEST, f"the body's framing is malformed: {_detail(exc)}"
    if isinstance(exc, HttpProcessingError):
        return 400, protocol.BAD_REQUEST, f"the request is not valid HTTP/1.1: {_detail(exc)}"
    if status >= 500:
        return (
            status,
            protocol.INTERNAL_ERROR,
            "the server failed to handle this request; see its log",
        )
    return status, protocol.BAD_REQUEST, HTTPStatus(status).phrase


def _detail(exc: HttpProcessingError) -> str:
    # The parser's text can quote the client's bytes over several lines; one short line is enough.
    first = (exc.message or type(exc).__name__).strip().splitlines()
    return (first[0].rstrip(": ") if first else type(exc).__name__)[:200]


class CasdRequestHandler(RequestHandler):
    """aiohttp's connection protocol plus a header timeout and a place in the connection count.

    A connection must complete a request's headers within `header_timeout` seconds of
    connecting, or of the first byte of a later request; otherwise it is closed (with a 408
    when part of a request had arrived). Idle time between requests is aiohttp's
    keep-alive timeout.
    """

    def __init__(self, manager: CasdServer, *, header_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._casd_server = manager
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._casd_server
        if server.live >= server.max_connections:
            server.refused += 1
            server.note_refusal()
            answer = raw_error(
                503,
                protocol.UNAVAILABLE,
                f"the server is at its limit of {server.max_connections} connections;"
                " try again shortly",
            )
            # A listening socket's transports are full asyncio.Transports: they write.
            cast(asyncio.Transport, transport).write(answer)
            transport.close()
            return
        server.live += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._casd_server.live -= 1
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None and not self._waiter.done()
        if idle and data and self._header_timer is None and self._header_timeout > 0:
            self._arm_header_timer()
            # A request has begun: the header timeout rules now, not the keep-alive timer,
            # which would otherwise cut off a request that began just before it fired.
            # aiohttp arms it again after the answer.
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            # A request's headers are complete: from here the body timeout and the handler rule.
            self._cancel_header_timer()
            self._header_bytes = 0
            self._fail_body_on_parser_error()
        elif idle or self._header_timer is not None:
            self._header_bytes += len(data)

    def _fail_body_on_parser_error(self) -> None:
        """When the parser fails inside the body being read (broken chunked framing), fail
        that body: aiohttp only queues the error as the next request, and the handler would
        wait for the rest of a body that is not coming."""
        request = self._current_request
        if request is None or not self._messages:
            return
        last = self._messages[-1][0]
        if isinstance(last, RawRequestMessage) or request.content.is_eof():
            return
        request.content.set_exception(
            RequestPayloadError(getattr(last, "message", "malformed request body"))
        )

    def _arm_header_timer(self) -> None:
        if self._header_timeout > 0:
            self._header_timer = self._loop.call_later(self._header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport is None or self._messages:
            return
        if self._waiter is None or self._waiter.done():
            return  # a request is being handled; its own rules apply
        if self._header_bytes:
            self.transport.write(
                raw_error(
                    408,
                    protocol.REQUEST_TIMEOUT,
                    f"the request headers did not arrive within {self._header_timeout:g} seconds",
                )
            )
        self.force_close()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Refusals aiohttp raises before the app's middlewares run (an unknown `Expect`),
        in the protocol's JSON error shape like every other refusal."""
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            status = resp.status
            code = HTTPStatus(status).phrase.lower().replace(" ", "_")
            resp = web.Response(
                status=status,
                body=error_body(code, resp.text or HTTPStatus(status).phrase),
                content_type="application/json",
                charset="utf-8",
            )
            resp.force_close()
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The parser's refusals and unhandled failures, in the protocol's JSON error shape."""
        status, code, text = parser_error(exc, status)
        if isinstance(exc, ConnectionError):
            # The client went away mid-request (a cut upload): nothing to report.
            self.logger.debug("client %s went away: %s", request.remote, exc)
        elif status >= 500:
            self.logger.error("error handling request from %s", request.remote, exc_info=exc)
        else:
            # A client's malformed bytes are its problem: one line, no traceback.
            self.logger.info("refused a malformed request from %s: %s", request.remote, text)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed")
        resp = web.Response(
            status=status,
            body=error_body(code, text),
            content_type="application/json",
            charset="utf-8",
        )
        resp.force_close()
        return resp


class CasdServer(Server):
    """aiohttp's low-level server, building `CasdRequestHandler`s and counting connections."""

    def __init__(self, handler: Any, *, max_connections: int, header_timeout: float, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.live = 0
        self.refused = 0
        self._refusal_logged_at = 0.0

    def note_refusal(self) -> None:
        now = time.monotonic()
        if now - self._refusal_logged_at >= 60:
            self._refusal_logged_at = now
            log.warning(
                "refusing connections: %d open, the limit (--max-connections) is %d;"
                " %d refused so far",
                self.live,
                self.max_connections,
                self.refused,
            )

    def __call__(self) -> RequestHandler:
        return CasdRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )


class CasdAppRunner(web.AppRunner):
    """An AppRunner whose server is a `CasdServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        header_timeout: float,
        **kwargs: Any,
    ):
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_timeout = header_timeout

    async def _make_server(self) -> Server:
        plain = await super()._make_server()
        # Rebuild with the same handler and arguments aiohttp chose, in our subclass.
        return CasdServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            max_connections=self._max_connections,
            header_timeout=self._header_timeout,
            **plain._kwargs,
        )


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_ceiling(fd_limit: int) -> int:
    """The most connections this many file descriptors can carry with room to spare."""
    return max(1, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION)


class AcceptFailureLog:
    """A loop exception handler that logs "out of file descriptors" once per burst.

    asyncio reports every failed accept() (EMFILE, ENFILE...) with a traceback and retries a
    second later, for as long as the shortage lasts; one line when a burst starts and a
    count when it ends (after `quiet` seconds without one) say the same.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, quiet: float = 30.0):
        self._loop = loop
        self._quiet = quiet
        self._count = 0
        self._last = 0.0
        self._summary: asyncio.TimerHandle | None = None
        self._previous = loop.get_exception_handler()

    def install(self) -> None:
        self._loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            self._last = time.monotonic()
            self._count += 1
            if self._count == 1:
                log.error(
                    "cannot accept connections: %s; lower --max-connections or raise the"
                    " open-file limit (further failures are counted, not logged)",
                    exc.strerror or exc,
                )
                self._summary = loop.call_later(self._quiet, self._maybe_summarize)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _maybe_summarize(self) -> None:
        idle = time.monotonic() - self._last
        if idle < self._quiet:
            self._summary = self._loop.call_later(self._quiet - idle, self._maybe_summarize)
            return
        log.warning("accepting connections again after %d failed attempts", self._count)
        self._count = 0
        self._summary = None
