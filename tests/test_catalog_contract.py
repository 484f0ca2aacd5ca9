"""The catalogue contract (casd/catalog/__init__.py), run against every engine.

Each test opens a fresh catalogue: SQLite in the test's folder, PostgreSQL in a fresh database
of the session's throwaway cluster. The blob store is a set of digests the `Locked`
callbacks add to and remove from, so the invariant can be checked after every race: every
live row names a blob in the store.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from casd.catalog import DELETING, LIVE, QUARANTINED, HookEvents, open_catalog
from casd.digest import Algo, Digest
from casd.errors import (
    BadRequest,
    FileDigestMismatch,
    Incomplete,
    OffsetMismatch,
    QuotaExceeded,
    TooLarge,
    TooManyPending,
)
from casd.models import ChunkRef, Manifest, PendingBudget, StreamLimits, Tenant

WAIT = 30
T0 = 1_000.0
LATER = 1e12


@pytest.fixture(params=["sqlite", "postgres"])
def where(request, tmp_path):
    """Where a catalogue of the engine under test lives (a second open shares it)."""
    if request.param == "sqlite":
        return tmp_path / "catalog.sqlite"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def cat(where):
    c = await open_catalog(where, synchronous="NORMAL")
    yield c
    await c.close()


@pytest.fixture
async def other(where, cat):
    """A second catalogue on the same store: another daemon, or `casd gc`."""
    c = await open_catalog(where, synchronous="NORMAL")
    yield c
    await c.close()


def hx(tag: object) -> str:
    return hashlib.md5(str(tag).encode()).hexdigest()


def dg(tag: object) -> Digest:
    return Digest(Algo("md5"), hx(tag))


def manifest(tag: object, chunks: list[tuple[object, int]], name: str = "") -> Manifest:
    refs = tuple(ChunkRef(hx(t), size) for t, size in chunks)
    return Manifest(dg(f"file-{tag}"), sum(s for _t, s in chunks), refs, "", name)


class Store:
    """A pretend blob store: `place` and `unlink` as Locked callbacks."""

    def __init__(self):
        self.blobs: set[str] = set()
        self.placed: list[str] = []

    async def place(self, d: Digest) -> None:
        self.placed.append(d.hex)
        self.blobs.add(d.hex)

    async def unlink(self, rows) -> None:
        for r in rows:
            self.blobs.discard(r.digest.hex)


async def assert_invariant(cat, store: Store) -> None:
    live = {r.digest.hex for r in await cat.all_chunks() if r.state == LIVE}
    assert live <= store.blobs, f"live rows name blobs not in the store: {live - store.blobs}"


async def publish(cat, store: Store, tag: object, size: int = 1, now: float = T0) -> bool:
    return await cat.publish_chunk(dg(tag), size, "x" * 32, now, store.place)


# ---- uploads -------------------------------------------------------------------------------


async def test_begin_upload_creates_then_resumes_the_same_upload(cat):
    m = manifest(1, [("a", 1), ("b", 2), ("a", 1)])
    up, missing = await cat.begin_upload(m, "k", T0, LATER, "u" * 32)
    assert missing == [hx("a"), hx("b")]  # once each, in manifest order
    assert (up.id, up.state, up.size) == ("u" * 32, "pending", 4)
    again, missing2 = await cat.begin_upload(m, "k", T0 + 1, LATER + 5, "v" * 32)
    assert again.id == up.id and again.expires_at == LATER + 5 and missing2 == missing
    other_list, _ = await cat.begin_upload(m, "k2", T0, LATER, "w" * 32)
    assert other_list.id == "w" * 32 and other_list.manifest_id != up.manifest_id
    assert await cat.get_upload(up.id) == again


async def test_an_expired_upload_is_not_resumed(cat):
    m = manifest(1, [("a", 1)])
    up, _ = await cat.begin_upload(m, "k", T0, T0 + 10, "u" * 32)
    fresh, _ = await cat.begin_upload(m, "k", T0 + 20, T0 + 100, "v" * 32)
    assert fresh.id == "v" * 32 and fresh.manifest_id > up.manifest_id
    assert await cat.get_upload(up.id) is None
    assert not await cat.touch_upload(up.id, T0 + 20, T0 + 200)
    assert await cat.touch_upload(fresh.id, T0 + 20, T0 + 200)


async def test_a_chunk_size_that_contradicts_the_stored_one_is_refused(cat):
    store = Store()
    await publish(cat, store, "a", size=5)
    with pytest.raises(BadRequest):
        await cat.begin_upload(manifest(1, [("a", 6)]), "k", T0, LATER, "u" * 32)
    assert await cat.get_upload("u" * 32) is None  # nothing written


async def test_budget_refuses_new_uploads_but_not_resumes(cat):
    budget = PendingBudget(total=5, per_client=3)
    m1 = manifest(1, [("a", 1), ("b", 1)])
    await cat.begin_upload(m1, "k", T0, LATER, "1" * 32, "c1", budget)
    with pytest.raises(TooManyPending):
        await cat.begin_upload(
            manifest(2, [("c", 1), ("d", 1)]), "k", T0, LATER, "2" * 32, "c1", budget
        )
    with pytest.raises(TooLarge):
        await cat.begin_upload(
            manifest(3, [(i, 1) for i in range(4)]), "k", T0, LATER, "3" * 32, "c2", budget
        )
    await cat.begin_upload(
        manifest(4, [("e", 1), ("f", 1)]), "k", T0, LATER, "4" * 32, "c2", budget
    )
    with pytest.raises(TooManyPending):  # the total: 4 held, 2 more is over 5
        await cat.begin_upload(
            manifest(5, [("g", 1), ("h", 1)]), "k", T0, LATER, "5" * 32, "c3", budget
        )
    resumed, _ = await cat.begin_upload(m1, "k", T0, LATER, "6" * 32, "c1", budget)
    assert resumed.id == "1" * 32
    assert (await cat.stats_counts(T0))["pending_entries"] == 4


async def test_an_open_streamed_upload_holds_one_entry_of_the_budget(cat):
    budget = PendingBudget(total=10, per_client=2)
    for n in "12":
        await cat.begin_stream(Algo.MD5, "", "", T0, LATER, n * 32, "c1", budget=budget)
    with pytest.raises(TooManyPending):
        await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "3" * 32, "c1", budget=budget)
    assert await cat.get_upload("3" * 32) is None  # nothing written
    await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "4" * 32, "c2", budget=budget)
    assert (await cat.stats_counts(T0))["pending_entries"] == 3


# ---- streamed uploads (protocol v1.1) ----------------------------------------------------------

ROOMY = StreamLimits(max_chunks=100, max_file_size=1000)


def refs(chunks: list[tuple[object, int]]) -> list[ChunkRef]:
    return [ChunkRef(hx(t), size) for t, size in chunks]


async def tenant_owning_four_of_ten(cat) -> Tenant:
    """Tenant q, quota 10 bytes, owning one 4-byte file (chunk x, proved)."""
    q = Tenant("q", quota=10)
    await publish(cat, Store(), "x", size=4)
    up, _ = await cat.begin_upload(manifest(1, [("x", 4)]), "k", T0, LATER, "1" * 32, tenant=q)
    await cat.prove_chunk("q", dg("x"))
    await cat.register_file(up.id, T0)
    return q


async def test_a_stream_grows_in_order_then_seals_into_a_pending_upload(cat):
    store = Store()
    await publish(cat, store, "a")
    up = await cat.begin_stream(Algo.MD5, ".bin", "f.bin", T0, LATER, "s" * 32, "c1")
    assert not up.sealed and up.size == 0
    assert await cat.get_upload(up.id) == up
    batch = await cat.append_stream(up.id, 0, refs([("a", 1), ("b", 2)]), T0, LATER, ROOMY)
    assert (batch.count, batch.size, batch.missing) == (2, 3, [hx("b")])
    batch = await cat.append_stream(up.id, 2, refs([("b", 2), ("c", 3)]), T0, LATER, ROOMY)
    assert (batch.count, batch.size, batch.missing) == (4, 8, [hx("b"), hx("c")])
    assert await cat.missing(up.manifest_id) == [hx("b"), hx("c")]
    assert await cat.manifest_page(up.manifest_id, 0, 10) == [
        (hx("a"), 1),
        (hx("b"), 2),
        (hx("b"), 2),
        (hx("c"), 3),
    ]
    with pytest.raises(BadRequest):  # the chunks add up to 8
        await cat.seal_stream(up.id, dg("file"), 7, "stream:x")
    sealed = await cat.seal_stream(up.id, dg("file"), 8, "stream:x")
    assert sealed.sealed and sealed.digest == dg("file") and sealed.size == 8
    assert await cat.get_upload(up.id) == sealed
    # Sealed: no more digests; sealing again answers the upload as it is.
    assert await cat.append_stream(up.id, 4, refs([("d", 1)]), T0, LATER, ROOMY) is None
    assert await cat.seal_stream(up.id, dg("other"), 8, "stream:x") == sealed
    await publish(cat, store, "b", size=2)
    await publish(cat, store, "c", size=3)
    entry = await cat.register_file(up.id, T0)
    assert entry.digest == dg("file") and entry.size == 8 and entry.ext == ".bin"


async def test_a_stream_batch_refused_writes_nothing(cat):
    store = Store()
    await publish(cat, store, "big", size=5)
    up = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "s" * 32)
    await cat.append_stream(up.id, 0, refs([("a", 1)]), T0, LATER, ROOMY)
    with pytest.raises(OffsetMismatch) as info:
        await cat.append_stream(up.id, 0, refs([("b", 1)]), T0, LATER, ROOMY)
    assert info.value.extra["count"] == 1
    with pytest.raises(TooLarge):
        await cat.append_stream(
            up.id, 1, refs([("b", 1), ("c", 1)]), T0, LATER, StreamLimits(2, 100)
        )
    with pytest.raises(TooLarge):
        await cat.append_stream(up.id, 1, refs([("b", 10)]), T0, LATER, StreamLimits(100, 10))
    with pytest.raises(BadRequest):  # "a" was listed with size 1
        await cat.append_stream(up.id, 1, refs([("a", 2)]), T0, LATER, ROOMY)
    with pytest.raises(BadRequest):  # the stored "big" has another size
        await cat.append_stream(up.id, 1, refs([("big", 4)]), T0, LATER, ROOMY)
    assert await cat.manifest_page(up.manifest_id, 0, 10) == [(hx("a"), 1)]
    batch = await cat.append_stream(up.id, 1, refs([("b", 1)]), T0, LATER, ROOMY)
    assert (batch.count, batch.size) == (2, 2)


async def test_stream_batches_count_against_the_pending_budget(cat):
    budget = PendingBudget(total=5, per_client=3)
    up = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "s" * 32, "c1")
    await cat.append_stream(up.id, 0, refs([("a", 1), ("b", 1)]), T0, LATER, ROOMY, "c1", budget)
    with pytest.raises(TooManyPending):
        await cat.append_stream(
            up.id, 2, refs([("c", 1), ("d", 1)]), T0, LATER, ROOMY, "c1", budget
        )
    assert (await cat.stats_counts(T0))["pending_entries"] == 2


async def test_an_expired_or_aborted_stream_takes_no_batch(cat):
    up = await cat.begin_stream(Algo.SHA256, "", "", T0, T0 + 10, "s" * 32)
    assert up.digest.algo is Algo.SHA256
    assert await cat.append_stream(up.id, 0, [], T0 + 20, LATER, ROOMY) is None
    up2 = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "t" * 32)
    assert await cat.drop_pending_upload(up2.id)
    assert await cat.append_stream(up2.id, 0, [], T0, LATER, ROOMY) is None
    assert await cat.seal_stream(up2.id, dg("f"), 0, "stream:t") is None


async def test_gc_keeps_the_chunks_an_open_stream_lists(cat):
    store = Store()
    await publish(cat, store, "listed", now=T0)
    await publish(cat, store, "garbage", now=T0)
    up = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "s" * 32)
    await cat.append_stream(up.id, 0, refs([("listed", 1)]), T0, LATER, ROOMY)
    planned = [r.digest.hex for r in await cat.garbage_chunks(T0 + 200, T0 + 50)]
    assert planned == [hx("garbage")]
    marked = await cat.mark_garbage([hx("listed"), hx("garbage")], T0 + 200, T0 + 50)
    assert [r.digest.hex for r in marked] == [hx("garbage")]


# ---- publish and merge -----------------------------------------------------------------------


async def test_publish_places_once_and_missing_shrinks(cat):
    store = Store()
    up, _ = await cat.begin_upload(manifest(1, [("a", 1), ("b", 1)]), "k", T0, LATER, "u" * 32)
    assert await publish(cat, store, "a")
    assert not await publish(cat, store, "a")  # already live: place not called again
    assert store.placed == [hx("a")]
    assert await cat.missing(up.manifest_id) == [hx("b")]
    assert await cat.has_chunk(dg("a")) and not await cat.has_chunk(dg("b"))
    assert await cat.present_chunks({hx("a"), hx("b")}) == {hx("a")}
    await assert_invariant(cat, store)


async def test_missing_is_each_digest_once_in_order_however_many_are_stored(cat):
    """Few stored, half, all but one, all: the list is the same rule each time (an engine
    may read the stored side or the missing side, whichever is smaller)."""
    store = Store()
    tags = [f"c{i}" for i in range(12)]
    listed = [(t, 1) for t in tags] + [("c0", 1), ("c8", 1), ("c3", 1)]
    up, missing = await cat.begin_upload(manifest(1, listed), "k", T0, LATER, "u" * 32)
    assert missing == [hx(t) for t in tags]
    stored: set[str] = set()
    for batch in (
        ["c2"],
        ["c0", "c5", "c7", "c9", "c10", "c11"],
        ["c1", "c4"],
        ["c6", "c3"],
        ["c8"],
    ):
        for t in batch:
            await publish(cat, store, t)
            stored.add(t)
        want = [hx(t) for t in tags if t not in stored]
        assert await cat.missing(up.manifest_id) == want
        again, resumed = await cat.begin_upload(manifest(1, listed), "k", T0, LATER, "v" * 32)
        assert again.id == up.id and resumed == want


async def test_a_tenants_missing_list_counts_only_what_it_proved_however_many(cat):
    store = Store()
    tags = [f"c{i}" for i in range(6)]
    listed = [(t, 1) for t in tags]
    a = Tenant("a")
    up, _ = await cat.begin_upload(manifest(1, listed), "k", T0, LATER, "u" * 32, tenant=a)
    for t in tags:
        await publish(cat, store, t)
    proved: set[str] = set()
    for batch in (["c4"], ["c0", "c1", "c2"], ["c3", "c5"]):
        for t in batch:
            await cat.prove_chunk("a", dg(t))
            proved.add(t)
        want = [hx(t) for t in tags if t not in proved]
        assert await cat.missing(up.manifest_id, "a") == want
        assert await cat.missing(up.manifest_id) == []


async def test_a_place_that_fails_leaves_no_row(cat):
    async def broken(_d):
        raise OSError("the store said no")

    with pytest.raises(OSError):
        await cat.publish_chunk(dg("a"), 1, "x" * 32, T0, broken)
    assert not await cat.has_chunk(dg("a"))
    assert await cat.all_chunks() == []


async def test_publish_touches_its_upload_but_never_revives_an_expired_one(cat):
    store = Store()
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, T0 + 10, "u" * 32)
    await cat.publish_chunk(dg("a"), 1, "x" * 32, T0 + 1, store.place, (up.id, T0 + 50))
    assert (await cat.get_upload(up.id)).expires_at == T0 + 50
    await cat.publish_chunk(dg("b"), 1, "x" * 32, T0 + 60, store.place, (up.id, T0 + 500))
    assert (await cat.get_upload(up.id)).expires_at == T0 + 50


async def test_register_is_refused_while_chunks_are_missing_then_idempotent(cat):
    store = Store()
    up, _ = await cat.begin_upload(
        manifest(1, [("a", 1), ("b", 1)], "f.txt"), "k", T0, LATER, "u" * 32
    )
    await publish(cat, store, "a")
    with pytest.raises(Incomplete) as info:
        await cat.register_file(up.id, T0)
    assert info.value.extra["missing"] == [hx("b")]
    await publish(cat, store, "b")
    entry = await cat.register_file(up.id, T0)
    assert entry is not None and entry.name == "f.txt" and entry.size == 2
    assert await cat.register_file(up.id, T0 + 1) == entry
    assert await cat.get_file(entry.digest) == entry
    assert (await cat.get_upload(up.id)).state == "merged"
    assert await cat.register_file("z" * 32, T0) is None


async def test_abort_and_merge_are_decided_once(cat):
    store = Store()
    await publish(cat, store, "a")
    merged, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, LATER, "m" * 32)
    await cat.register_file(merged.id, T0)
    assert not await cat.drop_pending_upload(merged.id)  # merged first: the abort loses
    aborted, _ = await cat.begin_upload(manifest(2, [("a", 1), ("a", 1)]), "k", T0, LATER, "a" * 32)
    assert await cat.drop_pending_upload(aborted.id)
    assert await cat.register_file(aborted.id, T0) is None  # aborted first: nothing to merge
    assert await cat.get_upload(aborted.id) is None
    assert not await cat.drop_pending_upload(aborted.id)


async def test_delete_file_forgets_it_and_its_merged_upload(cat):
    store = Store()
    await publish(cat, store, "a")
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, LATER, "u" * 32)
    entry = await cat.register_file(up.id, T0)
    assert await cat.delete_file(entry.digest)
    assert not await cat.delete_file(entry.digest)
    assert await cat.get_file(entry.digest) is None
    assert await cat.file_with_chunks(entry.digest) is None
    assert await cat.get_upload(up.id) is None
    assert await cat.has_chunk(dg("a"))  # chunks are left for gc


# ---- tenants ----------------------------------------------------------------------------------

A, B = Tenant("a"), Tenant("b")


async def test_a_tenant_sees_its_own_uploads_proofs_and_files(cat):
    store = Store()
    m = manifest(1, [("x", 1), ("y", 1)], "a.txt")
    up_a, missing = await cat.begin_upload(m, "k", T0, LATER, "a" * 32, tenant=A)
    assert up_a.tenant == "a" and missing == [hx("x"), hx("y")]
    for t in ("x", "y"):
        await publish(cat, store, t)
    # Stored, but not proved by a: still missing to it, and it cannot merge.
    assert await cat.missing(up_a.manifest_id, "a") == [hx("x"), hx("y")]
    assert await cat.missing(up_a.manifest_id) == []
    with pytest.raises(Incomplete):
        await cat.register_file(up_a.id, T0)
    assert await cat.prove_chunk("a", dg("x")) and not await cat.prove_chunk("a", dg("x"))
    assert await cat.missing(up_a.manifest_id, "a") == [hx("y")]
    await cat.prove_chunk("a", dg("y"))
    entry = await cat.register_file(up_a.id, T0)
    assert entry.name == "a.txt"
    assert await cat.get_file(entry.digest, "a") == entry
    assert await cat.get_file(entry.digest, "b") is None
    assert await cat.file_with_chunks(entry.digest, "b") is None
    assert (await cat.file_with_chunks(entry.digest, "a"))[1] == [(hx("x"), 1), (hx("y"), 1)]
    # b's handshake of the same manifest: its own upload, every chunk missing.
    up_b, missing = await cat.begin_upload(
        manifest(1, [("x", 1), ("y", 1)], "b.txt"), "k", T0, LATER, "b" * 32, tenant=B
    )
    assert up_b.id != up_a.id and missing == [hx("x"), hx("y")]
    for t in ("x", "y"):
        await cat.prove_chunk("b", dg(t))
    mine = await cat.register_file(up_b.id, T0 + 1)
    assert (mine.name, mine.created) == ("b.txt", T0 + 1)  # b's name, never a's
    assert [f.name for f in await cat.list_files("b")] == ["b.txt"]
    usage = await cat.tenant_usage(T0)
    assert (usage["a"].files, usage["a"].logical_bytes) == (1, 2)
    assert (usage["b"].files, usage["b"].logical_bytes) == (1, 2)
    # Deleting is per tenant; the file goes with its last owner.
    assert not await cat.delete_file(entry.digest, tenant="c")
    assert await cat.delete_file(entry.digest, tenant="a")
    assert await cat.get_file(entry.digest, "a") is None
    assert await cat.register_file(up_a.id, T0) is None  # a's repeated merge: gone for a
    assert await cat.get_file(entry.digest) is not None
    assert await cat.delete_file(entry.digest, tenant="b")
    assert await cat.get_file(entry.digest) is None


async def test_files_page_lists_a_tenants_own_files_in_digest_order(cat):
    store = Store()
    await publish(cat, store, "x")
    owned: dict[str, list[str]] = {"a": [], "b": []}
    for tag, owners in ((1, "a"), (2, "ab"), (3, "a"), (4, "b")):
        for t in owners:
            up, _ = await cat.begin_upload(
                manifest(tag, [("x", 1)], f"{t}{tag}.txt"),
                "k",
                T0,
                LATER,
                f"{t}{tag}" * 16,
                tenant=Tenant(t),
            )
            await cat.prove_chunk(t, dg("x"))
            entry = await cat.register_file(up.id, T0)
            owned[t].append(entry.digest.hex)
    for t, digests in owned.items():
        want = sorted(digests)
        pages, after = [], ""
        while page := await cat.files_page(t, after, 2):
            pages.append(page)
            after = page[-1].digest.hex
        assert [f.digest.hex for page in pages for f in page] == want
        assert [len(page) for page in pages] == {"a": [2, 1], "b": [2]}[t]
        # Under this tenant's own names.
        assert {f.name for page in pages for f in page} == {
            f"{t}{tag}.txt" for tag in (1, 2, 3, 4) if hx(f"file-{tag}") in digests
        }
    everything = await cat.files_page(None, "", 10)
    assert [f.digest.hex for f in everything] == sorted({*owned["a"], *owned["b"]})
    assert await cat.files_page("c", "", 10) == []
    assert await cat.files_page(None, everything[-1].digest.hex, 10) == []


async def test_an_admin_delete_removes_every_ownership(cat):
    store = Store()
    await publish(cat, store, "x")
    for t in (A, B):
        up, _ = await cat.begin_upload(
            manifest(1, [("x", 1)]), "k", T0, LATER, t.name * 32, tenant=t
        )
        await cat.prove_chunk(t.name, dg("x"))
        entry = await cat.register_file(up.id, T0)
    assert await cat.delete_file(entry.digest)
    assert await cat.get_file(entry.digest, "a") is None
    assert await cat.list_files("b") == []
    assert await cat.tenant_usage(T0) == {}


async def test_a_size_clash_is_told_only_about_a_chunk_the_tenant_proved(cat):
    store = Store()
    await publish(cat, store, "x", size=5)
    # b never held x: a clash would tell it x is stored; its PUT will fail verification.
    await cat.begin_upload(manifest(1, [("x", 6)]), "k", T0, LATER, "b" * 32, tenant=B)
    await cat.prove_chunk("a", dg("x"))
    with pytest.raises(BadRequest):
        await cat.begin_upload(manifest(2, [("x", 6)]), "k", T0, LATER, "a" * 32, tenant=A)


async def test_quota_counts_owned_and_pending_bytes_and_a_race_takes_it_once(cat, other):
    q = await tenant_owning_four_of_ten(cat)
    await cat.begin_upload(manifest(2, [("p", 3)]), "k", T0, LATER, "2" * 32, tenant=q)
    with pytest.raises(QuotaExceeded) as info:
        await cat.begin_upload(manifest(3, [("r", 4)]), "k", T0, LATER, "3" * 32, tenant=q)
    assert (info.value.extra["quota"], info.value.extra["usage"]) == (10, 7)
    assert len(await cat.pending_uploads()) == 1  # nothing written
    # 7 used: two handshakes of 3 bytes on two connections, at once; one fits.
    results = await asyncio.gather(
        cat.begin_upload(manifest(4, [("s", 3)]), "k", T0, LATER, "4" * 32, tenant=q),
        other.begin_upload(manifest(5, [("t", 3)]), "k", T0, LATER, "5" * 32, tenant=q),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded", "tuple"], results
    # Another tenant's quota is its own.
    await cat.begin_upload(manifest(6, [("u", 9)]), "k", T0, LATER, "6" * 32, tenant=Tenant("z", 9))


async def test_a_tenants_stream_is_its_own_and_misses_what_it_did_not_prove(cat):
    store = Store()
    for t in ("x", "y"):
        await publish(cat, store, t)
    await cat.prove_chunk("a", dg("x"))
    await cat.prove_chunk("b", dg("y"))
    up = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "s" * 32, "c1", tenant=A, size=3)
    assert up.tenant == "a" and not up.sealed
    assert await cat.get_upload(up.id) == up
    listed = refs([("y", 1), ("x", 1), ("z", 1), ("y", 1)])
    batch = await cat.append_stream(up.id, 0, listed, T0, LATER, ROOMY, tenant=A)
    # y is stored but proved by b only, z stored by nobody: alike to a, both missing.
    assert batch.missing == [hx("y"), hx("z")]
    assert (await cat.tenant_usage(T0))["a"].pending_bytes == 4
    # The same batch without a tenant: only what is not stored.
    free = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "f" * 32)
    assert free.tenant == ""
    batch = await cat.append_stream(free.id, 0, listed, T0, LATER, ROOMY)
    assert batch.missing == [hx("z")]
    # Sealed and proved, the upload registers as a's file only.
    await publish(cat, store, "z")
    for t in ("y", "z"):
        await cat.prove_chunk("a", dg(t))
    await cat.seal_stream(up.id, dg("file"), 4, "stream:s")
    entry = await cat.register_file(up.id, T0)
    assert await cat.get_file(entry.digest, "a") == entry
    assert await cat.get_file(entry.digest, "b") is None


async def test_a_tenants_stream_over_its_quota_is_refused_and_writes_nothing(cat):
    q = await tenant_owning_four_of_ten(cat)
    s1 = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "2" * 32, tenant=q, size=6)
    await cat.append_stream(s1.id, 0, refs([("p", 3)]), T0, LATER, ROOMY, tenant=q)
    before = (await cat.pending_uploads(), await cat.stats_counts(T0))
    with pytest.raises(QuotaExceeded) as info:  # 4 owned + 3 listed + 4 declared > 10
        await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "3" * 32, tenant=q, size=4)
    assert (info.value.extra["quota"], info.value.extra["usage"]) == (10, 7)
    assert (await cat.pending_uploads(), await cat.stats_counts(T0)) == before
    assert await cat.get_upload("3" * 32) is None
    s2 = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "4" * 32, tenant=q, size=3)
    assert s2.tenant == "q"
    # What a daemon reserved at open is that daemon's; the catalogue bounds what every
    # upload lists: 4 owned + 3 listed + 4 more > 10, refused, nothing written.
    before = (await cat.pending_uploads(), await cat.stats_counts(T0))
    with pytest.raises(QuotaExceeded):
        await cat.append_stream(s2.id, 0, refs([("r", 4)]), T0, LATER, ROOMY, tenant=q)
    assert (await cat.pending_uploads(), await cat.stats_counts(T0)) == before
    batch = await cat.append_stream(s2.id, 0, refs([("r", 3)]), T0, LATER, ROOMY, tenant=q)
    assert (batch.count, batch.size) == (1, 3)
    # Without a quota, or without a tenant, there is nothing to check.
    await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "5" * 32, tenant=Tenant("r"), size=99)
    await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "6" * 32)


async def test_a_tenants_stream_is_told_no_size_clash_about_a_chunk_it_never_proved(cat):
    store = Store()
    await publish(cat, store, "x", size=5)
    # b never held x: a clash would tell it x is stored. It is listed as missing, as a digest
    # nobody stored would be, and its PUT will fail verification.
    up = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "b" * 32, tenant=B, size=99)
    batch = await cat.append_stream(up.id, 0, refs([("x", 6)]), T0, LATER, ROOMY, tenant=B)
    assert (batch.count, batch.size, batch.missing) == (1, 6, [hx("x")])
    # x is untouched: live, with its size, not missing to anyone who does not need a proof.
    row = next(r for r in await cat.all_chunks() if r.digest.hex == hx("x"))
    assert (row.state, row.size) == (LIVE, 5)
    probe = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "p" * 32)
    batch = await cat.append_stream(probe.id, 0, refs([("x", 5)]), T0, LATER, ROOMY)
    assert batch.missing == []
    # Its own listing still binds it: x was listed with size 6.
    with pytest.raises(BadRequest):
        await cat.append_stream(up.id, 1, refs([("x", 5)]), T0, LATER, ROOMY, tenant=B)
    # a proved x: it is told of its clash, and nothing is written.
    await cat.prove_chunk("a", dg("x"))
    mine = await cat.begin_stream(Algo.MD5, "", "", T0, LATER, "a" * 32, tenant=A, size=99)
    with pytest.raises(BadRequest):
        await cat.append_stream(mine.id, 0, refs([("x", 6)]), T0, LATER, ROOMY, tenant=A)
    assert await cat.manifest_page(mine.manifest_id, 0, 10) == []
    batch = await cat.append_stream(mine.id, 0, refs([("x", 5)]), T0, LATER, ROOMY, tenant=A)
    assert batch.missing == []


async def test_gc_retiring_a_chunk_drops_its_proofs(cat):
    store = Store()
    await publish(cat, store, "x")
    await cat.prove_chunk("a", dg("x"))
    marked = await cat.mark_garbage([hx("x")], T0 + 200, T0 + 50)
    assert [r.digest.hex for r in marked] == [hx("x")]
    await cat.retire_chunks([hx("x")], store.unlink)
    await publish(cat, store, "x", now=T0 + 300)  # stored again by someone else
    _up, missing = await cat.begin_upload(
        manifest(1, [("x", 1)]), "k", T0, LATER, "a" * 32, tenant=A
    )
    assert missing == [hx("x")]


# ---- reads ------------------------------------------------------------------------------------


async def test_manifest_reads_page_in_order(cat):
    chunks = [(i, 10 + i) for i in range(7)] + [(0, 10)]
    up, _ = await cat.begin_upload(manifest(1, chunks), "k", T0, LATER, "u" * 32)
    full = [(hx(t), s) for t, s in chunks]
    assert await cat.manifest_chunks(up.manifest_id) == full
    assert await cat.manifest_chunk_count(up.manifest_id) == 8
    pages = [await cat.manifest_page(up.manifest_id, start, 3) for start in (0, 3, 6, 9)]
    assert [list(map(tuple, p)) for p in pages] == [full[0:3], full[3:6], full[6:8], []]
    assert await cat.manifest_size_of(up.manifest_id, dg(3)) == 13
    assert await cat.manifest_size_of(up.manifest_id, dg("nope")) is None
    assert await cat.manifest_chunk_count(up.manifest_id + 1000) is None


async def test_file_chunks_page_gives_each_chunks_xxh3_or_none(cat):
    """The page GET .../chunks sends: the xxh3 recorded when the chunk was published; None
    for a chunk with no row, or with the empty one quarantine records for an unseen blob."""
    store = Store()
    await cat.publish_chunk(dg("a"), 1, "1" * 32, T0, store.place)
    await cat.publish_chunk(dg("b"), 2, "2" * 32, T0, store.place)
    chunks = [("a", 1), ("never", 3), ("b", 2), ("a", 1), ("unseen", 4)]
    up, _ = await cat.begin_upload(manifest(1, chunks), "k", T0, LATER, "u" * 32)

    async def set_aside(facts):
        return [(dg("unseen"), 4)]

    await cat.quarantine([hx("unseen")], T0, set_aside)
    pages = [await cat.file_chunks_page(up.manifest_id, start, 2) for start in (0, 2, 4, 6)]
    assert [list(map(tuple, p)) for p in pages] == [
        [(hx("a"), 1, "1" * 32), (hx("never"), 3, None)],
        [(hx("b"), 2, "2" * 32), (hx("a"), 1, "1" * 32)],
        [(hx("unseen"), 4, None)],
        [],
    ]


async def test_file_with_chunks_gives_the_file_and_its_list(cat):
    store = Store()
    for t in ("a", "b"):
        await publish(cat, store, t)
    up, _ = await cat.begin_upload(
        manifest(1, [("b", 1), ("a", 1), ("b", 1)]), "k", T0, LATER, "u" * 32
    )
    entry = await cat.register_file(up.id, T0)
    got = await cat.file_with_chunks(entry.digest)
    assert got is not None
    assert got[0] == entry
    assert [tuple(c) for c in got[1]] == [(hx("b"), 1), (hx("a"), 1), (hx("b"), 1)]
    assert await cat.file_with_chunks(dg("unknown")) is None


async def test_manifest_ids_are_never_reused(cat):
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, LATER, "u" * 32)
    assert await cat.drop_pending_upload(up.id)
    again, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, LATER, "v" * 32)
    assert again.manifest_id > up.manifest_id


# ---- quarantine ---------------------------------------------------------------------------------


async def test_quarantined_chunks_are_absent_and_damage_their_files(cat):
    store = Store()
    await publish(cat, store, "a")
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, LATER, "u" * 32)
    entry = await cat.register_file(up.id, T0)
    seen = {}

    async def decide(facts):
        seen.update(facts)
        return [(dg("a"), 1)]

    assert await cat.quarantine([hx("a")], T0, decide) == [(dg("a"), 1)]
    assert seen[hx("a")].row.state == LIVE
    assert [f.digest for f, _size in seen[hx("a")].files] == [entry.digest]
    assert not await cat.has_chunk(dg("a"))
    assert await cat.damaged(entry.manifest_id)
    facts, answer = await cat.chunk_users([hx("a")], T0, lambda f: _const(f))
    assert facts[hx("a")].row.state == QUARANTINED and answer == [hx("a")]
    assert await publish(cat, store, "a")  # a PUT heals it
    assert not await cat.damaged(entry.manifest_id)


async def _const(facts):
    return sorted(facts)


# ---- gc -----------------------------------------------------------------------------------------


async def test_gc_marks_only_unreferenced_old_chunks_and_retires_them(cat):
    store = Store()
    for t in ("used", "pending", "garbage"):
        await publish(cat, store, t, now=T0)
    await publish(cat, store, "young", now=T0 + 100)
    up, _ = await cat.begin_upload(manifest(1, [("used", 1)]), "k", T0, LATER, "f" * 32)
    await cat.register_file(up.id, T0)
    await cat.begin_upload(manifest(2, [("pending", 1)]), "k", T0, LATER, "p" * 32)
    now, cutoff = T0 + 200, T0 + 50
    planned = [r.digest.hex for r in await cat.garbage_chunks(now, cutoff)]
    assert planned == [hx("garbage")]
    every = [hx(t) for t in ("used", "pending", "garbage", "young")]
    marked = await cat.mark_garbage(every, now, cutoff)
    assert [r.digest.hex for r in marked] == [hx("garbage")]
    assert [r.state for r in marked] == [DELETING]
    assert [r.digest.hex for r in await cat.deleting_chunks()] == [hx("garbage")]
    assert not await cat.has_chunk(dg("garbage"))  # DELETING counts as absent
    retired = await cat.retire_chunks([hx("garbage")], store.unlink)
    assert [r.digest.hex for r in retired] == [hx("garbage")]
    assert hx("garbage") not in store.blobs
    assert await cat.deleting_chunks() == []
    await assert_invariant(cat, store)


async def test_gc_drops_expired_uploads_and_unused_manifests(cat):
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)]), "k", T0, T0 + 10, "u" * 32)
    keep, _ = await cat.begin_upload(manifest(2, [("b", 1)]), "k", T0, LATER, "k" * 32)
    assert await cat.expired_uploads(T0 + 20) == [(up.id, 1)]
    assert await cat.drop_expired_uploads([up.id, keep.id], T0 + 20) == (1, 1)
    assert await cat.get_upload(up.id) is None and await cat.get_upload(keep.id) is not None
    assert await cat.unused_manifests(T0 + 20) == []
    assert await cat.drop_unused_manifests([keep.manifest_id]) == 0


async def test_orphans_are_blobs_with_no_row_and_no_file(cat):
    store = Store()
    await publish(cat, store, "rowed")
    assert await cat.orphans([hx("rowed"), hx("lost")]) == {hx("lost")}
    got = []

    async def unlink(still):
        got.append(still)
        return len(still)

    assert await cat.retire_orphans([hx("rowed"), hx("lost")], unlink) == 1
    assert got == [{hx("lost")}]


async def test_quarantined_rows_nothing_uses_are_forgotten(cat):
    async def decide(_facts):
        return [(dg("q"), 1)]

    await cat.quarantine([hx("q")], T0, decide)
    assert await cat.unused_quarantined(T0) == 1
    assert await cat.drop_unused_quarantined(T0) == 1
    assert await cat.all_chunks() == []


# ---- the digest lock: publish racing gc on two connections ------------------------------------


async def test_a_publish_racing_retire_waits_and_puts_the_blob_back(cat, other):
    """gc (on `other`) is inside retire's locked section, the blob already unlinked; a publish
    of the same digest must wait for it, then find the row gone and place the blob again."""
    store = Store()
    await publish(cat, store, "x", now=T0)
    await other.mark_garbage([hx("x")], T0 + 100, T0 + 50)
    inside, release = asyncio.Event(), asyncio.Event()

    async def slow_unlink(rows):
        await store.unlink(rows)
        inside.set()
        await asyncio.wait_for(release.wait(), WAIT)

    gc = asyncio.create_task(other.retire_chunks([hx("x")], slow_unlink))
    await asyncio.wait_for(inside.wait(), WAIT)
    racer = asyncio.create_task(publish(cat, store, "x", now=T0 + 101))
    done, _ = await asyncio.wait({racer}, timeout=0.5)
    assert not done, "publish committed while gc held the digest lock"
    release.set()
    assert [r.digest.hex for r in await asyncio.wait_for(gc, WAIT)] == [hx("x")]
    assert await asyncio.wait_for(racer, WAIT) is True
    assert hx("x") in store.blobs and await cat.has_chunk(dg("x"))
    await assert_invariant(cat, store)


async def test_a_retire_racing_a_revival_skips_the_revived_chunk(cat, other):
    """A publish (on `cat`) revives a DELETING chunk and is held inside its locked section;
    gc's retire must wait, then leave the now live row and its blob alone."""
    store = Store()
    await publish(cat, store, "x", now=T0)
    await other.mark_garbage([hx("x")], T0 + 100, T0 + 50)
    inside, release = asyncio.Event(), asyncio.Event()

    async def slow_place(d):
        await store.place(d)
        inside.set()
        await asyncio.wait_for(release.wait(), WAIT)

    reviving = asyncio.create_task(cat.publish_chunk(dg("x"), 1, "x" * 32, T0 + 101, slow_place))
    await asyncio.wait_for(inside.wait(), WAIT)
    unlinked = []

    async def unlink(rows):
        unlinked.extend(rows)
        await store.unlink(rows)

    gc = asyncio.create_task(other.retire_chunks([hx("x")], unlink))
    done, _ = await asyncio.wait({gc}, timeout=0.5)
    assert not done, "retire ran while a publish held the digest lock"
    release.set()
    assert await asyncio.wait_for(reviving, WAIT) is True
    assert await asyncio.wait_for(gc, WAIT) == [] and unlinked == []
    assert hx("x") in store.blobs
    await assert_invariant(cat, store)


