"""What only the SQLite engine does: one write path, and a full disk told by its error code."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from casd.catalog.sqlite import SqliteCatalog
from casd.digest import Algo, Digest
from casd.errors import StorageFull
from casd.models import ChunkRef, Manifest


def manifest(tag: str, n: int) -> Manifest:
    chunks = tuple(ChunkRef(hashlib.md5(f"{tag}-{i}".encode()).hexdigest(), 1) for i in range(n))
    return Manifest(Digest(Algo("md5"), hashlib.md5(tag.encode()).hexdigest()), n, chunks)


async def test_a_full_database_is_storage_full_and_writes_nothing(tmp_path):
    """SQLITE_FULL (here from a page limit, as a full disk gives it) is StorageFull; the
    batch is rolled back and the writer keeps working once there is room."""
    cat = await SqliteCatalog.open(tmp_path / "catalog.sqlite", "NORMAL")
    try:
        pages = await cat.read(lambda con: con.execute("PRAGMA page_count").fetchone()[0])

        def limit(con, n):
            con.execute(f"PRAGMA max_page_count = {n}")

        await cat.writer.alone(limit, pages + 2)
        with pytest.raises(StorageFull):
            await cat.begin_upload(manifest("big", 20_000), "k", 0, 1e12, "a" * 32)
        assert await cat.get_upload("a" * 32) is None
        await cat.writer.alone(limit, 1 << 30)
        _up, missing = await cat.begin_upload(manifest("big", 20_000), "k", 0, 1e12, "a" * 32)
        assert len(missing) == 20_000
    finally:
        await cat.close()


async def test_full_in_a_message_is_not_a_full_disk(tmp_path):
    """Only the error code counts: an error that merely says "full" stays what it is."""
    cat = await SqliteCatalog.open(tmp_path / "catalog.sqlite", "NORMAL")
    try:

        def broken(con):
            con.execute("SELECT * FROM full_table_that_is_not_there")

        with pytest.raises(sqlite3.OperationalError):
            await cat.writer.run(broken)
    finally:
        await cat.close()
