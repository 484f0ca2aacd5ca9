"""HTTP: `create_app(settings)`, the routes of PROTOCOL.md, and the one error middleware."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import mimetypes
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from casd import hooks, observe, openapi, protocol
from casd.config import Settings
from casd.digest import Algo, Digest
from casd.errors import (
    BadRequest,
    BodyTimeout,
    CasdError,
    DigestMismatch,
    FileDigestMismatch,
    Forbidden,
    Incomplete,
    MalformedBody,
    MisdirectedRequest,
    NotFound,
    NotInManifest,
    OffsetMismatch,
    QuotaExceeded,
    RangeNotSatisfiable,
    SizeMismatch,
    StorageFull,
    StoreUnavailable,
    TooLarge,
    TooManyPending,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from casd.hooks import HOOKS
from casd.models import ChunkList, ChunkRef, FileEntry, HandshakeComplete, Manifest, Tenant
from casd.service import MAX_STREAM_BATCH, BlobReader, Service
from casd.tenants import Principal, Role, TokenFile
from casd.web_guard import guard_middleware, install_guard, require_json

log = logging.getLogger("casd.web")

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", Service)
BIG_HANDSHAKES = web.AppKey("big_handshakes", asyncio.Semaphore)
# Tenant mode only: the token file, re-read as it changes (casd.tenants.TokenFile).
TOKENS = web.AppKey("tokens", TokenFile)
# The request's Principal in tenant mode (set by auth_middleware).
PRINCIPAL = "casd.principal"

STATIC_DIR = Path(__file__).parent / "static"

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}\Z")
# RFC 7240: a client that tracks progress itself may skip the `missing` list in chunk answers.
_MINIMAL = re.compile(r"(^|[,;\s])return\s*=\s*minimal\b", re.I)
# Parsing a big manifest takes long enough to stall other requests; do it in a thread.
THREAD_PARSE_BYTES = 256 * 1024
# Handshakes over THREAD_PARSE_BYTES are parsed and recorded this many at a time: each costs
# a few times its body in memory until it is recorded, so this bounds what they cost together.
BIG_HANDSHAKES_AT_ONCE = 2
# Handshake bodies being received may hold this many times the handshake limit together
# (beyond THREAD_PARSE_BYTES each); past it a handshake is answered 503.
BODIES_IN_MEMORY = 4

# Domain error -> (HTTP status, protocol error code). The only place they meet.
ERROR_MAP: dict[type[CasdError], tuple[int, str]] = {
    BadRequest: (400, protocol.BAD_REQUEST),
    Unauthorized: (401, protocol.UNAUTHORIZED),
    Forbidden: (403, protocol.FORBIDDEN),
    NotFound: (404, protocol.NOT_FOUND),
    Incomplete: (409, protocol.INCOMPLETE),
    NotInManifest: (409, protocol.NOT_IN_MANIFEST),
    BodyTimeout: (408, protocol.REQUEST_TIMEOUT),
    TooLarge: (413, protocol.TOO_LARGE),
    UnsupportedMediaType: (415, protocol.UNSUPPORTED_MEDIA_TYPE),
    RangeNotSatisfiable: (416, protocol.RANGE_NOT_SATISFIABLE),
    MisdirectedRequest: (421, protocol.MISDIRECTED_REQUEST),
    DigestMismatch: (422, protocol.DIGEST_MISMATCH),
    MalformedBody: (400, protocol.BAD_REQUEST),
    SizeMismatch: (422, protocol.SIZE_MISMATCH),
    FileDigestMismatch: (422, protocol.FILE_DIGEST_MISMATCH),
    OffsetMismatch: (409, protocol.OFFSET_MISMATCH),
    TooManyPending: (429, protocol.TOO_MANY_PENDING),
    QuotaExceeded: (413, protocol.QUOTA_EXCEEDED),
    Unavailable: (503, protocol.UNAVAILABLE),
    StoreUnavailable: (503, protocol.UNAVAILABLE),
    StorageFull: (507, protocol.INSUFFICIENT_STORAGE),
}
# aiohttp's own refusals (no route, wrong method, body over client_max_size) in the same shape.
HTTP_CODES = {
    400: protocol.BAD_REQUEST,
    401: protocol.UNAUTHORIZED,
    404: protocol.NOT_FOUND,
    405: protocol.METHOD_NOT_ALLOWED,
    413: protocol.TOO_LARGE,
}


def mapped_error(exc: CasdError) -> tuple[int, str] | None:
    """(HTTP status, error code) of the nearest of `exc`'s classes in ERROR_MAP; None when
    none is there (a bug: the middleware answers 500 and logs it)."""
    for cls in type(exc).__mro__:
        found = ERROR_MAP.get(cls)
        if found is not None:
            return found
    return None


def error_response(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except CasdError as exc:
        mapped = mapped_error(exc)
        if mapped is None:
            log.error(
                "unmapped domain error on %s %s", request.method, request.raw_path, exc_info=exc
            )
            return _internal_error()
        status, code = mapped
        resp = error_response(status, code, exc.message, **exc.extra)
        if isinstance(exc, RangeNotSatisfiable):
            resp.headers["Content-Range"] = f"bytes */{exc.size}"
        if isinstance(exc, (BodyTimeout, MalformedBody)):
            await _answer_and_close(request, resp)
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, protocol.BAD_REQUEST)
        resp = error_response(exc.status, code, _reason(request, exc))
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.raw_path)
        return _internal_error()


def _internal_error() -> web.Response:
    return error_response(
        500, protocol.INTERNAL_ERROR, "the server failed to handle this request; see its log"
    )


async def _answer_and_close(request: web.Request, resp: web.Response) -> None:
    """Send `resp`, then drop the connection: the rest of this body is not coming (or is
    garbage), so aiohttp must not wait for it before closing."""
    resp.force_close()
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        pass
    if request.protocol is not None:
        request.protocol.force_close()


async def body_pieces(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; BodyTimeout when the client pauses over
    --body-timeout, MalformedBody when its chunked framing or length is broken."""
    timeout = request.app[SETTINGS].body_timeout or None
    content = request.content
    while True:
        try:
            async with asyncio.timeout(timeout):
                piece = await content.readany()
        except TimeoutError:
            raise BodyTimeout(
                f"no byte of the body arrived for {timeout:g} seconds; nothing was kept"
            ) from None
        except (HttpProcessingError, RequestPayloadError) as exc:
            raise MalformedBody(
                f"the body's chunked framing or length is malformed ({type(exc).__name__})"
            ) from None
        if not piece:
            return
        yield piece