# ---- hook queue -----------------------------------------------------------------------------------


def hook_events(kind: str, max_rows: int = 100) -> HookEvents:
    """Events for receivers u1 and u2 whose body is the file's digest."""
    return HookEvents(
        lambda e: [("u1", kind, e.digest.hex), ("u2", kind, e.digest.hex)], T0, max_rows
    )


async def queued(cat, url: str) -> list[tuple[str, str]]:
    return [(kind, body) for _id, kind, body in await cat.hook_events(url, 10)]


async def test_hook_events_commit_with_the_registration_and_deletion_only(cat):
    store = Store()
    await publish(cat, store, "a")
    up, _ = await cat.begin_upload(manifest(1, [("a", 1), ("b", 1)]), "k", T0, LATER, "u" * 32)
    failed = hook_events("file.completed")
    with pytest.raises(Incomplete):
        await cat.register_file(up.id, T0, failed)
    assert await cat.register_file("z" * 32, T0, failed) is None
    assert failed.queued == 0 and await cat.count_hook_events() == 0
    await publish(cat, store, "b")
    assert await cat.register_file(up.id, T0) is not None  # no events: none queued
    assert await cat.count_hook_events() == 0
    up2, _ = await cat.begin_upload(manifest(2, [("a", 1)]), "k", T0, LATER, "v" * 32)
    done = hook_events("file.completed")
    entry = await cat.register_file(up2.id, T0, done)
    assert (done.queued, done.dropped) == (2, 0)
    assert await queued(cat, "u1") == [("file.completed", entry.digest.hex)]
    again = hook_events("file.completed")  # a repeated merge answers; it registers nothing
    assert await cat.register_file(up2.id, T0 + 1, again) == entry
    assert again.queued == 0 and await cat.count_hook_events() == 2
    deleted = hook_events("file.deleted")
    assert await cat.delete_file(entry.digest, deleted)
    assert deleted.queued == 2
    assert await queued(cat, "u2") == [
        ("file.completed", entry.digest.hex),
        ("file.deleted", entry.digest.hex),
    ]
    unknown = hook_events("file.deleted")
    assert not await cat.delete_file(entry.digest, unknown)
    assert unknown.queued == 0 and await cat.count_hook_events() == 4


