"""GET /metrics: Prometheus text, per-app registry, route templates, dedup bytes, protection."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from casd.web import create_app
from helpers import prepare, rand, upload

CHUNK = 64 * 1024


def samples(text: str) -> dict[tuple, float]:
    """(name, sorted label items) -> value, from the exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client, **headers) -> str:
    r = await client.get("/metrics", headers=headers)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain")
    return await r.text()


async def test_upload_counts_bytes_chunks_dedup_and_routes(client):
    p = prepare(rand(3 * CHUNK + 100, seed=1), CHUNK)
    await upload(client, "", p)
    text = await scrape(client)
    assert value(text, "casd_chunks_stored_total") == 4
    assert value(text, "casd_uploads_total", event="started") == 1
    assert value(text, "casd_uploads_total", event="completed") == 1
    # Chunk bodies plus the handshake body were read.
    assert value(text, "casd_received_bytes_total") > len(p.data)
    assert value(text, "casd_dedup_skipped_bytes_total") == 0
    chunk_route = "/v1/uploads/{upload_id}/chunks/{digest}"
    assert value(text, "casd_requests_total", route=chunk_route, method="PUT", status="201") == 4
    # The route template, never the raw path: no label holds a digest or an upload id.
    assert p.order[0] not in text
    assert value(text, "casd_request_duration_seconds_count", operation="chunk_put") == 4
    assert value(text, "casd_request_duration_seconds_count", operation="merge") == 1
    assert value(text, "casd_catalog_commit_duration_seconds_count") >= 1
    assert value(text, "casd_disk_free_bytes") > 0
    assert "casd_catalog_write_queue_depth" in text
    assert "casd_requests_in_flight" in text

    # The same file again: answered complete, every byte skipped.
    r = await client.post("/v1/handshake", json=p.handshake)
    assert (await r.json())["status"] == "complete"
    # A second file sharing all but its last chunk: only that chunk is missing.
    q = prepare(p.data[: 3 * CHUNK] + b"other tail", CHUNK)
    r = await client.post("/v1/handshake", json=q.handshake)
    body = await r.json()
    assert len(body["missing"]) == 1
    text = await scrape(client)
    assert value(text, "casd_dedup_skipped_bytes_total") == len(p.data) + 3 * CHUNK

    r = await client.get(f"/v1/files/{p.digest}")
    assert await r.read() == p.data
    r = await client.get(f"/v1/files/{p.digest}", headers={"Range": "bytes=0-9"})
    assert r.status == 206
    await r.read()
    # A download is counted when its handler returns, which on a loaded machine can be just
    # after the client has read the last byte: scrape again until it is (a few times at most).
    for _ in range(50):
        text = await scrape(client)
        if value(text, "casd_served_bytes_total") >= len(p.data) + 10:
            break
        await asyncio.sleep(0.02)
    assert value(text, "casd_served_bytes_total") == len(p.data) + 10
    assert value(text, "casd_request_duration_seconds_count", operation="download") == 2


async def test_merge_mismatch_abort_and_unmatched_routes(client):
    p = prepare(rand(2 * CHUNK, seed=2), CHUNK)
    hs = dict(p.handshake, md5="0" * 32)
    r = await client.post("/v1/handshake", json=hs)
    upload_id = (await r.json())["upload_id"]
    for d in p.order:
        await client.put(f"/v1/uploads/{upload_id}/chunks/{d}", data=p.chunks[d])
    r = await client.post(f"/v1/uploads/{upload_id}/merge")
    assert r.status == 422
    q = prepare(rand(CHUNK, seed=3), CHUNK)
    r = await client.post("/v1/handshake", json=q.handshake)
    r = await client.delete(f"/v1/uploads/{(await r.json())['upload_id']}")
    assert r.status == 204
    for i in range(3):
        assert (await client.get(f"/no/such/{i}")).status == 404
    text = await scrape(client)
    assert value(text, "casd_merge_digest_mismatches_total") == 1
    assert value(text, "casd_uploads_total", event="aborted") == 1
    assert value(text, "casd_requests_total", route="unmatched", method="GET", status="404") == 3


async def test_in_flight_counts_a_request_being_received(client):
    p = prepare(rand(CHUNK, seed=6), CHUNK)
    upload_id = (await (await client.post("/v1/handshake", json=p.handshake)).json())["upload_id"]
    half_sent, finish = asyncio.Event(), asyncio.Event()

    async def body():
        yield p.chunks[p.order[0]][:100]
        half_sent.set()
        await finish.wait()
        yield p.chunks[p.order[0]][100:]

    put = asyncio.create_task(
        client.put(
            f"/v1/uploads/{upload_id}/chunks/{p.order[0]}",
            data=body(),
            headers={"Content-Length": str(CHUNK)},
        )
    )
    await half_sent.wait()
    # The scrape itself is in flight too.
    for _ in range(200):
        if value(await scrape(client), "casd_requests_in_flight") == 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the held PUT never showed as in flight")
    finish.set()
    assert (await put).status == 201
    assert value(await scrape(client), "casd_requests_in_flight") == 1


async def test_each_app_has_its_own_registry(aiohttp_client, tmp_path, settings):
    a = await aiohttp_client(create_app(settings))
    b = await aiohttp_client(create_app(dataclasses.replace(settings, data_dir=tmp_path / "b")))
    await upload(a, "", prepare(rand(CHUNK, seed=4), CHUNK))
    assert value(await scrape(a), "casd_chunks_stored_total") == 1
    assert value(await scrape(b), "casd_chunks_stored_total") == 0


@pytest.mark.parametrize(
    "changes, good, bad",
    [
        ({"metrics_token": "m-secret"}, "m-secret", "wrong"),
        ({"token": "api-secret"}, "api-secret", "wrong"),
        ({"token": "api-secret", "metrics_token": "m-secret"}, "m-secret", "api-secret"),
    ],
)
async def test_metrics_token(aiohttp_client, settings, changes, good, bad):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, **changes)))
    r = await client.get("/metrics")
    assert r.status == 401
    assert (await r.json())["error"] == "unauthorized"
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {bad}"})
    assert r.status == 401
    await scrape(client, Authorization=f"Bearer {good}")


def test_real_daemon_serves_metrics(daemon):
    with urllib.request.urlopen(f"{daemon.url}/healthz") as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{daemon.url}/metrics") as r:
        text = r.read().decode()
    assert re.search(r'casd_requests_total\{method="GET",route="/healthz",status="200"\} 1', text)
