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


async def test_reads_queued_behind_a_busy_reader_each_get_their_own_answer(tmp_path):
    """While the one quick reader is held, reads pile up; once it is free they are answered
    together, each with its own result or its own error, and each sees what was committed
    before it was asked (here: an upload begun while the reader was held)."""
    import asyncio
    import threading

    cat = await SqliteCatalog.open(tmp_path / "catalog.sqlite", "NORMAL", readers=1)
    gate = threading.Event()
    try:
        first, _ = await cat.begin_upload(manifest("one", 2), "k1", 0, 1e12, "a" * 32)
        held = asyncio.create_task(cat.read(lambda con: gate.wait(30)))
        await asyncio.sleep(0)
        # Committed while the reader is held, before the reads below are queued.
        second, _ = await cat.begin_upload(manifest("two", 3), "k2", 0, 1e12, "b" * 32)

        def boom(con):
            raise ValueError("this read fails alone")

        def count_uploads(con):
            return con.execute("SELECT count(*) FROM uploads").fetchone()[0]

        queued = [
            asyncio.create_task(cat.get_upload("a" * 32)),
            asyncio.create_task(cat.read(boom)),
            asyncio.create_task(cat.get_upload("b" * 32)),
            asyncio.create_task(cat.read(count_uploads)),
            asyncio.create_task(cat.manifest_chunk_count(second.manifest_id)),
            asyncio.create_task(cat.get_upload("c" * 32)),
        ]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in queued)  # all wait for the held reader
        gate.set()
        assert await asyncio.wait_for(held, 10) is True
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 10)
        assert results[0] == first
        assert isinstance(results[1], ValueError)
        assert results[2] == second
        assert results[3] == 2
        assert results[4] == 3
        assert results[5] is None
        # The reader kept working after the error, and later reads go on as before.
        assert await cat.get_upload("a" * 32) == first
    finally:
        gate.set()
        await cat.close()


async def test_publishes_that_wait_together_are_placed_together(tmp_path):
    """Publishes queued behind a busy writer commit in one transaction; their `place`
    callbacks run side by side under the lock (not one loop round trip after another),
    each exactly when its publish needs it: once per digest, never for a digest already
    live, and one that fails fails its own publish alone."""
    import asyncio
    import threading

    from casd.catalog import LIVE

    def dg(tag: str) -> Digest:
        return Digest(Algo("md5"), hashlib.md5(tag.encode()).hexdigest())

    cat = await SqliteCatalog.open(tmp_path / "catalog.sqlite", "NORMAL")
    gate = threading.Event()
    running = 0
    most = 0
    placed: list[str] = []

    async def place(d: Digest) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        placed.append(d.hex)
        await asyncio.sleep(0.01)
        running -= 1
        if d == dg("bad"):
            raise OSError(28, "injected: no space")

    try:
        assert await cat.publish_chunk(dg("old"), 1, "x" * 32, 0, place)
        placed.clear()
        busy = asyncio.create_task(cat.writer.run(lambda con: gate.wait(30)))
        for _ in range(1000):  # until the writer has taken it into a transaction
            await asyncio.sleep(0.001)
            if cat.writer.depth == 0:
                break
        tags = ["a", "b", "bad", "c", "a", "old"]
        pubs = [asyncio.create_task(cat.publish_chunk(dg(t), 1, "x" * 32, 1, place)) for t in tags]
        await asyncio.sleep(0.05)
        assert cat.writer.depth == len(tags)  # all wait for the same next transaction
        gate.set()
        await busy
        results = await asyncio.gather(*pubs, return_exceptions=True)
        assert results[:2] == [True, True]
        assert isinstance(results[2], OSError)
        assert results[3:] == [True, False, False]  # "a" again and "old": already live
        assert sorted(placed) == sorted(dg(t).hex for t in ("a", "b", "bad", "c"))
        assert most == 4
        rows = await cat.read(
            lambda con: {
                r[0] for r in con.execute("SELECT digest FROM chunks WHERE state = ?", (LIVE,))
            }
        )
        assert rows == {dg(t).hex for t in ("old", "a", "b", "c")}
    finally:
        gate.set()
        await cat.close()
