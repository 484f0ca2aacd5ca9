"""Webhooks: file events queued in the catalogue and POSTed, signed, to each --hook-url with
retries; and the optional pre-handshake hook that may refuse a handshake."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import aiohttp
from aiohttp import web

from casd import protocol
from casd.catalog import Catalog, HookEvents
from casd.config import Settings
from casd.errors import Forbidden, Unavailable
from casd.metrics import Metrics
from casd.models import FileEntry, Manifest

log = logging.getLogger("casd.hooks")

BATCH = 50
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 60.0
MESSAGE_MAX = 500  # characters of a pre-handshake refusal passed on to the client
_REMEMBERED = 10_000  # uploads whose handshake's skipped bytes are kept for file.completed


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Casd-Signature value: HMAC-SHA256 over "TIMESTAMP." + body."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Hooks:
    """The delivery loops (one per receiver URL) and the pre-handshake check of one app."""

    def __init__(self, settings: Settings, catalog: Catalog, metrics: Metrics):
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._wake = {url: asyncio.Event() for url in settings.hook_urls}
        self._tasks: list[asyncio.Task] = []
        self._skipped: OrderedDict[str, int] = OrderedDict()

    async def start(self) -> None:
        if not (self.settings.hook_urls or self.settings.hook_pre_handshake):
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.hook_timeout)
        )
        self._tasks = [asyncio.create_task(self._deliver(url)) for url in self.settings.hook_urls]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ---- events -----------------------------------------------------------------------

    def remember_skipped(self, upload_id: str, skipped: int) -> None:
        """What a handshake did not need sent, for the file.completed event of its upload."""
        if not self.settings.hook_urls:
            return
        self._skipped[upload_id] = skipped
        self._skipped.move_to_end(upload_id)
        while len(self._skipped) > _REMEMBERED:
            self._skipped.popitem(last=False)

    def completed_events(self, upload_id: str, tenant: str | None = None) -> HookEvents | None:
        """The file.completed events to commit with the merge of `upload_id` (None when no
        receiver is configured); hand them to `committed` once the merge returned. In
        tenant mode `tenant` (the uploader's) goes into the event: the file is now its."""
        skipped = self._skipped.get(upload_id)

        def data(entry: FileEntry) -> dict:
            fields = _file_fields(entry)
            if skipped is not None:
                fields["bytes_skipped"] = skipped
                fields["bytes_sent"] = entry.size - skipped
            if tenant is not None:
                fields["tenant"] = tenant
            return fields

        return self._events("file.completed", data)

    def deleted_events(self, tenant: str | None = None) -> HookEvents | None:
        """The file.deleted events to commit with a file's deletion (None when no receiver
        is configured); hand them to `committed` once the deletion returned. `tenant`: in
        tenant mode, whose ownership the delete removed (None: an admin's, every one)."""

        def data(entry: FileEntry) -> dict:
            algo = entry.digest.algo.value
            fields = {"algo": algo, algo: entry.digest.hex, "digest": entry.digest.hex}
            if tenant is not None:
                fields["tenant"] = tenant
            return fields

        return self._events("file.deleted", data)

    def _events(self, kind: str, data: Callable[[FileEntry], dict]) -> HookEvents | None:
        urls = self.settings.hook_urls
        if not urls:
            return None
        now = time.time()

        def rows(entry: FileEntry) -> list[tuple[str, str, str]]:
            body = json.dumps({"event": kind, "time": now, "data": data(entry)})
            return [(url, kind, body) for url in urls]

        return HookEvents(rows, now, self.settings.hook_queue_max)

    def committed(self, events: HookEvents | None, upload_id: str | None = None) -> None:
        """After the catalogue operation carrying `events` returned (its events are in the
        queue): count them, say what a full queue dropped, wake the delivery loops; and
        forget the merged upload's skipped bytes."""
        if upload_id is not None:
            self._skipped.pop(upload_id, None)
        if events is None or not events.queued:
            return
        self.metrics.hook_events.labels("queued").inc(events.queued)
        if events.dropped:
            self.metrics.hook_events.labels("dropped").inc(events.dropped)
            log.warning(
                "webhook queue full (%d events): dropped the %d oldest",
                events.max_rows,
                events.dropped,
            )
        for wake in self._wake.values():
            wake.set()

    async def _deliver(self, url: str) -> None:
        """Send this URL's queued events in order; the first failure holds the rest back
        (that keeps each file's events in order) and is retried with exponential backoff."""
        wake = self._wake[url]
        delay = BACKOFF_FIRST
        while True:
            wake.clear()
            try:
                rows = await self.catalog.hook_events(url, BATCH)
                if not rows:
                    await wake.wait()
                    continue
                for event_id, kind, body in rows:
                    error = await self._post(url, event_id, kind, body.encode())
                    if error is not None:
                        self.metrics.hook_events.labels("failed").inc()
                        log.warning(
                            "webhook %s to %s failed (%s); retrying in %.1f s",
                            kind,
                            url,
                            error,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, BACKOFF_MAX)
                        break
                    delay = BACKOFF_FIRST
                    await self.catalog.hook_event_done(event_id)
                    self.metrics.hook_events.labels("delivered").inc()
            except Exception as exc:  # a busy catalogue must not end delivery
                log.warning("webhook delivery to %s paused: %s", url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _post(self, url: str, event_id: int, kind: str, body: bytes) -> str | None:
        """None when the receiver answered 2xx, else what went wrong."""
        assert self._session is not None
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Casd-Event": kind,
            "X-Casd-Delivery": str(event_id),
            "X-Casd-Timestamp": timestamp,
        }
        if self.settings.hook_secret:
            headers["X-Casd-Signature"] = sign(self.settings.hook_secret, timestamp, body)
        try:
            async with self._session.post(url, data=body, headers=headers) as r:
                await r.read()
                return None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__ if not str(exc) else str(exc)

    # ---- pre-handshake ----------------------------------------------------------------

    async def check_handshake(self, request: web.Request, m: Manifest) -> None:
        """Ask --hook-pre-handshake; raise Forbidden on a non-2xx answer, Unavailable when
        it does not answer."""
        url = self.settings.hook_pre_handshake
        if url is None:
            return
        assert self._session is not None
        algo = m.digest.algo.value
        summary = {
            "algo": algo,
            algo: m.digest.hex,
            "digest": m.digest.hex,
            "size": m.size,
            "name": m.name,
            "ext": m.ext,
            "chunks": len(m.chunks),
        }
        headers = {}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with self._session.post(url, json=summary, headers=headers) as r:
                text = (await r.content.read(64 * 1024)).decode("utf-8", "replace")
                status = r.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("pre-handshake hook %s did not answer: %s", url, exc or type(exc).__name__)
            raise Unavailable("the upload policy service did not answer; try again later") from None
        if 200 <= status < 300:
            return
        raise Forbidden(_refusal(text, status))


def _refusal(text: str, status: int) -> str:
    """The receiver's message: its JSON `message` (or `error`), else its text, bounded."""
    message = text
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            message = str(data.get("message") or data.get("error") or text)
    except ValueError:
        pass
    message = " ".join(message.split())[:MESSAGE_MAX]
    return message or f"the upload was refused (policy answered HTTP {status})"


def _file_fields(entry: FileEntry) -> dict:
    algo = entry.digest.algo.value
    return {
        "algo": algo,
        algo: entry.digest.hex,
        "digest": entry.digest.hex,
        "size": entry.size,
        "name": entry.name,
        "ext": entry.ext,
        "url": protocol.file_url(entry.digest, entry.ext),
    }


HOOKS = web.AppKey("hooks", Hooks)


def install(app: web.Application, settings_key, service_key, metrics_key) -> None:
    """Start the delivery loops once the service is open; stop them before it closes."""

    async def hooks_ctx(app: web.Application):
        hooks = app[HOOKS] = Hooks(app[settings_key], app[service_key].catalog, app[metrics_key])
        await hooks.start()
        yield
        await hooks.close()

    app.cleanup_ctx.append(hooks_ctx)
