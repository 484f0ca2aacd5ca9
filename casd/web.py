"""HTTP: `create_app(settings)`, the routes of PROTOCOL.md, and the one error middleware."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

from casd.config import Settings
from casd.digest import Algo, Digest
from casd.errors import (
    BadRequest,
    CasdError,
    DigestMismatch,
    FileDigestMismatch,
    Incomplete,
    NotFound,
    NotInManifest,
    RangeNotSatisfiable,
    SizeMismatch,
    StorageFull,
    TooLarge,
    TooManyPending,
    Unauthorized,
    Unavailable,
)
from casd.models import ChunkRef, FileEntry, HandshakeResult, Manifest
from casd.service import Service

log = logging.getLogger("casd.web")

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", Service)

STATIC_DIR = Path(__file__).parent / "static"

_EXT = re.compile(r"\.[A-Za-z0-9_-]{1,16}\Z")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}\Z")
_URL_EXT = re.compile(r"(\.[A-Za-z0-9_-]{1,16})*\Z")
# RFC 7240: a client that tracks progress itself may skip the `missing` list in chunk answers.
_MINIMAL = re.compile(r"(^|[,;\s])return\s*=\s*minimal\b", re.I)
# Parsing a big manifest takes long enough to stall other requests; do it in a thread.
THREAD_PARSE_BYTES = 256 * 1024

# Domain error -> (HTTP status, protocol error code). The only place they meet.
ERROR_MAP: dict[type[CasdError], tuple[int, str]] = {
    BadRequest: (400, "bad_request"),
    Unauthorized: (401, "unauthorized"),
    NotFound: (404, "not_found"),
    Incomplete: (409, "incomplete"),
    NotInManifest: (409, "not_in_manifest"),
    TooLarge: (413, "too_large"),
    RangeNotSatisfiable: (416, "range_not_satisfiable"),
    DigestMismatch: (422, "digest_mismatch"),
    SizeMismatch: (422, "size_mismatch"),
    FileDigestMismatch: (422, "file_digest_mismatch"),
    TooManyPending: (429, "too_many_pending"),
    Unavailable: (503, "unavailable"),
    StorageFull: (507, "insufficient_storage"),
}
# aiohttp's own refusals (no route, wrong method, body over client_max_size) in the same shape.
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def error_response(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except CasdError as exc:
        status, code = ERROR_MAP[type(exc)]
        resp = error_response(status, code, exc.message, **exc.extra)
        if isinstance(exc, RangeNotSatisfiable):
            resp.headers["Content-Range"] = f"bytes */{exc.size}"
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "bad_request")
        resp = error_response(exc.status, code, _reason(request, exc))
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(
            500, "internal_error", "the server failed to handle this request; see its log"
        )


def _reason(request: web.Request, exc: web.HTTPException) -> str:
    return {
        404: f"no such endpoint: {request.path}",
        405: f"{request.method} is not allowed on {request.path}",
        413: "the request body is over this server's limit",
    }.get(exc.status, exc.reason)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    settings = request.app[SETTINGS]
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


def client_of(request: web.Request) -> str:
    """Who a request comes from, for per-client budgets: its bearer token when tokens are
    required (a fingerprint: the catalogue never holds a secret), else its address."""
    settings = request.app[SETTINGS]
    if settings.token is not None or settings.admin_token is not None:
        header = request.headers.get("Authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        fingerprint = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()
        return "token:" + fingerprint[:16]
    return f"addr:{request.remote or '-'}"


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# ---- parsing at the edge ----------------------------------------------------------------


def parse_ext(value: object) -> str:
    if not isinstance(value, str) or (value and not _EXT.match(value)):
        raise BadRequest(
            f"ext {value!r} is not empty or a dot followed by 1 to 16 of [A-Za-z0-9_-]"
        )
    return value.lower()


def _int(obj: dict, key: str, where: str) -> int:
    value = obj.get(key)
    if type(value) is not int or value < 0:
        raise BadRequest(f"{where}{key} must be a non-negative integer, got {value!r}")
    return value


def parse_manifest(body: bytes) -> Manifest:
    """Handshake JSON -> Manifest with typed digests; raises BadRequest on anything off."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the handshake must be a JSON object")
    try:
        algo = Algo.parse(data.get("algo"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    key = algo.value
    try:
        digest = Digest.parse(algo, data.get(key))
    except ValueError as exc:
        raise BadRequest(f"{key}: {exc}") from None
    size = _int(data, "size", "")
    name = data.get("name", "")
    if name is None:
        name = ""
    if not isinstance(name, str) or len(name) > 255:
        raise BadRequest("name must be a string of at most 255 characters")
    if "ext" in data and data["ext"] is not None:
        ext = parse_ext(data["ext"])
    else:
        guess = os.path.splitext(name)[1]
        ext = guess.lower() if _EXT.match(guess) else ""
    raw_chunks = data.get("chunks")
    if not isinstance(raw_chunks, list):
        raise BadRequest("chunks must be a list of {" + key + ", size} objects")
    chunks = []
    parse_hex = algo.parse_hex
    for i, c in enumerate(raw_chunks):
        try:
            hex_ = parse_hex(c[key])
            csize = c["size"]
        except (TypeError, KeyError, ValueError) as exc:
            if not isinstance(c, dict):
                raise BadRequest(f"chunks[{i}] must be an object with {key} and size") from None
            if isinstance(exc, ValueError):
                raise BadRequest(f"chunks[{i}].{key}: {exc}") from None
            raise BadRequest(f"chunks[{i}] needs {key} and size") from None
        if type(csize) is not int or csize < 0:
            raise BadRequest(f"chunks[{i}].size must be a non-negative integer, got {csize!r}")
        chunks.append(ChunkRef(hex_, csize))
    return Manifest(digest, size, tuple(chunks), ext, name)


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


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_url(digest: Digest, ext: str) -> str:
    return f"/v1/files/{digest.hex}{ext}"


def _complete(digest: Digest, size: int, ext: str) -> dict:
    return {
        "status": "complete",
        "algo": digest.algo.value,
        digest.algo.value: digest.hex,
        "size": size,
        "url": file_url(digest, ext),
    }


# ---- handlers ---------------------------------------------------------------------------


async def handshake(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    limit = request.app[SETTINGS].max_handshake_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the handshake body is over {limit} bytes")
    body = await request.read()
    if len(body) > THREAD_PARSE_BYTES:
        manifest = await asyncio.to_thread(parse_manifest, body)
    else:
        manifest = parse_manifest(body)
    result: HandshakeResult = await service.handshake(manifest, client_of(request))
    if result.status == "complete":
        return web.json_response(_complete(result.digest, result.size, result.ext))
    return web.json_response(
        {
            "status": "pending",
            "algo": result.digest.algo.value,
            result.digest.algo.value: result.digest.hex,
            "size": result.size,
            "upload_id": result.upload_id,
            "missing": result.missing,
            "expires_at": rfc3339(result.expires_at),
        }
    )


async def upload_status(request: web.Request) -> web.Response:
    upload, missing = await request.app[SERVICE].status(parse_upload_id(request))
    return web.json_response(
        {
            "status": "pending",
            "upload_id": upload.id,
            "algo": upload.digest.algo.value,
            upload.digest.algo.value: upload.digest.hex,
            "size": upload.size,
            "missing": missing,
            "expires_at": rfc3339(upload.expires_at),
        }
    )


async def put_chunk(request: web.Request) -> web.Response:
    upload_id = parse_upload_id(request)
    digest = parse_digest(request.match_info["digest"], "chunk digest")
    minimal = bool(_MINIMAL.search(request.headers.get("Prefer", "")))
    result = await request.app[SERVICE].put_chunk(
        upload_id, digest, request.content.iter_any(), request.content_length,
        with_missing=not minimal,
    )
    status = 201 if result.stored else 200
    if minimal:
        return web.json_response(
            {"stored": result.stored}, status=status,
            headers={"Preference-Applied": "return=minimal"},
        )
    return web.json_response({"stored": result.stored, "missing": result.missing}, status=status)


async def merge(request: web.Request) -> web.Response:
    entry = await request.app[SERVICE].merge(parse_upload_id(request))
    return web.json_response(_complete(entry.digest, entry.size, entry.ext))


async def abort(request: web.Request) -> web.Response:
    await request.app[SERVICE].abort(parse_upload_id(request))
    return web.Response(status=204)


def _split_file_name(name: str) -> tuple[Digest, str]:
    hex_, dot, ext = name.partition(".")
    digest = parse_digest(hex_, "file digest")
    ext = dot + ext
    if not _URL_EXT.match(ext):
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
            if n == 0:
                raise RangeNotSatisfiable(f"an empty suffix range of a {size}-byte file", size)
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
    fallback = "".join(
        ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\%' else "_" for ch in name
    )
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
    entry = await service.get_file(digest)
    etag = f'"{entry.digest.hex}"'
    ctype = _content_type(url_ext, entry)
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": ctype,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Cache-Control": "public, max-age=31536000, immutable",
        "Content-Disposition": content_disposition(
            entry.name, ctype.startswith(_INLINE_TYPES)
        ),
    }
    inm = request.headers.get("If-None-Match")
    if inm is not None and _etag_matches(inm, etag):
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
    plan = await service.read_plan(entry, start, length)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    await resp.prepare(request)
    if request.method != "HEAD" and length:
        try:
            await _send_segments(request, resp, plan)
        except OSError as exc:
            # The status line is out: all that is left to say is "this body is incomplete",
            # and closing the connection short of Content-Length says exactly that.
            if not isinstance(exc, ConnectionResetError):
                log.error("download of %s cut short: %s", entry.digest.hex, exc)
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError(str(exc)) from exc
    await resp.write_eof()
    return resp


async def _send_segments(request: web.Request, resp: web.StreamResponse, plan) -> None:
    """Zero-copy where the transport allows it: sendfile each blob slice in order."""
    loop = asyncio.get_running_loop()
    for seg in plan:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        f = await asyncio.to_thread(open, seg.path, "rb")
        try:
            try:
                sent = await loop.sendfile(transport, f, seg.offset, seg.length)
            except NotImplementedError:
                await _copy_segment(resp, f, seg.offset, seg.length)
            else:
                if sent != seg.length:
                    raise BlobShort(f"{seg.path} ended after {sent} of {seg.length} bytes")
        finally:
            f.close()


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


async def delete_file(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"], "file digest")
    await request.app[SERVICE].delete_file(digest)
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICE].health()
    except StorageFull:
        raise
    except Exception as exc:
        log.warning("health check failed: %s", exc)
        return error_response(503, "unavailable", f"unhealthy: {exc}")
    return web.json_response({"status": "ok"})


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise NotFound("the upload page is not installed")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


# ---- app --------------------------------------------------------------------------------


def create_app(settings: Settings, clock: Callable[[], float] = time.time) -> web.Application:
    """The casd application: routes, middlewares, and the service opened on startup."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware],
        client_max_size=settings.max_handshake_bytes,
    )
    app[SETTINGS] = settings

    async def service_ctx(app: web.Application):
        service = await Service.open(settings, clock)
        app[SERVICE] = service
        yield
        await service.close()

    app.cleanup_ctx.append(service_ctx)
    r = app.router
    r.add_post("/v1/handshake", handshake)
    r.add_get("/v1/uploads/{upload_id}", upload_status)
    r.add_put("/v1/uploads/{upload_id}/chunks/{digest}", put_chunk)
    r.add_post("/v1/uploads/{upload_id}/merge", merge)
    r.add_delete("/v1/uploads/{upload_id}", abort)
    r.add_get("/v1/files/{name}", get_file)
    r.add_delete("/v1/files/{digest}", delete_file)
    r.add_get("/healthz", healthz)
    r.add_get("/", index)
    if STATIC_DIR.is_dir():
        r.add_static("/static/", STATIC_DIR)
    return app