class BodyBudget:
    """Bytes that bodies being received into memory may hold together beyond `free` each.

    A handshake body is held whole until it is parsed; without a shared ceiling, many
    connections each sending a body just under the limit would hold all of them at once.
    """

    def __init__(self, limit: int, free: int):
        self.limit = limit
        self.free = free
        self.used = 0


BODY_BUDGET = web.AppKey("body_budget", BodyBudget)


async def read_body(request: web.Request, limit: int, budget: BodyBudget) -> bytearray:
    """The whole (small) body, under the same timeout as a streamed one; TooLarge over
    `limit`, Unavailable when the bodies being received together are over `budget`.

    One growing buffer, handed over as it is: request.read() would copy it once more.
    """
    buf = bytearray()
    taken = 0
    try:
        async for piece in body_pieces(request):
            buf += piece
            if len(buf) > limit:
                raise TooLarge(f"the body is over {limit} bytes")
            need = max(0, len(buf) - budget.free) - taken
            if need:
                if budget.used + need > budget.limit:
                    raise Unavailable(
                        "the server is receiving too many large bodies at once; try again shortly"
                    )
                budget.used += need
                taken += need
        return buf
    finally:
        budget.used -= taken


def _reason(request: web.Request, exc: web.HTTPException) -> str:
    return {
        404: f"no such endpoint: {request.path}",
        405: f"{request.method} is not allowed on {request.path}",
        413: "the request body is over this server's limit",
    }.get(exc.status, exc.reason)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    settings = request.app[SETTINGS]
    if settings.tokens is not None:
        return await _tenant_auth(request, handler)
    if settings.token is None and settings.admin_token is None:
        return await handler(request)
    if not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    is_admin = settings.admin_token is not None and _same(given, settings.admin_token)
    admin_only = request.method == "DELETE" and request.path.startswith("/v1/files/")
    if admin_only and settings.admin_token is not None:
        if not is_admin:
            raise Unauthorized("deleting a file needs the admin token (Authorization: Bearer ...)")
    elif settings.token is not None and not (is_admin or _same(given, settings.token)):
        raise Unauthorized("missing or wrong token (Authorization: Bearer ...)")
    return await handler(request)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:] if header[:7].lower() == "bearer " else ""


# ---- tenant mode (docs/tenants.md) --------------------------------------------------


def _role_needed(request: web.Request) -> Role:
    """Reads of files (and of the API description) need `read`; everything else `upload`.
    What an admin may do beyond that (every tenant's files) is the handlers' business."""
    path = request.path
    if request.method in ("GET", "HEAD") and (
        path.startswith("/v1/files/") or path in ("/v1/files", "/v1/openapi.json")
    ):
        return Role.READ
    return Role.UPLOAD


async def _tenant_auth(request: web.Request, handler):
    """401 for a missing or unknown token, 403 for a role that may not do this; the token
    itself is never logged or echoed, only its tenant."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    try:
        principal = request.app[TOKENS].table().lookup(_bearer(request))
    except UnicodeEncodeError:
        principal = None  # not even bytes a client could have sent: a wrong token
    if principal is None:
        raise Unauthorized("missing or unknown token (Authorization: Bearer ...)")
    need = _role_needed(request)
    if not principal.role.allows(need):
        raise Forbidden(
            f"a {principal.role.value} token of tenant {principal.tenant!r} may not"
            f" {request.method} {request.path[:200]}: that needs the {need.value} role"
        )
    request[PRINCIPAL] = principal
    return await handler(request)


def uploader_of(request: web.Request) -> Tenant | None:
    """The tenant (and quota) whose uploads a request handles; None without tenants. An
    admin's uploads are its own tenant's too."""
    principal: Principal | None = request.get(PRINCIPAL)
    return principal.scope if principal is not None else None


def overseer_of(request: web.Request) -> Tenant | None:
    """Whose pending uploads a status request or an abort may reach: the tenant's own; an
    admin's, every tenant's (None, as without tenants)."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None or principal.role is Role.ADMIN:
        return None
    return principal.scope


