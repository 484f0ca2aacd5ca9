"""Durability shared between concurrent uploads: folder fsyncs grouped (FolderSync), a chunk's
file and folders durable before the catalogue row that publishes it commits."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from casd.blobstore import local
from casd.blobstore.local import FolderSync
from casd.web import create_app
from helpers import prepare, rand, record_durability, record_read_back


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.001)


class GatedFsync:
    """Records each fsync; the first one waits for `release` (and fails when told to)."""

    def __init__(self, fail_first: bool = False):
        self.calls: list[Path] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_first = fail_first
        self._lock = threading.Lock()

    def __call__(self, folder: Path) -> None:
        with self._lock:
            self.calls.append(folder)
            first = len(self.calls) == 1
        if first:
            self.entered.set()
            assert self.release.wait(10)
            if self.fail_first:
                raise OSError(5, "injected I/O error")


def waiting(folders: FolderSync, folder: Path) -> int:
    state = folders._folders.get(folder)
    return 0 if state is None else state.users


def test_callers_that_arrive_during_an_fsync_share_the_next_one(tmp_path):
    fsync = GatedFsync()
    folders = FolderSync(fsync)
    returned: list[int] = []

    def sync(n: int) -> None:
        folders.sync(tmp_path)
        returned.append(n)

    first = threading.Thread(target=sync, args=(0,))
    first.start()
    assert fsync.entered.wait(10)
    # Their entries were made after the running fsync began: it does not cover them.
    later = [threading.Thread(target=sync, args=(n,)) for n in range(1, 9)]
    for t in later:
        t.start()
    wait_until(lambda: waiting(folders, tmp_path) == 9, "eight callers waiting")
    assert returned == []
    fsync.release.set()
    for t in [first, *later]:
        t.join(10)
    assert sorted(returned) == list(range(9))
    assert fsync.calls == [tmp_path, tmp_path]  # one for the first, one shared by eight
    assert folders._folders == {}
    folders.sync(tmp_path)  # alone: its own fsync at once
    assert len(fsync.calls) == 3


def test_a_failed_fsync_fails_its_caller_and_the_waiters_run_their_own(tmp_path):
    fsync = GatedFsync(fail_first=True)
    folders = FolderSync(fsync)
    errors: list[BaseException] = []

    def sync() -> None:
        try:
            folders.sync(tmp_path)
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=sync)
    first.start()
    assert fsync.entered.wait(10)
    later = [threading.Thread(target=sync) for _ in range(4)]
    for t in later:
        t.start()
    wait_until(lambda: waiting(folders, tmp_path) == 5, "four callers waiting")
    fsync.release.set()
    for t in [first, *later]:
        t.join(10)
    assert len(errors) == 1  # only the caller whose fsync failed
    assert len(fsync.calls) == 2


async def test_a_new_chunk_is_durable_before_the_row_that_publishes_it_commits(
    aiohttp_client, settings, monkeypatch
):
    """The temp file, the blob's folder and both fan-out folders above it are fsynced before
    the transaction that marks the chunk live commits (docs/design.md, 'What is fsynced
    before what')."""
    events = record_durability(monkeypatch)
    client = await aiohttp_client(create_app(settings))
    p = prepare(rand(1000), 1000)
    r = await client.post("/v1/handshake", json=p.handshake)
    uid = (await r.json())["upload_id"]
    digest = p.order[0]
    events.clear()
    r = await client.put(f"/v1/uploads/{uid}/chunks/{digest}", data=p.chunks[digest])
    assert r.status == 201, await r.text()
    commit = next(i for i, e in enumerate(events) if e[0] == "commit" and "publish" in e[1])
    before = events[:commit]
    leaf = settings.data_dir / "blobs" / "md5" / digest[:2] / digest[2:4]
    assert [e[0] for e in before].count("file") == 1
    for folder in (leaf, leaf.parent, leaf.parent.parent):
        assert ("folder", str(folder)) in before, (folder, events)
    assert (leaf / digest).is_file()


async def test_concurrent_chunks_in_fresh_fan_out_folders_are_all_durable(
    aiohttp_client, settings, monkeypatch
):
    """Many chunks at once, sharing fsyncs: every new entry, a blob's link or a fan-out
    folder on its way, is followed by an fsync of the folder that holds it. (Two of the 16
    digests may share a fan-out folder, for 1 seed in about 550, e.g. CASD_TEST_SEED=208:
    the second blob's link then needs only its own folder synced again.)"""
    n = 16
    synced: list[tuple[str, float]] = []
    linked: dict[str, float] = {}
    made: dict[str, float] = {}
    real_link = local.os.link
    real_mkdir = Path.mkdir
    tick = iter(range(1 << 30))

    def fsync_dir(folder: Path) -> None:
        synced.append((str(folder), next(tick)))

    def link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        linked[str(dst)] = next(tick)

    def mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        made[str(self)] = next(tick)

    monkeypatch.setattr(local, "fsync_dir", fsync_dir)
    monkeypatch.setattr(local.os, "link", link)
    client = await aiohttp_client(create_app(settings))
    monkeypatch.setattr(Path, "mkdir", mkdir)  # from here on: the fan-out folders
    p = prepare(rand(n * 1000), 1000)
    r = await client.post("/v1/handshake", json=p.handshake)
    uid = (await r.json())["upload_id"]

    async def put(d: str) -> int:
        r = await client.put(f"/v1/uploads/{uid}/chunks/{d}", data=p.chunks[d])
        return r.status

    assert await asyncio.gather(*(put(d) for d in p.order)) == [201] * n
    assert len(linked) == n
    assert {str(Path(dst).parent) for dst in linked} <= set(made)  # fresh: made by casd
    for entry, at in {**made, **linked}.items():
        folder = str(Path(entry).parent)
        assert any(f == folder and t > at for f, t in synced), (entry, folder)


async def test_a_chunk_sent_in_tiny_pieces_is_stored_exactly(aiohttp_client, settings):
    """The ingest path keeps the body's pieces as they come and writes them with one writev
    per block; a body arriving in thousands of small pieces (joined now and then) and one
    in a few big ones are stored byte for byte."""
    client = await aiohttp_client(create_app(settings))
    data = rand(3 << 20)
    p = prepare(data, len(data))
    r = await client.post("/v1/handshake", json=p.handshake)
    uid = (await r.json())["upload_id"]
    digest = p.order[0]

    async def tiny():
        for i in range(0, len(data), 997):
            yield data[i : i + 997]
            await asyncio.sleep(0)  # let the server take each piece on its own

    r = await client.put(
        f"/v1/uploads/{uid}/chunks/{digest}",
        data=tiny(),
        headers={"Content-Length": str(len(data))},
    )
    assert r.status == 201, await r.text()
    blob = settings.data_dir / "blobs" / "md5" / digest[:2] / digest[2:4] / digest
    assert blob.read_bytes() == data
    r = await client.post(f"/v1/uploads/{uid}/merge")
    assert r.status == 200, await r.text()


async def test_chunks_sent_in_order_are_hashed_for_the_file_as_they_arrive(
    aiohttp_client, settings, monkeypatch
):
    """A chunk that is the next one the whole-file hash needs is fed to it while it streams
    in: merge verifies the file without reading any chunk back. A chunk whose bytes are
    wrong leaves that hash as it was: sent again right, the file merges."""

    read_back = record_read_back(monkeypatch)
    client = await aiohttp_client(create_app(settings))
    p = prepare(rand(6 * 1000), 1000)
    r = await client.post("/v1/handshake", json=p.handshake)
    uid = (await r.json())["upload_id"]
    for n, digest in enumerate(p.order):
        if n == 3:
            wrong = bytes(len(p.chunks[digest]))
            r = await client.put(f"/v1/uploads/{uid}/chunks/{digest}", data=wrong)
            assert r.status == 422, await r.text()
        r = await client.put(f"/v1/uploads/{uid}/chunks/{digest}", data=p.chunks[digest])
        assert r.status == 201, await r.text()
    r = await client.post(f"/v1/uploads/{uid}/merge")
    assert r.status == 200, await r.text()
    assert read_back == []
    r = await client.get(f"/v1/files/{p.handshake['md5']}")
    assert await r.read() == b"".join(p.chunks[d] for d in p.order)


async def test_a_chunk_arriving_while_hash_ahead_looks_is_still_hashed_as_it_streams(
    aiohttp_client, settings, monkeypatch
):
    """Each PUT starts a background hash-ahead. Held at its first catalogue read until the
    next chunk's PUT has decided whether to feed the file's hash, it must not keep that
    chunk from doing so: merge then reads no chunk back."""
    from casd.web import SERVICE

    read_back = record_read_back(monkeypatch)
    client = await aiohttp_client(create_app(settings))
    service = client.server.app[SERVICE]
    decided = asyncio.Event()
    held: set[asyncio.Task] = set()
    real_follow = service._follow_in_order
    real_page = service.catalog.manifest_page

    async def follow_in_order(upload, digest):
        got = await real_follow(upload, digest)
        decided.set()
        return got

    async def manifest_page(manifest_id, start, count):
        task = asyncio.current_task()
        if task in service._background and task not in held:
            held.add(task)
            decided.clear()
            await decided.wait()
        return await real_page(manifest_id, start, count)

    monkeypatch.setattr(service, "_follow_in_order", follow_in_order)
    monkeypatch.setattr(service.catalog, "manifest_page", manifest_page)
    p = prepare(rand(4 * 1000), 1000)
    r = await client.post("/v1/handshake", json=p.handshake)
    uid = (await r.json())["upload_id"]
    for digest in p.order:
        r = await client.put(f"/v1/uploads/{uid}/chunks/{digest}", data=p.chunks[digest])
        assert r.status == 201, await r.text()
    assert len(held) >= len(p.order) - 1, "the hash-aheads were not held: no race was driven"
    decided.set()
    r = await client.post(f"/v1/uploads/{uid}/merge")
    assert r.status == 200, await r.text()
    assert read_back == []
