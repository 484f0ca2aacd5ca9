"""Prometheus metrics of one app: a registry per app (no process-global state), `GET /metrics`."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from casd.config import Settings
from casd.errors import Unauthorized

# Routes whose latency gets a histogram: the ones an upload or a download waits on.
TIMED_ROUTES = {
    "/v1/handshake": "handshake",
    "/v1/uploads/{upload_id}/chunks/{digest}": "chunk_put",
    "/v1/uploads/{upload_id}/merge": "merge",
    "/v1/files/{name}": "download",
}
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The counters, gauges and histograms of one app, in their own registry."""

    def __init__(self, data_dir: Path):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "casd_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "casd_request_duration_seconds",
            "time to answer, for the upload and download routes",
            ["operation"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("casd_requests_in_flight", "requests being handled", registry=r)
        self.bytes_received = Counter(
            "casd_received_bytes", "request body bytes read (chunks, handshakes)", registry=r
        )
        self.bytes_served = Counter(
            "casd_served_bytes",
            "file bytes sent by downloads (as announced by Content-Length)",
            registry=r,
        )
        self.bytes_skipped = Counter(
            "casd_dedup_skipped_bytes",
            "bytes clients did not have to send: chunks a handshake did not list as missing,"
            " and whole files answered complete",
            registry=r,
        )
        self.chunks_stored = Counter(
            "casd_chunks_stored", "chunks written to the blob store (201 answers)", registry=r
        )
        self.uploads = Counter(
            "casd_uploads",
            "uploads by event: started (handshake answered pending), completed"
            " (merge answered 200), aborted (DELETE answered 204)",
            ["event"],
            registry=r,
        )
        self.merge_mismatches = Counter(
            "casd_merge_digest_mismatches",
            "merges refused because the chunks hash to another file digest",
            registry=r,
        )
        self.expired_uploads = Gauge(
            "casd_uploads_expired",
            "uploads past their expiry that gc has not removed yet (counted at scrape)",
            registry=r,
        )
        self.write_queue = Gauge(
            "casd_catalog_write_queue_depth",
            "catalogue writes waiting for the next transaction",
            registry=r,
        )
        self.commit_latency = Histogram(
            "casd_catalog_commit_duration_seconds",
            "duration of one batched catalogue write transaction",
            buckets=_BUCKETS,
            registry=r,
        )
        self.disk_free = Gauge(
            "casd_disk_free_bytes", "free bytes on the data folder's filesystem", registry=r
        )
        self.disk_free.set_function(lambda: _free_bytes(data_dir))
        self.hook_events = Counter(
            "casd_hook_events",
            "webhook events by outcome: queued, delivered, dropped (queue"
            " full), failed (a delivery attempt failed; it is retried)",
            ["outcome"],
            registry=r,
        )
        self.hook_queue = Gauge(
            "casd_hook_queue_depth",
            "webhook events waiting for delivery (counted at scrape)",
            registry=r,
        )
        for event in ("started", "completed", "aborted"):
            self.uploads.labels(event)
        for outcome in ("queued", "delivered", "dropped", "failed"):
            self.hook_events.labels(outcome)
        self.timers = {route: self.latency.labels(op) for route, op in TIMED_ROUTES.items()}
        # PUT /v1/files/{name} (a v1.1 one-request upload) shares the download's route.
        self.file_put_timer = self.latency.labels("file_put")

    def observe(
        self, route: str, method: str, status: int, seconds: float, received: int, served: int
    ) -> None:
        """Account one answered request (called once per request by the access middleware)."""
        self.requests.labels(route, method, str(status)).inc()
        timer = (
            self.file_put_timer
            if method == "PUT" and route == "/v1/files/{name}"
            else self.timers.get(route)
        )
        if timer is not None:
            timer.observe(seconds)
        if received:
            self.bytes_received.inc(received)
        if served:
            self.bytes_served.inc(served)
        if route == "/v1/uploads/{upload_id}/chunks/{digest}":
            if status == 201:
                self.chunks_stored.inc()
        elif route == "/v1/uploads/{upload_id}/merge":
            if status == 200:
                self.uploads.labels("completed").inc()
            elif status == 422:
                self.merge_mismatches.inc()
        elif route == "/v1/uploads/{upload_id}" and method == "DELETE" and status == 204:
            self.uploads.labels("aborted").inc()


def _free_bytes(path: Path) -> float:
    try:
        st = os.statvfs(path)
    except OSError:
        return float("nan")
    return float(st.f_bavail * st.f_frsize)


def allowed(settings: Settings, header: str) -> bool:
    """Whether an Authorization header may read /metrics.

    --metrics-token, when set, is the one key; otherwise the API tokens protect /metrics
    when they are configured; with no token at all /metrics is open on the listen address.
    In tenant mode only --metrics-token opens it: its totals are about every tenant.
    """
    given = header[7:] if header[:7].lower() == "bearer " else ""
    keys = (
        [settings.metrics_token]
        if settings.metrics_token
        else [t for t in (settings.token, settings.admin_token) if t]
    )
    if not keys:
        return settings.tokens is None
    # A header that is not valid UTF-8 arrives with lone surrogates (aiohttp decodes it with
    # surrogateescape): encoded back the same way it is the bytes sent, simply a wrong token.
    try:
        raw = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return any(hmac.compare_digest(raw, k.encode("utf-8", "surrogateescape")) for k in keys)


def metrics_handler(metrics_key, settings_key, service_key):
    async def handle(request: web.Request) -> web.Response:
        settings = request.app[settings_key]
        if not allowed(settings, request.headers.get("Authorization", "")):
            raise Unauthorized("/metrics needs its token (Authorization: Bearer ...)")
        metrics: Metrics = request.app[metrics_key]
        service = request.app[service_key]
        metrics.write_queue.set(service.catalog.writer.depth)
        metrics.expired_uploads.set(await service.catalog.count_expired_pending(service.clock()))
        metrics.hook_queue.set(await service.catalog.count_hook_events())
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle
