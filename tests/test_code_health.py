"""The shape of the code: the layering arrows of STYLE.md, error mapping along the class
hierarchy, Settings checked when built, states as types, seeded random test data."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from casd.cli import main
from casd.config import Settings
from casd.digest import Algo, Digest
from casd.errors import CasdError, NotFound, StorageFull
from casd.models import (
    ChunkRef,
    ChunkState,
    FsckKind,
    HandshakeComplete,
    HandshakePending,
    Manifest,
    UploadState,
)
from casd.web import SERVICE, create_app, mapped_error
from helpers import casd_serve_run, prepare, rand, upload

CASD = Path(__file__).resolve().parent.parent / "casd"

# ---- layering ---------------------------------------------------------------------------

LEAVES = {
    "casd.chunking",
    "casd.config",
    "casd.digest",
    "casd.errors",
    "casd.models",
    "casd.protocol",
    "casd.tenants",
}
# The modules that may use aiohttp's server side: web.py and its plumbing, and `casd serve`.
SERVER_SIDE = {
    "casd.web",
    "casd.web_guard",
    "casd.server",
    "casd.observe",
    "casd.metrics",
    "casd.hooks",
    "casd.openapi",
    "casd.cli_serve",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(CASD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CASD.rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports; `from m import n` also counts as m.n (n may be a module),
    except for casd's own where only real modules count."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES or not _within(node.module, "casd"):
                    out.add(full)
    return out


def _ours(path: Path) -> set[str]:
    # The bare package (`from casd import protocol`) runs only casd/__init__.py: no arrow.
    return {m for m in _imports(path) if m.startswith("casd.")}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_layering_test_sees_every_module():
    assert MODULES.keys() >= LEAVES
    assert {"casd.service", "casd.web", "casd.gc", "casd.fsck", "casd.client"} <= MODULES.keys()


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_only_leaves(leaf):
    assert _ours(MODULES[leaf]) <= LEAVES, f"{leaf} imports more than leaves"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_no_aiohttp(leaf):
    # Domain errors carry no HTTP; the client can use the leaves without a server.
    assert not {m for m in _imports(MODULES[leaf]) if _within(m, "aiohttp")}


@pytest.mark.parametrize(
    "engine, other", [("casd.catalog", "casd.blobstore"), ("casd.blobstore", "casd.catalog")]
)
def test_storage_engines_import_only_leaves_and_never_each_other(engine, other):
    for name, path in MODULES.items():
        if _within(name, engine):
            wrong = {m for m in _ours(path) if m not in LEAVES and not _within(m, engine)}
            assert not wrong, f"{name} imports {wrong}"


def test_the_client_needs_none_of_the_server():
    for name, path in MODULES.items():
        if _within(name, "casd.client"):
            wrong = {m for m in _ours(path) if m not in LEAVES and not _within(m, "casd.client")}
            assert not wrong, f"{name} imports {wrong}"


def test_aiohttp_server_side_only_in_web_and_its_plumbing():
    for name, path in MODULES.items():
        if name in SERVER_SIDE:
            continue
        server = {
            m
            for m in _imports(path)
            if _within(m, "aiohttp.web") or m.startswith(("aiohttp.web_", "aiohttp.http_parser"))
        }
        assert not server, f"{name} imports aiohttp's server side: {server}"


def test_service_and_maintenance_never_import_web_or_cli():
    for name in ("casd.service", "casd.maintenance", "casd.gc", "casd.fsck"):
        wrong = {
            m
            for m in _ours(MODULES[name])
            if m.startswith(("casd.web", "casd.cli", "casd.server", "casd.client"))
        }
        assert not wrong, f"{name} imports {wrong}"


# ---- what each command imports ----------------------------------------------------------

_MODULES_AFTER = """
import json, sys
from casd.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "casd"))))
"""


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["stats"], {"aiohttp", "casd.client", "casd.web", "casd.cli_transfer"}),
        (["upload", "--help"], {"casd.web", "casd.server", "casd.maintenance", "casd.cli_admin"}),
        (["serve", "--check-config"], {"casd.client", "casd.web", "casd.cli_transfer"}),
    ],
)
def test_a_command_imports_only_what_it_runs(tmp_path, argv, absent):
    """A `casd` process imports the modules its command runs on: an admin command starts
    without aiohttp, in a third of the CPU time (tests and scripts start hundreds)."""
    r = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *argv, "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CASD.parent,
        check=False,
    )
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    assert f"casd.cli_{'transfer' if argv[0] == 'upload' else 'admin'}" in loaded, r.stderr
    assert not absent & loaded


# ---- errors along the class hierarchy ----------------------------------------------------


class _GoneAgain(NotFound):
    """A subclass no one put in ERROR_MAP."""


class _Unmapped(CasdError):
    pass


def test_mapped_error_walks_the_class_hierarchy():
    assert mapped_error(_GoneAgain("x")) == (404, "not_found")
    assert mapped_error(StorageFull("x")) == (507, "insufficient_storage")
    assert mapped_error(_Unmapped("x")) is None


async def test_a_subclass_of_a_domain_error_gets_its_parents_answer(aiohttp_client, settings):
    app = create_app(settings)

    async def gone(request):
        raise _GoneAgain("no such thing", extra_field=1)

    async def unmapped(request):
        raise _Unmapped("a secret detail")

    app.router.add_get("/v1/test-gone", gone)
    app.router.add_get("/v1/test-unmapped", unmapped)
    client = await aiohttp_client(app)
    r = await client.get("/v1/test-gone")
    assert r.status == 404
    assert await r.json() == {"error": "not_found", "message": "no such thing", "extra_field": 1}
    # A domain error nothing maps is a bug: a 500 in the one shape, no detail leaked.
    r = await client.get("/v1/test-unmapped")
    body = await r.json()
    assert r.status == 500 and body["error"] == "internal_error"
    assert "secret" not in body["message"]


# ---- Settings are checked when built -----------------------------------------------------


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"port": 65536}, "port"),
        ({"port": -1}, "port"),
        ({"host": ""}, "host"),
        ({"max_chunk_size": 0}, "max_chunk_size"),
        ({"io_workers": 0}, "io_workers"),
        ({"max_chunks": 2.5}, "max_chunks"),
        ({"read_connections": True}, "read_connections"),
        ({"max_pending_chunks": 10}, "max_pending_chunks_per_client cannot exceed"),
        ({"reserve_bytes": -1}, "reserve_bytes"),
        ({"upload_ttl": 0}, "upload_ttl"),
        ({"hook_timeout": math.inf}, "hook_timeout"),
        ({"body_timeout": -1.0}, "body_timeout"),
        ({"header_timeout": math.nan}, "header_timeout"),
        ({"sqlite_synchronous": "SOMETIMES"}, "sqlite_synchronous"),
        ({"algos": ()}, "algos"),
        ({"algos": ("md5", "crc32")}, "algos"),
    ],
)
def test_settings_refuse_values_out_of_range(changes, words):
    with pytest.raises(ValueError, match=words):
        Settings(**changes)


def test_settings_take_the_edges_of_their_ranges(tmp_path):
    s = Settings(
        data_dir=tmp_path,
        port=0,
        reserve_bytes=0,
        header_timeout=0,
        body_timeout=0,
        keepalive_timeout=0,
        shutdown_timeout=0,
        max_pending_chunks=5,
        max_pending_chunks_per_client=5,
        algos=("sha256",),
    )
    assert s.max_pending_chunks_per_client == s.max_pending_chunks == 5
    with pytest.raises(ValueError, match="max_pending_chunks_per_client"):
        dataclasses.replace(s, max_pending_chunks_per_client=6)


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["--max-pending-chunks", "10"],
            "--max-pending-chunks-per-client cannot exceed --max-pending-chunks",
        ),
        (["--io-workers", "0"], "--io-workers must be"),
        (["--max-handshake-size", "0"], "--max-handshake-size must be"),
        (["--port", "70000"], "--port"),
        (["--upload-ttl", "0"], "--upload-ttl must be"),
    ],
)
def test_serve_names_the_flag_of_a_bad_setting(tmp_path, capsys, argv, words):
    code = main(["serve", "--check-config", "--data", str(tmp_path / "d"), *argv])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("casd serve: ")


def test_a_bad_setting_is_one_line_from_the_real_command(tmp_path):
    proc = casd_serve_run("--max-pending-chunks", "10", data=tmp_path / "d", fork=False)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [
        "casd serve: --max-pending-chunks-per-client cannot exceed --max-pending-chunks"
    ]
    assert not (tmp_path / "d").exists()  # refused before anything was made


# ---- states as types ---------------------------------------------------------------------


def _manifest(data: bytes) -> Manifest:
    h = hashlib.md5(data).hexdigest()
    return Manifest(Digest(Algo.MD5, h), len(data), (ChunkRef(h, len(data)),))


async def test_handshake_results_are_complete_or_pending(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    service = client.app[SERVICE]
    data = rand(1000)
    first = await service.handshake(_manifest(data))
    assert isinstance(first, HandshakePending)
    assert first.missing == [hashlib.md5(data).hexdigest()] and len(first.upload_id) == 32
    done = await upload(client.session, str(client.make_url("")).rstrip("/"), prepare(data))
    assert done["status"] == "complete"
    again = await service.handshake(_manifest(data))
    assert isinstance(again, HandshakeComplete)
    assert not hasattr(again, "upload_id")  # a complete answer has no upload to speak of
    with pytest.raises(dataclasses.FrozenInstanceError):
        again.size = 1  # type: ignore[misc]  # frozen on purpose: the test checks it


async def test_state_enums_are_what_the_catalogue_stores(aiohttp_client, settings):
    client = await aiohttp_client(create_app(settings))
    await upload(client.session, str(client.make_url("")).rstrip("/"), prepare(rand(1000)))
    con = sqlite3.connect(settings.catalog_path)
    try:
        [(upload_state,)] = con.execute("SELECT state FROM uploads").fetchall()
        [(chunk_state,)] = con.execute("SELECT state FROM chunks").fetchall()
    finally:
        con.close()
    assert UploadState(upload_state) is UploadState.MERGED
    assert ChunkState(chunk_state) is ChunkState.LIVE


def test_fsck_kinds_keep_their_json_names():
    assert {k.value for k in FsckKind} == {
        "missing_blob",
        "wrong_size",
        "corrupt",
        "orphan_file",
        "orphan_row",
        "temp_file",
    }
    assert str(FsckKind.CORRUPT) == f"{FsckKind.CORRUPT}" == "corrupt"


# ---- seeded random test data -------------------------------------------------------------


def test_rand_draws_the_tests_seeded_stream(request, capsys):
    first, second = rand(64), rand(64)
    assert first != second
    same = helpers.RandomData(helpers.TEST_SEED, request.node.nodeid)
    assert [first, second] == [same.bytes(64, "draw-0"), same.bytes(64, "draw-1")]
    assert f"CASD_TEST_SEED={helpers.TEST_SEED}" in capsys.readouterr().out


def test_test_modules_import_the_helpers_the_seeding_reaches():
    """conftest.py seeds `helpers.current` for each test; a module that imports
    `tests.helpers` gets a second copy whose rand() the seeding never reaches (its bytes
    then depend on the tests run before it, and CASD_TEST_SEED does not reproduce them)."""

    def of_tests(module: str | None) -> bool:
        return module == "tests" or (module or "").startswith("tests.")

    wrong = []
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                modules = [node.module] if isinstance(node, ast.ImportFrom) else []
            if any(map(of_tests, modules)):
                wrong.append(f"{path.name}:{node.lineno}")
    assert wrong == []