def reader_of(request: web.Request) -> str | None:
    """The tenant whose files a request may see and delete; None for every file (an admin,
    or no tenants)."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None or principal.role is Role.ADMIN:
        return None
    return principal.tenant


def client_of(request: web.Request) -> str:
    """Who a request comes from, for per-client budgets: its tenant in tenant mode, its
    bearer token when tokens are required (a fingerprint: the catalogue never holds a
    secret), else its address."""
    settings = request.app[SETTINGS]
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is not None:
        return "tenant:" + principal.tenant
    if settings.token is not None or settings.admin_token is not None:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        fingerprint = hashlib.sha256(given.encode("utf-8", "surrogateescape")).hexdigest()
        return "token:" + fingerprint[:16]
    return "addr:" + _address_key(request.remote or "-")


def _address_key(remote: str) -> str:
    """An IPv4 address as it is; an IPv6 address by its /64, the block one subscriber is
    routinely given, so that rotating through it does not buy a client more budget."""
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote  # a Unix socket or a test transport
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _same(given: str, token: str) -> bool:
    """Constant-time token check; a header that is not valid UTF-8 is simply a wrong token.

    aiohttp decodes header bytes as UTF-8 with surrogateescape, so `given` may hold lone
    surrogates: encoding it back the same way restores the bytes the client sent.
    """
    try:
        raw = given.encode("utf-8", "surrogateescape")
        want = token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(raw, want)


# ---- parsing at the edge ----------------------------------------------------------------


def parse_name_ext(name: str | None, ext: str | None) -> tuple[str, str]:
    """A file's name (at most 255 characters) and its ext: the one given, or else the
    name's own extension when that is a valid ext, or else none."""
    name = name or ""
    if len(name) > 255:
        raise BadRequest("name must be a string of at most 255 characters")
    if ext is not None:
        return name, parse_ext(ext)
    guess = os.path.splitext(name)[1]
    return name, guess.lower() if protocol.EXT_RE.match(guess) else ""


def parse_ext(value: object) -> str:
    if not isinstance(value, str) or (value and not protocol.EXT_RE.match(value)):
        raise BadRequest(
            f"ext {value!r} is not empty or a dot followed by 1 to 16 of [A-Za-z0-9_-]"
        )
    return value.lower()


class _WireChunk(msgspec.Struct, gc=False):
    """One manifest entry as sent; the digest is under the upload's algorithm's key."""

    size: int
    md5: str | None = None
    sha256: str | None = None


class _WireHandshake(msgspec.Struct, gc=False):
    """The handshake body as sent. Decoding into typed structs stops at the first element of
    the wrong shape, instead of first building whatever nested lists the body holds."""

    chunks: list[_WireChunk]
    size: int
    algo: str | None = None
    md5: str | None = None
    sha256: str | None = None
    ext: str | None = None
    name: str | None = None


_HANDSHAKE_DECODER = msgspec.json.Decoder(_WireHandshake)


def parse_manifest(body: bytes | bytearray) -> Manifest:
    """Handshake JSON -> Manifest with typed digests; raises BadRequest on anything off."""
    data = _decode(_HANDSHAKE_DECODER, body, "handshake")
    try:
        algo = Algo.parse(data.algo)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    key = algo.value
    try:
        digest = Digest.parse(algo, getattr(data, key))
    except ValueError as exc:
        raise BadRequest(f"{key}: {exc}") from None
    if data.size < 0:
        raise BadRequest(f"size must be a non-negative integer, got {data.size}")
    name, ext = parse_name_ext(data.name, data.ext)
    return Manifest(digest, data.size, _parse_chunk_refs(algo, data.chunks, True), ext, name)


def _parse_chunk_refs(algo: Algo, wire: list[_WireChunk], check_sizes: bool) -> ChunkList:
    """The chunk entries of a handshake or a v1.1 batch -> their lowercase hex digests and
    sizes; BadRequest naming the first entry whose digest is absent or not `algo`'s (or,
    `check_sizes`, whose size is negative). Empties `wire`.

    A 200,000-entry list is checked at once, not digest by digest: every digest has the
    right length and one bytes.fromhex of them all joined gives exactly their bytes (a
    whitespace fromhex would skip shows as bytes missing); only a list that fails is
    walked, to say which entry is wrong.
    """
    key = algo.value
    raws = [c.md5 for c in wire] if key == "md5" else [c.sha256 for c in wire]
    # Equal sizes (all but the last, in fixed-size chunking) share one int object.
    same: dict[int, int] = {}
    sizes = [same.setdefault(c.size, c.size) for c in wire]
    wire.clear()  # consumed: the entries' memory is free for what follows
    width = algo.hex_len
    packed = b""
    ok = not check_sizes or not sizes or min(sizes) >= 0
    if ok and raws:
        try:
            if set(map(len, raws)) == {width}:  # type: ignore[arg-type]
                packed = bytes.fromhex("".join(raws))  # type: ignore[arg-type]
            ok = len(packed) * 2 == width * len(raws)
        except (TypeError, ValueError):  # a None among them; a character that is not hex
            ok = False
    if not ok:
        parse_hex = algo.parse_hex
        for i, (raw, size) in enumerate(zip(raws, sizes, strict=True)):
            if raw is None:
                raise BadRequest(f"chunks[{i}] needs {key} and size")
            try:
                parse_hex(raw)
            except ValueError as exc:
                raise BadRequest(f"chunks[{i}].{key}: {exc}") from None
            if check_sizes and size < 0:
                raise BadRequest(f"chunks[{i}].size must be a non-negative integer, got {size}")
        raise AssertionError("a chunk list that failed the joined check has no bad entry")
    del raws  # the strings as sent go before their lowercase copies are made
    text = packed.hex()
    return ChunkList([text[i : i + width] for i in range(0, len(text), width)], sizes)


def parse_digest(text: str, what: str = "digest") -> Digest:
    try:
        return Digest.parse_any(text)
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None


