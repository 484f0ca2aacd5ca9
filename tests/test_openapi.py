"""GET /v1/openapi.json: the protocol as OpenAPI 3.1, in step with the routes, fuzzed live."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess

import pytest

from casd.openapi import document
from casd.web import create_app


def _shape(path: str) -> str:
    """A path template with its parameter names erased: /v1/files/{name} -> /v1/files/{}."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def app_routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        out.add((_shape(path), route.method.lower()))
    return out


def doc_routes() -> set[tuple[str, str]]:
    return {(_shape(p), m) for p, ops in document()["paths"].items() for m in ops}


def test_every_route_is_documented_and_every_documented_route_exists(settings, tmp_path):
    # Tenant mode has every route; without tenants, all but the tenant's file list.
    (tmp_path / "tokens").write_text("")
    tenant_app = create_app(dataclasses.replace(settings, tokens=tmp_path / "tokens"))
    routes = app_routes(tenant_app)
    assert app_routes(create_app(settings)) == routes - {
        ("/v1/files", "get"),
        ("/v1/files", "head"),
    }
    documented = doc_routes()
    # aiohttp adds HEAD beside every GET; the document lists HEAD where it is part of the
    # protocol (downloads), and every HEAD it lists must exist.
    routes = {r for r in routes if r[1] != "head"} | {r for r in documented if r[1] == "head"}
    assert not routes - documented, f"routes missing from casd/openapi.py: {routes - documented}"
    assert not documented - routes, f"documented routes the app lacks: {documented - routes}"
    assert {r for r in documented if r[1] == "head"} <= app_routes(tenant_app)


async def test_served_document(aiohttp_client, settings, tmp_path):
    client = await aiohttp_client(create_app(settings))
    r = await client.get("/v1/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    body = await r.json()
    # Without tenants, all but what only tenant mode has; in tenant mode, all of it.
    whole = document()
    assert body == {**whole, "paths": {p: o for p, o in whole["paths"].items() if p != "/v1/files"}}
    (tmp_path / "tokens").write_text(
        f"sha256:{hashlib.sha256(b't').hexdigest()} tenant=a role=read"
    )
    tenants = await aiohttp_client(
        create_app(dataclasses.replace(settings, tokens=tmp_path / "tokens"))
    )
    r = await tenants.get("/v1/openapi.json", headers={"Authorization": "Bearer t"})
    assert await r.json() == whole
    assert body["openapi"].startswith("3.1")
    # The error shape is open: no enum fixes the codes, so new ones fit.
    error = body["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"] and "enum" not in error["properties"]["error"]


def test_schema_is_valid_openapi():
    import schemathesis

    schema = schemathesis.openapi.from_dict(document())
    assert len(list(schema.get_all_operations())) == sum(
        len(v) for v in document()["paths"].values()
    )


async def test_static_miss_is_a_json_404(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    for path in ("/static/nope.js", "/static/../casd/web.py", "/static/%2e%2e/web.py"):
        r = await client.get(path)
        assert r.status == 404, path
        assert (await r.json())["error"] == "not_found"
    r = await client.get("/static/casd.js")
    assert r.status == 200 and "javascript" in r.content_type


@pytest.mark.slow
def test_schemathesis_against_a_live_daemon(daemon, tmp_path):
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    r = subprocess.run(
        [
            st,
            "run",
            f"{daemon.url}/v1/openapi.json",
            "--max-examples",
            "10",
            "--max-time",
            "25",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-6000:]
    assert "Traceback" not in daemon.log()
    # The links took real upload ids from handshakes to the upload's operations.
    lines = [json.loads(x) for x in daemon.log().split("\n") if x.startswith('{"')]
    pending = {
        x["upload_id"] for x in lines if x.get("route") == "/v1/handshake" and x.get("upload_id")
    }
    followed = {
        x.get("upload_id")
        for x in lines
        if x.get("route", "").startswith("/v1/uploads/{upload_id}")
    }
    assert pending & followed
