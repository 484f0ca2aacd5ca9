"""Upgrading a catalogue that holds data at the schema before packed manifests (SQLite 0005,
PostgreSQL 0002): every chunk list is converted, and everything that reads lists still
answers as it did (pages, sizes, missing lists, downloads, gc's references)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

import casd.catalog.sqlite
from casd.catalog import open_catalog
from casd.digest import Algo, Digest
from casd.models import ChunkRef, StreamLimits

# The first version that stores lists packed, per engine.
PACKED = {"sqlite": 6, "postgres": 3}
SIZE = 7


def hx(tag: str) -> str:
    return hashlib.md5(tag.encode()).hexdigest()


# A file of 5,000 chunks (3 parts of packed list), one digest used twice; a pending upload
# sharing a chunk with it; an open streamed upload with a batch listed already.
FILE_LIST = [hx(f"d{i}") for i in range(4999)] + [hx("d0")]
PENDING_LIST = [hx("d0"), hx("x1"), hx("x2")]
STREAM_LIST = [hx("s0"), hx("d1")]
FILE_DIGEST = hx("the file")
PENDING_DIGEST = hx("the pending file")
STORED = [*FILE_LIST[:4999], hx("x1"), hx("garbage")]


def old_rows() -> list[tuple[str, tuple]]:
    """(statement, parameters) building the old catalogue; ids 1, 2, 3 for the manifests."""
    out: list[tuple[str, tuple]] = []
    manifests = [
        (1, FILE_DIGEST, SIZE * len(FILE_LIST), "k1", FILE_LIST),
        (2, PENDING_DIGEST, SIZE * len(PENDING_LIST), "k2", PENDING_LIST),
        (3, "0" * 32, SIZE * len(STREAM_LIST), "", STREAM_LIST),
    ]
    for mid, digest, size, key, listed in manifests:
        out.append(
            (
                "INSERT INTO manifests (id, algo, digest, size, chunks_key, chunk_count, created)"
                " {override} VALUES ($1, 'md5', $2, $3, $4, $5, 1.0)",
                (mid, digest, size, key, len(listed)),
            )
        )
        for seq, h in enumerate(listed):
            out.append(
                (
                    "INSERT INTO manifest_chunks (manifest_id, seq, digest, size)"
                    " VALUES ($1, $2, $3, $4)",
                    (mid, seq, h, SIZE),
                )
            )
    out.append(
        (
            "INSERT INTO files (digest, algo, size, manifest_id, ext, name, created)"
            " VALUES ($1, 'md5', $2, 1, '.bin', 'f.bin', 1.0)",
            (FILE_DIGEST, SIZE * len(FILE_LIST)),
        )
    )
    for uid, mid in (("a" * 32, 2), ("b" * 32, 3)):
        out.append(
            (
                "INSERT INTO uploads (id, manifest_id, ext, name, state, created, expires_at)"
                " VALUES ($1, $2, '', '', 'pending', 1.0, 1e12)",
                (uid, mid),
            )
        )
    for h in STORED:
        out.append(
            (
                "INSERT INTO chunks (digest, algo, size, xxh3, created, state)"
                " VALUES ($1, 'md5', $2, $3, 1.0, 0)",
                (h, SIZE, "0" * 32),
            )
        )
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request) -> str:
    return request.param


async def build_old_catalogue(engine: str, where, monkeypatch) -> None:
    import casd.catalog.postgres as pg_module

    module = casd.catalog.sqlite if engine == "sqlite" else pg_module
    every = module._migrations()
    assert any(v == PACKED[engine] for v, _n, _s in every)
    with monkeypatch.context() as m:
        m.setattr(module, "_migrations", lambda: [x for x in every if x[0] < PACKED[engine]])
        cat = await open_catalog(where)
        await cat.close()
    if engine == "sqlite":
        con = sqlite3.connect(where)
        try:
            with con:
                for sql, params in old_rows():
                    con.execute(sql.format(override="").replace("$", "?"), params)
        finally:
            con.close()
    else:
        import asyncpg

        con = await asyncpg.connect(where)
        try:
            async with con.transaction():
                for sql, params in old_rows():
                    await con.execute(sql.format(override="OVERRIDING SYSTEM VALUE"), *params)
        finally:
            await con.close()


async def test_an_old_catalogue_with_data_is_converted(engine, tmp_path, monkeypatch, request):
    where = (
        str(tmp_path / "catalog.sqlite")
        if engine == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    await build_old_catalogue(engine, where, monkeypatch)
    cat = await open_catalog(where)
    try:
        file_list = [(h, SIZE) for h in FILE_LIST]
        assert await cat.manifest_chunks(1) == file_list
        assert await cat.manifest_chunk_count(1) == len(FILE_LIST)
        # Pages across the stored parts' edges, and past the end.
        for start, limit in ((0, 10), (2040, 20), (2047, 2), (4090, 2000), (4995, 100)):
            assert await cat.manifest_page(1, start, limit) == file_list[start : start + limit]
        assert await cat.manifest_page(1, 5000, 10) == []
        page = await cat.file_chunks_page(1, 4998, 10)
        assert page == [(FILE_LIST[4998], SIZE, "0" * 32), (FILE_LIST[4999], SIZE, "0" * 32)]
        assert await cat.manifest_size_of(1, Digest(Algo.MD5, hx("d3"))) == SIZE
        assert await cat.manifest_size_of(2, Digest(Algo.MD5, hx("d3"))) is None
        entry_and_chunks = await cat.file_with_chunks(Digest(Algo.MD5, FILE_DIGEST))
        assert entry_and_chunks is not None and entry_and_chunks[1] == file_list
        # Missing: each once, in manifest order.
        assert await cat.missing(2) == [hx("x2")]
        assert await cat.missing(3) == [hx("s0")]
        assert await cat.missing(1) == []
        # gc: only the chunk nothing references is garbage.
        garbage = await cat.garbage_chunks(now=2.0, cutoff=1e12)
        assert [c.digest.hex for c in garbage] == [hx("garbage")]
        facts, _ = await cat.chunk_users([hx("d0")], now=2.0)
        assert [f.digest.hex for f, _size in facts[hx("d0")].files] == [FILE_DIGEST]
        assert facts[hx("d0")].uploads == ("a" * 32,)
        # The open streamed upload takes its next batch after the one listed before.
        batch = await cat.append_stream(
            "b" * 32,
            2,
            [ChunkRef(hx("s1"), SIZE), ChunkRef(hx("s0"), SIZE)],
            2.0,
            1e12,
            StreamLimits(10_000, 1 << 40),
        )
        assert batch is not None and batch.count == 4 and batch.missing == [hx("s1"), hx("s0")]
        assert await cat.manifest_chunks(3) == [
            (h, SIZE) for h in (*STREAM_LIST, hx("s1"), hx("s0"))
        ]
        # Dropping a manifest drops its packed list.
        assert await cat.abort_uploads(["a" * 32]) == ["a" * 32]
        assert await cat.manifest_chunks(2) == []
    finally:
        await cat.close()
    if engine == "sqlite":
        con = sqlite3.connect(where)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            assert "manifest_chunks" not in tables
            for table in ("manifest_parts", "manifest_digests"):
                assert con.execute(
                    f"SELECT count(*) FROM {table} WHERE manifest_id = 2"
                ).fetchone() == (0,)
        finally:
            con.close()