async def test_a_refused_registration_queues_no_event(cat):
    store = Store()
    await publish(cat, store, "a")
    await publish(cat, store, "b")
    first, _ = await cat.begin_upload(manifest(3, [("a", 1)]), "k", T0, LATER, "u" * 32)
    await cat.register_file(first.id, T0)
    # Same digest, another size: refused after the upload was flipped to merged, which the
    # refusal rolls back together with any event.
    clash, _ = await cat.begin_upload(manifest(3, [("a", 1), ("b", 1)]), "k", T0, LATER, "v" * 32)
    with pytest.raises(FileDigestMismatch):
        await cat.register_file(clash.id, T0, hook_events("file.completed"))
    assert await cat.count_hook_events() == 0
    assert (await cat.get_upload(clash.id)).state == "pending"


async def test_hook_queue_keeps_order_and_drops_the_oldest_when_full(cat):
    store = Store()
    await publish(cat, store, "a")
    entries = []
    for i in range(2):
        up, _ = await cat.begin_upload(manifest(i, [("a", 1)]), "k", T0, LATER, f"{i}" * 32)
        events = hook_events("file.completed", max_rows=3)
        entries.append(await cat.register_file(up.id, T0, events))
    assert (events.queued, events.dropped) == (2, 1)
    assert await cat.count_hook_events() == 3
    first, second = (e.digest.hex for e in entries)
    events = await cat.hook_events("u1", 10)
    assert [e[2] for e in events] == [second]  # u1's event of the first, the oldest, dropped
    await cat.hook_event_done(events[0][0])
    await cat.hook_event_done(events[0][0])  # gone already: no error
    assert await cat.hook_events("u1", 10) == []
    assert [e[2] for e in await cat.hook_events("u2", 10)] == [first, second]


async def test_stats_and_listings(cat):
    store = Store()
    await publish(cat, store, "a")
    up, _ = await cat.begin_upload(manifest(1, [("a", 1)], "one"), "k", T0, LATER, "u" * 32)
    entry = await cat.register_file(up.id, T0)
    pending, _ = await cat.begin_upload(manifest(2, [("b", 4)]), "k", T0, LATER, "p" * 32, "me")
    counts = await cat.stats_counts(T0)
    assert counts["files"] == 1 and counts["chunks"] == 1 and counts["pending_uploads"] == 1
    assert counts["pending_bytes"] == 4 and counts["physical_bytes"] == 1
    assert await cat.list_files() == [entry]
    [p] = await cat.pending_uploads()
    assert (p.id, p.entries, p.client) == (pending.id, 1, "me")
    assert await cat.abort_uploads([pending.id, "nope"]) == [pending.id]
    assert await cat.count_expired_pending(LATER + 1) == 0
    await cat.ping()