def parse_upload_id(request: web.Request) -> str:
    upload_id = request.match_info["upload_id"]
    if not _UPLOAD_ID.match(upload_id):
        raise NotFound(f"no upload {upload_id!r}")
    return upload_id


def _complete(digest: Digest, size: int, ext: str) -> dict:
    return {
        "status": "complete",
        "algo": digest.algo.value,
        digest.algo.value: digest.hex,
        "size": size,
        "url": protocol.file_url(digest, ext),
    }


def missing_response(fields: dict, missing: list[str], status: int = 200) -> web.Response:
    """`fields` plus `"missing": [...]` as JSON.

    The list is joined, not walked by the JSON encoder: its entries are lowercase hex digests
    from the catalogue, which JSON carries verbatim, and for a 500,000-entry list the join
    costs the event loop a fifth of what json.dumps does. It is joined a slice at a time
    into one buffer, so a 200,000-entry answer is not also held as a whole string or two.
    """
    body = bytearray(json.dumps(fields)[:-1].encode())
    body += b', "missing": ['
    for i in range(0, len(missing), 8192):
        body += (', "' if i else '"').encode() + '", "'.join(missing[i : i + 8192]).encode() + b'"'
    body += b"]}"
    return web.Response(
        body=body,
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


# ---- handlers ---------------------------------------------------------------------------


async def handshake(request: web.Request) -> web.Response:
    require_json(request)
    service = request.app[SERVICE]
    limit = request.app[SETTINGS].max_handshake_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the handshake body is over {limit} bytes")
    body = await read_body(request, limit, request.app[BODY_BUDGET])
    hooks = request.app[HOOKS]
    client = client_of(request)
    tenant = uploader_of(request)
    if len(body) > THREAD_PARSE_BYTES:
        async with request.app[BIG_HANDSHAKES]:
            manifest = await asyncio.to_thread(parse_manifest, body)
            body.clear()  # the JSON (12 MB for 200,000 chunks) is not kept meanwhile
            await hooks.check_handshake(request, manifest)
            result = await service.handshake(manifest, client, tenant)
    else:
        manifest = parse_manifest(body)
        await hooks.check_handshake(request, manifest)
        result = await service.handshake(manifest, client, tenant)
    skipped = observe.handshake_answered(request, manifest, result)
    if isinstance(result, HandshakeComplete):
        return web.json_response(_complete(result.digest, result.size, result.ext))
    hooks.remember_skipped(result.upload_id, skipped)
    return missing_response(
        {
            "status": "pending",
            "algo": result.digest.algo.value,
            result.digest.algo.value: result.digest.hex,
            "size": result.size,
            "upload_id": result.upload_id,
            "expires_at": protocol.format_timestamp(result.expires_at),
        },
        result.missing,
    )


async def upload_status(request: web.Request) -> web.Response:
    upload, missing = await request.app[SERVICE].status(
        parse_upload_id(request), overseer_of(request)
    )
    if not upload.sealed:  # a v1.1 streamed upload: no digest yet, only what it lists so far
        return missing_response(
            {
                "status": "open",
                "upload_id": upload.id,
                "algo": upload.digest.algo.value,
                "size": upload.size,
                "expires_at": protocol.format_timestamp(upload.expires_at),
            },
            missing,
        )
    return missing_response(
        {
            "status": "pending",
            "upload_id": upload.id,
            "algo": upload.digest.algo.value,
            upload.digest.algo.value: upload.digest.hex,
            "size": upload.size,
            "expires_at": protocol.format_timestamp(upload.expires_at),
        },
        missing,
    )


async def put_chunk(request: web.Request) -> web.Response:
    upload_id = parse_upload_id(request)
    digest = parse_digest(request.match_info["digest"], "chunk digest")
    minimal = bool(_MINIMAL.search(request.headers.get("Prefer", "")))
    result = await request.app[SERVICE].put_chunk(
        upload_id,
        digest,
        body_pieces(request),
        request.content_length,
        with_missing=not minimal,
        tenant=uploader_of(request),
    )
    status = 201 if result.stored else 200
    if result.missing is None:  # the client asked for the minimal answer
        return web.json_response(
            {"stored": result.stored},
            status=status,
            headers={"Preference-Applied": "return=minimal"},
        )
    return missing_response({"stored": result.stored}, result.missing, status)


async def merge(request: web.Request) -> web.Response:
    upload_id = parse_upload_id(request)
    claim = await merge_claim(request)
    hooks = request.app[HOOKS]
    tenant = uploader_of(request)
    events = hooks.completed_events(upload_id, tenant.name if tenant is not None else None)
    entry, instant = await request.app[SERVICE].merge(upload_id, events, claim, tenant)
    hooks.committed(events, upload_id)
    answer = _complete(entry.digest, entry.size, entry.ext)
    if instant:
        answer["instant"] = True
    return web.json_response(answer)


# ---- protocol v1.1: streamed uploads ------------------------------------------------------

# Bodies of the small v1.1 requests (open, merge claim): a few fields, never more.
SMALL_BODY = 64 * 1024
# A batch body: MAX_STREAM_BATCH SHA-256 entries are about 400 KB of JSON.
BATCH_BODY = 1024 * 1024


class _WireOpen(msgspec.Struct, gc=False, forbid_unknown_fields=False):
    algo: str | None = None
    ext: str | None = None
    name: str | None = None
    size: int | None = None


class _WireBatch(msgspec.Struct, gc=False):
    start: int
    chunks: list[_WireChunk]
    algo: str | None = None


class _WireClaim(msgspec.Struct, gc=False):
    size: int | None = None
    algo: str | None = None
    md5: str | None = None
    sha256: str | None = None


def _decode(decoder: msgspec.json.Decoder, body: bytes | bytearray, what: str):
    """`body` decoded by `decoder` (a handshake, a v1.1 request); BadRequest naming `what`."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the {what} is not valid: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # Also what a lone UTF-16 surrogate (an unpaired \ud800) in a string answers: such a
        # string cannot be stored or echoed as UTF-8.
        raise BadRequest(f"the body is not valid JSON (or has a lone surrogate): {exc}") from None
    except RecursionError:
        raise BadRequest("the body nests JSON too deeply") from None


def _algo(value: str | None) -> Algo:
    try:
        return Algo.parse(value)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


_OPEN_DECODER = msgspec.json.Decoder(_WireOpen)
_BATCH_DECODER = msgspec.json.Decoder(_WireBatch)
_CLAIM_DECODER = msgspec.json.Decoder(_WireClaim)


def parse_batch(body: bytes | bytearray) -> tuple[Algo, int, list[ChunkRef]]:
    """A v1.1 digest batch -> (algo, start, chunks); BadRequest on anything off."""
    data = _decode(_BATCH_DECODER, body, "batch")
    algo = _algo(data.algo)
    if data.start < 0:
        raise BadRequest(f"start must be a non-negative integer, got {data.start}")
    return algo, data.start, list(_parse_chunk_refs(algo, data.chunks, False))


async def merge_claim(request: web.Request) -> tuple[Digest, int] | None:
    """The file's (digest, size) a v1.1 client sends with merge, or None when the body is
    empty or not JSON (a v1 client's merge, whose body the server never read)."""
    if not request.body_exists or request.content_type != "application/json":
        return None
    body = await read_body(request, SMALL_BODY, request.app[BODY_BUDGET])
    if not body.strip():
        return None
    data = _decode(_CLAIM_DECODER, body, "merge body")
    algo = _algo(data.algo)
    raw = getattr(data, algo.value)
    if raw is None and data.size is None:
        return None
    try:
        digest = Digest.parse(algo, raw)
    except ValueError as exc:
        raise BadRequest(f"{algo.value}: {exc}") from None
    if data.size is None or data.size < 0:
        raise BadRequest("a merge body with a digest needs the file's size, 0 or more")
    return digest, data.size


async def capabilities(request: web.Request) -> web.Response:
    """What this server offers: how a v1.1 client learns it may stream (PROTOCOL.md)."""
    s = request.app[SETTINGS]
    offered = streams_offered(request.app)
    return web.json_response(
        {
            "protocol": "1.1" if offered else "1",
            "versions": ["1", "1.1"] if offered else ["1"],
            "stream_uploads": offered,
            "algos": list(s.algos),
            "max_chunk_size": s.max_chunk_size,
            "max_chunks": s.max_chunks,
            "max_file_size": s.max_file_size,
            "max_batch": MAX_STREAM_BATCH,
            "file_put": True,
        }
    )


def streams_offered(app: web.Application) -> bool:
    """Whether v1.1 streamed uploads are offered: unless --no-stream-uploads, and only
    without a pre-handshake policy hook, which decides on a file's digest and size before
    any chunk is accepted (a streamed upload has its digest only at merge). In tenant mode
    too, on every engine: the quota is checked against the size declared at open."""
    settings = app[SETTINGS]
    return settings.stream_uploads and settings.hook_pre_handshake is None


def _offered(request: web.Request) -> None:
    """Where streams are not offered the v1.1 endpoints answer as a v1 server's missing route."""
    if not streams_offered(request.app):
        raise NotFound(f"no such endpoint: {request.path}")


async def open_stream(request: web.Request) -> web.Response:
    _offered(request)
    require_json(request)
    body = await read_body(request, SMALL_BODY, request.app[BODY_BUDGET])
    data = _decode(_OPEN_DECODER, body, "request")
    algo = _algo(data.algo)
    name, ext = parse_name_ext(data.name, data.ext)
    if data.size is not None and data.size < 0:
        raise BadRequest(f"size must be a non-negative integer, got {data.size}")
    upload = await request.app[SERVICE].open_stream(
        algo, ext, name, client_of(request), uploader_of(request), data.size
    )
    return web.json_response(
        {
            "status": "open",
            "upload_id": upload.id,
            "algo": algo.value,
            "count": 0,
            "size": 0,
            "expires_at": protocol.format_timestamp(upload.expires_at),
        },
        status=201,
    )


async def add_chunks(request: web.Request) -> web.Response:
    _offered(request)
    require_json(request)
    upload_id = parse_upload_id(request)
    limit = min(BATCH_BODY, request.app[SETTINGS].max_handshake_bytes)
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the batch body is over {limit} bytes")
    body = await read_body(request, limit, request.app[BODY_BUDGET])
    if len(body) > THREAD_PARSE_BYTES:
        algo, start, chunks = await asyncio.to_thread(parse_batch, body)
    else:
        algo, start, chunks = parse_batch(body)
    batch = await request.app[SERVICE].add_chunks(
        upload_id, algo, start, chunks, client_of(request), uploader_of(request)
    )
    return missing_response({"count": batch.count, "size": batch.size}, batch.missing)


# ---- protocol v1.1: one-request uploads ---------------------------------------------------


def parse_put_file(request: web.Request) -> Manifest:
    """`PUT /v1/files/{digest}[.ext]?name=&size=` -> the handshake it stands for: a file of
    one chunk (none when empty) whose digest is the file's. The size is `size` or else
    Content-Length; both given, they must agree."""
    hex_, dot, url_ext = request.match_info["name"].partition(".")
    digest = parse_digest(hex_, "file digest")
    name, ext = parse_name_ext(request.query.get("name"), dot + url_ext if dot else None)
    given = request.query.get("size")
    length = request.content_length
    if given is not None:
        if not given.isascii() or not given.isdigit() or len(given) > 20:
            raise BadRequest(f"size must be a non-negative integer, got {given[:40]!r}")
        size = int(given)
        if length is not None and length != size:
            raise SizeMismatch(f"the body has {length} bytes, not the size {size} given")
    elif length is not None:
        size = length
    else:
        raise BadRequest("a file PUT needs Content-Length (or the size in ?size=)")
    chunks = (ChunkRef(digest.hex, size),) if size else ()
    return Manifest(digest, size, chunks, ext, name)


async def put_file(request: web.Request) -> web.Response:
    """The v1.1 one-request upload of a file that is at most one chunk: handshake, chunk PUT
    and merge in one, verified as they are (PROTOCOL.md)."""
    manifest = parse_put_file(request)
    hooks = request.app[HOOKS]
    await hooks.check_handshake(request, manifest)
    tenant = uploader_of(request)
    key = "put:" + manifest.digest.hex
    hooks.remember_skipped(key, 0)
    events = hooks.completed_events(key, tenant.name if tenant is not None else None)
    entry, completed = await request.app[SERVICE].put_file(
        manifest, body_pieces(request), tenant, events
    )
    hooks.committed(events, key)
    metrics = request.app[observe.METRICS]
    if completed:
        metrics.uploads.labels("completed").inc()
    elif manifest.size:
        metrics.bytes_skipped.inc(manifest.size)
    observe.note(request, digest=manifest.digest.hex, completed=completed)
    return web.json_response(
        _complete(entry.digest, entry.size, entry.ext), status=201 if completed else 200
    )


async def abort(request: web.Request) -> web.Response:
    await request.app[SERVICE].abort(parse_upload_id(request), overseer_of(request))
    return web.Response(status=204)


def _split_file_name(name: str) -> tuple[Digest, str]:
    hex_, dot, ext = name.partition(".")
    digest = parse_digest(hex_, "file digest")
    ext = dot + ext
    if not protocol.EXTS_RE.match(ext):
        raise BadRequest(f"{ext!r} is not an extension")
    return digest, ext.lower()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range -> (start, length); None to send the whole file.

    Unparseable or multi-range headers are ignored (RFC 9110 allows that); a range that
    starts past the end raises RangeNotSatisfiable.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n < 0 or not last.isdigit():
                return None
            if n == 0 or size == 0:
                # RFC 9110 14.1.3: a suffix range is satisfiable only if both it and the
                # representation are non-empty.
                raise RangeNotSatisfiable(f"no bytes -{n} in a {size}-byte file", size)
            start = max(0, size - n)
            return start, size - start
        start = int(first)
        if not first.isdigit():
            return None
        end = int(last) if last else size - 1
        if last and not last.isdigit():
            return None
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"bytes {start}- are past the end of a {size}-byte file", size)
    if end < start:
        return None
    end = min(end, size - 1)
    return start, end - start + 1


def content_disposition(name: str, inline: bool) -> str:
    """RFC 6266: a plain ASCII fallback plus filename* with the exact UTF-8 name."""
    kind = "inline" if inline else "attachment"
    if not name:
        return kind
    fallback = "".join(ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%' else "_" for ch in name)
    quoted = urllib.parse.quote(name, safe="")
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


# Shown in the browser when opened; anything else downloads. Scripts never run either way.
_INLINE_TYPES = ("image/", "video/", "audio/", "text/plain", "application/pdf")


def _content_type(url_ext: str, entry: FileEntry) -> str:
    for ext in (url_ext, entry.ext):
        if ext:
            guessed, _ = mimetypes.guess_type("f" + ext, strict=False)
            if guessed:
                return guessed
    return "application/octet-stream"


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


async def get_file(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    digest, url_ext = _split_file_name(request.match_info["name"])
    etag = f'"{digest.hex}"'
    inm = request.headers.get("If-None-Match")
    not_modified = inm is not None and _etag_matches(inm, etag)
    # Bytes go out only from a manifest registered for this digest (Service.read_plan), so a
    # delete and a new upload committing meanwhile cannot put other bytes under this ETag.
    reader = reader_of(request)
    sending = request.method != "HEAD" and not not_modified
    if sending:
        entry = await service.open_file(digest, reader)
    else:
        entry = await service.get_file(digest, reader)
    ctype = _content_type(url_ext, entry)
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": ctype,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Cache-Control": "public, max-age=31536000, immutable",
        "Content-Disposition": content_disposition(entry.name, ctype.startswith(_INLINE_TYPES)),
    }
    if request.app[SETTINGS].tokens is not None:
        # Tenant mode: what this answer holds is this tenant's (another gets 404, and its
        # own name in Content-Disposition). `public` would let a shared cache (a proxy, a
        # CDN) hand it to any request for the URL, whatever its token (RFC 9111 3.5).
        headers["Cache-Control"] = "private, max-age=31536000, immutable"
        headers["Vary"] = "Authorization"
    if not_modified:
        return web.Response(status=304, headers=headers)
    rng = None
    if_range = request.headers.get("If-Range")
    if if_range is None or if_range.strip() == etag:
        rng = parse_range(request.headers.get("Range"), entry.size)
    if rng is None:
        status, start, length = 200, 0, entry.size
    else:
        start, length = rng
        status = 206
        headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{entry.size}"
    plan = service.read_plan(entry, start, length if sending else 0, reader)
    cursor = _BlobCursor(service)
    try:
        first = await anext(plan, None)
        if first is not None:
            # The first blob opens before the status line: a store that is down is a 503,
            # not a cut-off body.
            await cursor.reader_for(first)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        if first is not None:
            try:
                await _send_segments(request, resp, first, plan, cursor)
            except (OSError, CasdError) as exc:
                # The status line is out: all that is left to say is "this body is
                # incomplete", and closing the connection short of Content-Length says
                # exactly that.
                if not isinstance(exc, ConnectionResetError):
                    log.error("download of %s cut short: %s", entry.digest.hex, exc)
                if request.transport is not None:
                    request.transport.close()
                raise ConnectionResetError(str(exc)) from exc
    finally:
        await plan.aclose()
        await cursor.close()
    await resp.write_eof()
    return resp


# A download must move at least this much every --body-timeout seconds (4 KiB/s with the
# default): a client that stops reading is cut off instead of holding a connection and an
# open blob forever, and a phone on a poor network is still far above it.
SEND_SLICE = 256 * 1024


class _BlobCursor:
    """The blob a download is reading: a manifest may list one chunk many times in a row,
    and it is opened once for them. Whoever made the cursor closes it."""

    def __init__(self, service: Service):
        self._service = service
        self._reader: BlobReader | None = None
        self._digest: Digest | None = None

    async def reader_for(self, seg):
        if self._reader is None or self._digest != seg.digest:
            await self.close()
            self._reader = await self._service.open_segment(seg)
            self._digest = seg.digest
        return self._reader

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()


async def _send_segments(
    request: web.Request, resp: web.StreamResponse, first, rest, cursor: _BlobCursor
) -> None:
    """Each blob slice in order, `first` then `rest`: zero-copy (sendfile) from a local file
    where the store and the transport allow it, otherwise streamed in pieces from the store."""
    timeout = request.app[SETTINGS].body_timeout or None
    seg = first
    while seg is not None:
        await _send_segment(request, resp, await cursor.reader_for(seg), seg, timeout)
        seg = await anext(rest, None)


async def _send_segment(request, resp, reader, seg, timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    pos, end = seg.offset, seg.offset + seg.length
    if reader.file is None:
        async for piece in reader.stream(pos, seg.length):
            try:
                async with asyncio.timeout(timeout):
                    await resp.write(piece)
            except TimeoutError:
                raise ConnectionResetError(
                    f"the client took no {len(piece)} bytes in {timeout:g} seconds"
                ) from None
            pos += len(piece)
        if pos != end:
            raise BlobShort(f"blob {seg.digest.hex} ended {end - pos} bytes short of its slice")
        return
    f = reader.file
    while pos < end:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        n = min(SEND_SLICE, end - pos)
        try:
            async with asyncio.timeout(timeout):
                try:
                    sent = await loop.sendfile(transport, f, pos, n)
                except NotImplementedError:
                    await _copy_segment(resp, f, pos, n)
                    sent = n
        except TimeoutError:
            raise ConnectionResetError(
                f"the client took no {n} bytes in {timeout:g} seconds"
            ) from None
        if sent != n:
            raise BlobShort(f"blob {seg.digest.hex} ended {n - sent} bytes short of its slice")
        pos += n


class BlobShort(OSError):
    """A blob is shorter than the catalogue says (damaged or collected meanwhile)."""


async def _copy_segment(resp: web.StreamResponse, f, offset: int, length: int) -> None:
    f.seek(offset)
    while length > 0:
        data = await asyncio.to_thread(f.read, min(length, 1 << 20))
        if not data:
            raise BlobShort("blob shorter than its catalogue entry")
        await resp.write(data)
        length -= len(data)


# Rows of a manifest read and sent at a time: about 0.3 MB of JSON, so a manifest of any
# length streams in bounded memory and the event loop is never held long.
MANIFEST_PAGE = 4096


async def get_file_chunks(request: web.Request) -> web.StreamResponse:
    """The file's manifest as JSON, streamed page by page (see PROTOCOL.md)."""
    service = request.app[SERVICE]
    digest, _url_ext = _split_file_name(request.match_info["name"])
    entry, count = await service.file_manifest(digest, reader_of(request))
    algo = entry.digest.algo.value
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/json; charset=utf-8",
            # A digest's manifest can change: deleted, then uploaded again cut otherwise.
            "Cache-Control": "no-cache",
            "X-Chunk-Count": str(count),
        }
    )
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    await resp.write(
        f'{{"algo":"{algo}","{algo}":"{entry.digest.hex}","size":{entry.size},'
        f'"count":{count},"chunks":['.encode()
    )
    sep = ""
    try:
        async for rows in service.manifest_pages(entry, count, MANIFEST_PAGE):
            # Digests and xxh3s are hex the daemon wrote, sizes integers: nothing here needs
            # escaping. `xxh3` is optional (PROTOCOL.md): absent when the catalogue has none.
            text = ",".join(
                f'{{"digest":"{hex_}","size":{size},"offset":{offset},"xxh3":"{xxh3}"}}'
                if xxh3
                else f'{{"digest":"{hex_}","size":{size},"offset":{offset}}}'
                for hex_, size, offset, xxh3 in rows
            )
            await resp.write((sep + text).encode())
            sep = ","
    except NotFound as exc:
        # The status line is out; a body cut short of its closing bracket (and of the
        # chunked encoding's last chunk) is how to say "this manifest is not whole".
        log.warning("manifest of %s cut short: %s", entry.digest.hex, exc.message)
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError(exc.message) from exc
    await resp.write(b"]}")
    await resp.write_eof()
    return resp


# Files a `GET /v1/files` answer lists at most (and by default).
LIST_LIMIT = 1000
_AFTER = re.compile(r"[0-9a-f]{0,64}\Z")


async def list_files(request: web.Request) -> web.Response:
    """Tenant mode only: the files this tenant owns (an admin: every file), a page at a time
    in digest order (PROTOCOL.md)."""
    after = request.query.get("after", "")
    if not _AFTER.match(after):
        raise BadRequest(f"after must be a lowercase hex digest, got {after[:80]!r}")
    given = request.query.get("limit")
    limit = LIST_LIMIT
    if given is not None:
        if not (given.isascii() and given.isdigit() and 1 <= int(given[:9]) <= LIST_LIMIT):
            raise BadRequest(f"limit must be an integer from 1 to {LIST_LIMIT}, got {given[:40]!r}")
        limit = int(given)
    files = await request.app[SERVICE].list_files(reader_of(request), after, limit)
    return web.json_response(
        {
            "files": [
                {
                    "algo": f.digest.algo.value,
                    f.digest.algo.value: f.digest.hex,
                    "size": f.size,
                    "name": f.name,
                    "ext": f.ext,
                    "created": protocol.format_timestamp(f.created),
                    "url": protocol.file_url(f.digest, f.ext),
                }
                for f in files
            ],
            "next": files[-1].digest.hex if len(files) == limit else None,
        }
    )


async def delete_file(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"], "file digest")
    hooks = request.app[HOOKS]
    reader = reader_of(request)
    events = hooks.deleted_events(reader)
    await request.app[SERVICE].delete_file(digest, events, reader)
    hooks.committed(events)
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICE].health()
    except StorageFull:
        raise
    except Exception as exc:
        # The details (paths, SQLite's words) are for the operator; /healthz needs no token.
        log.warning("health check failed: %s", exc)
        return error_response(
            503,
            protocol.UNAVAILABLE,
            "unhealthy: the catalogue cannot be read, the data folder cannot be written or"
            " the blob store does not answer; the daemon's log says which",
        )
    return web.json_response({"status": "ok"})


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise NotFound("the upload page is not installed")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of the upload page; a missing one is a JSON 404 like every other error."""
    name = request.match_info["path"]
    try:
        path = (STATIC_DIR / name).resolve()
        found = path.is_relative_to(STATIC_DIR.resolve()) and path.is_file()
    except (OSError, ValueError):
        # A NUL byte or a name over the filesystem's limits names no file of the page.
        found = False
    if not found:
        raise NotFound(f"no static file {name[:200]!r}")
    return web.FileResponse(path)


# ---- app --------------------------------------------------------------------------------


def create_app(settings: Settings, clock: Callable[[], float] = time.time) -> web.Application:
    """The casd application: routes, middlewares, and the service opened on startup."""
    app = web.Application(
        middlewares=[error_middleware, guard_middleware, auth_middleware],
        client_max_size=settings.max_handshake_bytes,
    )
    app[SETTINGS] = settings
    if settings.tokens is not None:
        app[TOKENS] = TokenFile(settings.tokens)  # TokenFileError: the daemon does not start
    app[BIG_HANDSHAKES] = asyncio.Semaphore(BIG_HANDSHAKES_AT_ONCE)
    app[BODY_BUDGET] = BodyBudget(
        BODIES_IN_MEMORY * settings.max_handshake_bytes, THREAD_PARSE_BYTES
    )

    async def service_ctx(app: web.Application):
        service = await Service.open(settings, clock)
        app[SERVICE] = service
        yield
        await service.close()

    app.cleanup_ctx.append(service_ctx)
    install_guard(app, settings)
    observe.install(app, SETTINGS, SERVICE)
    hooks.install(app, SETTINGS, SERVICE, observe.METRICS)
    r = app.router
    r.add_post("/v1/handshake", handshake)
    r.add_get("/v1/uploads/{upload_id}", upload_status)
    r.add_put("/v1/uploads/{upload_id}/chunks/{digest}", put_chunk)
    r.add_post("/v1/uploads/{upload_id}/merge", merge)
    r.add_delete("/v1/uploads/{upload_id}", abort)
    if settings.tokens is not None:
        # A tenant lists its own files; without tenants there is no such endpoint, as before.
        r.add_get("/v1/files", list_files, name="listFiles")
    r.add_get("/v1/files/{name}", get_file)
    r.add_get("/v1/files/{name}/chunks", get_file_chunks)
    r.add_delete("/v1/files/{digest}", delete_file)
    r.add_put("/v1/files/{name}", put_file)
    r.add_get("/v1/openapi.json", openapi.serve)
    r.add_get("/v1/capabilities", capabilities)
    r.add_post("/v1/uploads", open_stream)
    r.add_post("/v1/uploads/{upload_id}/chunks", add_chunks)
    r.add_get("/healthz", healthz)
    r.add_get("/", index)
    r.add_get("/static/{path:.+}", static_file)
    return app
