"""Cross-site defences of the HTTP server: Host allowlist, Origin check, CORS, page headers.

A browser is the one client that sends requests on behalf of whatever page it shows, so a
page from anywhere can reach a daemon on 127.0.0.1. Three things keep such pages out:
the `Host` check (a DNS-rebinding page names its own host), the `Origin` check on
mutating requests (a cross-site form or `fetch` names its origin), and the JSON
Content-Type the handshake requires (which a page can only send after a CORS preflight).
CORS (`--cors-origin`) then lets named origins in on purpose.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from aiohttp import web

from casd.config import Settings
from casd.errors import Forbidden, MisdirectedRequest, UnsupportedMediaType

MUTATING = frozenset({"POST", "PUT", "DELETE", "PATCH"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# What casd.js and other clients send, and what they must be able to read back.
CORS_ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE"
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Range, If-None-Match, If-Range, Prefer, X-Request-ID"
)
CORS_EXPOSE_HEADERS = (
    "ETag, Content-Range, Content-Length, Accept-Ranges, Content-Disposition,"
    " Preference-Applied, Retry-After, X-Request-ID"
)
CORS_MAX_AGE = "600"

# The upload page loads only its own files; casd.js may start its worker from a blob: URL
# (the fallback for pages on other origins), and the page's favicon is a data: URL.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; worker-src 'self' blob:; connect-src 'self';"
    " img-src 'self' data:; style-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _host_name(value: str) -> str:
    """'Example.COM:8080' -> 'example.com', '[::1]:80' -> '::1'; the port is not compared."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def default_allowed_hosts(listen_host: str) -> frozenset[str] | None:
    """The Host names a daemon listening on `listen_host` answers; None: any name."""
    name = _host_name(listen_host)
    if name in ("", "0.0.0.0", "::"):
        return None
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    return frozenset({name, *LOOPBACK_NAMES}) if loopback else frozenset({name})


@dataclass(frozen=True)
class Guard:
    """The cross-site policy of one app, derived once from its Settings."""

    hosts: frozenset[str] | None  # None: any Host
    origins: frozenset[str]
    any_origin: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        given = {_host_name(h) for h in settings.allowed_hosts}
        hosts: frozenset[str] | None = None
        if "*" not in given:
            default = default_allowed_hosts(settings.host)
            if default is not None:
                hosts = default | given
            elif given:
                hosts = frozenset(given)
        origins = frozenset(o.rstrip("/").lower() for o in settings.cors_origins if o != "*")
        return cls(hosts, origins, "*" in settings.cors_origins)

    def host_ok(self, host: str | None) -> bool:
        # No Host at all is HTTP/1.0 from a tool, never a browser: nothing to rebind.
        return self.hosts is None or host is None or _host_name(host) in self.hosts

    @property
    def cors_on(self) -> bool:
        return self.any_origin or bool(self.origins)

    def cors_allows(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins


GUARD = web.AppKey("guard", Guard)


def _same_origin(request: web.Request, origin: str) -> bool:
    """Origin names the host the request was sent to (the scheme may differ behind a proxy)."""
    _scheme, sep, netloc = origin.partition("://")
    host = request.headers.get("Host")
    return bool(sep) and host is not None and netloc.lower() == host.strip().lower()


def _is_preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


@web.middleware
async def guard_middleware(request: web.Request, handler):
    """Host check, CORS preflight, Origin check; runs inside the error middleware."""
    guard = request.app[GUARD]
    host = request.headers.get("Host")
    if not guard.host_ok(host):
        raise MisdirectedRequest(
            f"this server does not answer for host {host!r}; start it with"
            " --allowed-host NAME to accept that name"
        )
    origin = request.headers.get("Origin")
    if _is_preflight(request):
        if origin is None or not guard.cors_allows(origin):
            raise Forbidden(
                f"origin {origin!r} may not call this server; start it with"
                " --cors-origin ORIGIN to allow it"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            },
        )
    if (
        request.method in MUTATING
        and origin is not None
        and not _same_origin(request, origin)
        and not guard.cors_allows(origin)
    ):
        raise Forbidden(
            f"a {request.method} from origin {origin!r} is refused; start the server with"
            " --cors-origin ORIGIN to allow that origin"
        )
    return await handler(request)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers on every answer (errors too), security headers on the page's files.

    A signal rather than a middleware: downloads send their headers from inside the
    handler, and this runs just before any response's headers go out.
    """
    guard = request.app[GUARD]
    path = request.path
    is_static = path.startswith("/static/")
    origin = request.headers.get("Origin")
    if is_static:
        # The page's scripts are public and the same for everyone, and a page on another
        # origin must be able to import casd.js to learn (from its clear error) that casd
        # does not let that origin in. One answer for all: no Vary, any cache may share it.
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif guard.cors_on:
        # The answer depends on Origin: a cache must not hand a CORS-less copy to a page.
        response.headers.add("Vary", "Origin")
        if origin is not None and guard.cors_allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    if path == "/" or is_static:
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)


def require_json(request: web.Request) -> None:
    """A JSON body must say so: other types are what a cross-site form can send unasked."""
    if request.content_type != "application/json":
        given = request.headers.get("Content-Type")
        raise UnsupportedMediaType(
            f"this endpoint takes Content-Type: application/json, got {given!r}"
            if given
            else "this endpoint takes Content-Type: application/json, got none"
        )


def install_guard(app: web.Application, settings: Settings) -> None:
    """Attach the policy to `app`; `guard_middleware` must be in its middleware list."""
    app[GUARD] = Guard.from_settings(settings)
    app.on_response_prepare.append(on_response_prepare)
