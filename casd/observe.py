"""The outermost middleware: request id, one access log line and the metrics of each request."""

from __future__ import annotations

import asyncio
import logging
import time
from itertools import repeat

from aiohttp import web

from casd.logs import REQUEST_ID, request_id
from casd.metrics import Metrics, metrics_handler
from casd.models import ChunkList, HandshakeComplete, HandshakeResult, Manifest

access_log = logging.getLogger("casd.access")

METRICS = web.AppKey("metrics", Metrics)
# What a handler learned that the URL does not show (a handshake's upload id and digest).
NOTES = "casd.notes"
_RID = "casd.request_id"


def note(request: web.Request, **facts) -> None:
    """Attach facts to this request's access line (upload_id, digest, ...)."""
    request.setdefault(NOTES, {}).update(facts)


def handshake_answered(request: web.Request, manifest: Manifest, result: HandshakeResult) -> int:
    """Account a handshake: dedup-skipped bytes (returned), a started upload, its log ids."""
    metrics = request.app[METRICS]
    upload_id = None
    if isinstance(result, HandshakeComplete):
        skipped = manifest.size
    else:
        upload_id = result.upload_id
        chunks = ChunkList.of(manifest.chunks)
        sizes = dict(zip(chunks.hexes, chunks.sizes, strict=True))
        # `missing` names each digest once, and only digests of this manifest.
        skipped = manifest.size - sum(map(sizes.get, result.missing, repeat(0)))
        metrics.uploads.labels("started").inc()
    if skipped > 0:
        metrics.bytes_skipped.inc(skipped)
    note(request, upload_id=upload_id, digest=manifest.digest.hex, skipped=skipped)
    return skipped


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler):
    rid = request_id(request.headers.get("X-Request-ID"))
    request[_RID] = rid
    token = REQUEST_ID.set(rid)
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    started = time.perf_counter()
    status = 500
    resp = None
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away before the answer was complete
        raise
    finally:
        seconds = time.perf_counter() - started
        metrics.in_flight.dec()
        route = _route(request)
        received = request.content.total_bytes
        sent = 0
        if resp is not None and request.method != "HEAD":
            # Content-Length where announced (sendfile bypasses aiohttp's byte count), else
            # what aiohttp wrote (a chunked answer).
            length = resp.content_length
            sent = length if length is not None else resp.body_length
        metrics.observe(
            route,
            request.method,
            status,
            seconds,
            received,
            sent if route == "/v1/files/{name}" and request.method != "PUT" and status < 300 else 0,
        )
        _access_line(request, route, status, received, sent, seconds)
        REQUEST_ID.reset(token)


def _access_line(request, route, status, received, sent, seconds) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    facts = dict(request.get(NOTES, ()))
    info = request.match_info
    if "upload_id" in info:
        facts.setdefault("upload_id", info["upload_id"])
    if "digest" in info:
        facts.setdefault("digest", info["digest"])
    elif "name" in info:
        facts.setdefault("digest", info["name"].partition(".")[0])
    fields = {
        "request_id": request[_RID],
        "method": request.method,
        "route": route,
        "status": status,
        "bytes_in": received,
        "bytes_out": sent,
        "duration_ms": round(seconds * 1000, 2),
        **facts,
    }
    access_log.info("%s %s %d", request.method, route, status, extra={"fields": fields})


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(_RID)
    if rid is not None:
        response.headers["X-Request-ID"] = rid


def install(app: web.Application, settings_key, service_key) -> None:
    """Add the metrics registry, the outermost middleware and GET /metrics to `app`."""
    settings = app[settings_key]
    metrics = app[METRICS] = Metrics(settings.data_dir)

    async def observe_catalog(app: web.Application):
        app[service_key].catalog.writer.on_commit = metrics.commit_latency.observe
        yield

    # After the service's cleanup context: its catalogue exists once this runs.
    app.cleanup_ctx.append(observe_catalog)
    app.middlewares.insert(0, observe_middleware)
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_get("/metrics", metrics_handler(METRICS, settings_key, service_key))
