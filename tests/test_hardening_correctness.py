"""Issue 15, items 7, 10, 11 (two cases) and 13: races and answers a hostile client can drive.

- A download's ETag and bytes come from manifests of that digest, read a page at a time;
  manifest ids are never reused.
- Abort and merge of one upload are decided once.
- A non-UTF-8 bearer token is a wrong token (401), a suffix range of an empty file is 416.
- Error answers do not disclose a stored chunk's size, an assembled file's real digest, or
  (on the tokenless /healthz) a path or SQLite's words.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3

import aiohttp
import pytest

import casd.catalog.sqlite
from casd.catalog.sqlite import GroupWriter, SqliteCatalog
from casd.web import create_app
from helpers import prepare, rand, upload

CHUNK = 64 * 1024
WAIT = 30  # seconds: a bound on every wait for a held request, never a sleep


async def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, (await resp.read())[:500]
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["error"] == code and isinstance(body["message"], str)
    return body


async def handshake(client, hs: dict) -> dict:
    r = await client.post("/v1/handshake", json=hs)
    assert r.status == 200, await r.text()
    return await r.json()


async def put_all(client, hs: dict, p) -> None:
    for d in hs["missing"]:
        r = await client.put(f"/v1/uploads/{hs['upload_id']}/chunks/{d}", data=p.chunks[d])
        assert r.status in (200, 201), await r.text()


class Gate:
    """Holds the first call that passes while armed, until released; bounded waits only.

    `armed` is False, True, or a string that must be part of the call's SQL (reads) or of the
    write's function name (writes): a chunk PUT's background hashing also reads the catalogue,
    and the string keeps the gate for the request under test.
    """

    def __init__(self):
        self.armed: bool | str = False
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def passing(self, sql: str = "") -> None:
        if self.armed is True or (isinstance(self.armed, str) and self.armed in sql):
            self.armed = False
            self.reached.set()
            await asyncio.wait_for(self.release.wait(), WAIT)

    async def hold(self, task: asyncio.Task) -> None:
        """Wait until `task` is held here (or has finished without passing)."""
        reached = asyncio.create_task(self.reached.wait())
        await asyncio.wait({reached, task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        reached.cancel()
        self.armed = False


@pytest.fixture
def read_gate(monkeypatch) -> Gate:
    """Holds a request right after a catalogue read (armed)."""
    gate = Gate()
    orig_one, orig_all = SqliteCatalog._one, SqliteCatalog._all

    async def one(self, sql, params=()):
        row = await orig_one(self, sql, params)
        await gate.passing(sql)
        return row

    async def all_(self, sql, params=()):
        rows = await orig_all(self, sql, params)
        await gate.passing(sql)
        return rows

    monkeypatch.setattr(SqliteCatalog, "_one", one)
    monkeypatch.setattr(SqliteCatalog, "_all", all_)
    return gate


@pytest.fixture
def write_gate(monkeypatch) -> Gate:
    """Holds a request just before a catalogue write (armed: part of the write's name)."""
    gate = Gate()
    orig = GroupWriter.run

    async def run(self, fn, *args):
        await gate.passing(fn.__name__)
        return await orig(self, fn, *args)

    monkeypatch.setattr(GroupWriter, "run", run)
    return gate


# ---- item 7: the bytes under an ETag -------------------------------------------------------


@pytest.mark.parametrize("meanwhile", ["other_file", "same_file_rechunked"])
async def test_download_racing_delete_and_new_upload_never_serves_other_bytes(
    client, read_gate, meanwhile
):
    a = prepare(rand(3 * CHUNK, seed=1), CHUNK)
    if meanwhile == "other_file":
        b = prepare(rand(3 * CHUNK, seed=2), CHUNK)  # same size and shape: a reused id fits
    else:
        b = prepare(a.data, CHUNK // 2)  # a's bytes again, in other chunks
    # b's chunks are already stored (from an upload aborted earlier), so a new handshake of
    # b makes a manifest at once.
    hs = await handshake(client, b.handshake)
    await put_all(client, hs, b)
    assert (await client.delete(f"/v1/uploads/{hs['upload_id']}")).status == 204
    await upload(client, "", a)

    read_gate.armed = "files"
    download = asyncio.create_task(client.get(f"/v1/files/{a.digest}"))
    await read_gate.hold(download)
    assert read_gate.reached.is_set()
    # The download has read a's file row; now a is deleted and b handshaken (and merged).
    assert (await client.delete(f"/v1/files/{a.digest}")).status == 204
    again = await handshake(client, b.handshake)
    assert again["status"] == "pending" and again["missing"] == []
    if meanwhile == "same_file_rechunked":
        assert (await client.post(f"/v1/uploads/{again['upload_id']}/merge")).status == 200
    read_gate.release.set()
    r = await asyncio.wait_for(download, WAIT)
    if meanwhile == "same_file_rechunked":
        assert r.status == 200  # it looked again and found the file as it is now
    if r.status == 200:
        body = await r.read()
        assert r.headers["ETag"] == f'"{a.digest}"' and len(body) == len(a.data)
        assert hashlib.md5(body).hexdigest() == a.digest
    else:
        await assert_error(r, 404, "not_found")


@pytest.mark.parametrize("meanwhile", ["deleted", "same_file_rechunked"])
async def test_a_download_whose_manifest_is_dropped_midway_goes_on_or_is_cut_off(
    client, monkeypatch, meanwhile
):
    """A download reads its manifest a page at a time. The file is deleted (its manifest
    dropped) after the first page: with the same bytes registered again in other chunks the
    download goes on through the new manifest; with no such file it is cut off short of its
    Content-Length, never padded with other bytes."""
    monkeypatch.setattr("casd.service.DOWNLOAD_PAGE", 2)
    gate = Gate()
    orig = SqliteCatalog.manifest_page

    async def page(self, manifest_id, start, limit):
        if start > 0:
            await gate.passing()
        return await orig(self, manifest_id, start, limit)

    monkeypatch.setattr(SqliteCatalog, "manifest_page", page)
    a = prepare(rand(6 * CHUNK, seed=7), CHUNK)
    await upload(client, "", a)
    gate.armed = True
    r = await client.get(f"/v1/files/{a.digest}")
    assert r.status == 200 and r.content_length == len(a.data)
    reading = asyncio.create_task(r.read())
    await gate.hold(reading)
    assert gate.reached.is_set()  # the download is between its first and second page
    assert (await client.delete(f"/v1/files/{a.digest}")).status == 204
    if meanwhile == "same_file_rechunked":
        done = await upload(client, "", prepare(a.data, CHUNK // 2))
        assert done["status"] == "complete"
    gate.release.set()
    if meanwhile == "same_file_rechunked":
        body = await asyncio.wait_for(reading, WAIT)
        assert body == a.data
    else:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(reading, WAIT)


async def test_the_newest_manifest_id_is_not_given_again(client, settings):
    a = prepare(rand(2 * CHUNK), CHUNK)
    b = prepare(rand(2 * CHUNK), CHUNK)
    await upload(client, "", a)
    ids = manifest_ids(settings.data_dir)
    assert (await client.delete(f"/v1/files/{a.digest}")).status == 204
    assert manifest_ids(settings.data_dir) == []
    await handshake(client, b.handshake)
    assert manifest_ids(settings.data_dir)[0] > max(ids)


def manifest_ids(data_dir) -> list[int]:
    con = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        return [r[0] for r in con.execute("SELECT id FROM manifests ORDER BY id")]
    finally:
        con.close()


async def test_a_version_1_catalogue_with_data_is_migrated(aiohttp_client, settings, monkeypatch):
    old = await aiohttp_client(create_app(settings))
    files = [prepare(rand(3 * CHUNK + i), CHUNK, name=f"f{i}.bin") for i in range(3)]
    for p in files:
        await upload(old, "", p)
    pending = prepare(rand(2 * CHUNK), CHUNK)
    hs = await handshake(old, pending.handshake)
    await old.close()
    downgrade_to_version_1(settings.data_dir)
    before = table_rows(settings.data_dir)

    client = await aiohttp_client(create_app(settings))
    after = table_rows(settings.data_dir)
    assert after == before  # every row kept, ids included
    con = sqlite3.connect(settings.data_dir / "catalog.sqlite")
    try:
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        versions = [r[0] for r in con.execute("SELECT version FROM schema_migrations")]
        assert versions == sorted(v for v, _n, _s in casd.catalog.sqlite._migrations())
    finally:
        con.close()
    for p in files:
        r = await client.get(f"/v1/files/{p.digest}")
        assert r.status == 200 and await r.read() == p.data
    status = await (await client.get(f"/v1/uploads/{hs['upload_id']}")).json()
    assert status["missing"] == pending.order
    # Deleting a file still cascades to its chunk list, and the newest id is not reused.
    newest = max(manifest_ids(settings.data_dir))
    assert (await client.delete(f"/v1/uploads/{hs['upload_id']}")).status == 204
    assert newest not in manifest_ids(settings.data_dir)
    assert (await client.delete(f"/v1/files/{files[0].digest}")).status == 204
    fresh = prepare(rand(CHUNK), CHUNK)
    await handshake(client, fresh.handshake)
    assert max(manifest_ids(settings.data_dir)) > newest
    con = sqlite3.connect(settings.data_dir / "catalog.sqlite")
    try:
        orphans = sum(
            con.execute(
                f"SELECT count(*) FROM {table} mc WHERE NOT EXISTS"
                " (SELECT 1 FROM manifests m WHERE m.id = mc.manifest_id)"
            ).fetchone()[0]
            for table in ("manifest_parts", "manifest_digests")
        )
    finally:
        con.close()
    assert orphans == 0


def version_1_columns() -> dict[str, list[str]]:
    """The columns each table had in version 1 of the schema."""
    _version, _name, script = casd.catalog.sqlite._migrations()[0]
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(script)
        return {
            t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")]
            for t in ("manifests", "manifest_chunks", "uploads", "files", "chunks")
        }
    finally:
        con.close()


def version_1_rows(con: sqlite3.Connection, table: str, cols: list[str]) -> list:
    """The rows of a version-1 table; manifest_chunks, gone since version 6, from the packed
    lists that replaced it (manifest_id, seq, digest, size)."""
    if (
        table == "manifest_chunks"
        and not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'manifest_chunks'").fetchone()
    ):
        assert cols == ["manifest_id", "seq", "digest", "size"], cols
        out = []
        for (mid,) in con.execute("SELECT id FROM manifests").fetchall():
            listed = casd.catalog.sqlite._manifest_chunks_sync(con, mid)
            out += [(mid, seq, d, size) for seq, (d, size) in enumerate(listed)]
        return out
    return con.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()


def downgrade_to_version_1(data_dir) -> None:
    """Rewrite the catalogue as version 1 of the schema held it: the same rows, its columns."""
    path = data_dir / "catalog.sqlite"
    columns = version_1_columns()
    con = sqlite3.connect(path)
    try:
        rows = {t: version_1_rows(con, t, cols) for t, cols in columns.items()}
    finally:
        con.close()
    for suffix in ("", "-wal", "-shm"):
        (data_dir / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    version, name, script = casd.catalog.sqlite._migrations()[0]
    con = sqlite3.connect(path)
    try:
        con.executescript(script)
        con.execute(
            "CREATE TABLE schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
        )
        con.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
        for t, cols in columns.items():
            marks = ", ".join("?" * len(cols))
            con.executemany(f"INSERT INTO {t} ({', '.join(cols)}) VALUES ({marks})", rows[t])
        con.commit()
    finally:
        con.close()


def table_rows(data_dir) -> dict:
    """Every row of every version-1 table, by its version-1 columns."""
    con = sqlite3.connect(data_dir / "catalog.sqlite")
    try:
        return {t: sorted(version_1_rows(con, t, cols)) for t, cols in version_1_columns().items()}
    finally:
        con.close()


# ---- item 10: abort racing merge -----------------------------------------------------------


async def ready_upload(client, size: int = 3 * CHUNK):
    p = prepare(rand(size), CHUNK)
    hs = await handshake(client, p.handshake)
    await put_all(client, hs, p)
    return p, hs["upload_id"]


async def test_abort_held_before_its_write_loses_to_a_merge(client, write_gate):
    p, uid = await ready_upload(client)
    write_gate.armed = "drop"
    abort = asyncio.create_task(client.delete(f"/v1/uploads/{uid}"))
    await write_gate.hold(abort)
    assert write_gate.reached.is_set()
    merged = await client.post(f"/v1/uploads/{uid}/merge")
    assert merged.status == 200, await merged.text()
    first = await merged.json()
    write_gate.release.set()
    await assert_error(await asyncio.wait_for(abort, WAIT), 404, "not_found")
    again = await client.post(f"/v1/uploads/{uid}/merge")
    assert again.status == 200 and await again.json() == first
    r = await client.get(f"/v1/files/{p.digest}")
    assert r.status == 200 and await r.read() == p.data
    assert (await handshake(client, p.handshake))["status"] == "complete"


async def test_merge_held_before_registering_loses_to_an_abort(client, write_gate):
    p, uid = await ready_upload(client)
    write_gate.armed = "register"
    merge = asyncio.create_task(client.post(f"/v1/uploads/{uid}/merge"))
    await write_gate.hold(merge)  # hashed, about to register
    assert write_gate.reached.is_set()
    assert (await client.delete(f"/v1/uploads/{uid}")).status == 204
    write_gate.release.set()
    await assert_error(await asyncio.wait_for(merge, WAIT), 404, "not_found")
    await assert_error(await client.post(f"/v1/uploads/{uid}/merge"), 404, "not_found")
    await assert_error(await client.get(f"/v1/files/{p.digest}"), 404, "not_found")
    assert (await handshake(client, p.handshake))["status"] == "pending"


async def test_merge_that_read_a_pending_upload_then_lost_it_to_an_abort_is_404(client, read_gate):
    p, uid = await ready_upload(client)
    read_gate.armed = "FROM uploads"
    merge = asyncio.create_task(client.post(f"/v1/uploads/{uid}/merge"))
    await read_gate.hold(merge)  # it has seen the upload pending, nothing more
    assert read_gate.reached.is_set()
    assert (await client.delete(f"/v1/uploads/{uid}")).status == 204
    read_gate.release.set()
    # Its manifest went with the abort: not a file digest mismatch, just no such upload.
    await assert_error(await asyncio.wait_for(merge, WAIT), 404, "not_found")
    await assert_error(await client.get(f"/v1/files/{p.digest}"), 404, "not_found")


async def test_abort_and_merge_race_through_the_daemon(daemon):
    async with aiohttp.ClientSession() as s:
        base = daemon.url

        async def one(i: int) -> tuple[int, int]:
            p = prepare(rand(2 * CHUNK + i), CHUNK)
            async with s.post(f"{base}/v1/handshake", json=p.handshake) as r:
                hs = await r.json()
            uid = hs["upload_id"]
            for d in hs["missing"]:
                async with s.put(f"{base}/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d]) as r:
                    assert r.status == 201

            async def abort_after(delay: float):
                # Only spreads the interleavings (abort first, mid-merge, after); the checks
                # below hold for every one of them.
                await asyncio.sleep(delay)
                return await s.delete(f"{base}/v1/uploads/{uid}")

            merge, abort = await asyncio.gather(
                s.post(f"{base}/v1/uploads/{uid}/merge"), abort_after((i % 6) * 0.004)
            )
            outcome = (merge.status, abort.status)
            merge.release()
            abort.release()
            async with (
                s.post(f"{base}/v1/uploads/{uid}/merge") as again,
                s.get(f"{base}/v1/files/{p.digest}") as got,
            ):
                if outcome == (200, 404):
                    assert again.status == 200
                    assert got.status == 200 and await got.read() == p.data
                else:
                    assert outcome == (404, 204), outcome
                    assert again.status == 404 and got.status == 404
            return outcome

        outcomes = []
        for _round in range(4):
            outcomes += await asyncio.gather(*(one(i) for i in range(12)))
    assert set(outcomes) <= {(200, 404), (404, 204)}
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/healthz") as r:
        assert r.status == 200


# ---- item 11: a non-UTF-8 token, ranges of an empty file -----------------------------------


async def raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("token", [b"\xff\xfe\xfd", b"s3cret\x80", b"\xc3("])
async def test_non_utf8_bearer_token_is_401(daemon_factory, token):
    daemon = daemon_factory("--token", "s3cret", "--admin-token", "adm")
    for method, path in (("POST", "/v1/handshake"), ("DELETE", "/v1/files/" + "0" * 32)):
        head = (
            (
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                "Connection: close\r\n"
            ).encode()
            + b"Authorization: Bearer "
            + token
            + b"\r\n\r\n"
        )
        status, body = await raw_request(daemon.port, head)
        assert status == 401, body
        assert b'"unauthorized"' in body and b"Traceback" not in body
    async with aiohttp.ClientSession() as s:
        p = prepare(rand(100), CHUNK)
        headers = {"Authorization": "Bearer s3cret"}
        async with s.post(f"{daemon.url}/v1/handshake", json=p.handshake, headers=headers) as r:
            assert r.status == 200
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("header", ["bytes=-5", "bytes=-1", "bytes=-0", "bytes=0-", "bytes=0-0"])
async def test_any_range_of_an_empty_file_is_416(client, header):
    p = prepare(b"", CHUNK)
    await upload(client, "", p)
    r = await client.get(f"/v1/files/{p.digest}", headers={"Range": header})
    await assert_error(r, 416, "range_not_satisfiable")
    assert r.headers["Content-Range"] == "bytes */0"
    whole = await client.get(f"/v1/files/{p.digest}")
    assert whole.status == 200 and await whole.read() == b""


async def test_suffix_range_of_a_non_empty_file_still_works(client):
    p = prepare(rand(10), CHUNK)
    await upload(client, "", p)
    r = await client.get(f"/v1/files/{p.digest}", headers={"Range": "bytes=-50"})
    assert r.status == 206 and await r.read() == p.data
    assert r.headers["Content-Range"] == "bytes 0-9/10"


# ---- item 13: say what is wrong, not what is stored ----------------------------------------


async def test_wrong_size_for_a_stored_chunk_does_not_disclose_the_real_size(client, settings):
    secret = rand(70_001)
    stored = prepare(secret, 1 << 20)
    await upload(client, "", stored)
    chunk = stored.order[0]
    # Another manifest names that chunk with a size of its own, then a chunk to make it add up.
    filler = rand(12_345)
    filler_md5 = hashlib.md5(filler).hexdigest()
    claim = {
        "md5": hashlib.md5(b"whatever").hexdigest(),
        "size": 3 + len(filler),
        "chunks": [{"md5": chunk, "size": 3}, {"md5": filler_md5, "size": len(filler)}],
    }
    before = table_rows(settings.data_dir)
    r = await client.post("/v1/handshake", json=claim)
    body = await assert_error(r, 400, "bad_request")
    assert set(body) == {"error", "message"}
    assert chunk in body["message"]
    # The chunk's digest is random hex: it may hold "3" or even "70001" (CASD_TEST_SEED=19800).
    rest = (await r.text()).replace(chunk, "<chunk>")
    assert "3" in rest and "70001" not in rest and "70,001" not in rest
    assert table_rows(settings.data_dir) == before


async def test_lying_merge_does_not_disclose_the_real_digest(client):
    real = prepare(rand(2 * CHUNK), CHUNK)
    claimed = hashlib.md5(b"a digest these bytes do not have").hexdigest()
    hs = await handshake(client, dict(real.handshake, md5=claimed))
    await put_all(client, hs, real)
    r = await client.post(f"/v1/uploads/{hs['upload_id']}/merge")
    body = await assert_error(r, 422, "file_digest_mismatch")
    assert set(body) == {"error", "message"}
    assert claimed in body["message"]
    assert real.digest not in await r.text()
    await assert_error(await client.get(f"/v1/files/{claimed}"), 404, "not_found")


async def test_unhealthy_answer_does_not_disclose_paths_or_errors(client, monkeypatch, caplog):
    from casd.blobstore import LocalBlobStore

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self.tmp_dir / "secret-probe"))

    monkeypatch.setattr(LocalBlobStore, "check_writable", refuse)
    r = await client.get("/healthz")
    body = await assert_error(r, 503, "unavailable")
    assert set(body) == {"error", "message"}
    assert "secret-probe" not in body["message"] and "Permission" not in body["message"]
    assert "secret-probe" in caplog.text  # the operator still learns what failed
